//! What becomes of a delivered job message once its outcome is known: which event is published, whether
//! the message is dead-lettered or queued again, how it is settled, which counter moves. [`plan`] is a pure
//! function of the outcome, the delivery and the retry policy, so every row of the table below is tested
//! without a broker; `effects.rs` carries a [`Plan`] out.
//!
//! | outcome | event | message |
//! | --- | --- | --- |
//! | images stored | `completed` | ack once the event is stored; counted done |
//! | already stored by an earlier delivery | `completed` again | ack once the event is stored |
//! | undecodable or invalid job | `failed` `INVALID_REQUEST` | dead-lettered, term |
//! | deadline passed before it started | `failed` `TIMEOUT` | term |
//! | cancel request | `cancelled` | term |
//! | deadline or worker timeout while running | `failed` `TIMEOUT` | term |
//! | transient (storage down, device error) | none | nak with backoff; on the last delivery `failed` + dead-letter |
//! | shutdown grace over | none | nak now: another worker takes it; on the last delivery queued again, term |
//! | never settled in `max_deliver` deliveries | `failed` `INTERNAL` | dead-lettered, removed |
//!
//! A dead letter or a requeue that cannot be done (NATS away) replaces the rest of the plan with its
//! `fallback` settlement: the job stays queued rather than lost.

use std::time::Duration;

use uuid::Uuid;

use crate::protocol::{self, Cancelled, Completed, ErrorCode, Event, Failed, ProtocolError, PROTOCOL_VERSION};

/// Which delivery of which job message is handled. A job queued again (see [`Plan::requeue`]) is a new
/// message whose deliveries count from 1 again; the stream sequence keeps its events apart from the first
/// message's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message's sequence in the jobs stream.
    pub seq: u64,
    /// Its delivery count, from 1.
    pub n: i64,
}

/// How a worker retries: the consumer's `max_deliver` (0 or less: no limit) and the nak delays by delivery
/// (the last one repeats).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_deliver: i64,
    pub backoff: Vec<Duration>,
}

impl RetryPolicy {
    fn is_last(&self, delivery: Delivery) -> bool {
        self.max_deliver > 0 && delivery.n >= self.max_deliver
    }

    fn backoff(&self, delivery: Delivery) -> Option<Duration> {
        self.backoff.get((delivery.n.max(1) - 1) as usize).or(self.backoff.last()).copied()
    }
}

/// How a delivery ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every image is stored; `fresh` is false when an earlier delivery stored them (reported again).
    Completed { completed: Completed, fresh: bool },
    /// The job can never succeed: it does not decode, breaks a rule, or its inputs are unusable.
    Invalid { job_id: Option<Uuid>, error: ProtocolError },
    /// Its deadline passed before a worker took it.
    Expired { job_id: Uuid },
    /// A cancel request stopped it (`at_step` `None`: before generation started).
    Cancelled { job_id: Uuid, at_step: Option<u32> },
    /// It ran past its deadline (`deadline`: true) or the worker's time limit.
    TimedOut { job_id: Uuid, at_step: Option<u32>, deadline: bool },
    /// The worker shut down and the grace period ran out.
    Shutdown { job_id: Uuid, at_step: Option<u32> },
    /// It may succeed later or elsewhere (storage down, a device error).
    Transient { job_id: Uuid, code: ErrorCode, message: String },
    /// JetStream stopped delivering it after `deliveries` deliveries that never settled (workers that
    /// crashed or hung on it).
    Undeliverable { job_id: Option<Uuid>, deliveries: i64 },
}

/// How the message is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Done: removed from the work queue.
    Ack,
    /// Never to be delivered again: removed from the work queue.
    Term,
    /// Delivered again after the delay (`None`: at once).
    Nak(Option<Duration>),
}

/// The worker's counters that heartbeats report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Done,
    Failed,
}

/// What to do, in this order: dead-letter, requeue, publish the event, count, settle.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub job_id: Option<Uuid>,
    /// Copy the message to the dead-letter stream first, with this reason.
    pub dead_letter: Option<String>,
    /// Publish the message again as a new message of the work queue (at its end, with fresh deliveries).
    pub requeue: bool,
    /// The job's report. The counter and the settlement wait for it to be stored: a job nobody heard the end
    /// of must come round again (a redelivery reports the stored images, the cancel, the expiry or the
    /// failure again), or its status would wait forever.
    pub event: Option<Event>,
    pub counter: Option<Counter>,
    pub settle: Settle,
    /// The settlement instead of the whole plan when the dead letter or the requeue cannot be done.
    pub fallback: Settle,
}

/// When a job could not be dead-lettered (NATS away): leave it to a later delivery rather than lose it.
pub const RETRY_LATER: Settle = Settle::Nak(Some(Duration::from_secs(5)));

/// A `failed` event, its message cut to what the protocol allows.
pub fn failed(job_id: Uuid, code: ErrorCode, message: &str, at: u64) -> Event {
    let message = protocol::truncate(message, protocol::MAX_ERROR_MESSAGE_BYTES).to_string();
    Event::Failed(Failed { v: PROTOCOL_VERSION, job_id, at, code, message, field: None })
}

/// The plan for `outcome` of `delivery` under `policy`; `now` (unix ms) dates the event.
pub fn plan(outcome: Outcome, delivery: Delivery, policy: &RetryPolicy, now: u64) -> Plan {
    let quiet = |job_id: Option<Uuid>, settle: Settle| Plan {
        job_id,
        dead_letter: None,
        requeue: false,
        event: None,
        counter: None,
        settle,
        fallback: settle,
    };
    let fail = |job_id: Uuid, event: Event| Plan {
        event: Some(event),
        counter: Some(Counter::Failed),
        ..quiet(Some(job_id), Settle::Term)
    };
    let give_up = |job_id: Option<Uuid>, reason: String, event: Option<Event>| Plan {
        dead_letter: Some(reason),
        event,
        counter: Some(Counter::Failed),
        fallback: RETRY_LATER,
        ..quiet(job_id, Settle::Term)
    };
    match outcome {
        Outcome::Completed { completed, fresh } => {
            Plan { counter: fresh.then_some(Counter::Done), ..quiet(Some(completed.job_id), Settle::Ack) }
                .with_event(Event::Completed(completed))
        }
        Outcome::Invalid { job_id, error } => {
            let event = job_id.map(|id| Event::Failed(Failed::from_error(id, &error, now)));
            give_up(job_id, error.to_string(), event)
        }
        Outcome::Expired { job_id } => {
            fail(job_id, failed(job_id, ErrorCode::Timeout, "the job's deadline passed before a worker took it", now))
        }
        Outcome::Cancelled { job_id, at_step } => {
            let event = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id, at: now, at_step });
            quiet(Some(job_id), Settle::Term).with_event(event)
        }
        Outcome::TimedOut { job_id, at_step, deadline } => {
            let message = format!(
                "the job ran past its {} after {} steps",
                if deadline { "deadline" } else { "time limit" },
                at_step.unwrap_or(0)
            );
            fail(job_id, failed(job_id, ErrorCode::Timeout, &message, now))
        }
        // A nak on the last delivery would leave the job none, and JetStream would give it up though nothing
        // failed: it is queued again instead.
        Outcome::Shutdown { job_id, .. } if policy.is_last(delivery) => {
            Plan { requeue: true, fallback: Settle::Nak(None), ..quiet(Some(job_id), Settle::Term) }
        }
        Outcome::Shutdown { job_id, .. } => quiet(Some(job_id), Settle::Nak(None)),
        Outcome::Transient { job_id, code, message } if policy.is_last(delivery) => {
            let reason = format!("gave up after {} deliveries: {message}", delivery.n);
            let event = failed(job_id, code, &reason, now);
            give_up(Some(job_id), reason, Some(event))
        }
        Outcome::Transient { job_id, .. } => quiet(Some(job_id), Settle::Nak(policy.backoff(delivery))),
        Outcome::Undeliverable { job_id, deliveries } => {
            let reason = format!(
                "delivered {deliveries} times without finishing (the workers running it crashed or stalled); giving up"
            );
            let event = job_id.map(|id| failed(id, ErrorCode::Internal, &reason, now));
            give_up(job_id, reason, event)
        }
    }
}

impl Plan {
    fn with_event(mut self, event: Event) -> Self {
        self.event = Some(event);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Timings, PROTOCOL_VERSION};

    const NOW: u64 = 1_700_000_000_000;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_deliver: 3, backoff: vec![Duration::from_secs(1), Duration::from_secs(5)] }
    }

    fn delivery(n: i64) -> Delivery {
        Delivery { seq: 7, n }
    }

    /// One row of the table: the plan's shape, with the event reduced to its type and code.
    #[derive(Debug, PartialEq)]
    struct Row {
        event: Option<(&'static str, Option<ErrorCode>)>,
        dead_letter: bool,
        requeue: bool,
        counter: Option<Counter>,
        settle: Settle,
        fallback: Settle,
    }

    fn row(plan: &Plan) -> Row {
        Row {
            event: plan.event.as_ref().map(|e| {
                let code = match e {
                    Event::Failed(f) => Some(f.code),
                    _ => None,
                };
                (e.type_name(), code)
            }),
            dead_letter: plan.dead_letter.is_some(),
            requeue: plan.requeue,
            counter: plan.counter,
            settle: plan.settle,
            fallback: plan.fallback,
        }
    }

    #[test]
    fn every_outcome_has_its_plan() {
        let id = Uuid::new_v4();
        let completed = Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: id,
            at: NOW,
            images: vec![],
            timings: Timings::default(),
            warnings: vec![],
        };
        let invalid = ProtocolError::invalid("width", "must be a positive multiple of 8, got 7");
        let transient = || Outcome::Transient { job_id: id, code: ErrorCode::Storage, message: "store down".into() };
        let nak = |secs| Settle::Nak(Some(Duration::from_secs(secs)));
        let failed = |code| Some(("failed", Some(code)));
        let r = |event, dead_letter, requeue, counter, settle, fallback| Row {
            event,
            dead_letter,
            requeue,
            counter,
            settle,
            fallback,
        };
        use Counter::{Done, Failed};
        use Settle::{Ack, Nak, Term};
        #[rustfmt::skip]
        let table: Vec<(&str, Outcome, i64, Row)> = vec![
            ("completed", Outcome::Completed { completed: completed.clone(), fresh: true }, 1,
                r(Some(("completed", None)), false, false, Some(Done), Ack, Ack)),
            ("already completed", Outcome::Completed { completed, fresh: false }, 2,
                r(Some(("completed", None)), false, false, None, Ack, Ack)),
            ("invalid", Outcome::Invalid { job_id: Some(id), error: invalid.clone() }, 1,
                r(failed(ErrorCode::InvalidRequest), true, false, Some(Failed), Term, RETRY_LATER)),
            ("undecodable, no id", Outcome::Invalid { job_id: None, error: ProtocolError::malformed("not a map") }, 1,
                r(None, true, false, Some(Failed), Term, RETRY_LATER)),
            ("expired", Outcome::Expired { job_id: id }, 1,
                r(failed(ErrorCode::Timeout), false, false, Some(Failed), Term, Term)),
            ("cancelled", Outcome::Cancelled { job_id: id, at_step: Some(3) }, 1,
                r(Some(("cancelled", None)), false, false, None, Term, Term)),
            ("timed out", Outcome::TimedOut { job_id: id, at_step: Some(3), deadline: true }, 1,
                r(failed(ErrorCode::Timeout), false, false, Some(Failed), Term, Term)),
            ("shutdown", Outcome::Shutdown { job_id: id, at_step: Some(2) }, 2,
                r(None, false, false, None, Nak(None), Nak(None))),
            ("shutdown, last delivery", Outcome::Shutdown { job_id: id, at_step: Some(2) }, 3,
                r(None, false, true, None, Term, Nak(None))),
            ("transient, first delivery", transient(), 1, r(None, false, false, None, nak(1), nak(1))),
            ("transient, second delivery", transient(), 2, r(None, false, false, None, nak(5), nak(5))),
            ("transient, last delivery", transient(), 3,
                r(failed(ErrorCode::Storage), true, false, Some(Failed), Term, RETRY_LATER)),
            ("undeliverable", Outcome::Undeliverable { job_id: Some(id), deliveries: 3 }, 3,
                r(failed(ErrorCode::Internal), true, false, Some(Failed), Term, RETRY_LATER)),
            ("undeliverable, no id", Outcome::Undeliverable { job_id: None, deliveries: 3 }, 3,
                r(None, true, false, Some(Failed), Term, RETRY_LATER)),
        ];
        for (name, outcome, n, want) in table {
            let plan = plan(outcome, delivery(n), &policy(), NOW);
            assert_eq!(row(&plan), want, "{name}");
            if let Some(event) = &plan.event {
                assert_eq!((event.job_id(), event.at()), (id, NOW), "{name}: the event is about the job, dated now");
            }
        }
    }

    #[test]
    fn events_and_reasons_say_what_happened() {
        let id = Uuid::new_v4();
        let error = ProtocolError::invalid("width", "must be a positive multiple of 8, got 7");
        let p = plan(Outcome::Invalid { job_id: Some(id), error: error.clone() }, delivery(1), &policy(), NOW);
        assert_eq!(p.event, Some(Event::Failed(Failed::from_error(id, &error, NOW))), "the field travels");
        assert_eq!(p.dead_letter.as_deref(), Some(error.to_string().as_str()));

        let transient = Outcome::Transient { job_id: id, code: ErrorCode::OutOfMemory, message: "CUDA OOM".into() };
        let p = plan(transient, delivery(3), &policy(), NOW);
        assert_eq!(p.dead_letter.as_deref(), Some("gave up after 3 deliveries: CUDA OOM"));
        let Some(Event::Failed(f)) = &p.event else { panic!("{p:?}") };
        assert_eq!((f.code, f.message.as_str()), (ErrorCode::OutOfMemory, "gave up after 3 deliveries: CUDA OOM"));

        let p = plan(Outcome::TimedOut { job_id: id, at_step: None, deadline: false }, delivery(1), &policy(), NOW);
        let Some(Event::Failed(f)) = &p.event else { panic!("{p:?}") };
        assert_eq!(f.message, "the job ran past its time limit after 0 steps");

        let p = plan(Outcome::Cancelled { job_id: id, at_step: None }, delivery(1), &policy(), NOW);
        assert_eq!(
            p.event,
            Some(Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at: NOW, at_step: None }))
        );

        // A huge message from a device error is cut to what an event may carry.
        let long = Outcome::Transient { job_id: id, code: ErrorCode::Internal, message: "x".repeat(100_000) };
        let Some(Event::Failed(f)) = plan(long, delivery(3), &policy(), NOW).event else { panic!() };
        assert!(f.message.len() <= protocol::MAX_ERROR_MESSAGE_BYTES);
    }

    #[test]
    fn without_max_deliver_every_delivery_retries_and_the_last_delay_repeats() {
        let unlimited = RetryPolicy { max_deliver: 0, ..policy() };
        let id = Uuid::new_v4();
        for n in [1, 3, 50] {
            let transient = Outcome::Transient { job_id: id, code: ErrorCode::Storage, message: "down".into() };
            let p = plan(transient, delivery(n), &unlimited, NOW);
            let want = if n == 1 { 1 } else { 5 };
            assert_eq!(p.settle, Settle::Nak(Some(Duration::from_secs(want))), "delivery {n}");
            let p = plan(Outcome::Shutdown { job_id: id, at_step: None }, delivery(n), &unlimited, NOW);
            assert!(!p.requeue && p.settle == Settle::Nak(None), "delivery {n}");
        }
        let no_backoff = RetryPolicy { max_deliver: 3, backoff: vec![] };
        let transient = Outcome::Transient { job_id: id, code: ErrorCode::Storage, message: "down".into() };
        assert_eq!(plan(transient, delivery(1), &no_backoff, NOW).settle, Settle::Nak(None));
    }
}
