//! Signed webhooks: a job's `webhook` asks for its events to be POSTed to a URL. The aggregator plans a
//! delivery for each event asked for and queues it durably on JetStream before acknowledging the event; the
//! queens' shared sender POSTs each one, signed, retries it with backoff for `--webhook-retry-for`, then
//! gives up on it and records it in the job's status (`webhook.dead_letters`). A queen or receiver that
//! restarts loses nothing: a delivery leaves the queue only once its receiver answered 2xx or it was
//! dead-lettered. Each attempt at one event carries the same idempotency key (`webhook-id`).
//!
//! # Layout
//!
//! - this file: [`WebhookConfig`] and [`Webhooks`]: the queue (stream `SD_WEBHOOKS`), the checks of a
//!   submission's webhook;
//! - `plan`: which events become deliveries, their keys and bodies, progress throttled (pure);
//! - `policy`: the allow/deny policy on the addresses deliveries go to;
//! - `sender`: the queens' sender: POST, sign, retry with backoff, dead-letter.

pub mod plan;
pub mod policy;
pub mod sender;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};

use super::work_queue::WorkQueue;
use crate::api::{WebhookSecret, WebhookSpec};
use crate::protocol::{ProtocolError, Subjects};
pub use plan::{Delivery, Planner};
pub use policy::AddressPolicy;
use policy::HostError;

/// Why a submission's webhook is not taken.
#[derive(Debug, thiserror::Error)]
pub enum WebhookCheckError {
    /// The request's fault (422).
    #[error(transparent)]
    Invalid(#[from] ProtocolError),
    /// Its host was not looked up in time: every lookup place is taken, or the resolver is slow (503; a
    /// later try may pass).
    #[error("{0}")]
    NotKnownYet(String),
}

/// The queens' shared consumer of the deliveries.
pub const SENDER_CONSUMER: &str = "queen-webhooks";

/// How webhooks are sent. Every queen of a fleet should have the same.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// What deliveries are signed with (each gives a signature: several while a secret is rotated). None:
    /// submissions with a webhook are refused.
    pub secrets: Vec<WebhookSecret>,
    pub policy: AddressPolicy,
    /// The longest one attempt may take, connecting and reading the answer included.
    pub timeout: Duration,
    /// How long a delivery is retried before it is given up on (counted from when it was queued).
    pub retry_for: Duration,
    /// The wait before the first retry; it doubles with each failed attempt, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// The least time between two progress deliveries of a job.
    pub progress_interval: Duration,
}

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The most bytes of a receiver's answer read (the rest is never read).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secrets: Vec::new(),
            policy: AddressPolicy::default(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(24 * 3600),
            backoff: Duration::from_secs(1),
            progress_interval: Duration::from_secs(2),
        }
    }
}

impl WebhookConfig {
    /// The wait after failed attempt number `attempt` (1-based) of a delivery queued `waited` ago: `backoff`
    /// doubled each time, capped, and never longer than the delivery has waited (at least `backoff`), with up
    /// to 10 % of jitter so receivers that failed together are not retried together. (`attempt` is the queue's
    /// delivery count, which also counts each time the delivery was put back for a busy receiver: after 25 of
    /// those, one failure would otherwise wait the 10-minute cap, and a progress delivery be given up.)
    pub fn backoff_after(&self, attempt: u32, waited: Duration) -> Duration {
        let doubled = self.backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let wait = doubled.min(MAX_BACKOFF).min(waited.max(self.backoff));
        wait + wait.mul_f64(rand::random::<f64>() * 0.1)
    }
}

/// A fleet's webhook queue and configuration; cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    pub(super) queue: WorkQueue,
    pub config: Arc<WebhookConfig>,
}

impl Webhooks {
    /// Binds (creating if needed) the delivery queue of the fleet under `subjects`.
    pub async fn open(js: &jetstream::Context, subjects: &Subjects, config: WebhookConfig) -> anyhow::Result<Self> {
        // An event applied again after a queen stopped mid-way queues its delivery once.
        let (description, window) = ("sd-rbee queens: webhook deliveries to send", Duration::from_secs(600));
        let queue = WorkQueue::open(js, subjects.webhooks_stream(), subjects.webhooks(), description, window).await?;
        Ok(Self { queue, config: Arc::new(config) })
    }

    /// Checks a submission's webhook: this queen sends webhooks, the URL is an http(s) URL, and every
    /// address its host resolves to is allowed. Errors name the field; a host not looked up in time is
    /// [`WebhookCheckError::NotKnownYet`] (a later try may pass).
    pub async fn check(&self, spec: &mut WebhookSpec) -> Result<(), WebhookCheckError> {
        if self.config.secrets.is_empty() {
            return Err(WebhookCheckError::Invalid(ProtocolError::invalid(
                "webhook",
                "this queen sends no webhooks: it has no --webhook-secret (SD_RBEE_WEBHOOK_SECRET)",
            )));
        }
        let url = spec.normalize()?;
        let host = url.host().ok_or_else(|| ProtocolError::invalid("webhook.url", "has no host"))?;
        let port = url.port_or_known_default().unwrap_or(443);
        self.config.policy.check_host(&host, port).await.map_err(|e| match e {
            HostError::Refused(e) => WebhookCheckError::Invalid(ProtocolError::invalid("webhook.url", e)),
            HostError::NotKnownYet(e) => WebhookCheckError::NotKnownYet(format!("`webhook.url`: {e}")),
        })
    }

    /// Queues a delivery (once per idempotency key within the stream's duplicate window).
    pub async fn enqueue(&self, delivery: &Delivery) -> anyhow::Result<()> {
        let payload = bytes::Bytes::from(serde_json::to_vec(delivery)?);
        self.queue.publish(&delivery.id, payload).await.context("cannot queue a webhook delivery")
    }

    /// The queens' shared consumer of the queue, and its messages fetched `batch` at a time. An attempt that
    /// outlives its ack wait is made again (by this or another queen).
    pub(super) async fn messages(
        &self,
        batch: usize,
    ) -> anyhow::Result<(consumer::PullConsumer, consumer::pull::Stream)> {
        let ack_wait = self.config.timeout + Duration::from_secs(30);
        self.queue.consume(SENDER_CONSUMER, "sd-rbee queens: webhook sender", ack_wait, Some(batch)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = WebhookConfig { backoff: Duration::from_secs(1), ..Default::default() };
        let long_ago = Duration::from_secs(3600);
        for (attempt, base) in [(1, 1), (2, 2), (3, 4), (10, 512), (11, 600), (40, 600)] {
            let wait = config.backoff_after(attempt, long_ago);
            let base = Duration::from_secs(base);
            assert!(wait >= base && wait <= base.mul_f64(1.1), "attempt {attempt}: {wait:?}");
        }
        // Put back 25 times for a busy receiver in its first 20 s, then failed once: not the cap.
        let wait = config.backoff_after(26, Duration::from_secs(20));
        assert!(wait >= Duration::from_secs(20) && wait <= Duration::from_secs(22), "{wait:?}");
        let wait = config.backoff_after(1, Duration::ZERO);
        assert!(wait >= Duration::from_secs(1), "never under the backoff: {wait:?}");
    }
}
