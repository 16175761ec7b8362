//! `sd-rbee up`: the whole fleet from one command runs jobs submitted through the API and onto the bus (both
//! asking for its token), stops cleanly on SIGTERM, a second `up` on the same data directory keeps the first
//! one's token, jobs and images, and an `up` killed outright takes its services with it.

use crate::common;

use std::time::{Duration, Instant};

use common::queen::{cli, follow, names, tiny, wait_state};
use common::servers::free_port;
use common::up::{running, stop, up};
use sd_rbee::api::QueenClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_job_stops_on_sigterm_and_a_second_up_finds_it() {
    let data = tempfile::tempdir().unwrap();
    // Open to others, as an older `up` left it: restricted below.
    let open: std::fs::Permissions = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(data.path(), open).unwrap();
    let port = free_port();
    let first = up(data.path(), port);
    let saved = std::fs::read_to_string(data.path().join("token")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the data folder is its owner's alone");
    }
    assert_eq!(saved.trim(), first.token);
    let base = format!("http://127.0.0.1:{port}");
    let c = QueenClient::new(&base, Some(first.token.clone())).unwrap();
    let job = c.submit(&tiny(2, 7), None).await.unwrap();
    let events = follow(&c, job.job_id).await;
    assert_eq!(names(&events).last(), Some(&"completed"), "{:?}", names(&events));
    let image = c.image(job.job_id, 0).await.unwrap();
    // Straight onto the bus, as another service would publish, with `submit --nats`: with the token, which
    // the bus asks for too.
    let refused = async_nats::connect(format!("nats://127.0.0.1:{}", first.nats_port)).await;
    assert!(refused.is_err(), "the bus let a client in without the token");
    let nats = first.nats_url.clone();
    assert_eq!(nats, format!("nats://{}@127.0.0.1:{}", first.token, first.nats_port));
    let flags = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "3", "--wait", "--json"];
    let mut args = vec!["submit", "--nats", &nats, "-m", "tiny", "-p", "a lighthouse"];
    args.extend(flags);
    let out = cli(&args, &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bus_job: uuid::Uuid = result["job_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(wait_state(&c, bus_job, "completed").await.status.model, "tiny", "the queen follows bus jobs");
    let wrong = QueenClient::new(&base, Some("not-the-token-0123456789".into())).unwrap();
    assert!(wrong.jobs("").await.is_err(), "the queen asks for the token");
    stop(first, Duration::from_secs(60));
    assert!(data.path().join("worker-1.log").is_file() && data.path().join("jetstream").is_dir());

    let second = up(data.path(), port);
    assert_eq!(second.token, first_token(&saved), "the token is kept");
    let c = QueenClient::new(&base, Some(second.token.clone())).unwrap();
    let list = c.jobs("").await.unwrap();
    for id in [job.job_id, bus_job] {
        assert!(list.jobs.iter().any(|j| j.job_id == id && j.state.name() == "completed"), "{id}: {list:?}");
    }
    assert_eq!(c.image(job.job_id, 0).await.unwrap(), image, "its image is still there");

    // Killed outright, `up` leaves nothing running: its children hear of its death.
    let mut second = second;
    let children = second.children();
    assert_eq!(children.len(), 2, "nats-server and one worker: {children:?}");
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    let start = Instant::now();
    while let Some(pid) = children.iter().find(|&&pid| running(pid)) {
        assert!(start.elapsed() < Duration::from_secs(60), "process {pid} outlived a killed up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", second.nats_port)).is_err(), "nats-server still listens");
}

fn first_token(saved: &str) -> String {
    saved.trim().to_string()
}
