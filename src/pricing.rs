//! Model prices and the cost of a usage, in integer micro-dollars.
//!
//! Invariant: a model name resolves to at most one price; dated snapshots
//! (`gpt-4o-mini-2024-07-18`) resolve to their base entry (`gpt-4o-mini`) unless the snapshot
//! has an entry of its own.

use std::sync::Arc;

use crate::maps::FastMap;
use crate::usage::Usage;

/// USD per one million tokens, kept as micro-dollars per million tokens so that the arithmetic
/// stays in integers: `$0.15 / 1M` is `150_000` micro-dollars per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl Price {
    /// Cost of `usage` in micro-dollars, rounded to the nearest micro-dollar.
    /// Cached input is part of input and billed at the cached rate.
    pub fn cost_micro_usd(&self, usage: &Usage) -> u64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let fresh = usage.input_tokens - cached;
        let per_million = u128::from(fresh) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
            + u128::from(usage.output_tokens) * u128::from(self.output);
        let micro = (per_million + 500_000) / 1_000_000;
        u64::try_from(micro).unwrap_or(u64::MAX)
    }
}

/// Micro-dollars as dollars with six decimals: `1_234_567` -> `1.234567`.
pub fn format_usd(micro: u64) -> String {
    // Per request (a response header, the log line): itoa rather than the formatting machinery.
    let mut text = String::with_capacity(28);
    text.push_str(itoa::Buffer::new().format(micro / 1_000_000));
    text.push('.');
    let mut fraction = itoa::Buffer::new();
    let fraction = fraction.format(micro % 1_000_000);
    text.push_str("000000".get(fraction.len()..).unwrap_or_default());
    text.push_str(fraction);
    text
}

#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// Model name -> (label, price). The label is the entry's own name: a bounded metric label.
    models: FastMap<Arc<str>, Price>,
    /// Charged for a model with no entry.
    pub fallback: Price,
}

/// A model name resolved against the table.
#[derive(Debug, Clone)]
pub struct Priced {
    /// The table entry's name, when there is one.
    pub entry: Option<Arc<str>>,
    pub price: Price,
}

impl Pricing {
    pub fn new(models: FastMap<Arc<str>, Price>, fallback: Price) -> Self {
        Pricing { models, fallback }
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.models.keys()
    }

    /// The entry for `model`: exact, else with a trailing `-YYYY-MM-DD` or `-MMDD` snapshot
    /// suffix removed.
    pub fn entry(&self, model: &str) -> Option<(&Arc<str>, &Price)> {
        if let Some(found) = self.models.get_key_value(model) {
            return Some(found);
        }
        let base = strip_snapshot(model)?;
        self.models.get_key_value(base)
    }

    pub fn resolve(&self, model: &str) -> Priced {
        match self.entry(model) {
            Some((name, price)) => Priced {
                entry: Some(name.clone()),
                price: *price,
            },
            None => Priced {
                entry: None,
                price: self.fallback,
            },
        }
    }
}

/// `gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`; `gpt-4-0613` -> `gpt-4`.
fn strip_snapshot(model: &str) -> Option<&str> {
    let bytes = model.as_bytes();
    let is_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    // -YYYY-MM-DD
    if bytes.len() > 11 {
        let (base, tail) = model.split_at(model.len() - 11);
        let t = tail.as_bytes();
        if t[0] == b'-'
            && is_digits(&t[1..5])
            && t[5] == b'-'
            && is_digits(&t[6..8])
            && t[8] == b'-'
            && is_digits(&t[9..11])
        {
            return Some(base);
        }
    }
    // -MMDD
    if bytes.len() > 5 {
        let (base, tail) = model.split_at(model.len() - 5);
        let t = tail.as_bytes();
        if t[0] == b'-' && is_digits(&t[1..5]) {
            return Some(base);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Pricing {
        let mut models = FastMap::default();
        models.insert(
            Arc::from("gpt-4o-mini"),
            Price {
                input: 150_000,
                cached_input: 75_000,
                output: 600_000,
            },
        );
        Pricing::new(
            models,
            Price {
                input: 1,
                cached_input: 1,
                output: 1,
            },
        )
    }

    #[test]
    fn usd_has_six_decimals() {
        for (micro, text) in [
            (0, "0.000000"),
            (29, "0.000029"),
            (1_234_567, "1.234567"),
            (25_000_000, "25.000000"),
            (u64::MAX, "18446744073709.551615"),
        ] {
            assert_eq!(format_usd(micro), text);
        }
    }

    #[test]
    fn snapshots_resolve_to_their_base_entry() {
        let pricing = table();
        let priced = pricing.resolve("gpt-4o-mini-2024-07-18");
        assert_eq!(priced.entry.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(priced.price.input, 150_000);
        assert!(pricing.resolve("gpt-4o").entry.is_none());
        assert!(pricing.resolve("gpt-4o-mini-x").entry.is_none());
    }

    #[test]
    fn cost_bills_cached_input_at_its_own_rate() {
        let price = table().resolve("gpt-4o-mini").price;
        let usage = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 400_000,
            output_tokens: 1_000_000,
            reasoning_tokens: 0,
        };
        // 600k fresh * 0.15 + 400k cached * 0.075 + 1M out * 0.60 = 0.09 + 0.03 + 0.60 USD
        assert_eq!(price.cost_micro_usd(&usage), 720_000);
    }
}
