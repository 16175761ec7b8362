//! `sd-rbee up`: the whole fleet from one command runs jobs submitted through the API and onto the bus (both
//! asking for its token), stops cleanly on SIGTERM, a second `up` on the same data directory keeps the first
//! one's token, jobs and images, a worker that dies is started again (one that fails at its start stops
//! `up`), and an `up` killed outright takes its services with it.

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
    let first_nats_port = first.nats_port;
    stop(first, Duration::from_secs(60));
    assert!(data.path().join("worker-1.log").is_file() && data.path().join("jetstream").is_dir());

    let second = up(data.path(), port);
    assert_eq!(second.token, first_token(&saved), "the token is kept");
    assert_eq!(second.nats_port, first_nats_port, "and the bus's port, while it is free: an exported URL still works");
    let c = QueenClient::new(&base, Some(second.token.clone())).unwrap();
    let list = c.jobs("").await.unwrap();
    for id in [job.job_id, bus_job] {
        assert!(list.jobs.iter().any(|j| j.job_id == id && j.state.name() == "completed"), "{id}: {list:?}");
    }
    assert_eq!(c.image(job.job_id, 0).await.unwrap(), image, "its image is still there");

    // A worker that dies once it has run a while is started again (`up` is its supervisor).
    let mut second = second;
    let worker = |up: &common::up::Up| {
        let is_worker = |pid: &u32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).any(|arg| arg == b"worker")
        };
        up.children().into_iter().find(is_worker)
    };
    let crashed = worker(&second).expect("a worker");
    // Past the time in which a worker's exit is taken for a failed start (10 s): it started before it was seen.
    tokio::time::sleep(Duration::from_secs(11)).await;
    unsafe { libc::kill(crashed as libc::pid_t, libc::SIGKILL) };
    let start = Instant::now();
    while worker(&second).is_none_or(|pid| pid == crashed) {
        assert!(start.elapsed() < Duration::from_secs(20), "the killed worker was not started again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = c.submit(&tiny(2, 8), None).await.unwrap();
    assert_eq!(names(&follow(&c, again.job_id).await).last(), Some(&"completed"), "the new worker runs jobs");
    let log = std::fs::read_to_string(data.path().join("worker-1.log")).unwrap();
    assert!(log.matches("worker up-1 started at").count() >= 3, "appended to, each start marked:\n{log}");

    // Killed outright, `up` leaves nothing running: its children hear of its death.
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

/// A worker that fails at its start (here a flag it does not know) stops `up`, which says where its log is
/// and exits with an error, leaving nothing running; flags `up` sets itself are refused after `--`.
#[test]
fn up_stops_when_a_worker_fails_at_its_start() {
    use common::servers::{sd_rbee_binary, tool};
    let data = tempfile::tempdir().unwrap();
    let model = format!("tiny={}", common::fixture("tiny-sd15").display());
    let run = |worker_args: &[&str]| {
        let (out, err) = (data.path().join("out.txt"), data.path().join("err.txt"));
        let mut child = std::process::Command::new(sd_rbee_binary())
            .args(["up", "--workers", "2", "--model", &model, "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(data.path())
            .arg("--nats-server")
            .arg(tool("nats-server"))
            .arg("--")
            .args(worker_args)
            .env_remove("SD_RBEE_API_TOKENS")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("up still runs: {}", std::fs::read_to_string(&err).unwrap());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        (status, std::fs::read_to_string(out).unwrap(), std::fs::read_to_string(err).unwrap())
    };

    let (status, out, err) = run(&["--no-such-flag"]);
    assert!(!status.success(), "{err}");
    assert!(err.contains("failed at its start") && err.contains("worker-"), "{err}");
    let log = std::fs::read_to_string(data.path().join("worker-1.log")).unwrap();
    assert!(log.contains("--no-such-flag"), "the worker's own error is in its log: {log}");
    let nats_port: u16 =
        out.lines().find_map(|l| l.trim().strip_prefix("nats:")?.rsplit(':').next()?.parse().ok()).unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(), "nats-server still listens");

    let (status, _, err) = run(&["--prefix", "other"]);
    assert!(!status.success() && err.contains("--prefix after `--`"), "{err}");
}
