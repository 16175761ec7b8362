//! Where queued jobs stand in their queue, walked once for every caller ([`QueueWalks`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::vocab::Priority;

/// How long a walk of a queue answers positions before it is walked again from the consumer's place.
const WALK_FRESH: Duration = Duration::from_secs(1);
/// The most jobs a walk reads: a job further back has no position.
const MAX_WALK: usize = 1000;
/// Walks kept before the idle ones are forgotten.
const MAX_QUEUES_WALKED: usize = 1024;

/// The waiting jobs of each queue (model and priority), walked once for every caller: each status request of
/// a queued job used to walk its queue up to it, a thousand reads for a job a thousand back, so clients
/// polling many queued jobs multiplied the queue's depth. Now a queue is walked at most as far as the
/// furthest job asked for, once per [`WALK_FRESH`] (positions may be that stale), one walker at a time.
#[derive(Default)]
pub struct QueueWalks {
    walks: parking_lot::Mutex<HashMap<(String, Priority), SharedWalk>>,
}

/// One queue's walk; a caller holds it while it walks, so the others wait and read the same walk.
type SharedWalk = Arc<tokio::sync::Mutex<Walk>>;

/// The stream sequences of the jobs waiting on one queue's subject, in order, as far as walked.
#[derive(Default)]
struct Walk {
    started: Option<Instant>,
    seqs: Vec<u64>,
    /// The sequence to read from next.
    next: u64,
}

impl Walk {
    /// Where `seq` stands among the jobs walked: `Some(n)` with n jobs before it, `None` when it is not
    /// among them.
    fn position(&self, seq: u64) -> Option<u64> {
        let n = self.seqs.partition_point(|&s| s < seq);
        (self.seqs.get(n) == Some(&seq)).then_some(n as u64)
    }

    /// Whether the walk must go on to answer for `seq` (a job past its end) and may (under the cap).
    fn short_of(&self, seq: u64) -> bool {
        self.seqs.last().is_none_or(|&last| last < seq) && self.seqs.len() < MAX_WALK
    }
}

impl QueueWalks {
    /// Jobs before `seq` on the queue of `model` at `priority`; `None` when it is not waiting there (taken,
    /// cancelled, or past [`MAX_WALK`]) or NATS cannot say.
    pub(super) async fn ahead_of(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        subject: &str,
        model: &str,
        priority: Priority,
        seq: u64,
    ) -> Option<u64> {
        let walk = {
            let mut walks = self.walks.lock();
            // Models come and go: forget the walks no one is reading when there are many.
            if walks.len() >= MAX_QUEUES_WALKED {
                walks.retain(|_, walk| Arc::strong_count(walk) > 1);
            }
            walks.entry((model.to_string(), priority)).or_default().clone()
        };
        // Fresh as of the asking: callers that queued behind a long walk read it rather than each walk again.
        let asked = Instant::now();
        let mut walk = walk.lock().await;
        if walk.started.is_none_or(|at| asked.saturating_duration_since(at) >= WALK_FRESH) {
            // Jobs already delivered (running) are not waiting: start after the consumer's last delivery, or
            // at the start when no worker has made the consumer yet. A consumer NATS cannot tell about leaves
            // the position unknown: walked from the start, running jobs would count as waiting.
            let next = match stream.consumer_info(crate::bus::priority_consumer_name(model, priority)).await {
                Ok(info) => info.delivered.stream_sequence + 1,
                Err(e) if crate::bus::consumer_missing(&e) => 1,
                Err(_) => return None,
            };
            *walk = Walk { started: Some(Instant::now()), seqs: Vec::new(), next };
        }
        while walk.short_of(seq) {
            match stream.direct_get_next_for_subject(subject, Some(walk.next)).await {
                // (One past the job ends the walk for it, and is kept for the next caller.)
                Ok(msg) => {
                    walk.seqs.push(msg.sequence);
                    walk.next = msg.sequence + 1;
                }
                // No message from there on (or NATS cannot say): asked again, the walk goes on from here.
                Err(_) => break,
            }
        }
        walk.position(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_places_the_jobs_it_read_and_no_other() {
        let walk = Walk { started: Some(Instant::now()), seqs: vec![3, 7, 8, 20], next: 21 };
        assert_eq!([3, 7, 8, 20].map(|s| walk.position(s)), [Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!([1, 5, 21].map(|s| walk.position(s)), [None, None, None], "not waiting, or not read yet");
        assert!(walk.short_of(21) && !walk.short_of(20) && !walk.short_of(4));
        let full = Walk { seqs: (1..=MAX_WALK as u64).collect(), ..Default::default() };
        assert!(!full.short_of(MAX_WALK as u64 + 5), "never past the cap");
    }
}
