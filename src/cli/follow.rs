//! Following a job to its end for `submit --wait` and `watch`: a progress display on stderr that says what
//! the job waits for (its queue position, or that no live worker serves its model), and a timeout that
//! ends with the reason rather than only "deadline has elapsed".

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use futures::StreamExt;
use uuid::Uuid;

use crate::api::{ApiEvent, QueenClient};
use crate::bus::BusClient;
use crate::protocol::{self, Event};

/// How long without a heartbeat from a worker serving the model before saying none serves it.
const NO_WORKER_AFTER: Duration = Duration::from_secs(2 * protocol::HEARTBEAT_INTERVAL_SECS);

/// The job's progress on stderr: a spinner with what it waits for while queued, a bar once it runs. Hidden
/// when stderr is not a terminal; the waiting notes are then printed as lines.
pub struct JobBar {
    bar: indicatif::ProgressBar,
    terminal: bool,
    note: Option<String>,
    /// Each event as a JSON line on stdout, and nothing on stderr ([`JobBar::json`]).
    json: bool,
}

impl Default for JobBar {
    fn default() -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = indicatif::ProgressBar::new_spinner();
        if !terminal {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message("queued");
        Self { bar, terminal, note: None, json: false }
    }
}

impl JobBar {
    /// Each event as a JSON line on stdout (`watch --json`: `{"event", "id", "data"}`), and nothing else.
    pub fn json() -> Self {
        Self { bar: indicatif::ProgressBar::hidden(), terminal: false, note: None, json: true }
    }

    /// An event as the queen sent it.
    fn message(&self, m: &crate::api::SseMessage) {
        if self.json {
            println!("{}", serde_json::json!({"event": m.event, "id": m.id, "data": m.data}));
        }
    }

    /// What a queued job waits for; said once per change.
    pub fn waiting(&mut self, note: String) {
        if self.note.as_ref() == Some(&note) || self.json {
            return;
        }
        if self.terminal {
            self.bar.set_message(note.clone());
        } else {
            eprintln!("{note}");
        }
        self.note = Some(note);
    }

    pub fn started(&mut self, worker: &str) {
        self.note = Some(format!("running on {worker}"));
        self.bar.set_message(format!("running on {worker}"));
    }

    pub fn progress(&self, step: u32, total: u32) {
        if self.bar.length() != Some(u64::from(total)) {
            if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} step {pos}/{len} [{bar:30}] {elapsed}") {
                self.bar.set_style(style.progress_chars("=> "));
            }
            self.bar.set_length(u64::from(total));
        }
        self.bar.set_position(u64::from(step));
    }

    /// What the job was doing, for a timeout's message.
    fn state(&self) -> String {
        self.note.clone().unwrap_or_else(|| "queued".into())
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Follows a job published on the bus to its terminal event. While it is queued, listens to heartbeats to
/// say when no live worker serves its model.
pub async fn on_bus(
    client: &BusClient,
    job_id: Uuid,
    model: &str,
    timeout: Duration,
    bar: &mut JobBar,
) -> anyhow::Result<Event> {
    let events = client.events(job_id).await?;
    tokio::pin!(events);
    let mut beats = client.nats().subscribe(client.subjects().heartbeats_wildcard()).await?;
    let (start, mut served_at, mut running) = (Instant::now(), None::<Instant>, false);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => {
                    match &event {
                        Event::Accepted(a) => {
                            running = true;
                            bar.started(&a.worker_id);
                        }
                        Event::Progress(p) if p.phase.is_some() => bar.waiting(format!("loading model {model}")),
                        Event::Progress(p) => bar.progress(p.step, p.total),
                        _ => {}
                    }
                    if event.is_terminal() {
                        return Ok(event);
                    }
                }
                // An event this build cannot read (a newer type) is skipped, as the protocol says.
                Some(Err(e)) => tracing::warn!(error = %e, "skipping an unreadable event"),
                None => anyhow::bail!("the event stream of job {job_id} ended before the job did"),
            },
            Some(beat) = beats.next() => {
                if let Ok(hb) = protocol::decode_heartbeat(&beat.payload) {
                    if !hb.stopping && hb.models.iter().any(|m| m == model) {
                        served_at = Some(Instant::now());
                    }
                }
            }
            _ = tick.tick() => {
                let heard = served_at.is_some_and(|at| at.elapsed() < NO_WORKER_AFTER);
                if !running && !heard && start.elapsed() >= NO_WORKER_AFTER {
                    bar.waiting(format!(
                        "queued: no live worker serves model {model} (none heard for {} s); it runs when one starts",
                        NO_WORKER_AFTER.as_secs()
                    ));
                }
                if start.elapsed() >= timeout {
                    let state = match (running, heard) {
                        (true, _) => bar.state(),
                        (false, true) => format!("still queued (a live worker serves model {model}: jobs ahead of it are running)"),
                        (false, false) => format!(
                            "still queued: no live worker serving model {model} was heard in the {} waited",
                            humantime::format_duration(Duration::from_secs(start.elapsed().as_secs()))
                        ),
                    };
                    anyhow::bail!("job {job_id} did not finish within {}: {state}", humantime::format_duration(timeout));
                }
            }
        }
    }
}

/// Follows a job submitted through the queen to its terminal event; while it is queued, asks the queen for
/// its queue position and whether a live worker serves its model. A stream that breaks (the queen restarts)
/// is taken up again after the last event seen (`Last-Event-ID`), a few times in a row.
pub async fn on_queen(
    client: &QueenClient,
    job_id: Uuid,
    timeout: Duration,
    bar: &mut JobBar,
) -> anyhow::Result<ApiEvent> {
    const RECONNECTS: u32 = 5;
    let (start, mut running, mut last_id, mut reconnects) = (Instant::now(), false, None::<String>, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let events = match client.events(job_id, last_id.as_deref()).await {
            Ok(events) => events,
            Err(e) if reconnects < RECONNECTS && (last_id.is_some() || is_busy(&e)) && !is_refusal(&e) => {
                reconnects += 1;
                // The token's streams are all in use (one may be this follower's own, not yet freed): as
                // the queen's Retry-After says.
                // Else 1, 2, 4, 8, 8 s: a queen restarted (a rolling update) may take a while to listen again.
                let pause = if is_busy(&e) { 5 } else { 1u64 << (reconnects - 1).min(3) };
                tokio::time::sleep(Duration::from_secs(pause)).await;
                tracing::debug!(error = %e, "reconnecting to the job's events");
                continue;
            }
            Err(e) => return Err(e),
        };
        tokio::pin!(events);
        loop {
            tokio::select! {
                message = events.next() => match message {
                    Some(Ok(message)) => {
                        last_id = Some(message.id.clone());
                        // The budget is for one outage: a long job may see the queen restarted many times.
                        reconnects = 0;
                        bar.message(&message);
                        // An event this build does not know (a newer queen) is skipped.
                        let Some(event) = message.typed()? else { continue };
                        match &event {
                            ApiEvent::Started { worker_id, .. } => {
                                running = true;
                                bar.started(worker_id);
                            }
                            ApiEvent::Progress { phase: Some(_), .. } => bar.waiting("loading the model".into()),
                            ApiEvent::Progress { step, total, .. } => bar.progress(*step, *total),
                            _ => {}
                        }
                        if event.is_terminal() {
                            return Ok(event);
                        }
                    }
                    Some(Err(_)) | None if reconnects < RECONNECTS => {
                        reconnects += 1;
                        break;
                    }
                    Some(Err(e)) => return Err(e),
                    None => anyhow::bail!("the event stream of job {job_id} ended before the job did"),
                },
                _ = tick.tick() => {
                    if !running {
                        let status = tokio::time::timeout(Duration::from_secs(5), client.status(job_id)).await;
                        if let Ok(Ok(status)) = status {
                            let model = &status.status.model;
                            let note = match (status.waiting_for_worker, status.queue_position) {
                                (true, _) => format!("queued: no live worker serves model {model}; it runs when one starts"),
                                (false, Some(n)) => format!("queued: {n} jobs of {model} ahead"),
                                (false, None) => "queued".to_string(),
                            };
                            bar.waiting(note);
                        }
                    }
                    if start.elapsed() >= timeout {
                        anyhow::bail!("job {job_id} did not finish within {}: {}", humantime::format_duration(timeout), bar.state());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An answer from the queen (a 4xx), which reconnecting does not change.
fn is_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::api::ApiError>().is_some_and(|a| (400..500).contains(&a.status) && a.status != 429)
}

/// `429 TOO_MANY_STREAMS`: worth asking again once another stream of the token closed.
fn is_busy(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::api::ApiError>().is_some_and(|a| a.status == 429)
}
