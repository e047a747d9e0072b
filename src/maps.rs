//! The maps the request path reads: std's and dashmap's, with foldhash instead of SipHash.
//!
//! Invariant: every key inserted into these maps comes from the config or from a bounded set
//! (pricing entries, allowlist names, a credential's name), never from a client, so flooding
//! them with colliding keys is not possible; clients only look up. The hasher is still seeded
//! per process.

/// A fast, per-process seeded hasher.
pub type Hasher = foldhash::fast::RandomState;

pub type FastMap<K, V> = std::collections::HashMap<K, V, Hasher>;

pub type ConcurrentMap<K, V> = dashmap::DashMap<K, V, Hasher>;
