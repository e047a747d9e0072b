//! Rate limits per project and model (requests per minute, tokens per minute, requests per
//! day), as OpenAI applies them to projects. Pure: no I/O, no locks.
//!
//! Each limit is a GCRA (generic cell rate algorithm) meter in one `AtomicU64`: the
//! "theoretical arrival time" at which the meter is empty again. A request of cost `n` moves it
//! `n` emission intervals ahead; it is refused when that would put it more than one window
//! ahead of now. Invariant: over any window the admitted cost never exceeds the limit plus one
//! window's burst, which is OpenAI's own behaviour (a full minute's quota may be used at once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One limit: `limit` units per `window`.
#[derive(Debug)]
pub struct Gcra {
    limit: u64,
    window_nanos: u64,
    /// Nanoseconds per unit: `window / limit`.
    interval_nanos: u64,
    /// Theoretical arrival time, in nanoseconds since the limiter's epoch.
    tat: AtomicU64,
}

/// What a meter says after a decision, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    /// Until the meter is back to its full limit.
    pub reset: Duration,
}

/// A refusal: how long until the request would fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub standing: Standing,
    pub retry_after: Duration,
}

impl Gcra {
    pub fn new(limit: u64, window: Duration) -> Self {
        let limit = limit.max(1);
        let window_nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Gcra {
            limit,
            window_nanos,
            interval_nanos: (window_nanos / limit).max(1),
            tat: AtomicU64::new(0),
        }
    }

    pub fn per_minute(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    pub fn per_day(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(86_400))
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn standing_at(&self, tat: u64, now: u64) -> Standing {
        let ahead = tat.saturating_sub(now);
        let used = ahead.div_ceil(self.interval_nanos);
        Standing {
            limit: self.limit,
            remaining: self.limit.saturating_sub(used),
            reset: Duration::from_nanos(ahead),
        }
    }

    /// Takes `cost` units at `now` (nanoseconds on the caller's monotonic clock) or refuses.
    pub fn take(&self, cost: u64, now: u64) -> Result<Standing, Refused> {
        let step = cost.saturating_mul(self.interval_nanos);
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let start = current.max(now);
            let next = start.saturating_add(step);
            if next.saturating_sub(now) > self.window_nanos && cost > 0 {
                let standing = self.standing_at(current, now);
                let retry_after = next.saturating_sub(now).saturating_sub(self.window_nanos);
                return Err(Refused {
                    standing,
                    retry_after: Duration::from_nanos(retry_after),
                });
            }
            // AcqRel: a decision must see every earlier take and publish its own.
            match self
                .tat
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(self.standing_at(next, now)),
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back `cost` units taken earlier (an estimate that was too high).
    pub fn give_back(&self, cost: u64, now: u64) {
        let step = cost.saturating_mul(self.interval_nanos);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(step).max(now.min(tat)))
            });
    }

    /// Charges `cost` more units without refusing (usage above its estimate).
    pub fn charge(&self, cost: u64, now: u64) {
        let step = cost.saturating_mul(self.interval_nanos);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now).saturating_add(step))
            });
    }

    pub fn standing(&self, now: u64) -> Standing {
        self.standing_at(self.tat.load(Ordering::Acquire), now)
    }
}

/// Nanoseconds on a monotonic clock shared by every meter of the process.
pub fn now_nanos() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    // Offset by a day so that a fresh meter (TAT 0) is empty from the first call on.
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(86_400 * 1_000_000_000)
}

/// The meters of one rate-limit rule of a project.
#[derive(Debug)]
pub struct RuleMeters {
    pub rpm: Option<Gcra>,
    pub tpm: Option<Gcra>,
    pub rpd: Option<Gcra>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    RequestsPerMinute,
    TokensPerMinute,
    RequestsPerDay,
}

impl Limited {
    /// OpenAI's words for the limit, as in "on requests per min (RPM)".
    pub fn describe(self) -> &'static str {
        match self {
            Limited::RequestsPerMinute => "requests per min (RPM)",
            Limited::TokensPerMinute => "tokens per min (TPM)",
            Limited::RequestsPerDay => "requests per day (RPD)",
        }
    }

    /// OpenAI's error `type` for it.
    pub fn kind(self) -> &'static str {
        match self {
            Limited::TokensPerMinute => "tokens",
            Limited::RequestsPerMinute | Limited::RequestsPerDay => "requests",
        }
    }
}

/// The standing of a rule after an admission, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
}

impl RuleMeters {
    pub fn new(rpm: Option<u64>, tpm: Option<u64>, rpd: Option<u64>) -> Self {
        RuleMeters {
            rpm: rpm.map(Gcra::per_minute),
            tpm: tpm.map(Gcra::per_minute),
            rpd: rpd.map(Gcra::per_day),
        }
    }

    /// Takes one request and `tokens` from every meter, or none of them.
    pub fn admit(&self, tokens: u64, now: u64) -> Result<Headers, (Limited, Refused)> {
        let mut headers = Headers::default();
        if let Some(rpd) = &self.rpd {
            rpd.take(1, now)
                .map_err(|refused| (Limited::RequestsPerDay, refused))?;
        }
        if let Some(rpm) = &self.rpm {
            match rpm.take(1, now) {
                Ok(standing) => headers.requests = Some(standing),
                Err(refused) => {
                    if let Some(rpd) = &self.rpd {
                        rpd.give_back(1, now);
                    }
                    return Err((Limited::RequestsPerMinute, refused));
                }
            }
        }
        if let Some(tpm) = &self.tpm {
            match tpm.take(tokens, now) {
                Ok(standing) => headers.tokens = Some(standing),
                Err(refused) => {
                    if let Some(rpd) = &self.rpd {
                        rpd.give_back(1, now);
                    }
                    if let Some(rpm) = &self.rpm {
                        rpm.give_back(1, now);
                    }
                    return Err((Limited::TokensPerMinute, refused));
                }
            }
        }
        Ok(headers)
    }

    /// Corrects the tokens taken at admission once the real usage is known.
    pub fn settle_tokens(&self, estimated: u64, actual: u64, now: u64) {
        if let Some(tpm) = &self.tpm {
            if actual > estimated {
                tpm.charge(actual - estimated, now);
            } else {
                tpm.give_back(estimated - actual, now);
            }
        }
    }
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `120ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    let h = (secs / 3600.0).floor() as u64;
    let m = ((secs - h as f64 * 3600.0) / 60.0).floor() as u64;
    let s = secs - h as f64 * 3600.0 - m as f64 * 60.0;
    let s = if s.fract() < 0.001 {
        format!("{}", s.trunc() as u64)
    } else {
        format!("{s:.3}").trim_end_matches('0').to_owned()
    };
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn admits_a_full_window_then_refuses_until_it_drains() {
        let rpm = Gcra::per_minute(60);
        let t0 = 1_000 * SEC;
        for i in 0..60 {
            let standing = rpm.take(1, t0).unwrap();
            assert_eq!(standing.remaining, 59 - i);
        }
        let refused = rpm.take(1, t0).unwrap_err();
        assert_eq!(refused.standing.remaining, 0);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        // One interval later one more fits.
        assert!(rpm.take(1, t0 + SEC).is_ok());
        assert!(rpm.take(1, t0 + SEC).is_err());
        // A full window later the meter is back to its limit.
        assert_eq!(rpm.standing(t0 + 61 * SEC).remaining, 60);
    }

    #[test]
    fn token_costs_and_corrections() {
        let tpm = Gcra::per_minute(1_000);
        let t0 = 5 * SEC;
        assert_eq!(tpm.take(600, t0).unwrap().remaining, 400);
        assert!(tpm.take(500, t0).is_err(), "600 + 500 > 1000");
        tpm.give_back(300, t0);
        assert_eq!(tpm.standing(t0).remaining, 700);
        tpm.charge(100, t0);
        assert_eq!(tpm.standing(t0).remaining, 600);
    }

    #[test]
    fn contended_takes_never_pass_the_limit() {
        let rpm = Gcra::per_minute(1_000);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        if rpm.take(1, 42 * SEC).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    }

    #[test]
    fn formats_resets_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(120)), "120ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(3_723)), "1h2m3s");
    }
}
