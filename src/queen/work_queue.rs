//! The queens' own work queues (the expiry schedule `SD_EXPIRY`, the webhook deliveries `SD_WEBHOOKS`): a
//! JetStream stream on one subject, file storage, a message gone once acknowledged, a republished copy taken
//! once within the duplicate window; published to with the stream bound again if it went missing, and
//! consumed by one durable consumer all queens share, where a message not due yet waits handed back with a
//! delay (a NAK with a delay), so however many wait, due ones go on.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};

use crate::bus;

/// One work queue of the queens.
#[derive(Clone)]
pub struct WorkQueue {
    js: jetstream::Context,
    stream: String,
    subject: String,
    description: &'static str,
    duplicate_window: Duration,
}

impl WorkQueue {
    /// Binds (creating if needed) stream `stream` on `subject`.
    pub async fn open(
        js: &jetstream::Context,
        stream: String,
        subject: String,
        description: &'static str,
        duplicate_window: Duration,
    ) -> anyhow::Result<Self> {
        let queue = Self { js: js.clone(), stream, subject, description, duplicate_window };
        queue.bind().await?;
        Ok(queue)
    }

    /// Binds the stream, creating it again if it is gone (deleted, or lost with the server's store).
    pub async fn bind(&self) -> anyhow::Result<stream::Stream> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                description: Some(self.description.into()),
                subjects: vec![self.subject.clone()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: self.duplicate_window,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot create the stream {}", self.stream))
    }

    /// Queues `payload` once per `msg_id` within the duplicate window.
    pub async fn publish(&self, msg_id: &str, payload: bytes::Bytes) -> anyhow::Result<()> {
        let headers = bus::msg_id_headers(msg_id);
        bus::publish_rebinding(&self.js, &self.subject, headers, payload, || self.bind()).await.map(drop)
    }

    /// The queens' shared durable consumer `name` and its messages, fetched `batch` at a time (`None`: the
    /// client's default). A message not acknowledged within `ack_wait` is delivered again.
    pub async fn consume(
        &self,
        name: &str,
        description: &str,
        ack_wait: Duration,
        batch: Option<usize>,
    ) -> anyhow::Result<(consumer::PullConsumer, consumer::pull::Stream)> {
        let stream = self.js.get_stream(&self.stream).await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.into()),
                    description: Some(description.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    // Messages waiting out a delay would otherwise count as pending and hold up due ones.
                    max_ack_pending: -1,
                    ..Default::default()
                },
            )
            .await?;
        let messages = match batch {
            Some(n) => consumer.stream().max_messages_per_batch(n).messages().await?,
            None => consumer.messages().await?,
        };
        Ok((consumer, messages))
    }
}
