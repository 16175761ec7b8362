//! Taking jobs off the bus: one task per model pulls one job per free slot, from the model's three priority
//! queues (consumers `high-workers-<model>`, `workers-<model>`, `low-workers-<model>`), highest first except
//! for one pick in `--priority-share`, which starts from the lowest so that low priorities never starve.
//!
//! Each pick asks the queues in order with no-wait pulls (one round trip each, answered at once). When all
//! are empty the task sleeps until a job is published for the model (a JetStream publish is also a plain
//! NATS message on its subject, which the task subscribes to while it is idle, and only then: the notices
//! carry the jobs' payloads) or a second has passed (redeliveries publish nothing).
//!
//! Priorities order the pulls, not what a worker already holds: with batching, a worker holds up to twice its
//! batch size of jobs, and the batcher puts the highest priority waiting first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catalogue::Catalogue;
use super::{job, Shared};
use crate::bus;
use crate::vocab::Priority;

/// A model's job consumers, highest priority first (the order of [`Priority::ALL`]).
pub type Queues = [PullConsumer; 3];

/// The longest an idle puller waits before looking at its queues again without being told of a new job.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// After a notice of a new job, how often and how soon the queues are asked again when none showed it.
const RECHECKS: u32 = 3;
const RECHECK: Duration = Duration::from_millis(2);

/// How long a no-wait pull may go unanswered before it counts as empty.
const PULL_ANSWER: Duration = Duration::from_secs(3);

/// The order in which pick number `pick` (counting from 0) asks the priorities: highest first, except every
/// `share`-th pick, which starts from the lowest. `share` 0 or 1: 0 is strict priority, 1 always bottom-up.
pub fn pick_order(pick: u64, share: u32) -> [Priority; 3] {
    let [high, normal, low] = Priority::ALL;
    if share > 0 && pick % u64::from(share) == u64::from(share) - 1 {
        [low, normal, high]
    } else {
        [high, normal, low]
    }
}

fn index(priority: Priority) -> usize {
    Priority::ALL.iter().position(|&p| p == priority).expect("every priority is in ALL")
}

/// Pulls `model`'s jobs, one per free slot, by priority.
pub async fn pull(
    shared: Arc<Shared>,
    model: String,
    mut queues: Queues,
    slots: Arc<Semaphore>,
    jobs: TaskTracker,
    backlog: Arc<Backlog>,
    stop: CancellationToken,
) {
    let several = shared.catalogue.names().len() > 1;
    // Notices of new jobs, subscribed to only while idle (see the module's documentation).
    let mut arrivals: Option<Arrivals> = None;
    let mut deferred_since: Option<Instant> = None;
    let mut picks: u64 = 0;
    let mut recheck = 0;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Waiting for a slot (the worker's other models hold them): notices' payloads, whole jobs, would
                // pile up unread in the subscriptions meanwhile.
                arrivals = None;
                tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = stop.cancelled() => return,
                }
            }
        };
        // A model that is not resident lets queued jobs of resident ones go first (for at most 30 s), so a
        // mixed queue does not load and evict models job by job.
        if several && !shared.catalogue.is_resident(&model) && backlog.resident_waiting(&shared.catalogue).await {
            let since = *deferred_since.get_or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_secs(30) {
                drop(permit);
                arrivals = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        deferred_since = None;
        let mut taken = None;
        for priority in pick_order(picks, shared.config.priority_share) {
            let queue = &mut queues[index(priority)];
            match next_job(queue, &stop).await {
                Ok(Some(msg)) => {
                    taken = Some(msg);
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(model, priority = priority.as_str(), error = %e, "cannot pull jobs; retrying");
                    tokio::select! {
                        _ = async {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            rebind(&shared, &model, priority, queue).await;
                        } => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        let Some(msg) = taken else {
            drop(permit);
            if stop.is_cancelled() {
                return;
            }
            // Told of a job that no queue showed yet (the notice can overtake the stream's store of it):
            // look again shortly, a few times, before waiting for the next notice.
            if recheck > 0 {
                recheck -= 1;
                tokio::time::sleep(RECHECK).await;
                continue;
            }
            // Idle: watch for new jobs, then look once more, for one published before the watch took hold.
            if arrivals.is_none() {
                // Not past a stop: with NATS away, the watch waits for it to come back.
                arrivals = tokio::select! {
                    watched = watch(&shared, &model) => watched,
                    _ = stop.cancelled() => return,
                };
                if arrivals.is_some() {
                    recheck = 1;
                    continue;
                }
            }
            tokio::select! {
                woke = next_arrival(&mut arrivals) => if woke { recheck = RECHECKS },
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        };
        // Busy: no notices (nor their payloads) while jobs are in hand.
        arrivals = None;
        recheck = 0;
        // A job pulled as the worker stops is handled all the same: handed back by the shutdown's policy (a
        // copy queued on its last delivery) rather than nakked, which spent its delivery and, on its last,
        // failed it as never settled.
        let stopping = stop.is_cancelled();
        picks += 1;
        let (shared, model) = (shared.clone(), model.clone());
        jobs.spawn(async move {
            job::handle(shared, model, msg).await;
            drop(permit);
        });
        if stopping {
            return;
        }
    }
}

/// The next waiting job of one queue, without waiting for one: `None` when it is empty. A no-wait pull is
/// answered at once; one whose answer is lost (a connection dropped between request and reply) or held (the
/// consumer at its `max_ack_pending`) counts as empty after [`PULL_ANSWER`].
async fn next_job(queue: &mut PullConsumer, stop: &CancellationToken) -> anyhow::Result<Option<jetstream::Message>> {
    let mut batch = queue.fetch().max_messages(1).messages().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tokio::select! {
        // A job that arrives as the worker stops is still handed to the caller, which hands it back.
        biased;
        m = tokio::time::timeout(PULL_ANSWER, batch.next()) => answered(m),
        // The pull was sent: its answer, a job perhaps, comes all the same (at once: it does not wait). Not
        // read, that job would sit unacknowledged for the ack wait, a delivery spent.
        _ = stop.cancelled() => answered(tokio::time::timeout(PULL_ANSWER, batch.next()).await),
    }
}

/// A no-wait pull's answer: a job, none (empty, or no answer in time), or an error.
fn answered<E: std::fmt::Display>(
    m: Result<Option<Result<jetstream::Message, E>>, tokio::time::error::Elapsed>,
) -> anyhow::Result<Option<jetstream::Message>> {
    match m {
        Ok(Some(Ok(msg))) => Ok(Some(msg)),
        Ok(Some(Err(e))) => Err(anyhow::anyhow!("{e}")),
        Ok(None) | Err(_) => Ok(None),
    }
}

/// Plain NATS subscriptions to a model's job subjects (every priority): they say when a job arrives.
type Arrivals = futures::stream::SelectAll<async_nats::Subscriber>;

/// Subscribes to `model`'s job subjects, and makes sure the server has the subscriptions before returning;
/// `None` if NATS refuses (the puller then looks every [`IDLE_POLL`]).
async fn watch(shared: &Shared, model: &str) -> Option<Arrivals> {
    let normal = shared.subjects.jobs_at(model, Priority::Normal).ok()?;
    let mut all = futures::stream::SelectAll::new();
    for subject in [normal.clone(), format!("{normal}.*")] {
        match shared.client.subscribe(subject).await {
            Ok(sub) => all.push(sub),
            Err(e) => {
                tracing::debug!(model, error = %e, "cannot watch for new jobs; polling");
                return None;
            }
        }
    }
    // Bounded: the flush waits for NATS, which may be away.
    tokio::time::timeout(IDLE_POLL * 5, shared.client.flush()).await.ok()?.ok()?;
    Some(all)
}

/// Waits for a notice of a new job, then drops any others already buffered (one look at the queues serves
/// them all). Returns false, after a while, if the subscriptions ended.
async fn next_arrival(arrivals: &mut Option<Arrivals>) -> bool {
    use futures::FutureExt;
    let Some(subs) = arrivals else { return std::future::pending().await };
    if subs.next().await.is_none() {
        *arrivals = None;
        tokio::time::sleep(IDLE_POLL).await;
        return false;
    }
    while let Some(Some(_)) = subs.next().now_or_never() {}
    true
}

/// Every model's job consumers, to see whose queues hold jobs.
pub struct Backlog(pub Vec<(String, Queues)>);

impl Backlog {
    /// Whether a resident model has jobs waiting (not yet delivered to any worker), at any priority.
    async fn resident_waiting(&self, catalogue: &Catalogue) -> bool {
        for (model, queues) in &self.0 {
            if catalogue.is_resident(model) {
                for queue in queues {
                    let mut queue = queue.clone();
                    if queue.info().await.is_ok_and(|i| i.num_pending > 0) {
                        return true;
                    }
                }
            }
        }
        false
    }
}

/// After a failed pull, binds `model`'s consumer at `priority` again, creating it (and the streams) when
/// they are gone: an operator deleted them, or the server lost its store. Leaves `queue` as it was while
/// NATS is unreachable.
async fn rebind(shared: &Shared, model: &str, priority: Priority, queue: &mut PullConsumer) {
    let bind = || bus::jobs_consumer(&shared.js, &shared.subjects, model, priority, &shared.config.consumer);
    let result = match bind().await {
        Ok(c) => Ok(c),
        Err(_) => match bus::ensure_streams(&shared.js, &shared.subjects, &shared.config.streams).await {
            Ok(()) => bind().await,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(c) => *queue = c,
        Err(e) => tracing::debug!(model, error = %e, "cannot bind the job consumer yet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_go_highest_first_except_the_share() {
        let top = [Priority::High, Priority::Normal, Priority::Low];
        let bottom = [Priority::Low, Priority::Normal, Priority::High];
        let orders: Vec<_> = (0..20).map(|pick| pick_order(pick, 10)).collect();
        assert_eq!(orders.iter().filter(|o| **o == bottom).count(), 2);
        assert_eq!(orders[9], bottom);
        assert_eq!(orders[19], bottom);
        assert_eq!(orders[0], top, "the first pick is the highest priority's");
        assert!((0..100).all(|pick| pick_order(pick, 0) == top), "0: strict priority");
        assert!((0..10).all(|pick| pick_order(pick, 1) == bottom));
        assert_eq!(index(Priority::High), 0);
        assert_eq!(index(Priority::Low), 2);
    }
}
