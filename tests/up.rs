//! `sd-rbee up`: the whole fleet from one command runs a job, stops cleanly on SIGTERM, and a second `up` on
//! the same data directory keeps the first one's token, jobs and images.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::queen::{follow, names, tiny};
use common::servers::{free_port, sd_rbee_binary, tool};
use sd_rbee::api::QueenClient;

struct Up {
    child: Child,
    token: String,
    nats_port: u16,
}

/// Starts `sd-rbee up` and reads its banner: the token and the NATS port.
fn up(data: &std::path::Path, port: u16) -> Up {
    let model = format!("tiny={}", common::fixture("tiny-sd15").display());
    let mut child = Command::new(sd_rbee_binary())
        .args(["up", "--workers", "1", "--model", &model, "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .arg("--nats-server")
        .arg(tool("nats-server"))
        .args(["--", "--heartbeat-interval", "1s"])
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("SD_RBEE_API_TOKENS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut token, mut nats_port) = (None, None);
    let mut banner = String::new();
    while token.is_none() || nats_port.is_none() {
        let line = lines.next().unwrap_or_else(|| panic!("up ended before its banner:\n{banner}")).unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if let Some(rest) = line.trim().strip_prefix("token:") {
            token = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.trim().strip_prefix("nats:") {
            nats_port = rest.trim().rsplit(':').next().and_then(|p| p.parse().ok());
        }
    }
    assert!(banner.starts_with(&format!("sd-rbee is up: http://127.0.0.1:{port}/")), "{banner}");
    // The rest of the banner is not read: keep the pipe drained so the process never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Up { child, token: token.unwrap(), nats_port: nats_port.unwrap() }
}

/// SIGTERM, then the exit status within `limit`.
fn stop(mut up: Up, limit: Duration) {
    unsafe { libc::kill(up.child.id() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < limit, "up did not stop within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "up exited with {status}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", up.nats_port)).is_err(), "nats-server still listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_job_stops_on_sigterm_and_a_second_up_finds_it() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let first = up(data.path(), port);
    let saved = std::fs::read_to_string(data.path().join("token")).unwrap();
    assert_eq!(saved.trim(), first.token);
    let base = format!("http://127.0.0.1:{port}");
    let c = QueenClient::new(&base, Some(first.token.clone())).unwrap();
    let job = c.submit(&tiny(2, 7), None).await.unwrap();
    let events = follow(&c, job.job_id).await;
    assert_eq!(names(&events).last(), Some(&"completed"), "{:?}", names(&events));
    let image = c.image(job.job_id, 0).await.unwrap();
    let wrong = QueenClient::new(&base, Some("not-the-token-0123456789".into())).unwrap();
    assert!(wrong.jobs("").await.is_err(), "the queen asks for the token");
    stop(first, Duration::from_secs(60));
    assert!(data.path().join("worker-1.log").is_file() && data.path().join("jetstream").is_dir());

    let second = up(data.path(), port);
    assert_eq!(second.token, first_token(&saved), "the token is kept");
    let c = QueenClient::new(&base, Some(second.token.clone())).unwrap();
    let list = c.jobs("").await.unwrap();
    assert!(list.jobs.iter().any(|j| j.job_id == job.job_id && j.state.name() == "completed"), "{list:?}");
    assert_eq!(c.image(job.job_id, 0).await.unwrap(), image, "its image is still there");
    stop(second, Duration::from_secs(60));
}

fn first_token(saved: &str) -> String {
    saved.trim().to_string()
}
