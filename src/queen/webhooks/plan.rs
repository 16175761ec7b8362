//! Which of a job's events become webhook deliveries, with which idempotency key and body: pure rules, so
//! they are tested without a broker. The aggregator plans a delivery for each bus event it applies to a job
//! whose status record carries a webhook that asks for that event.
//!
//! Idempotency keys are made from the event itself, so a bus event applied twice (a queen that stopped
//! between applying it and acknowledging it) gives the same key, which the queue then takes once:
//! `{job_id}.completed` (`failed`, `cancelled`: a job ends once), `{job_id}.started.{seq}` and
//! `{job_id}.progress.{seq}`, where `seq` is the bus event's sequence in the events stream (a job starts
//! again after a redelivery, and reports many steps).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::{ApiEvent, JobState, JobStatus, WebhookBody, WebhookEvent};
use crate::protocol::{Accepted, Event};

/// One delivery, as the queue holds it: the exact body every attempt sends (signed anew each time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The idempotency key (`webhook-id`).
    pub id: String,
    pub job_id: Uuid,
    pub event: WebhookEvent,
    pub url: String,
    pub body: String,
    /// When it was queued (ms since the Unix epoch): retries end `--webhook-retry-for` after it.
    pub queued_at: u64,
}

/// Running jobs whose last progress delivery a planner remembers; quiet ones are forgotten past it.
const TRACKED_JOBS: usize = 4096;
const FORGET_QUIET_JOBS: Duration = Duration::from_secs(600);

/// A queen's planner: the rules, and the time (`at`) of each running job's last progress event delivered
/// (the throttle goes by the events' own times, so a backlog applied at once after a queen was down is
/// thinned as the steps happened; a queen that restarts, or another queen, may send one more early).
pub struct Planner {
    min_progress_interval: Duration,
    progress: HashMap<Uuid, u64>,
}

impl Planner {
    pub fn new(min_progress_interval: Duration) -> Self {
        Self { min_progress_interval, progress: HashMap::new() }
    }

    /// The delivery of bus event `event` (number `seq` in the events stream), applied to a job whose status
    /// is now `status`; `None` when its webhook does not ask for it, or a progress delivery came too lately.
    pub fn plan(&mut self, status: &JobStatus, event: &Event, seq: u64) -> Option<Delivery> {
        let job_id = event.job_id();
        if event.is_terminal() {
            self.progress.remove(&job_id);
        }
        let hook = status.webhook.as_ref()?;
        let kind = WebhookEvent::of(event);
        if !hook.wants(kind) {
            return None;
        }
        if kind == WebhookEvent::Progress {
            let asked = Duration::from_secs(hook.progress_interval_s.unwrap_or(0).into());
            let interval = asked.max(self.min_progress_interval).as_millis() as u64;
            let at = event.at();
            if self.progress.get(&job_id).is_some_and(|last| at.saturating_sub(*last) < interval) {
                return None;
            }
            self.progress.insert(job_id, at);
            if self.progress.len() > TRACKED_JOBS {
                let quiet = FORGET_QUIET_JOBS.as_millis() as u64;
                self.progress.retain(|_, last| at.saturating_sub(*last) < quiet);
            }
        }
        let id = match kind {
            WebhookEvent::Started | WebhookEvent::Progress => format!("{job_id}.{}.{seq}", kind.name()),
            _ => format!("{job_id}.{}", kind.name()),
        };
        // The event as the event stream shows it: a step or a start as the bus says it (a progress event's
        // preview left out), an ending as the record keeps it (its warnings and message bounded).
        let event_view = match kind {
            WebhookEvent::Started | WebhookEvent::Progress => ApiEvent::from_bus(event).into_iter().next()?,
            _ => ApiEvent::terminal_of(status)?,
        };
        let body = WebhookBody {
            id: id.clone(),
            kind: kind.type_name(),
            timestamp: rfc3339_millis(event.at()),
            job_id,
            event: event_view,
        };
        Some(Delivery {
            id,
            job_id,
            event: kind,
            url: hook.url.clone(),
            body: serde_json::to_string(&body).ok()?,
            queued_at: crate::protocol::now_millis(),
        })
    }
}

/// `at` (milliseconds since the epoch) in RFC 3339, to the millisecond. A bus event's time is its sender's word:
/// past the last millisecond RFC 3339 can write (year 9999) `humantime` refuses to format it, and `to_string`
/// would panic the aggregator on that event each time it came back; such a time is written as that millisecond.
fn rfc3339_millis(at: u64) -> String {
    const LAST_WRITABLE: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(at.min(LAST_WRITABLE))).to_string()
}

/// Whether a start the record did not take (older than a step it already has) is still owed to a webhook: a
/// valid worker, a job not expired then, and not one that had ended before it (a late pick-up of a job
/// cancelled meanwhile is no start).
pub fn owes_start(status: &JobStatus, accepted: &Accepted) -> bool {
    crate::protocol::validate_worker_id(&accepted.worker_id).is_ok()
        && !status.is_expired(accepted.at)
        && status.finished_at.is_none_or(|end| accepted.at <= end)
}

/// Whether `status` shows the terminal `event` applied: a redelivered event whose status update landed
/// before its delivery was queued (the update then changes nothing, but the delivery is still owed).
pub fn shows_terminal(status: &JobStatus, event: &Event) -> bool {
    JobState::ended_by(event) == Some(status.state) && status.finished_at == Some(event.at())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{WebhookInfo, WebhookSpec};
    use crate::protocol::{Cancelled, Completed, JobKind, JobRequest, Progress, Timings, PROTOCOL_VERSION};

    fn job_with(events: &[WebhookEvent]) -> JobStatus {
        let mut status = JobStatus::queued(&JobRequest::new(JobKind::Txt2Img, "tiny", "x"), Some(1));
        status.webhook = Some(WebhookInfo::new(&WebhookSpec::new("https://hooks.example.com/a", events)));
        status
    }

    #[test]
    fn only_the_events_asked_for_with_keys_from_the_event() {
        let status = job_with(&[WebhookEvent::Started, WebhookEvent::Cancelled]);
        let id = status.job_id;
        let mut planner = Planner::new(Duration::from_secs(1));
        let accepted = Event::Accepted(Accepted {
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 1_700_000_000_123,
            worker_id: "w1".into(),
            model: "tiny".into(),
            tenant: None,
        });
        let started = planner.plan(&status, &accepted, 7).expect("started was asked for");
        assert_eq!(started.id, format!("{id}.started.7"));
        assert_eq!(planner.plan(&status, &accepted, 7).unwrap().id, started.id, "the same event, the same key");
        let body: WebhookBody = serde_json::from_str(&started.body).unwrap();
        assert_eq!((body.id.as_str(), body.kind.as_str()), (started.id.as_str(), "job.started"));
        assert_eq!(body.timestamp, "2023-11-14T22:13:20.123Z");
        assert_eq!(body.event.name(), "started");
        assert_eq!(started.url, "https://hooks.example.com/a");
        let progress = Event::Progress(Progress::new(id, 1, 10, 5));
        assert!(planner.plan(&status, &progress, 8).is_none(), "progress was not asked for");
        let cancelled = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at: 9, at_step: Some(1) });
        let mut status = status;
        assert!(status.apply(&cancelled), "an ending is planned against the record that shows it");
        let ending = planner.plan(&status, &cancelled, 9).unwrap();
        assert_eq!(ending.id, format!("{id}.cancelled"));
        assert_eq!(serde_json::from_str::<WebhookBody>(&ending.body).unwrap().event.data()["at_step"], 1);
        let mut without = status.clone();
        without.webhook = None;
        assert!(planner.plan(&without, &cancelled, 9).is_none());
    }

    #[test]
    fn an_ending_dated_past_year_9999_is_still_delivered() {
        let mut planner = Planner::new(Duration::from_secs(1));
        for at in [253_402_300_800_000, u64::MAX] {
            let mut status = job_with(&[WebhookEvent::Cancelled]);
            let id = status.job_id;
            let cancelled = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at, at_step: None });
            status.apply(&cancelled);
            let delivery = planner.plan(&status, &cancelled, 3).expect("the ending is owed");
            let body: WebhookBody = serde_json::from_str(&delivery.body).unwrap();
            assert_eq!(body.timestamp, "9999-12-31T23:59:59.999Z");
        }
        assert_eq!(rfc3339_millis(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn progress_is_throttled_per_job() {
        let mut status = job_with(&[WebhookEvent::Progress]);
        let id = status.job_id;
        let mut planner = Planner::new(Duration::from_secs(1));
        // Step n happened at n00 ms past t0 (the event's own time, however late it is applied).
        let t0 = 1_700_000_000_000;
        let step = |n| Event::Progress(Progress::new(id, n, 90, t0 + 100 * n as u64));
        assert!(planner.plan(&status, &step(1), 1).is_some(), "the first");
        assert!(planner.plan(&status, &step(10), 2).is_none(), "900 ms later");
        assert!(planner.plan(&status, &step(11), 3).is_some(), "1 s later");
        // A job may ask for fewer, never for more than the queen's minimum.
        status.webhook.as_mut().unwrap().progress_interval_s = Some(5);
        assert!(planner.plan(&status, &step(41), 4).is_none(), "3 s later");
        assert!(planner.plan(&status, &step(61), 5).is_some(), "5 s later");
    }

    #[test]
    fn a_terminal_event_already_in_the_record_is_still_owed() {
        let mut status = job_with(&[WebhookEvent::Cancelled]);
        let id = status.job_id;
        let cancelled = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at: 50, at_step: None });
        assert!(!shows_terminal(&status, &cancelled));
        assert!(status.apply(&cancelled));
        assert!(shows_terminal(&status, &cancelled));
        let later = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at: 60, at_step: None });
        assert!(!shows_terminal(&status, &later), "another cancellation event");
    }

    #[test]
    fn a_late_start_is_owed_unless_the_job_had_ended_before_it() {
        let mut status = job_with(&[WebhookEvent::Started]);
        let id = status.job_id;
        let start = |at, worker: &str| Accepted {
            v: PROTOCOL_VERSION,
            job_id: id,
            at,
            worker_id: worker.into(),
            model: "tiny".into(),
            tenant: None,
        };
        assert!(owes_start(&status, &start(10, "w1")));
        assert!(!owes_start(&status, &start(10, "not a.token")), "a worker id no subject can carry");
        status.apply(&Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at: 20, at_step: None }));
        assert!(owes_start(&status, &start(15, "w1")), "it started before it was cancelled");
        assert!(!owes_start(&status, &start(25, "w1")), "picked up after it was cancelled");
    }

    #[test]
    fn an_ending_is_delivered_as_the_record_keeps_it() {
        let mut status = job_with(&[WebhookEvent::Completed]);
        let id = status.job_id;
        let done = Event::Completed(Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 30,
            images: vec![],
            timings: Timings::default(),
            warnings: vec!["w".repeat(64 << 10); 100],
        });
        assert!(status.apply(&done));
        let delivery = Planner::new(Duration::ZERO).plan(&status, &done, 3).unwrap();
        assert!(delivery.body.len() < 16 * 1024, "bounded: {} bytes", delivery.body.len());
        let body: WebhookBody = serde_json::from_str(&delivery.body).unwrap();
        assert_eq!(body.event.name(), "completed");
        assert_eq!(body.event.data()["at"], 30);
    }
}
