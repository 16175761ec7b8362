//! Cross-job batching: generations of different jobs that can share UNet passes (the same loaded model and
//! the same [`BatchKey`]: size, timesteps, LoRA set) run as one batch. Each job hands in a [`Ticket`] and
//! waits for its own result; everything else stays the job's own (progress, previews, cancel, deadline,
//! results, ack). The oldest waiting ticket waits at most the batch window for company, and not at all once
//! its batch is full. Batches run on blocking threads, at most `concurrency` at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::device::DeviceSpec;
use crate::diffusion::{
    BatchKey, BatchMember, CancelFlag, GenerateError, GenerationOutput, GenerationRequest, StepCallback, StepInfo,
};
use crate::generation::LoadedModel;
use crate::vocab::Priority;

/// One job's generation, waiting for a batch.
pub struct Ticket {
    pub model: Arc<LoadedModel>,
    pub request: GenerationRequest,
    pub key: BatchKey,
    pub cancel: CancelFlag,
    pub on_step: Box<dyn FnMut(&StepInfo) + Send>,
    pub done: oneshot::Sender<Result<GenerationOutput, GenerateError>>,
    /// Told when the ticket's batch starts (the job's time limit counts from then), with the batch's beat; and
    /// again, with its own, when it runs again alone after its batch failed.
    pub started: Option<mpsc::UnboundedSender<Arc<BatchBeat>>>,
    /// The job's priority: the highest waiting leads the next batch.
    pub priority: Priority,
}

/// When a running batch last finished a step (of any of its members) or a piece of its decode (a VAE call,
/// a tile), and the longest it took between two: a batch silent far longer than that is stuck in a call that
/// will not return (a hung device), which no cancel flag can interrupt.
#[derive(Debug)]
pub struct BatchBeat {
    started: Instant,
    last_ms: AtomicU64,
    longest_gap_ms: AtomicU64,
    /// Whether a step, VAE call or tile has finished yet.
    alive: AtomicBool,
    /// How many times a reference batch's work its first step is (at least 1): see [`first_step_scale`].
    first_step_scale: f64,
}

/// The work of a first step, which stands in for its unknown length until one ends, as a multiple of a
/// reference batch (one 1024² image with guidance: two UNet rows): rows times pixels squared (attention's
/// cost at the top levels), from 1 to [`MAX_FIRST_STEP_SCALE`]. The stall timeout is the reference's
/// patience; a 2048² batch of eight guided images on a CPU may take an hour for its first step, and a stop
/// early in it is no hang. (Past the cap, a device busy that long on a stopped job's step is better restarted
/// than waited for, hung or not; and a hung one is found within the hour.)
pub fn first_step_scale(requests: &[&GenerationRequest]) -> f64 {
    const REFERENCE_ROWS: f64 = 2.0;
    const REFERENCE_PIXELS: f64 = 1024.0 * 1024.0;
    let rows: f64 = requests.iter().map(|r| (r.num_images * if r.guidance_scale > 1.0 { 2 } else { 1 }) as f64).sum();
    let pixels = requests.iter().map(|r| (r.width * r.height) as f64).fold(0.0, f64::max);
    ((rows / REFERENCE_ROWS) * (pixels / REFERENCE_PIXELS).powi(2)).clamp(1.0, MAX_FIRST_STEP_SCALE)
}

/// The most [`first_step_scale`] grows the stall timeout: an hour at its default of 10 minutes.
pub const MAX_FIRST_STEP_SCALE: f64 = 6.0;

impl BatchBeat {
    fn new(first_step_scale: f64) -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            longest_gap_ms: AtomicU64::new(0),
            alive: AtomicBool::new(false),
            first_step_scale: first_step_scale.max(1.0),
        }
    }

    /// A step, a VAE call or a tile finished.
    fn beat(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_ms.swap(now, Ordering::Relaxed);
        self.longest_gap_ms.fetch_max(now.saturating_sub(last), Ordering::Relaxed);
        self.alive.store(true, Ordering::Relaxed);
    }

    /// How long since the last step, VAE call or tile finished (or the batch started).
    pub fn silent_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// The longest time between two such signs of life so far (the first counted from the batch's start).
    pub fn longest_gap(&self) -> Duration {
        Duration::from_millis(self.longest_gap_ms.load(Ordering::Relaxed))
    }

    /// Whether the batch, told to stop at `stopped`, is stuck: silent since then (or since its last sign of life
    /// after it) for longer than `floor` and three times the longest gap it has shown, counting the gap it was in
    /// when told. A step's length is unknown until one ends, but the one running when told has taken that long
    /// already: a slow first step (a large image on a CPU) stopped after minutes is not taken for a hung device.
    pub fn hung(&self, stopped: Instant, floor: Duration) -> bool {
        self.hung_at(stopped, floor, Instant::now())
    }

    fn hung_at(&self, stopped: Instant, floor: Duration, now: Instant) -> bool {
        let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        let open_at_stop = stopped.saturating_duration_since(last);
        // Before any sign of life, the floor grows with the first step's work.
        let floor = if !self.alive.load(Ordering::Relaxed) { floor.mul_f64(self.first_step_scale) } else { floor };
        let patience = floor.max(self.longest_gap().max(open_at_stop) * 3);
        now.saturating_duration_since(last.max(stopped)) >= patience
    }
}

/// How batches are formed and run.
#[derive(Clone, Debug)]
pub struct BatchSettings {
    /// The most images one batch generates (`None`: [`default_max_batch`]).
    pub max_batch: Option<usize>,
    /// How long the oldest waiting job waits for others to share its batch.
    pub window: Duration,
    /// Batches running at the same time.
    pub concurrency: usize,
    /// A pause after every step of a batch: simulates a slow device (for tests and demos).
    pub step_delay: Duration,
    pub device: DeviceSpec,
}

/// Area at which the default batch size applies unscaled (512 × 512 pixels).
const REFERENCE_PIXELS: usize = 512 * 512;

/// The default `--max-batch`: 1 on the CPU, where the UNet is compute-bound and a batch mostly adds latency;
/// 8 at 512 × 512 on GPUs, fewer for larger images (2 at 1024 × 1024), so the default fits the memory the
/// default of one job used to take several times over and no more.
pub fn default_max_batch(device: DeviceSpec, width: usize, height: usize) -> usize {
    match device {
        DeviceSpec::Cpu => 1,
        _ => (8 * REFERENCE_PIXELS / (width * height).max(1)).clamp(1, 8),
    }
}

/// Batches run so far, by size: `counts()[i]` batches of `i + 1` images.
#[derive(Debug, Default)]
pub struct BatchCounts(Mutex<Vec<u64>>);

impl BatchCounts {
    fn record(&self, size: usize) {
        let mut counts = self.0.lock().unwrap();
        if counts.len() < size {
            counts.resize(size, 0);
        }
        counts[size - 1] += 1;
    }
    pub fn counts(&self) -> Vec<u64> {
        self.0.lock().unwrap().clone()
    }
}

/// Hands tickets to the batching task.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Ticket>,
}

impl Batcher {
    /// Starts the batching task (on the current tokio runtime).
    pub fn start(settings: BatchSettings, counts: Arc<BatchCounts>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(settings, counts, rx));
        Self { tx }
    }

    /// Queues a ticket; its result comes on the ticket's `done`.
    pub fn submit(&self, ticket: Ticket) {
        if let Err(mpsc::error::SendError(ticket)) = self.tx.send(ticket) {
            let _ = ticket.done.send(Err(GenerateError::Other(anyhow::anyhow!("the worker is stopping"))));
        }
    }
}

/// What to do with the waiting tickets.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Run these (indices into the waiting list, oldest first).
    Run(Vec<usize>),
    /// Wait for company until then.
    WaitUntil(Instant),
}

/// A waiting ticket as the decision sees it: its group, its images, its priority and when it arrived.
struct Waiting<K> {
    group: K,
    images: usize,
    priority: Priority,
    arrived: Instant,
}

/// The batch of the oldest waiting ticket: every ticket of its group, oldest first, while the images fit
/// `max_images` (the oldest always goes). Run now when full or when the oldest has waited the window.
fn next<K: PartialEq>(
    waiting: &[Waiting<K>],
    max_images: impl Fn(&K) -> usize,
    window: Duration,
    now: Instant,
) -> Next {
    // The lead: the oldest of the highest priority waiting (the list is in arrival order).
    let lead = (0..waiting.len()).min_by_key(|&i| (waiting[i].priority, i)).expect("called with tickets waiting");
    let lead = &waiting[lead];
    let cap = max_images(&lead.group).max(1);
    // Its group's tickets, highest priority first, then oldest first (the lead always goes).
    let mut members: Vec<usize> = (0..waiting.len()).filter(|&i| waiting[i].group == lead.group).collect();
    members.sort_by_key(|&i| (waiting[i].priority, i));
    let mut picked = Vec::new();
    let mut images = 0;
    let mut full = false;
    for i in members {
        let w = &waiting[i];
        if !picked.is_empty() && images + w.images > cap {
            full = true;
            break;
        }
        picked.push(i);
        images += w.images;
    }
    picked.sort_unstable();
    let deadline = lead.arrived + window;
    if full || images >= cap || now >= deadline {
        Next::Run(picked)
    } else {
        Next::WaitUntil(deadline)
    }
}

/// A ticket's group: the model it runs on (by identity) and its batch key.
#[derive(PartialEq)]
struct Group {
    model: usize,
    key: BatchKey,
}

async fn batch_loop(settings: BatchSettings, counts: Arc<BatchCounts>, mut rx: mpsc::UnboundedReceiver<Ticket>) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    // Two lists in step: what the decision reads, and the tickets.
    let mut waiting: Vec<Waiting<Group>> = Vec::new();
    let mut tickets: Vec<Ticket> = Vec::new();
    let max_images =
        |g: &Group| settings.max_batch.unwrap_or_else(|| default_max_batch(settings.device, g.key.width, g.key.height));
    loop {
        // Tickets cancelled while they wait leave at once (their jobs are cancelled or out of time).
        let mut i = 0;
        while i < waiting.len() {
            if tickets[i].cancel.is_cancelled() {
                waiting.remove(i);
                let ticket = tickets.remove(i);
                let _ = ticket.done.send(Err(GenerateError::Cancelled { completed: 0, total: 0 }));
            } else {
                i += 1;
            }
        }
        let decision =
            if waiting.is_empty() { None } else { Some(next(&waiting, max_images, settings.window, Instant::now())) };
        let wait_until = match decision {
            Some(Next::Run(picked)) => match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let mut batch = Vec::with_capacity(picked.len());
                    for &i in picked.iter().rev() {
                        waiting.remove(i);
                        batch.push(tickets.remove(i));
                    }
                    batch.reverse();
                    counts.record(batch.iter().map(|t| t.request.num_images).sum());
                    let step_delay = settings.step_delay;
                    tokio::task::spawn_blocking(move || {
                        run_batch(batch, step_delay);
                        drop(permit);
                    });
                    continue;
                }
                // Every slot runs a batch: look again soon (a slot frees, or a waiting job is cancelled).
                Err(_) => Some(Instant::now() + Duration::from_millis(20)),
            },
            Some(Next::WaitUntil(at)) => Some(at),
            None => None,
        };
        let received = match wait_until {
            Some(at) => {
                let at = tokio::time::Instant::from_std(at.min(Instant::now() + Duration::from_millis(100)));
                match tokio::time::timeout_at(at, rx.recv()).await {
                    Ok(r) => r.map(Some),
                    Err(_) => Some(None),
                }
            }
            None => rx.recv().await.map(Some),
        };
        match received {
            Some(Some(ticket)) => {
                let w = Waiting {
                    group: Group { model: Arc::as_ptr(&ticket.model) as usize, key: ticket.key.clone() },
                    images: ticket.request.num_images,
                    priority: ticket.priority,
                    arrived: Instant::now(),
                };
                waiting.push(w);
                tickets.push(ticket);
            }
            Some(None) => {}
            // Every sender is gone: the worker has stopped.
            None if waiting.is_empty() => return,
            None => {}
        }
    }
}

/// Runs one batch on this (blocking) thread and hands every ticket its result. Members a shared call failed
/// for (a batch too large for the device's memory, as like as not) run again one by one, rather than all fail
/// their delivery together, come back together, be batched together and fail again.
fn run_batch(mut batch: Vec<Ticket>, step_delay: Duration) {
    let (mut results, beat) = run_members(&mut batch.iter_mut().collect::<Vec<_>>(), None, step_delay);
    // (A member cancelled meanwhile ends at once, before its first step.) Each run alone beats the failed
    // batch's beat too: the members still waiting their turn watch it, and would take the silence for a hang.
    run_alone_after_a_shared_failure(&mut batch, &mut results, |ticket| {
        run_members(&mut [ticket], Some(&beat), step_delay).0.pop().expect("one result per member")
    });
    for (ticket, result) in batch.into_iter().zip(results) {
        let _ = ticket.done.send(result);
    }
}

/// In a batch of several, runs each member whose result is a shared call's failure again alone, its result
/// replacing that failure.
fn run_alone_after_a_shared_failure<T, O>(
    members: &mut [T],
    results: &mut [Result<O, GenerateError>],
    mut alone: impl FnMut(&mut T) -> Result<O, GenerateError>,
) {
    if members.len() < 2 {
        return;
    }
    for (member, result) in members.iter_mut().zip(results.iter_mut()) {
        if let Err(GenerateError::Batch(e)) = result {
            tracing::warn!(error = %format!("{e:#}"), "a batch's shared call failed; its members run alone");
            *result = alone(member);
        }
    }
}

/// Generates `tickets` as one batch, a result for each, telling each ticket it started (its time limit and
/// the watchdog count from then, on the beat returned); its signs of life beat `also` too.
fn run_members(
    tickets: &mut [&mut Ticket],
    also: Option<&BatchBeat>,
    step_delay: Duration,
) -> (Vec<Result<GenerationOutput, GenerateError>>, Arc<BatchBeat>) {
    let started = Arc::new(BatchBeat::new(first_step_scale(&tickets.iter().map(|t| &t.request).collect::<Vec<_>>())));
    for ticket in tickets.iter() {
        if let Some(to) = &ticket.started {
            let _ = to.send(started.clone());
        }
    }
    let beat = &|| {
        started.beat();
        if let Some(also) = also {
            also.beat();
        }
    };
    let model = tickets[0].model.clone();
    let slept = Cell::new(0usize);
    let mut callbacks: Vec<StepCallback> = Vec::with_capacity(tickets.len());
    let mut requests = Vec::with_capacity(tickets.len());
    for ticket in tickets.iter_mut() {
        let on_step = &mut ticket.on_step;
        let slept = &slept;
        callbacks.push(Box::new(move |info: &StepInfo| {
            // One pause per step of the batch, not one per member.
            if !step_delay.is_zero() && info.step > slept.get() {
                slept.set(info.step);
                std::thread::sleep(step_delay);
            }
            beat();
            on_step(info)
        }));
        requests.push((&ticket.request, &ticket.cancel));
    }
    // The decode has no steps: its VAE calls and tiles are the batch's signs of life meanwhile.
    let alive = || beat();
    let mut members: Vec<BatchMember> = requests
        .into_iter()
        .zip(callbacks.iter_mut())
        .map(|((request, cancel), on_step)| BatchMember {
            request,
            on_step: on_step.as_mut(),
            cancel: Some(cancel),
            on_decode: Some(&alive),
        })
        .collect();
    if members.len() > 1 {
        tracing::debug!(size = members.len(), "running a batch");
    }
    let results = model.pipeline.generate_batch(&mut members);
    (results, started.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_beat_tells_its_silence_and_its_slowest_step() {
        let beat = BatchBeat::new(1.0);
        std::thread::sleep(Duration::from_millis(30));
        assert!(beat.silent_for() >= Duration::from_millis(30));
        beat.beat();
        assert!(beat.silent_for() < Duration::from_millis(20));
        assert!(beat.longest_gap() >= Duration::from_millis(30), "the first step counts from the start");
        beat.beat();
        assert!(beat.longest_gap() >= Duration::from_millis(30), "the longest stays");
    }

    #[test]
    fn a_batch_is_hung_only_when_silent_past_its_patience_after_the_stop() {
        let beat = BatchBeat::new(1.0);
        let at = |ms: u64| beat.started + Duration::from_millis(ms);
        let floor = Duration::from_secs(10);
        // Told to stop 9 minutes into its first step: that step gets 27 minutes more, not the 10 of the floor.
        let stopped = at(9 * 60_000);
        assert!(!beat.hung_at(stopped, floor, at(9 * 60_000 + 600_000)));
        assert!(!beat.hung_at(stopped, floor, at(9 * 60_000 + 26 * 60_000)));
        assert!(beat.hung_at(stopped, floor, at(9 * 60_000 + 27 * 60_000)));
        // Told early: the floor holds, counted from the stop, not from the batch's start.
        assert!(!beat.hung_at(at(2_000), floor, at(11_000)));
        assert!(beat.hung_at(at(2_000), floor, at(12_000)));
        // Once steps have ended, the longest gap between them sets the patience.
        beat.last_ms.store(40_000, Ordering::Relaxed);
        beat.longest_gap_ms.store(20_000, Ordering::Relaxed);
        assert!(!beat.hung_at(at(45_000), floor, at(104_000)), "silent 59 s of a patience of 60");
        assert!(beat.hung_at(at(45_000), floor, at(105_000)));
        // A step that ends after the stop is a sign of life: silence counts from it.
        beat.last_ms.store(50_000, Ordering::Relaxed);
        assert!(!beat.hung_at(at(45_000), floor, at(105_000)));
    }

    #[test]
    fn a_large_first_step_stopped_early_is_given_time_in_proportion() {
        let request = |side: usize, num_images: usize| {
            let mut r = GenerationRequest::new("x");
            (r.width, r.height, r.num_images, r.guidance_scale) = (side, side, num_images, 7.5);
            r
        };
        let (small, huge) = (request(512, 1), request(2048, 8));
        assert_eq!(first_step_scale(&[&small]), 1.0, "never below the reference's patience");
        assert_eq!(first_step_scale(&[&request(1024, 4)]), 4.0, "4 times the rows");
        let twice_the_pixels = first_step_scale(&[&request(1448, 1)]);
        assert!((twice_the_pixels - 4.0).abs() < 0.01, "twice the pixels, 4 times the work: {twice_the_pixels}");
        assert_eq!(first_step_scale(&[&huge]), MAX_FIRST_STEP_SCALE, "8 × 16 times, capped");
        // Told to stop 5 s into a 2048² first step: 10 minutes of silence are no hang, the cap's hour is.
        let beat = BatchBeat::new(first_step_scale(&[&huge]));
        let at = |ms: u64| beat.started + Duration::from_millis(ms);
        let floor = Duration::from_secs(600);
        assert!(!beat.hung_at(at(5_000), floor, at(5_000 + 601_000)));
        assert!(!beat.hung_at(at(5_000), floor, at(5_000 + 59 * 60_000)));
        assert!(beat.hung_at(at(5_000), floor, at(5_000 + 60 * 60_000)));
        // Once a step has ended, steps are known: the floor is the floor again.
        beat.beat();
        let last = beat.last_ms.load(Ordering::Relaxed);
        assert!(beat.hung_at(at(last), floor, at(last + 600_000)));
    }

    #[test]
    fn members_of_a_batch_whose_shared_call_failed_run_alone() {
        let shared = || Err(GenerateError::Batch(anyhow::anyhow!("CUDA out of memory")));
        let own = || Err(GenerateError::InvalidRequest { field: "width", message: "bad".into() });
        let mut members = [1, 2, 3];
        let mut results: Vec<Result<i32, GenerateError>> = vec![shared(), own(), shared()];
        let mut ran = Vec::new();
        run_alone_after_a_shared_failure(&mut members, &mut results, |m| {
            ran.push(*m);
            if *m == 3 {
                shared()
            } else {
                Ok(*m * 10)
            }
        });
        assert_eq!(ran, [1, 3], "only the members the shared call failed for, once each");
        assert!(matches!(results[0], Ok(10)));
        assert!(matches!(results[1], Err(GenerateError::InvalidRequest { .. })), "its own error stays");
        assert!(matches!(results[2], Err(GenerateError::Batch(_))), "failing alone too, it fails");
        // A lone member has nothing to gain from running again.
        let mut results: Vec<Result<i32, GenerateError>> = vec![shared()];
        run_alone_after_a_shared_failure(&mut [1], &mut results, |_| panic!("not run again"));
    }

    fn w(group: char, images: usize, arrived: Instant) -> Waiting<char> {
        Waiting { group, images, priority: Priority::Normal, arrived }
    }

    #[test]
    fn the_highest_priority_waiting_leads_and_goes_first_in_its_group() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let at = |group, priority| Waiting { group, images: 1, priority, arrived: t0 };
        let waiting = [
            at('a', Priority::Low),
            at('b', Priority::Low),
            at('b', Priority::High),
            at('a', Priority::Normal),
            at('b', Priority::Normal),
        ];
        // The high job's group leads; within it high, then normal, then low, while the batch has room.
        assert_eq!(next(&waiting, |_| 2, window, t0), Next::Run(vec![2, 4]));
        // Room for all of b: it waits the window for company, then runs every b job.
        assert_eq!(next(&waiting, |_| 8, window, t0), Next::WaitUntil(t0 + window));
        assert_eq!(next(&waiting, |_| 8, window, t0 + window), Next::Run(vec![1, 2, 4]));
        // Without a high one, the normal job's group leads, ahead of the older low ones.
        assert_eq!(next(&waiting[..2], |_| 1, window, t0), Next::Run(vec![0]));
        let no_high = [at('a', Priority::Low), at('b', Priority::Normal)];
        assert_eq!(next(&no_high, |_| 1, window, t0), Next::Run(vec![1]));
    }

    #[test]
    fn a_lone_job_waits_the_window_and_no_longer() {
        let t0 = Instant::now();
        let window = Duration::from_millis(50);
        let waiting = [w('a', 1, t0)];
        assert_eq!(next(&waiting, |_| 4, window, t0), Next::WaitUntil(t0 + window));
        assert_eq!(next(&waiting, |_| 4, window, t0 + window), Next::Run(vec![0]));
        // With batches of one there is nothing to wait for.
        assert_eq!(next(&waiting, |_| 1, window, t0), Next::Run(vec![0]));
    }

    #[test]
    fn a_full_batch_runs_at_once_with_the_oldest_group_only() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let waiting = [w('a', 1, t0), w('b', 1, t0), w('a', 2, t0), w('a', 1, t0), w('a', 1, t0)];
        // Images count: 1 + 2 + 1 = 4 fills a batch of 4; the fifth waits for the next one.
        assert_eq!(next(&waiting, |_| 4, window, t0), Next::Run(vec![0, 2, 3]));
        // A job bigger than the batch still runs (alone).
        let big = [w('a', 6, t0), w('a', 1, t0)];
        assert_eq!(next(&big, |_| 4, window, t0), Next::Run(vec![0]));
        // Caps per group (the default scales with the image size).
        let caps = |g: &char| if *g == 'a' { 2 } else { 8 };
        assert_eq!(next(&waiting, caps, window, t0), Next::Run(vec![0]));
    }

    #[test]
    fn default_batch_sizes() {
        assert_eq!(default_max_batch(DeviceSpec::Cpu, 512, 512), 1);
        let gpu = DeviceSpec::Cuda(0);
        assert_eq!(default_max_batch(gpu, 512, 512), 8);
        assert_eq!(default_max_batch(gpu, 1024, 1024), 2);
        assert_eq!(default_max_batch(gpu, 2048, 2048), 1);
        assert_eq!(default_max_batch(gpu, 64, 64), 8);
    }

    #[test]
    fn batch_counts_by_size() {
        let c = BatchCounts::default();
        c.record(1);
        c.record(3);
        c.record(3);
        assert_eq!(c.counts(), vec![1, 0, 2]);
    }
}
