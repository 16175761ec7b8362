//! The NATS side shared by the worker, the queen and the client: connecting (reconnecting for ever once
//! connected), the per-model job consumers, and publishing with the headers the protocol asks for; the
//! JetStream streams of `docs/PROTOCOL.md` are in `streams.rs`, and [`BusClient`] (`client.rs`) is what
//! submitters use.

mod client;
mod streams;

pub use client::{stored_cancel, BusClient, MAX_STORED_EVENT_BYTES};
pub use streams::{ensure_streams, max_deliveries_subject, StreamSettings, ADVISORY_CONSUMER, MAX_STORED_CANCELS};

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use uuid::Uuid;

use crate::protocol::{self, Subjects, MSG_ID_HEADER};
use crate::vocab::Priority;

/// A NATS URL (or a comma-separated list of them) split into the servers and the credentials they carry:
/// `nats://USER:PASSWORD@host:4222` or `nats://TOKEN@host:4222`, as the other NATS clients take them (percent-
/// encode `@ : / , # ?` in them). One set of credentials serves every server of the list. async-nats ignores
/// credentials in URLs, so they are passed as options, and `shown` is the URL without them, for messages and
/// logs; no error here quotes the URL itself.
#[derive(PartialEq)]
pub struct NatsUrl {
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    pub shown: String,
}

#[derive(PartialEq)]
pub enum NatsAuth {
    None,
    Token(String),
    UserPassword(String, String),
}

// By hand, so that no `{:?}` ever prints a password.
impl std::fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsUrl").field("shown", &self.shown).field("auth", &self.auth).finish()
    }
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NatsAuth::None => "None",
            NatsAuth::Token(_) => "Token(…)",
            NatsAuth::UserPassword(..) => "UserPassword(…)",
        })
    }
}

impl NatsUrl {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut servers = Vec::new();
        let mut auth = NatsAuth::None;
        let entries: Vec<&str> = text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        for (i, server) in entries.iter().enumerate() {
            let which =
                if entries.len() > 1 { format!("entry {} of the NATS URL", i + 1) } else { "the NATS URL".into() };
            // A bare host:port is a nats:// address, as async-nats takes it.
            let with_scheme = if server.contains("://") { server.to_string() } else { format!("nats://{server}") };
            // The URL's own error, not the URL: it may hold a password.
            let mut parsed =
                url::Url::parse(&with_scheme).map_err(|e| anyhow::anyhow!("{which} does not parse: {e}"))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                bail!("{which} names no host");
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                if parsed.username().is_empty() {
                    bail!("{which} has a password but no user (nats://USER:PASSWORD@host, or nats://TOKEN@host)");
                }
                let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
                let user = decode(parsed.username());
                auth = match parsed.password() {
                    Some(password) => NatsAuth::UserPassword(user, decode(password)),
                    None => NatsAuth::Token(user),
                };
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
            }
            servers.push(parsed.to_string().trim_end_matches('/').to_string());
        }
        if servers.is_empty() {
            bail!("the NATS URL is empty");
        }
        Ok(Self { shown: servers.join(","), servers, auth })
    }
}

/// Connects to `url` as `name`. The first connection must succeed within `timeout` (an error names the
/// URL, without its credentials); afterwards the client reconnects on its own for as long as the process runs.
pub async fn connect(url: &str, name: &str, timeout: Duration) -> anyhow::Result<async_nats::Client> {
    let NatsUrl { servers, auth, shown } = NatsUrl::parse(url)?;
    let opts = match auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token),
        NatsAuth::UserPassword(user, password) => async_nats::ConnectOptions::with_user_and_password(user, password),
    };
    let servers: Vec<async_nats::ServerAddr> = servers
        .iter()
        .map(|s| s.parse().with_context(|| format!("{s:?} is not a NATS URL")))
        .collect::<anyhow::Result<_>>()?;
    let opts = opts
        .name(name)
        .max_reconnects(None)
        .connection_timeout(timeout.min(Duration::from_secs(10)))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(2000)))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    let started = std::time::Instant::now();
    loop {
        match opts.clone().connect(servers.as_slice()).await {
            Ok(client) => return Ok(client),
            Err(e) if started.elapsed() < timeout => {
                tracing::debug!(url = %shown, error = %e, "NATS not reachable yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot connect to NATS at {shown}")),
        }
    }
}

/// How a model's job consumer redelivers.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// A job not acked (or progress-acked) within this is redelivered to another worker.
    pub ack_wait: Duration,
    /// Deliveries before a job is given up on (dead-lettered).
    pub max_deliver: i64,
    /// Jobs of this model in flight across the fleet, per priority (each priority's consumer has its own).
    pub max_ack_pending: i64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: protocol::JOBS_MAX_DELIVER as i64,
            max_ack_pending: 1024,
        }
    }
}

/// The durable name of `model`'s (normal-priority) job consumer, shared by every worker that serves the model.
pub fn consumer_name(model: &str) -> String {
    priority_consumer_name(model, Priority::Normal)
}

/// The durable name of `model`'s job consumer at `priority`: `workers-<model>` (normal, the name it had
/// before priorities), `high-workers-<model>`, `low-workers-<model>`. The prefixes differ, so a name maps
/// back to one model whatever characters model names use ([`parse_consumer_name`]).
pub fn priority_consumer_name(model: &str, priority: Priority) -> String {
    match priority {
        Priority::Normal => format!("workers-{model}"),
        other => format!("{}-workers-{model}", other.as_str()),
    }
}

/// Whether a consumer lookup failed because there is no such consumer (or stream), which answers the
/// question, rather than because NATS could not be asked.
pub fn consumer_missing(e: &async_nats::jetstream::context::ConsumerInfoError) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as Kind;
    match e.kind() {
        Kind::NotFound | Kind::InvalidName | Kind::StreamNotFound => true,
        Kind::JetStream(j) => j.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// The model and priority of a job consumer's name.
pub fn parse_consumer_name(name: &str) -> Option<(&str, Priority)> {
    let (model, priority) = if let Some(model) = name.strip_prefix("high-workers-") {
        (model, Priority::High)
    } else if let Some(model) = name.strip_prefix("low-workers-") {
        (model, Priority::Low)
    } else {
        (name.strip_prefix("workers-")?, Priority::Normal)
    };
    protocol::validate_model_name(model).ok().map(|_| (model, priority))
}

/// Creates (or updates to `settings`) the durable pull consumer of `model`'s jobs at `priority`.
pub async fn jobs_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    model: &str,
    priority: Priority,
    settings: &ConsumerSettings,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js.get_stream(subjects.jobs_stream()).await.context("cannot bind the jobs stream")?;
    let config = jobs_consumer_config(subjects, model, priority, settings)?;
    // The consumer is the fleet's, not this worker's: workers that give it other settings take turns
    // overwriting each other's, and each times its in-progress acks and its last delivery by its own.
    if let Ok(existing) = stream.consumer_info(priority_consumer_name(model, priority)).await {
        let theirs = &existing.config;
        if (theirs.ack_wait, theirs.max_deliver) != (config.ack_wait, config.max_deliver) {
            tracing::warn!(
                consumer = %existing.name, their_ack_wait = ?theirs.ack_wait, their_max_deliver = theirs.max_deliver,
                our_ack_wait = ?config.ack_wait, our_max_deliver = config.max_deliver,
                "the job consumer had other settings (another worker's --ack-wait or --max-deliver): give every worker of a fleet the same"
            );
        }
    }
    stream
        .create_consumer(config)
        .await
        .with_context(|| format!("cannot create the {} job consumer of model {model}", priority.as_str()))
}

/// A model's job consumers, highest priority first.
pub async fn jobs_consumers(
    js: &jetstream::Context,
    subjects: &Subjects,
    model: &str,
    settings: &ConsumerSettings,
) -> anyhow::Result<[consumer::PullConsumer; 3]> {
    let [high, normal, low] = Priority::ALL;
    Ok([
        jobs_consumer(js, subjects, model, high, settings).await?,
        jobs_consumer(js, subjects, model, normal, settings).await?,
        jobs_consumer(js, subjects, model, low, settings).await?,
    ])
}

fn jobs_consumer_config(
    subjects: &Subjects,
    model: &str,
    priority: Priority,
    settings: &ConsumerSettings,
) -> anyhow::Result<consumer::pull::Config> {
    Ok(consumer::pull::Config {
        durable_name: Some(priority_consumer_name(model, priority)),
        description: Some(format!("sd-rbee workers serving {model}, {} priority", priority.as_str())),
        filter_subject: subjects.jobs_at(model, priority)?,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    })
}

/// Creates `model`'s job consumer with the default settings unless it exists (one that exists keeps the
/// settings its workers gave it). The queen does this for its catalogue: an autoscaler (KEDA's
/// `nats-jetstream` scaler) reads a model's queue from this consumer, so it must exist before any worker
/// does for a fleet to scale up from zero.
pub async fn ensure_jobs_consumer(js: &jetstream::Context, subjects: &Subjects, model: &str) -> anyhow::Result<()> {
    let stream = js.get_stream(subjects.jobs_stream()).await.context("cannot bind the jobs stream")?;
    for priority in Priority::ALL {
        let config = jobs_consumer_config(subjects, model, priority, &ConsumerSettings::default())?;
        match stream.create_consumer_strict(config).await {
            Ok(_) => {}
            Err(e) if e.kind() == stream::ConsumerCreateStrictErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create the {} job consumer of model {model}", priority.as_str()))
            }
        }
    }
    Ok(())
}

/// The next message of an endless `messages()` stream. Such a stream can go quiet instead of failing when its
/// consumer is deleted or the server comes back without its store, so after `quiet` without a message this
/// asks the server whether the consumer still exists, and fails if it does not (the caller binds it again).
pub async fn next_message(
    consumer: &mut consumer::PullConsumer,
    messages: &mut consumer::pull::Stream,
    quiet: Duration,
) -> anyhow::Result<jetstream::Message> {
    loop {
        match tokio::time::timeout(quiet, messages.next()).await {
            Ok(Some(message)) => return message.map_err(|e| anyhow::anyhow!("{e}")),
            Ok(None) => anyhow::bail!("the consumer's message stream ended"),
            Err(_) => {
                consumer.info().await.context("the consumer is gone")?;
            }
        }
    }
}

/// [`stored_messages_until`] with no end but the last stored message, and no bound (for tests and tools).
pub async fn stored_messages(
    stream: &stream::Stream,
    filter_subject: String,
    deliver_policy: consumer::DeliverPolicy,
) -> anyhow::Result<Vec<jetstream::Message>> {
    stored_messages_until(stream, filter_subject, deliver_policy, usize::MAX, |_| false).await
}

/// The messages of `stream` that `filter_subject` and `deliver_policy` select, as stored now (does not wait
/// for more), through an ordered consumer, ending early with the first message `last` says ends what is
/// wanted, or once the messages read take `max_bytes` ([`held_bytes`]: what one reader keeps in memory is
/// bounded, however many tiny messages anyone published). It reads until a message says none is pending
/// after it, so messages added or replaced while it reads (a KV update moves a key to the stream's end) are
/// included rather than counted in place of others; a read that stalls for `STORED_READ_STALL` is an error.
pub async fn stored_messages_until(
    stream: &stream::Stream,
    filter_subject: String,
    deliver_policy: consumer::DeliverPolicy,
    max_bytes: usize,
    last: impl Fn(&jetstream::Message) -> bool,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let name = stream.cached_info().config.name.clone();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig { filter_subject, deliver_policy, ..Default::default() })
        .await
        .with_context(|| format!("cannot read stream {name}"))?;
    // The count is anyone's to choose: room is made as messages come, not for all of them at once.
    let mut out = Vec::with_capacity(consumer.cached_info().num_pending.min(64) as usize);
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    let mut bytes = 0usize;
    loop {
        let message = match tokio::time::timeout(STORED_READ_STALL, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => anyhow::bail!("cannot read stream {name}: {e}"),
            Ok(None) => anyhow::bail!("cannot read stream {name}: the consumer ended"),
            Err(_) => anyhow::bail!("reading stream {name} stalled (messages expired or removed while read)"),
        };
        let none_after = message.info().map(|i| i.pending == 0).unwrap_or(true);
        let ends = last(&message);
        bytes = bytes.saturating_add(held_bytes(&message));
        out.push(message);
        if none_after || ends || bytes >= max_bytes {
            return Ok(out);
        }
    }
}

/// What a read message takes in memory, about: its payload, headers and subjects, and the structures that
/// hold them.
fn held_bytes(message: &jetstream::Message) -> usize {
    const PER_MESSAGE: usize = 256;
    let reply = message.reply.as_ref().map_or(0, |r| r.len());
    PER_MESSAGE + message.length.max(message.payload.len()) + message.subject.len() + reply
}

/// How long [`stored_messages_until`] waits for the next message it was told of.
pub const STORED_READ_STALL: Duration = Duration::from_secs(5);

/// Headers with `Nats-Msg-Id`.
pub fn msg_id_headers(msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID_HEADER, msg_id);
    headers
}

/// How many bytes a message takes against the server's `max_payload`: the payload and the header block
/// (`NATS/1.0\r\n`, a `name: value\r\n` line per value, `\r\n`), as the server counts them.
pub fn wire_size(headers: &HeaderMap, payload_len: usize) -> usize {
    let mut size = payload_len;
    if headers.iter().next().is_some() {
        size += b"NATS/1.0\r\n\r\n".len();
        for (name, values) in headers.iter() {
            for value in values {
                size += AsRef::<str>::as_ref(name).len() + b": \r\n".len() + value.as_str().len();
            }
        }
    }
    size
}

/// Why a publish to a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message can never be stored as it is (over the server's `max_payload` or the stream's message
    /// size limit): not retried; the caller sends less.
    #[error("cannot publish to {subject}: the message is {size} bytes with its headers, over the server's limit of {max} bytes")]
    TooLarge { subject: String, size: usize, max: usize },
    /// The server did not store it within the patience given (away, restarting, no stream).
    #[error("cannot publish to {subject}: {reason}")]
    Unavailable { subject: String, reason: String },
}

/// Publishes `payload` to `subject` of a stream of the queens' own and waits for the ack; when that fails
/// (the stream deleted, or lost with the server's store) it binds the stream again with `rebind`, once, and
/// tries again.
pub async fn publish_rebinding<F, Fut>(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
    rebind: F,
) -> anyhow::Result<jetstream::publish::PublishAck>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<stream::Stream>>,
{
    let mut rebound = false;
    loop {
        let published = async {
            let ack = js.publish_with_headers(subject.to_string(), headers.clone(), payload.clone()).await?;
            anyhow::Ok(ack.await?)
        };
        match published.await {
            Ok(ack) => return Ok(ack),
            Err(_) if !rebound => {
                rebind().await?;
                rebound = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Publishes to a stream and waits for the server's acknowledgement, retrying for up to `patience` (the
/// server may be restarting); `msg_id` makes retries safe. A message over the server's `max_payload` (which
/// async-nats checks before sending, headers included) or a stream's size limit is refused at once
/// ([`PublishError::TooLarge`]), never retried.
pub async fn publish_persistent(
    js: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    patience: Duration,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let ack = js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await?;
            ack.await
        };
        match attempt.await {
            Ok(ack) => return Ok(ack),
            Err(e) if is_too_large(&e) => {
                let (size, max) = (wire_size(&headers, payload.len()), js.client().max_payload());
                return Err(PublishError::TooLarge { subject, size, max });
            }
            Err(e) if started.elapsed() < patience => {
                tracing::warn!(subject, error = %e, "publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(PublishError::Unavailable { subject, reason: e.to_string() }),
        }
    }
}

/// Whether a publish failed for the message's size: the client's `max_payload` check, or a stream's
/// `max_msg_size` or header limit (JetStream errors 10054 and 10097).
fn is_too_large(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::ErrorCode;
    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return true;
    }
    let source = std::error::Error::source(e).and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
    source.is_some_and(|s| {
        matches!(s.error_code(), ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM)
    })
}

/// Publishes a job on its model's subject at its priority (`sd.jobs.<model>[.high|.low]`) with `Nats-Msg-Id` = its id (a retried publish is not a second
/// job), after validating it.
pub async fn publish_job(
    js: &jetstream::Context,
    subjects: &Subjects,
    job: &protocol::JobRequest,
    limits: &protocol::Limits,
) -> anyhow::Result<u64> {
    job.validate(limits)?;
    let subject = subjects.jobs_at(&job.model, job.priority)?;
    let bytes = protocol::encode(job);
    let (size, max) = (job_message_size(job.id, bytes.len()), js.client().max_payload());
    if max > 0 && size > max {
        anyhow::bail!(
            "job {} is {size} bytes as a bus message, over the server's {max} byte limit (max_payload): \
             send large images by object key",
            job.id
        );
    }
    // Retried for a few seconds (a server restarting, a lost ack): the message id makes a retry that
    // reaches the server twice one job.
    let headers = msg_id_headers(&job.msg_id());
    let ack = publish_persistent(js, subject.clone(), headers, bytes.into(), Duration::from_secs(10))
        .await
        .with_context(|| {
            format!("job {} was not stored on {subject} (is a worker or queen running to create the streams?)", job.id)
        })?;
    tracing::debug!(job_id = %job.id, seq = ack.sequence, duplicate = ack.duplicate, "job published");
    Ok(ack.sequence)
}

/// The `Nats-Msg-Id` of a job published again as a new message (see the worker's requeue).
pub fn requeue_msg_id(job_id: Uuid, stream_seq: u64) -> String {
    format!("{job_id}:requeue:{stream_seq}")
}

/// The most bytes a job message of `payload_len` bytes takes on the jobs stream: with the longest headers it
/// travels with there (a requeued copy's), so a job that is accepted can also be queued again.
pub fn job_message_size(job_id: Uuid, payload_len: usize) -> usize {
    wire_size(&msg_id_headers(&requeue_msg_id(job_id, u64::MAX)), payload_len)
}

/// A job's id from a message that may not decode: the payload's `id`, else its `Nats-Msg-Id` header.
pub fn job_id_of(payload: &[u8], headers: Option<&HeaderMap>) -> Option<Uuid> {
    protocol::peek_job_id(payload)
        .or_else(|| headers.and_then(|h| h.get(MSG_ID_HEADER)).and_then(|v| Uuid::parse_str(v.as_str()).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_and_become_options() {
        let url = NatsUrl::parse("nats://sd%40rbee:p%3Ass@nats:4222").unwrap();
        assert_eq!(url.auth, NatsAuth::UserPassword("sd@rbee".into(), "p:ss".into()));
        assert_eq!(url.servers, ["nats://nats:4222"]);
        assert_eq!(url.shown, "nats://nats:4222");
        let url = NatsUrl::parse("nats://s3cret@a:4222, b:4223").unwrap();
        assert_eq!(url.auth, NatsAuth::Token("s3cret".into()));
        assert_eq!(url.shown, "nats://a:4222,nats://b:4223");
        assert_eq!(NatsUrl::parse("nats://127.0.0.1:4222").unwrap().auth, NatsAuth::None);
        assert!(NatsUrl::parse(" , ").is_err());
        for (bad, says) in [
            ("nats://u:hunter2@host:42x2", "does not parse"),
            ("nats://:hunter2@host:4222", "no user"),
            ("nats://a:4222,nats://u:hunter2@:4222", "entry 2 of the NATS URL"),
        ] {
            let err = NatsUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says) && !err.contains("hunter2"), "{bad}: {err}");
        }
        let url = NatsUrl::parse("nats://u:hunter2@host:4222").unwrap();
        assert!(!format!("{url:?}").contains("hunter2"), "{url:?}");
    }

    #[test]
    fn consumer_names_map_back_to_one_model_and_priority() {
        // Model names may themselves start with "high-" or contain "-workers-".
        for model in ["xl", "high-x", "low-workers-y", "workers-z", "a~b"] {
            for priority in Priority::ALL {
                let name = priority_consumer_name(model, priority);
                assert_eq!(parse_consumer_name(&name), Some((model, priority)), "{name}");
            }
        }
        assert_eq!(consumer_name("xl"), "workers-xl");
        assert_eq!(parse_consumer_name("workers-advisories"), Some(("advisories", Priority::Normal)));
        assert_eq!(parse_consumer_name("other"), None);
    }
}
