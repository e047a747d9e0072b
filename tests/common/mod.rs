//! Helpers shared by tollgate's integration tests. Each test binary uses only some of them, and
//! test helpers may unwrap: a failed setup is a failed test.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod harness;
pub mod mock_upstream;
