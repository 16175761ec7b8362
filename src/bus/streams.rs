//! The fleet's streams: what each keeps and for how long, created at start-up by every process that uses
//! the bus (an operator's changes to an existing stream are kept).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};

use crate::protocol::{self, Subjects};

/// Retention of the streams (defaults: the protocol's).
#[derive(Clone, Debug)]
pub struct StreamSettings {
    pub duplicate_window: Duration,
    pub events_max_age: Duration,
    pub dlq_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(protocol::JOBS_DUPLICATE_WINDOW_SECS),
            events_max_age: Duration::from_secs(protocol::EVENTS_MAX_AGE_SECS),
            dlq_max_age: Duration::from_secs(protocol::DLQ_MAX_AGE_SECS),
        }
    }
}

/// Creates the jobs, events and dead-letter streams, or binds them when they exist (an operator's changes
/// to an existing stream are kept).
pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> anyhow::Result<()> {
    let configs = [
        stream::Config {
            name: subjects.jobs_stream(),
            subjects: vec![subjects.jobs_wildcard()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: settings.duplicate_window,
            // Queue positions are counted with direct gets.
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: subjects.events_stream(),
            subjects: vec![subjects.events_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.events_max_age,
            duplicate_window: settings.duplicate_window,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: subjects.dlq_stream(),
            subjects: vec![subjects.dead_letter_wildcard()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: settings.dlq_max_age,
            duplicate_window: settings.duplicate_window,
            ..Default::default()
        },
    ];
    // Cancel requests, the last per job, kept as long as any trace of a job is: a worker that takes a job
    // later than the request (after a crash's redelivery, a hand-back, or a restart) finds it there.
    let cancels = stream::Config {
        name: subjects.cancels_stream(),
        subjects: vec![subjects.cancel_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: settings.events_max_age.max(settings.dlq_max_age),
        max_messages_per_subject: 1,
        // Cancels of ids that were never jobs cost a subject each: the oldest go first past this many.
        max_messages: MAX_STORED_CANCELS,
        allow_direct: true,
        ..Default::default()
    };
    // JetStream's notices of jobs that ran out of deliveries, kept until a worker has dealt with them (a
    // core-NATS advisory nobody hears would leave such a job stuck).
    let advisories = stream::Config {
        name: subjects.advisories_stream(),
        subjects: vec![max_deliveries_subject(subjects)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: settings.dlq_max_age,
        ..Default::default()
    };
    for config in configs.into_iter().chain([advisories]) {
        let name = config.name.clone();
        js.get_or_create_stream(config).await.with_context(|| format!("cannot create or bind stream {name}"))?;
    }
    // Not essential: without it a cancel still reaches a running job, and a worker that cannot look one up
    // starts the job.
    let name = cancels.name.clone();
    if let Err(e) = js.get_or_create_stream(cancels).await {
        tracing::warn!(stream = %name, error = %e, "cannot create or bind the stored cancels' stream: a job cancelled while no worker holds it may still run");
    }
    Ok(())
}

/// The most cancel requests `SD_CANCELS` keeps.
pub const MAX_STORED_CANCELS: i64 = 1_000_000;

/// The advisories JetStream publishes when a job of any model reaches `max_deliver`.
pub fn max_deliveries_subject(subjects: &Subjects) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*", subjects.jobs_stream())
}

/// The workers' shared consumer of those advisories.
pub const ADVISORY_CONSUMER: &str = "workers-advisories";
