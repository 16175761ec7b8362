//! Per-token submission rates (`submit_rate=N/s|N/min|N/h` on a `--token-file` line): how many jobs a token
//! may queue, refilled evenly over the period with a burst of N, through every way in (the native API,
//! OpenAI's, AUTOMATIC1111's). Taken once a submission has passed every check and is a new job (a retry
//! that an idempotency key maps to its job takes none); past it, `429 RATE_LIMITED` with `Retry-After`. Each
//! queen keeps its own count: behind a load balancer of K queens a token may submit up to K times its rate.
//!
//! `governor`'s GCRA limiter keeps one small state per token, made at the token's first submission.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

/// How many jobs a token may submit per period (as a burst, refilled evenly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubmitRate {
    pub jobs: NonZeroU32,
    pub per: Duration,
}

impl SubmitRate {
    /// `N/s`, `N/min` or `N/h`, N from 1 to 1,000,000.
    pub fn parse(text: &str) -> Result<Self, String> {
        let wrong = || format!("{text:?} is not a rate: N/s, N/min or N/h, N from 1 to 1000000 (e.g. 30/min)");
        let (jobs, unit) = text.split_once('/').ok_or_else(wrong)?;
        let jobs: u32 = jobs.parse().map_err(|_| wrong())?;
        let jobs = NonZeroU32::new(jobs).filter(|n| n.get() <= 1_000_000).ok_or_else(wrong)?;
        let per = match unit {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(wrong()),
        };
        Ok(Self { jobs, per })
    }

    /// The unit of `per` as written.
    fn unit(self) -> &'static str {
        match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        }
    }

    fn quota(self) -> Quota {
        // At least a microsecond between jobs (1,000,000/s): never a zero period, which governor refuses.
        let every = (self.per / self.jobs.get()).max(Duration::from_micros(1));
        Quota::with_period(every).expect("a period of at least 1 µs").allow_burst(self.jobs)
    }
}

impl std::fmt::Display for SubmitRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.jobs, self.unit())
    }
}

/// The submission limiters of the tokens that have a rate, by caller and rate (a token given another rate
/// when the token file is read again starts afresh at it).
#[derive(Clone, Default)]
pub struct SubmitRates(Arc<Mutex<Limiters>>);

type Limiters = HashMap<(String, SubmitRate), Arc<DefaultDirectRateLimiter>>;

impl SubmitRates {
    /// Takes one submission of `caller` at `rate`, or says how long until the next one is allowed.
    pub fn take(&self, caller: &str, rate: SubmitRate) -> Result<(), Duration> {
        let limiter = self
            .0
            .lock()
            .entry((caller.to_string(), rate))
            .or_insert_with(|| Arc::new(RateLimiter::direct(rate.quota())))
            .clone();
        limiter.check().map_err(|not_until| not_until.wait_time_from(governor::clock::Clock::now(limiter.clock())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_a_token_submits_its_burst_then_waits() {
        let rate = SubmitRate::parse("3/min").unwrap();
        assert_eq!((rate.jobs.get(), rate.per, rate.to_string()), (3, Duration::from_secs(60), "3/min".into()));
        assert_eq!(SubmitRate::parse("1/h").unwrap().per, Duration::from_secs(3600));
        assert_eq!(SubmitRate::parse("1000000/s").unwrap().quota().replenish_interval(), Duration::from_micros(1));
        for bad in ["", "3", "0/s", "-1/s", "3/day", "3/ min", "1000001/s", "x/s"] {
            assert!(SubmitRate::parse(bad).unwrap_err().contains("not a rate"), "{bad:?}");
        }
        let rates = SubmitRates::default();
        for _ in 0..3 {
            rates.take("a", rate).unwrap();
        }
        let wait = rates.take("a", rate).unwrap_err();
        // One job's share of the minute, less the moments the three took.
        assert!(wait > Duration::from_secs(19) && wait <= Duration::from_secs(20), "{wait:?}");
        rates.take("b", rate).expect("another token has its own");
    }
}
