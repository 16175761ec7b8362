//! A queen served in-process for the HTTP tests, and the helpers they share: a client with the test token,
//! a small tiny-sd15 job, following a job's events, waiting for the fleet or a state.

use std::time::{Duration, Instant};

use sd_rbee::api::{JobSubmission, QueenClient, SseMessage};
use sd_rbee::queen::{Queen, QueenConfig};
use uuid::Uuid;

pub const TOKEN: &str = "test-token-0123456789abcdef";
pub const OTHER_TOKEN: &str = "second-token-0123456789abcdef";

/// A queen served in-process on a free port; stops when dropped.
pub struct QueenProcess {
    pub base: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn start_queen(
    nats: &str,
    store: &str,
    env: &[(String, String)],
    tweak: impl FnOnce(&mut QueenConfig),
) -> QueenProcess {
    let mut config = QueenConfig::new(nats, store, "127.0.0.1:0".parse().unwrap());
    // The store's credentials go in its options, not the environment of the test's other threads.
    config.store.settings = env.to_vec();
    config.api.tokens = vec![TOKEN.into(), OTHER_TOKEN.into()];
    config.worker_lost_after = Duration::from_secs(3);
    tweak(&mut config);
    let queen = Queen::start(config).await.unwrap();
    let base = format!("http://{}", queen.addr);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(queen.serve(async move {
        let _ = rx.await;
    }));
    QueenProcess { base, _stop: tx }
}

/// Waits (up to 20 s) until the queen process at `base` answers `/ready`.
pub async fn wait_ready(base: &str) {
    let start = Instant::now();
    while reqwest::get(format!("{base}/ready")).await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(20), "the queen at {base} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn client(q: &QueenProcess) -> QueenClient {
    QueenClient::new(&q.base, Some(TOKEN.into())).unwrap()
}

pub fn tiny(steps: u32, seed: u64) -> JobSubmission {
    let mut job = JobSubmission::new("tiny", "a paper boat on a pond");
    job.width = Some(64);
    job.height = Some(64);
    job.steps = Some(steps);
    job.seed = Some(seed);
    job
}

/// Waits until the queen has seen a heartbeat from a worker serving `tiny`.
pub async fn wait_for_fleet(c: &QueenClient) {
    let start = Instant::now();
    loop {
        let workers = c.workers().await.unwrap();
        if workers.iter().any(|w| !w.lost) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no worker showed up: {workers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn follow(c: &QueenClient, id: Uuid) -> Vec<SseMessage> {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), c.follow(id, |m| seen.push(m.clone())))
        .await
        .expect("the job did not end in time")
        .unwrap();
    seen
}

/// Waits until the status record (folded from events, a moment after them) reaches `state`.
pub async fn wait_state(c: &QueenClient, id: Uuid, state: &str) -> sd_rbee::api::StatusView {
    let start = Instant::now();
    loop {
        let s = c.status(id).await.unwrap();
        if s.status.state.name() == state {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "job {id} is {:?}, not {state}", s.status.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn names(events: &[SseMessage]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// `sd-rbee` with `args` and `env` (a child process; blocking work off the async threads), with the test
/// token and none of the caller's queen or NATS URLs in its environment.
pub async fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(&args)
            .envs(env)
            .env("SD_RBEE_API_TOKEN", TOKEN)
            .env_remove("SD_RBEE_QUEEN_URL")
            .env_remove("SD_RBEE_NATS_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}
