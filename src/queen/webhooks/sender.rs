//! The queens' webhook sender: a shared consumer of the delivery queue, so each attempt is made by one
//! queen. An attempt POSTs the delivery's body, signed anew, through a client that resolves hosts under the
//! address policy, follows no redirect, has no proxy, gives up after `--webhook-timeout` and reads at most
//! [`MAX_RESPONSE_BYTES`] of the answer. A 2xx answer acknowledges the delivery and counts it in the job's
//! status; anything else hands it back with the next backoff, until `--webhook-retry-for` has passed since it
//! was queued: then it is recorded in the job's status as a dead letter and leaves the queue.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};

use super::plan::Delivery;
use super::policy::{check_literal, PolicyResolver};
use super::{Webhooks, MAX_RESPONSE_BYTES};
use crate::api::{
    JobStatus, WebhookDeadLetter, WebhookEvent, WebhookSecret, WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
};
use crate::bus;
use crate::protocol;
use crate::queen::status::{StatusStore, StatusTooLarge};

/// Attempts in flight per queen.
const CONCURRENCY: usize = 32;
/// Attempts in flight per queen to one receiver (host and port) that answers slowly or not at all (an
/// attempt took half the timeout or more, lately), or that has not answered lately: it holds no more than
/// these of the queen's slots.
pub const PER_SLOW_RECEIVER: usize = 4;
/// Attempts in flight per queen to all the receivers that are slow or not heard from lately, together: the
/// others are kept for receivers that answer (many that hang, such as one dead server's subdomains, would
/// otherwise hold every slot, four each).
const SUSPECT_SLOTS: usize = CONCURRENCY / 2;
/// The slots no one receiver takes, however well it answers: kept for the others' deliveries (a receiver
/// that stops answering holds all it has until its attempts time out).
const KEPT_FOR_OTHERS: usize = 4;
/// How long a receiver is taken for slow after a slow attempt, and for one that answers in time after it did.
const SLOW_FOR: Duration = Duration::from_secs(120);
/// How much of a failed attempt's answer its error keeps.
const ERROR_SNIPPET_BYTES: usize = 200;
/// How long a `progress` delivery is retried at most (the others: `--webhook-retry-for`).
pub const PROGRESS_RETRY_FOR: Duration = Duration::from_secs(600);
/// How long, past its retries, a dead letter is tried to be recorded in a status that cannot take it now.
const RECORD_DEAD_LETTER_FOR: u64 = 600_000;

/// Sends deliveries until the process ends; binds the queue again and goes on after errors. A queen without
/// a secret sends nothing (the queens that have one do).
pub async fn run(webhooks: Webhooks, status: StatusStore) {
    if webhooks.config.secrets.is_empty() {
        return;
    }
    let client = match client(&webhooks) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot make the webhook client: no webhooks are sent");
            return;
        }
    };
    loop {
        if let Err(e) = send_due(&webhooks, &status, &client).await {
            tracing::warn!(error = %format!("{e:#}"), "the webhook sender stopped; resuming");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = webhooks.queue.bind().await {
                tracing::debug!(error = %e, "cannot bind the webhook stream yet");
            }
        }
    }
}

fn client(webhooks: &Webhooks) -> anyhow::Result<reqwest::Client> {
    let config = &webhooks.config;
    Ok(reqwest::Client::builder()
        .dns_resolver(PolicyResolver(Arc::new(config.policy.clone())))
        // A proxy would connect where the policy never looked; a redirect would lead anywhere.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .user_agent(concat!("sd-rbee-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

async fn send_due(webhooks: &Webhooks, status: &StatusStore, client: &reqwest::Client) -> anyhow::Result<()> {
    let (mut consumer, mut messages) = webhooks.messages(CONCURRENCY).await?;
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let receivers = Receivers::default();
    // Attempts in flight end with this loop (a stopping queen's are made again by the next one).
    let mut attempts = tokio::task::JoinSet::new();
    loop {
        let permit = permits.clone().acquire_owned().await?;
        while attempts.try_join_next().is_some() {}
        let msg = bus::next_message(&mut consumer, &mut messages, Duration::from_secs(5)).await?;
        let (webhooks, status, client, receivers) =
            (webhooks.clone(), status.clone(), client.clone(), receivers.clone());
        attempts.spawn(async move {
            let _permit = permit;
            if let Err(e) = attempt(&webhooks, &status, &client, &receivers, msg).await {
                tracing::warn!(error = %format!("{e:#}"), "a webhook attempt could not be settled");
            }
        });
    }
}

/// The attempts in flight to each receiver (host and port), and until when it is taken for slow, or for one
/// that answers in time.
#[derive(Clone, Default)]
struct Receivers(Arc<std::sync::Mutex<ReceiversState>>);

#[derive(Default)]
struct ReceiversState {
    by_receiver: std::collections::HashMap<String, ReceiverState>,
    /// Attempts in flight that were taken for suspect receivers (slow, or not heard from lately).
    suspect_in_flight: usize,
}

#[derive(Default)]
struct ReceiverState {
    /// When each attempt in flight started.
    in_flight: Vec<std::time::Instant>,
    slow_until: Option<std::time::Instant>,
    answered_until: Option<std::time::Instant>,
}

impl ReceiverState {
    fn remembered(&self, now: std::time::Instant) -> bool {
        let until = |t: Option<std::time::Instant>| t.is_some_and(|t| t > now);
        !self.in_flight.is_empty() || until(self.slow_until) || until(self.answered_until)
    }
}

/// One of a receiver's slots, given back when dropped.
struct ReceiverSlot {
    receivers: Receivers,
    receiver: String,
    started: std::time::Instant,
    suspect: bool,
}

impl Receivers {
    /// A slot for an attempt to `receiver` at `now`, or `Err(slow)` when it has its share in flight. A
    /// receiver is slow for [`SLOW_FOR`] after an attempt took `patience` or more, and while one has been
    /// in flight that long (a receiver that never answers is found out before its first attempt ends). It
    /// has the full share only for [`SLOW_FOR`] after an attempt took less: until its first answer, a
    /// receiver not heard from lately gets a slow one's, so one that hangs from the start never holds more
    /// (two would otherwise take every slot for a whole timeout). All such receivers together hold at most
    /// [`SUSPECT_SLOTS`].
    fn try_take(&self, receiver: &str, now: std::time::Instant, patience: Duration) -> Result<ReceiverSlot, bool> {
        let mut all = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let suspects = all.suspect_in_flight;
        let state = all.by_receiver.entry(receiver.to_string()).or_default();
        let hung = state.in_flight.iter().any(|&started| now.saturating_duration_since(started) >= patience);
        let slow = hung || state.slow_until.is_some_and(|until| until > now);
        let suspect = slow || state.answered_until.is_none_or(|until| until <= now);
        let share = if suspect { PER_SLOW_RECEIVER } else { CONCURRENCY - KEPT_FOR_OTHERS };
        if state.in_flight.len() >= share || (suspect && suspects >= SUSPECT_SLOTS) {
            return Err(slow);
        }
        state.in_flight.push(now);
        all.suspect_in_flight += usize::from(suspect);
        Ok(ReceiverSlot { receivers: self.clone(), receiver: receiver.to_string(), started: now, suspect })
    }

    /// An attempt to `receiver` ended at `now`, after `took`: one that took `patience` or more (answered
    /// slowly or not at all) gives it a slow receiver's share for a while, one quicker the full share.
    fn attempted(&self, receiver: &str, now: std::time::Instant, took: Duration, patience: Duration) {
        let mut all = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = all.by_receiver.entry(receiver.to_string()).or_default();
        match took >= patience {
            true => state.slow_until = Some(now + SLOW_FOR),
            false => state.answered_until = Some(now + SLOW_FOR),
        }
    }
}

impl Drop for ReceiverSlot {
    fn drop(&mut self) {
        let now = std::time::Instant::now();
        let mut all = self.receivers.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.suspect_in_flight -= usize::from(self.suspect);
        if let Some(state) = all.by_receiver.get_mut(&self.receiver) {
            if let Some(i) = state.in_flight.iter().position(|&s| s == self.started) {
                state.in_flight.swap_remove(i);
            }
        }
        // Receivers with nothing in flight and not heard from lately are forgotten.
        all.by_receiver.retain(|_, s| s.remembered(now));
    }
}

/// The receiver a delivery goes to: its URL's host (lowercase, without a trailing dot) and port (the URL
/// itself when it does not read).
fn receiver_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("").trim_end_matches('.');
            format!("{host}:{}", u.port_or_known_default().unwrap_or(0))
        }
        Err(_) => url.to_string(),
    }
}

/// How often an attempt in progress tells the queue so.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// One attempt at a delivery, and what becomes of it.
async fn attempt(
    webhooks: &Webhooks,
    status: &StatusStore,
    client: &reqwest::Client,
    receivers: &Receivers,
    msg: jetstream::Message,
) -> anyhow::Result<()> {
    let delivery: Delivery = match serde_json::from_slice(&msg.payload) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "an unreadable webhook delivery dropped");
            return msg.ack_with(AckKind::Term).await.map_err(|e| anyhow::anyhow!("term: {e}"));
        }
    };
    let config = &webhooks.config;
    let attempt = msg.info().map(|i| i.delivered).unwrap_or(1).clamp(1, u32::MAX as i64) as u32;
    let retry_for = match delivery.event {
        // A step's progress is stale long before a day has passed.
        WebhookEvent::Progress => config.retry_for.min(PROGRESS_RETRY_FOR),
        _ => config.retry_for,
    };
    let give_up_at = delivery.queued_at.saturating_add(retry_for.as_millis() as u64);
    // A receiver with its share in flight: the delivery waits its turn, put back (for about as long as an
    // attempt can take when the receiver is slow, a moment otherwise), instead of holding one of the slots
    // other receivers' deliveries need. (Each time counts in a dead letter's `attempts`.)
    let receiver = receiver_of(&delivery.url);
    let (job_id, id) = (delivery.job_id, delivery.id.as_str());
    let posted = match receivers.try_take(&receiver, std::time::Instant::now(), config.timeout / 2) {
        Ok(slot) => {
            // The ack timer starts again with the attempt (the message may have waited for a free slot).
            msg.ack_with(AckKind::Progress).await.map_err(|e| anyhow::anyhow!("progress: {e}"))?;
            let started = std::time::Instant::now();
            // And again while it lasts: the queue's ack wait was set by the queen that created it, perhaps
            // with a shorter --webhook-timeout, and a delivery redelivered mid-attempt is POSTed twice at once.
            let posting = post(client, &config.secrets, &config.policy, &delivery);
            tokio::pin!(posting);
            let mut still = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
            let posted = loop {
                tokio::select! {
                    posted = &mut posting => break posted,
                    _ = still.tick() => {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            };
            drop(slot);
            receivers.attempted(&receiver, std::time::Instant::now(), started.elapsed(), config.timeout / 2);
            posted
        }
        // Its retries are over while its receiver keeps every slot it may have busy: dead-lettered unsent. (A
        // last attempt outside the receiver's share would let one receiver's backlog take every sender slot.)
        Err(_) if protocol::now_millis() >= give_up_at => {
            Err("not sent: the receiver's earlier deliveries held its share of attempts until the retries ran out"
                .into())
        }
        Err(slow) => {
            let wait = match slow {
                true => config.timeout.max(Duration::from_secs(1)),
                false => Duration::from_millis(500 + rand::random::<u64>() % 500),
            };
            return msg.ack_with(AckKind::Nak(Some(wait))).await.map_err(|e| anyhow::anyhow!("nak: {e}"));
        }
    };
    let ack = match posted {
        Ok(()) => {
            tracing::debug!(%job_id, id, attempt, "webhook delivered");
            msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            let counted = |s: &mut JobStatus| s.webhook.as_mut().map(|w| w.delivered += 1).is_some();
            if let Err(e) = status.update(job_id, || JobStatus::unknown(job_id, 0), counted).await {
                tracing::debug!(%job_id, error = %e, "cannot count a webhook delivery in the job's status");
            }
            return Ok(());
        }
        Err(error) => {
            let error = sanitized(&error);
            let now = protocol::now_millis();
            let waited = Duration::from_millis(now.saturating_sub(delivery.queued_at));
            let wait = config.backoff_after(attempt, waited);
            if now.saturating_add(wait.as_millis() as u64) <= give_up_at {
                tracing::info!(%job_id, id, attempt, %error, retry_in = ?wait, "webhook attempt failed");
                AckKind::Nak(Some(wait))
            } else {
                let letter = WebhookDeadLetter {
                    id: delivery.id.clone(),
                    event: delivery.event,
                    attempts: attempt,
                    queued_at: delivery.queued_at,
                    last_attempt_at: now,
                    last_error: error.clone(),
                };
                let record = |s: &mut JobStatus| s.webhook.as_mut().is_some_and(|w| w.dead_lettered(letter.clone()));
                match status.update(job_id, || JobStatus::unknown(job_id, 0), record).await {
                    Ok(_) => {
                        tracing::warn!(%job_id, id, attempt, %error, "webhook delivery given up on (dead-lettered)");
                        AckKind::Term
                    }
                    // Given up on once the job's status says so, unless it never can: a record too large, or
                    // one that could not be written for long.
                    Err(e) if e.is::<StatusTooLarge>() || now > give_up_at.saturating_add(RECORD_DEAD_LETTER_FOR) => {
                        tracing::error!(%job_id, id, attempt, %error, record_error = %e, "webhook delivery given up on; the job's status does not show it");
                        AckKind::Term
                    }
                    Err(e) => {
                        tracing::warn!(%job_id, error = %e, "cannot record a dead webhook delivery yet");
                        AckKind::Nak(Some(wait))
                    }
                }
            }
        }
    };
    msg.ack_with(ack).await.map_err(|e| anyhow::anyhow!("ack: {e}"))
}

/// POSTs a delivery; Ok when its receiver answered 2xx, else what it answered or why there was no answer.
async fn post(
    client: &reqwest::Client,
    secrets: &[WebhookSecret],
    policy: &super::AddressPolicy,
    delivery: &Delivery,
) -> Result<(), String> {
    let url = url::Url::parse(&delivery.url).map_err(|e| format!("the URL no longer reads: {e}"))?;
    check_literal(policy, &url)?;
    let timestamp = protocol::now_millis() / 1000;
    let signature = WebhookSecret::header(secrets, &delivery.id, timestamp, delivery.body.as_bytes());
    let mut response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(WEBHOOK_ID_HEADER, &delivery.id)
        .header(WEBHOOK_TIMESTAMP_HEADER, timestamp.to_string())
        .header(WEBHOOK_SIGNATURE_HEADER, signature)
        .body(delivery.body.clone())
        .send()
        .await
        // The URL (its query may hold a receiver's token) is the job's, not for errors and logs.
        .map_err(|e| with_causes(&e.without_url()))?;
    let code = response.status();
    // The answer is read up to the cap (and within the timeout); the rest is never read.
    let mut head = Vec::new();
    while head.len() < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) if code.is_success() => {
                tracing::debug!(error = %with_causes(&e.without_url()), "a webhook answer was cut short");
                break;
            }
            Err(e) => return Err(format!("the receiver answered {code}, then: {}", with_causes(&e.without_url()))),
        }
    }
    if code.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head[..head.len().min(ERROR_SNIPPET_BYTES)]).trim().to_string();
    Err(if text.is_empty() {
        format!("the receiver answered {code}")
    } else {
        format!("the receiver answered {code}: {text}")
    })
}

/// An error as the job's status keeps it: no control characters (a receiver's answer is anyone's text), at
/// most twice [`ERROR_SNIPPET_BYTES`].
fn sanitized(error: &str) -> String {
    let clean: String = error.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    protocol::truncate(&clean, 2 * ERROR_SNIPPET_BYTES).to_string()
}

/// An error with its causes, each once (reqwest's own message leaves out why the connection failed).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queen::webhooks::AddressPolicy;

    fn delivery(url: &str) -> Delivery {
        Delivery {
            id: "k".into(),
            job_id: uuid::Uuid::nil(),
            event: WebhookEvent::Completed,
            url: url.into(),
            body: "{}".into(),
            queued_at: 0,
        }
    }

    #[tokio::test]
    async fn the_policy_holds_on_every_connection_not_only_at_submit() {
        let policy = AddressPolicy::default();
        let client = reqwest::Client::builder()
            .dns_resolver(PolicyResolver(Arc::new(policy.clone())))
            .no_proxy()
            .build()
            .unwrap();
        let secrets = ["a-secret-of-16-bytes-or-more".parse().unwrap()];
        // Nothing listens there: a refusal that reached the network would read "connection refused".
        for (url, why) in [
            ("http://127.0.0.1:9/hook?token=abc", "loopback"),
            ("http://localhost:9/hook?token=abc", "loopback"),
            ("http://[fd00::1]:9/hook", "unique local"),
        ] {
            let err = post(&client, &secrets, &policy, &delivery(url)).await.unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("token=abc"), "errors leave the URL out: {err}");
        }
    }

    #[test]
    fn each_receiver_gets_its_share_of_the_slots() {
        let receivers = Receivers::default();
        let now = std::time::Instant::now();
        let patience = Duration::from_secs(5);
        let slow = receiver_of("https://Slow.example./hook?x=1");
        assert_eq!(slow, receiver_of("https://slow.example:443/other"), "one receiver: host and port");
        assert_ne!(slow, receiver_of("http://slow.example/hook"));
        let take = |receiver: &str, at, n| -> Vec<_> {
            (0..n).map(|_| receivers.try_take(receiver, at, patience).expect("within its share")).collect()
        };
        // Not heard from yet: a slow receiver's share, until it answers in time.
        let held = take(&slow, now, PER_SLOW_RECEIVER);
        assert_eq!(receivers.try_take(&slow, now, patience).err(), Some(false), "its first share is taken");
        drop(held);
        receivers.attempted(&slow, now, patience / 10, patience);
        // A receiver that answers: all slots but those kept for the others.
        let held = take(&slow, now, CONCURRENCY - KEPT_FOR_OTHERS);
        assert_eq!(receivers.try_take(&slow, now, patience).err(), Some(false), "its share is taken");
        assert!(receivers.try_take(&receiver_of("https://other.example/"), now, patience).is_ok(), "another's is not");
        // Attempts in flight for the patience make it slow at once: a slow receiver's share.
        let later = now + patience;
        assert_eq!(receivers.try_take(&slow, later, patience).err(), Some(true));
        drop(held);
        assert!(receivers.try_take(&slow, later, patience).is_ok(), "none in flight, none slow");
        // Once an attempt took long, a slow receiver's share, for a while.
        receivers.attempted(&slow, now, patience, patience);
        let held = take(&slow, now, PER_SLOW_RECEIVER);
        assert_eq!(receivers.try_take(&slow, now, patience).err(), Some(true));
        drop(held);
        assert_eq!(receivers.0.lock().unwrap().by_receiver.len(), 1, "kept while slow");
        // Not slow for good; nor taken to answer, after a while: the first share again.
        let after = now + SLOW_FOR;
        let held = take(&slow, after, PER_SLOW_RECEIVER);
        assert_eq!(receivers.try_take(&slow, after, patience).err(), Some(false));
        drop(held);
        let others = Receivers::default();
        drop(others.try_take(&slow, now, patience).unwrap());
        assert!(others.0.lock().unwrap().by_receiver.is_empty(), "with nothing in flight, not heard from: forgotten");
    }

    #[test]
    fn receivers_that_are_slow_or_unheard_share_half_the_slots() {
        let receivers = Receivers::default();
        let now = std::time::Instant::now();
        let patience = Duration::from_secs(5);
        let answering = receiver_of("https://answers.example/");
        receivers.attempted(&answering, now, patience / 10, patience);
        // Subdomains of one server that hangs: each a new receiver, four slots each, half the slots together.
        let hanging: Vec<_> = (0..SUSPECT_SLOTS / PER_SLOW_RECEIVER)
            .flat_map(|n| {
                let receiver = receiver_of(&format!("https://s{n}.hangs.example/"));
                (0..PER_SLOW_RECEIVER)
                    .map(|_| receivers.try_take(&receiver, now, patience).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(hanging.len(), SUSPECT_SLOTS);
        let another = receiver_of("https://more.hangs.example/");
        assert_eq!(receivers.try_take(&another, now, patience).err(), Some(false), "the suspects' slots are taken");
        let held: Vec<_> = (0..CONCURRENCY - SUSPECT_SLOTS)
            .map(|_| receivers.try_take(&answering, now, patience).expect("a receiver that answers is not held up"))
            .collect();
        drop(hanging);
        assert!(receivers.try_take(&another, now, patience).is_ok(), "given back as they end");
        drop(held);
        assert_eq!(receivers.0.lock().unwrap().suspect_in_flight, 0);
    }

    #[test]
    fn errors_kept_in_the_status_are_plain_and_bounded() {
        let kept = sanitized(&format!("the receiver answered 500: \u{1b}[31m{}\n", "x".repeat(10_000)));
        assert!(kept.len() <= 2 * ERROR_SNIPPET_BYTES && !kept.contains('\u{1b}') && !kept.contains('\n'));
    }
}
