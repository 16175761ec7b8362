//! A job's event feed, as `GET /v1/jobs/{id}/events` serves it: `queued`, then every event the events
//! stream holds for the job, then live ones until the terminal event. Each event has an [`EventId`] made
//! from its sequence in the events stream, so a client that drops resumes right after the last one it got
//! (nothing lost, nothing repeated) for as long as the events stream keeps the job's events (24 hours by
//! default, `EVENTS_MAX_AGE_SECS`); after that a finished job's feed ends with its terminal event rebuilt
//! from the status record. A live terminal event waits (briefly) for the status record to show it, so a
//! client that reads the job right after its feed ends reads the same ending. A live feed also reads the
//! job's record now and then: a record that shows the end (or the job's expiry) while the terminal event
//! does not come ends the feed with the record's ending, so no follower waits for ever on an event that
//! was lost.

use futures::stream::BoxStream;
use futures::StreamExt;

use std::time::Duration;

use super::jobs::JobsError;
use super::status::StatusStore;
use crate::api::{ApiEvent, EventId, JobStatus};
use crate::bus::BusClient;
use crate::protocol::Event;

/// The frames one bus event shows as, with their ids.
fn frames(seq: u64, event: &Event) -> impl Iterator<Item = (EventId, ApiEvent)> {
    ApiEvent::from_bus(event)
        .into_iter()
        .enumerate()
        .map(move |(part, e)| (EventId::Frame { seq, part: part as u32 }, e))
}

/// How long a live terminal event waits for the status record to show it.
const RECORD_WAIT: Duration = Duration::from_secs(2);

/// Waits until `store`'s record of `job_id` is terminal, for at most [`RECORD_WAIT`]. Whichever queen's
/// aggregator applies the event writes the record a moment after the event is on the bus; a lagging one
/// delays the frame, it never loses it.
async fn record_settled(store: &StatusStore, job_id: uuid::Uuid) {
    let deadline = tokio::time::Instant::now() + RECORD_WAIT;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Ok(Some(s)) = store.get(job_id).await {
            if s.state.is_terminal() || s.is_expired(crate::protocol::now_millis()) {
                return;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!(%job_id, "the status record lags the terminal event; ending the feed anyway");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// How often a live feed reads the job's record ([`feed`]'s `recheck`), as the queen sets it.
pub const RECHECK: Duration = Duration::from_secs(30);

/// The feed of the job `status` describes, after `after` (from the start with `None`); a live one reads
/// the job's record every `recheck`.
pub async fn feed(
    bus: &BusClient,
    store: &StatusStore,
    status: &JobStatus,
    after: Option<EventId>,
    recheck: Duration,
) -> Result<BoxStream<'static, (EventId, ApiEvent)>, JobsError> {
    let is_new = move |id: &EventId| after.is_none_or(|a| *id > a);
    let queued = Some((EventId::QUEUED, ApiEvent::queued(status))).filter(|(id, _)| is_new(id));
    if after == Some(EventId::End) {
        return Ok(futures::stream::empty().boxed());
    }
    if status.state.is_terminal() {
        // A finished job: what the events stream still holds, ending with the terminal event from the
        // status record when the stream's is gone.
        let stored = bus.stored_events(status.job_id).await.map_err(JobsError::Unavailable)?;
        // The story ends at its first terminal event (a late duplicate, e.g. a cancel that raced a worker's
        // completion, is not told).
        let ended = stored.iter().position(|(_, e)| e.is_terminal());
        let told = &stored[..ended.map_or(stored.len(), |i| i + 1)];
        let mut out: Vec<(EventId, ApiEvent)> = queued.into_iter().collect();
        out.extend(told.iter().flat_map(|(seq, e)| frames(*seq, e)).filter(|(id, _)| is_new(id)));
        if ended.is_none() {
            out.extend(ApiEvent::terminal_of(status).map(|e| (EventId::End, e)));
        }
        return Ok(futures::stream::iter(out).boxed());
    }
    // Resuming inside a bus event's frames (after its progress, before its preview) reads that event again.
    let from = match after {
        Some(EventId::Frame { seq, .. }) if seq > 0 => Some(seq - 1),
        _ => None,
    };
    let live = bus.events_after(status.job_id, from).await.map_err(JobsError::Unavailable)?;
    let live = live
        .filter_map(|e| async move {
            match e {
                Ok((seq, event)) => Some(futures::stream::iter(frames(seq, &event).collect::<Vec<_>>())),
                Err(err) => {
                    tracing::warn!(error = %err, "event stream error");
                    None
                }
            }
        })
        .flatten()
        .filter(move |(id, _)| futures::future::ready(is_new(id)));
    // The response ends right after the terminal event (a follower such as curl then returns), without
    // waiting for an event that will never come.
    let (store, job_id) = (store.clone(), status.job_id);
    let ended = async_stream::stream! {
        futures::pin_mut!(live);
        let mut look = tokio::time::interval_at(tokio::time::Instant::now() + recheck, recheck);
        // Looks missed while a slow reader held the stream come one by one, not in a burst.
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the previous look found the record ended: the record is written after the terminal event
        // is on the bus, so a whole `recheck` later that event is lost (or its stream refuses us).
        let mut ended_before = false;
        loop {
            tokio::select! {
                biased;
                frame = live.next() => {
                    let Some(frame) = frame else { break };
                    // The bus still tells the job's story: the record may end before the stream has sent it.
                    ended_before = false;
                    let last = frame.1.is_terminal();
                    if last {
                        record_settled(&store, job_id).await;
                    }
                    yield frame;
                    if last {
                        break;
                    }
                }
                _ = look.tick() => match store.get(job_id).await {
                    Ok(Some(s)) if s.state.is_terminal() || s.is_expired(crate::protocol::now_millis()) => {
                        if ended_before {
                            tracing::warn!(%job_id, state = %s.state.name(), "the job's record ended without its terminal event on the bus; ending its feed from the record");
                            if let Some(end) = ApiEvent::terminal_of(&s) {
                                yield (EventId::End, end);
                            }
                            break;
                        }
                        ended_before = true;
                    }
                    // The record is gone with the bucket's max age: nothing more will be told.
                    Ok(None) => break,
                    Ok(Some(_)) => ended_before = false,
                    Err(e) => tracing::debug!(%job_id, error = %e, "cannot read the job's record"),
                },
            }
        }
    };
    Ok(futures::stream::iter(queued).chain(ended).boxed())
}
