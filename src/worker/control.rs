//! What the worker knows about the jobs it runs: a stop handle per running job (for cancel requests,
//! timeouts and shutdown), cancel requests that arrived before their job did, and the counters and state
//! that heartbeats report.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::batcher::BatchCounts;
use crate::diffusion::CancelFlag;
use crate::protocol::WorkerState;

/// Why a running job was stopped; the first reason set wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A cancel request: report `cancelled`.
    Cancelled = 1,
    /// The job's deadline or the worker's timeout: report `failed` with `TIMEOUT`.
    Timeout = 2,
    /// The worker is shutting down and the grace period is over: hand the job to another worker.
    Shutdown = 3,
    /// The job waited on this worker for its time limit without starting (behind other batches): hand it back
    /// to be tried again (a transient failure) rather than fail a job that never ran.
    Unstarted = 4,
}

/// Stops one running job between two denoising steps.
#[derive(Clone, Debug, Default)]
pub struct StopHandle {
    flag: CancelFlag,
    reason: Arc<AtomicU8>,
    /// When the first reason was set (the stall watchdog counts from it).
    stopped_at: Arc<std::sync::OnceLock<Instant>>,
    /// Whether its generation has begun (its batch started).
    generating: Arc<AtomicBool>,
}

impl StopHandle {
    /// Asks the job to stop; returns false if it was already asked (the first reason stays).
    pub fn stop(&self, reason: StopReason) -> bool {
        let won = self.reason.compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if won {
            let _ = self.stopped_at.set(Instant::now());
        }
        self.flag.cancel();
        won
    }

    /// When the job was told to stop (`None` before).
    pub fn stopped_at(&self) -> Option<Instant> {
        self.stopped_at.get().copied()
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::Timeout),
            3 => Some(StopReason::Shutdown),
            4 => Some(StopReason::Unstarted),
            _ => None,
        }
    }

    /// Its batch started: from now on a shutdown lets it finish within the grace period.
    pub fn started_generating(&self) {
        self.generating.store(true, Ordering::SeqCst);
    }

    /// The flag the generator checks between steps.
    pub fn flag(&self) -> &CancelFlag {
        &self.flag
    }
}

/// How long a cancel request is remembered (for a job this worker has not seen yet, or one that may be
/// delivered again: its `cancelled` report lost).
const EARLY_CANCEL_TTL: Duration = Duration::from_secs(15 * 60);

/// The most such requests remembered.
const MAX_EARLY_CANCELS: usize = 10_000;

#[derive(Default)]
struct Jobs {
    /// Usually one handle a job; two when JetStream delivered a job again (its acks lost) while its first
    /// delivery still ran here: a cancel must reach both, and the first to end must not forget the other.
    running: HashMap<Uuid, Vec<StopHandle>>,
    /// When each arrived, and why (a cancel, or the job's ttl passed).
    early_cancels: HashMap<Uuid, (Instant, StopReason)>,
    /// The same requests in arrival order, to forget the oldest first in O(1); an entry asked again since
    /// is skipped when it comes up.
    early_order: VecDeque<(Uuid, Instant)>,
    /// Set when the grace period ends: a job starting now is stopped at once.
    stopping: Option<StopReason>,
    /// Set when a shutdown begins: a job starting now is handed back at once.
    handing_back: bool,
}

/// The worker's running jobs and its counters.
#[derive(Default)]
pub struct Control {
    jobs: Mutex<Jobs>,
    pub jobs_done: AtomicU64,
    pub jobs_failed: AtomicU64,
    /// Batches run so far, by size.
    pub batches: Arc<BatchCounts>,
    /// Jobs answered from the result cache (nothing generated).
    pub cache_hits: AtomicU64,
}

impl Control {
    /// Registers a job that starts running. The reason of a cancel request for it that arrived earlier
    /// instead (on every delivery of it while the request is remembered).
    pub fn start(&self, job_id: Uuid) -> Result<StopHandle, StopReason> {
        let mut jobs = self.jobs.lock().unwrap();
        if let Some(&(at, reason)) = jobs.early_cancels.get(&job_id) {
            if at.elapsed() < EARLY_CANCEL_TTL {
                return Err(reason);
            }
        }
        let handle = StopHandle::default();
        if let Some(reason) = jobs.stopping {
            handle.stop(reason);
        } else if jobs.handing_back {
            handle.stop(StopReason::Shutdown);
        }
        jobs.running.entry(job_id).or_default().push(handle.clone());
        Ok(handle)
    }

    /// The delivery of `job_id` that `start` gave `handle` ended (in any way).
    pub fn finish(&self, job_id: Uuid, handle: &StopHandle) {
        let mut jobs = self.jobs.lock().unwrap();
        if let Some(handles) = jobs.running.get_mut(&job_id) {
            handles.retain(|h| !Arc::ptr_eq(&h.reason, &handle.reason));
            if handles.is_empty() {
                jobs.running.remove(&job_id);
            }
        }
    }

    /// A cancel request: stops the job if it runs here (for `reason`: cancelled, or timed out when its
    /// ttl passed), and remembers it for a while in case the job is delivered (again) later. Returns
    /// whether a running job was stopped.
    pub fn cancel(&self, job_id: Uuid, reason: StopReason) -> bool {
        let mut jobs = self.jobs.lock().unwrap();
        let handles = jobs.running.get(&job_id);
        for handle in handles.into_iter().flatten() {
            handle.stop(reason);
        }
        let running = handles.is_some();
        if jobs.early_cancels.contains_key(&job_id) {
            return running;
        }
        let now = Instant::now();
        // Anyone on the bus can send cancel requests: a flood of them for random ids must not grow the
        // worker's memory, nor cost it more than a little work each. Expired requests go, and past the cap the
        // oldest one.
        while let Some(&(id, at)) = jobs.early_order.front() {
            let expired = now.duration_since(at) >= EARLY_CANCEL_TTL;
            if !expired && jobs.early_cancels.len() < MAX_EARLY_CANCELS {
                break;
            }
            jobs.early_order.pop_front();
            if jobs.early_cancels.get(&id).map(|e| e.0) == Some(at) {
                jobs.early_cancels.remove(&id);
            }
        }
        jobs.early_cancels.insert(job_id, (now, reason));
        jobs.early_order.push_back((job_id, now));
        running
    }

    /// A shutdown begins: the jobs in hand whose generation has not begun (reading inputs, loading their
    /// model, waiting for a batch) are handed back now, to run on another worker at once rather than here
    /// within the grace period, or be stopped at its end having spent a delivery.
    pub fn hand_back_unstarted(&self) {
        let mut jobs = self.jobs.lock().unwrap();
        jobs.handing_back = true;
        for handle in jobs.running.values().flatten() {
            if !handle.generating.load(Ordering::SeqCst) {
                handle.stop(StopReason::Shutdown);
            }
        }
    }

    /// Stops every running job for `reason` (shutdown).
    pub fn stop_all(&self, reason: StopReason) {
        let mut jobs = self.jobs.lock().unwrap();
        jobs.stopping = Some(reason);
        for handle in jobs.running.values().flatten() {
            handle.stop(reason);
        }
    }

    /// Idle, or busy with (one of) its jobs.
    pub fn state(&self) -> WorkerState {
        match self.jobs.lock().unwrap().running.keys().next() {
            Some(&job_id) => WorkerState::Busy { job_id },
            None => WorkerState::Idle,
        }
    }

    /// Deliveries running.
    pub fn running(&self) -> usize {
        self.jobs.lock().unwrap().running.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_hands_back_the_jobs_not_yet_generating() {
        let control = Control::default();
        let (waiting, generating) = (Uuid::new_v4(), Uuid::new_v4());
        let waits = control.start(waiting).unwrap();
        let runs = control.start(generating).unwrap();
        runs.started_generating();
        control.hand_back_unstarted();
        assert_eq!(waits.reason(), Some(StopReason::Shutdown));
        assert_eq!(runs.reason(), None, "a generation under way has the grace period to finish");
        let late = control.start(Uuid::new_v4()).unwrap();
        assert_eq!(late.reason(), Some(StopReason::Shutdown), "one starting after is handed back too");
    }

    #[test]
    fn cancel_stops_running_jobs_and_remembers_early_ones() {
        let control = Control::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let handle = control.start(a).unwrap();
        assert_eq!(control.state(), WorkerState::Busy { job_id: a });
        assert!(control.cancel(a, StopReason::Cancelled));
        assert!(handle.flag().is_cancelled());
        assert_eq!(handle.reason(), Some(StopReason::Cancelled));
        // A later reason does not replace the first.
        assert!(!handle.stop(StopReason::Shutdown));
        assert_eq!(handle.reason(), Some(StopReason::Cancelled));
        control.finish(a, &handle);
        assert_eq!(control.state(), WorkerState::Idle);
        assert!(control.start(a).is_err(), "a cancelled job delivered again (its report lost) does not start");

        // A second delivery of a job still running here: a cancel reaches both, and the first to end leaves
        // the other registered.
        let (first, second) = (control.start(b).unwrap(), control.start(b).unwrap());
        assert_eq!(control.running(), 2);
        control.finish(b, &first);
        assert_eq!((control.running(), control.state()), (1, WorkerState::Busy { job_id: b }));
        let third = control.start(b).unwrap();
        assert!(control.cancel(b, StopReason::Cancelled));
        assert!(second.flag().is_cancelled() && third.flag().is_cancelled());
        assert!(!first.flag().is_cancelled(), "the ended delivery is not stopped");
        control.finish(b, &second);
        control.finish(b, &third);
        assert_eq!((control.running(), control.state()), (0, WorkerState::Idle));
        let b = Uuid::new_v4();

        assert!(!control.cancel(b, StopReason::Cancelled));
        assert!(control.start(b).is_err(), "a job cancelled before it arrived does not start");
        assert_eq!(control.start(b).err(), Some(StopReason::Cancelled), "nor on a later delivery");
        let expired = Uuid::new_v4();
        control.cancel(expired, StopReason::Timeout);
        assert_eq!(control.start(expired).err(), Some(StopReason::Timeout), "the sweeper's cancel keeps its reason");

        // A flood of cancels for jobs never seen stays bounded, the newest remembered.
        let first = Uuid::new_v4();
        control.cancel(first, StopReason::Cancelled);
        let flood: Vec<Uuid> = (0..MAX_EARLY_CANCELS + 5).map(|_| Uuid::new_v4()).collect();
        for id in &flood {
            control.cancel(*id, StopReason::Cancelled);
        }
        for id in &flood[flood.len() - 10..] {
            control.cancel(*id, StopReason::Cancelled);
        }
        let jobs = control.jobs.lock().unwrap();
        assert_eq!(jobs.early_cancels.len(), MAX_EARLY_CANCELS);
        assert!(jobs.early_order.len() <= MAX_EARLY_CANCELS + 1, "repeats are not queued twice");
        drop(jobs);
        assert!(control.start(first).is_ok(), "the oldest request was forgotten");
        assert!(control.start(*flood.last().unwrap()).is_err());
    }
}
