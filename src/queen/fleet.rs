//! The worker fleet as heartbeats show it. Every queen listens to every heartbeat (core NATS), so each has
//! the whole picture; a worker silent for `lost_after` is lost, and a job it held waits for redelivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use crate::api::WorkerInfo;
use crate::protocol::{self, Heartbeat, Subjects};

/// A model as the live fleet serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedModel {
    pub name: String,
    pub workers: usize,
    /// Of `workers`, those holding it in memory (the others load it for their first job).
    pub resident_workers: usize,
    pub loras: Vec<String>,
}

#[derive(Clone)]
pub struct Fleet {
    workers: Arc<Mutex<HashMap<String, (Heartbeat, u64)>>>,
    /// Every model a worker advertised, with when it last did (the catalogue of models jobs may name).
    advertised: Arc<Mutex<HashMap<String, u64>>>,
    lost_after_ms: u64,
    listening_since: std::time::Instant,
}

impl Fleet {
    pub fn new(lost_after: Duration) -> Self {
        Self {
            workers: Arc::default(),
            advertised: Arc::default(),
            lost_after_ms: lost_after.as_millis() as u64,
            listening_since: std::time::Instant::now(),
        }
    }

    /// Whether this queen has listened long enough to have heard every live worker (a queen just started
    /// cannot tell "no worker" from "not heard yet").
    pub fn has_heard_everyone(&self) -> bool {
        self.listening_since.elapsed().as_millis() as u64 >= self.lost_after_ms
    }

    /// Whether a worker advertised `model` within `retention` of `now`.
    pub fn advertised_within(&self, model: &str, now: u64, retention: Duration) -> bool {
        let retention = retention.as_millis() as u64;
        self.advertised.lock().unwrap().get(model).is_some_and(|&at| now.saturating_sub(at) <= retention)
    }

    /// The models workers advertised within `retention` of `now`, sorted.
    pub fn advertised(&self, now: u64, retention: Duration) -> Vec<String> {
        let retention = retention.as_millis() as u64;
        let mut names: Vec<String> = self
            .advertised
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, &at)| now.saturating_sub(at) <= retention)
            .map(|(m, _)| m.clone())
            .collect();
        names.sort();
        names
    }

    /// Records a heartbeat. Anyone on the bus can send one, so what is kept is bounded: at most
    /// [`MAX_WORKERS`] workers (a new one past that replaces the one silent longest), each with what
    /// [`check_heartbeat`] lets through.
    pub fn record(&self, hb: Heartbeat, now: u64) {
        let mut workers = self.workers.lock().unwrap();
        forget_departed(&mut workers, now);
        if !workers.contains_key(&hb.worker_id) && workers.len() >= MAX_WORKERS {
            // Room is made from lost workers only: a flood of new ids cannot push out live ones.
            let lost_after = self.lost_after_ms;
            let stalest = workers
                .iter()
                .filter(|(_, (_, seen))| now.saturating_sub(*seen) > lost_after)
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(id, _)| id.clone());
            match stalest {
                Some(id) => workers.remove(&id),
                None => return tracing::debug!(worker_id = %hb.worker_id, "fleet full of live workers; ignored"),
            };
        }
        let mut advertised = self.advertised.lock().unwrap();
        for model in &hb.models {
            if advertised.len() >= MAX_ADVERTISED_MODELS && !advertised.contains_key(model) {
                // Room is made by forgetting the model advertised longest ago.
                let oldest = advertised.iter().min_by_key(|(_, &at)| at).map(|(m, _)| m.clone());
                oldest.map(|m| advertised.remove(&m));
            }
            advertised.insert(model.clone(), now);
        }
        workers.insert(hb.worker_id.clone(), (hb, now));
    }

    /// Every worker heard of, lost ones included (until forgotten: see [`LOST_KEPT`]), sorted by id.
    pub fn workers(&self, now: u64) -> Vec<WorkerInfo> {
        let mut workers = self.workers.lock().unwrap();
        forget_departed(&mut workers, now);
        let mut out: Vec<WorkerInfo> = workers
            .values()
            .map(|(hb, seen)| WorkerInfo {
                heartbeat: hb.clone(),
                last_seen: *seen,
                lost: !hb.stopping && now.saturating_sub(*seen) > self.lost_after_ms,
                stopped: hb.stopping,
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
        out
    }

    /// Whether `worker_id` is lost (heard of, then silent too long). An unknown worker is lost once this
    /// queen has listened long enough to have heard it (it was forgotten, or went before the queen started);
    /// before that, it may yet be heard.
    pub fn is_lost(&self, worker_id: &str, now: u64) -> bool {
        match self.workers.lock().unwrap().get(worker_id) {
            Some((hb, seen)) => hb.stopping || now.saturating_sub(*seen) > self.lost_after_ms,
            None => self.has_heard_everyone(),
        }
    }

    /// Live workers serving `model`.
    pub fn serving(&self, model: &str, now: u64) -> usize {
        let workers = self.workers.lock().unwrap();
        let live = |seen: u64| now.saturating_sub(seen) <= self.lost_after_ms;
        workers
            .values()
            .filter(|(hb, seen)| !hb.stopping && live(*seen) && hb.models.iter().any(|m| m == model))
            .count()
    }

    /// The models live workers serve, by name: how many workers serve each and the LoRAs they can apply
    /// to it (the union of those workers' catalogues).
    pub fn models(&self, now: u64) -> Vec<ServedModel> {
        let mut by_name: std::collections::BTreeMap<String, ServedModel> = Default::default();
        for w in self.workers(now).into_iter().filter(|w| !w.lost && !w.stopped) {
            let hb = &w.heartbeat;
            for m in &hb.models {
                let entry = by_name.entry(m.clone()).or_insert_with(|| ServedModel {
                    name: m.clone(),
                    workers: 0,
                    resident_workers: 0,
                    loras: Vec::new(),
                });
                entry.workers += 1;
                entry.resident_workers += usize::from(hb.resident.contains(m));
                entry.loras.extend(hb.loras.iter().cloned());
            }
        }
        by_name
            .into_values()
            .map(|mut m| {
                m.loras.sort();
                m.loras.dedup();
                m
            })
            .collect()
    }

    /// Follows heartbeats until the subscription ends (the client drained at shutdown).
    pub async fn listen(self, client: async_nats::Client, subjects: Subjects) {
        // Fails only for a closed client (or a subject that cannot be), which no retry mends.
        let mut sub = match client.subscribe(subjects.heartbeats_wildcard()).await {
            Ok(s) => s,
            Err(e) => return tracing::error!(error = %e, "cannot subscribe to heartbeats"),
        };
        while let Some(msg) = sub.next().await {
            match protocol::decode_heartbeat(&msg.payload).and_then(|hb| check_heartbeat(hb, &msg.subject)) {
                Ok(hb) => self.record(hb, protocol::now_millis()),
                Err(e) => tracing::debug!(error = %e, "unreadable heartbeat"),
            }
        }
    }
}

/// How long a worker silent without saying goodbye is shown `lost` before it is forgotten: long enough for
/// the alert on lost workers to fire and its jobs to be redelivered, short enough that it clears (each start
/// of a worker without `--worker-id` is a new id, and a crash loop would otherwise add one for good).
pub const LOST_KEPT: Duration = Duration::from_secs(3600);

/// How long a worker that said goodbye is shown `stopped` before it is forgotten.
pub const STOPPED_KEPT: Duration = Duration::from_secs(600);

/// Forgets the workers lost for longer than [`LOST_KEPT`] and those stopped for longer than [`STOPPED_KEPT`]
/// (silence counted from the last heartbeat either way).
fn forget_departed(workers: &mut HashMap<String, (Heartbeat, u64)>, now: u64) {
    let kept = |hb: &Heartbeat| if hb.stopping { STOPPED_KEPT } else { LOST_KEPT }.as_millis() as u64;
    workers.retain(|_, (hb, seen)| now.saturating_sub(*seen) <= kept(hb));
}

/// The most workers a queen keeps track of.
pub const MAX_WORKERS: usize = 4096;

/// The most models a queen remembers as advertised.
const MAX_ADVERTISED_MODELS: usize = 4096;

/// The most models one heartbeat may claim.
const MAX_MODELS_PER_WORKER: usize = 64;

/// The most bytes kept of a heartbeat's free-text fields (host, device, version).
const MAX_TEXT_BYTES: usize = 256;

/// The most batch sizes a heartbeat's counts are kept for (a batch of more images than this is not counted).
const MAX_BATCH_SIZES: usize = 64;

/// A heartbeat as the fleet keeps it: from the worker its subject names, claiming valid model names only,
/// free text cut short. Anything else is refused.
fn check_heartbeat(mut hb: Heartbeat, subject: &str) -> Result<Heartbeat, protocol::ProtocolError> {
    protocol::validate_worker_id(&hb.worker_id)?;
    if !subject.ends_with(&format!(".{}", hb.worker_id)) {
        return Err(protocol::ProtocolError::invalid("worker_id", "is not the worker its subject names"));
    }
    if hb.models.len() > MAX_MODELS_PER_WORKER {
        return Err(protocol::ProtocolError::invalid(
            "models",
            format!("lists {} models, over {MAX_MODELS_PER_WORKER}", hb.models.len()),
        ));
    }
    for model in &hb.models {
        protocol::validate_model_name(model)?;
    }
    if hb.loras.len() > protocol::MAX_HEARTBEAT_LORAS {
        return Err(protocol::ProtocolError::invalid(
            "loras",
            format!("lists {} LoRAs, over {}", hb.loras.len(), protocol::MAX_HEARTBEAT_LORAS),
        ));
    }
    for lora in &hb.loras {
        protocol::validate_lora_name("loras", lora)?;
    }
    hb.models.sort();
    hb.models.dedup();
    hb.loras.sort();
    hb.loras.dedup();
    // Resident models are among the served ones (so the lists stay bounded by the models check).
    let mut seen = std::collections::HashSet::new();
    hb.resident.retain(|m| hb.models.binary_search(m).is_ok() && seen.insert(m.clone()));
    // One count per batch size, each a `/metrics` series: sizes past the bound are not kept.
    hb.batches.truncate(MAX_BATCH_SIZES);
    for text in [&mut hb.hostname, &mut hb.device, &mut hb.version] {
        protocol::cut(text, MAX_TEXT_BYTES);
    }
    Ok(hb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(id: &str) -> Heartbeat {
        Heartbeat {
            cache_hits: 0,
            v: protocol::PROTOCOL_VERSION,
            at: 0,
            worker_id: id.into(),
            hostname: "h".repeat(10_000),
            device: "cpu".into(),
            models: vec!["tiny".into()],
            loras: vec!["style".into()],
            resident: vec![],
            state: protocol::WorkerState::Idle,
            jobs_done: 0,
            jobs_failed: 0,
            uptime_s: 0,
            version: "0".into(),
            stopping: false,
            max_batch: 1,
            batches: Vec::new(),
        }
    }

    #[test]
    fn heartbeats_are_checked_and_the_fleet_is_bounded() {
        let hb = check_heartbeat(heartbeat("w1"), "sd.workers.w1").unwrap();
        assert_eq!(hb.hostname.len(), MAX_TEXT_BYTES);
        assert!(check_heartbeat(heartbeat("w1"), "sd.workers.w2").is_err());
        let mut bad = heartbeat("w1");
        bad.loras = vec!["../etc/passwd".into()];
        assert!(check_heartbeat(bad, "sd.workers.w1").is_err());
        let mut bad = heartbeat("w1");
        bad.models = vec!["a/b".into()];
        assert!(check_heartbeat(bad, "sd.workers.w1").is_err());
        let mut many = heartbeat("w1");
        many.models = (0..1000).map(|i| format!("m{i}")).collect();
        assert!(check_heartbeat(many, "sd.workers.w1").is_err());
        // Resident models listed again and again, and counts for a million batch sizes, are kept bounded.
        let mut repeated = heartbeat("w1");
        repeated.models = vec!["a".into(), "b".into()];
        repeated.resident = ["a", "b", "x"].iter().cycle().take(300_000).map(|m| m.to_string()).collect();
        repeated.batches = vec![1; 1_000_000];
        let hb = check_heartbeat(repeated, "sd.workers.w1").unwrap();
        assert_eq!((hb.resident, hb.batches.len()), (vec!["a".to_string(), "b".to_string()], MAX_BATCH_SIZES));

        // A flood of ids makes room from lost workers only, never from live ones.
        let fleet = Fleet::new(Duration::from_secs(30));
        fleet.record(heartbeat("gone"), 1_000_000);
        fleet.record(heartbeat("real"), 2_000_000);
        for i in 0..MAX_WORKERS + 10 {
            fleet.record(heartbeat(&format!("flood-{i}")), 2_000_000);
        }
        let workers = fleet.workers(2_000_000);
        assert_eq!(workers.len(), MAX_WORKERS);
        assert!(workers.iter().all(|w| w.heartbeat.worker_id != "gone"), "the lost worker made room");
        assert!(workers.iter().any(|w| w.heartbeat.worker_id == "real"), "a live worker stays");
        assert_eq!(fleet.serving("tiny", 2_000_000), MAX_WORKERS);
    }

    #[test]
    fn departed_workers_are_forgotten_after_a_while() {
        let fleet = Fleet::new(Duration::from_secs(30));
        let t0 = 10_000_000;
        fleet.record(heartbeat("crashed"), t0);
        fleet.record(Heartbeat { stopping: true, ..heartbeat("stopped") }, t0);
        let ids = |now| fleet.workers(now).into_iter().map(|w| w.heartbeat.worker_id).collect::<Vec<_>>();
        let lost_at = t0 + 60_000;
        assert_eq!(ids(lost_at), ["crashed", "stopped"]);
        assert!(fleet.workers(lost_at)[0].lost && fleet.is_lost("crashed", lost_at));
        assert!(!Fleet::new(Duration::from_secs(30)).is_lost("crashed", lost_at), "a queen just started may hear it");
        let later = t0 + STOPPED_KEPT.as_millis() as u64 + 1;
        assert_eq!(ids(later), ["crashed"], "the goodbye was said");
        let much_later = t0 + LOST_KEPT.as_millis() as u64 + 1;
        assert!(ids(much_later).is_empty(), "a crashed worker does not count as lost for ever");
        let listened = Fleet { listening_since: std::time::Instant::now() - Duration::from_secs(31), ..fleet };
        assert!(listened.is_lost("crashed", much_later), "but its jobs still wait for redelivery");
    }
}
