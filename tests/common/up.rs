//! `sd-rbee up` as a child process: started with the tiny model, its banner read for the token and the NATS
//! port, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::servers::{sd_rbee_binary, tool};

pub struct Up {
    pub child: Child,
    pub token: String,
    pub nats_port: u16,
    /// The bus's URL as `up` printed it, with its token.
    pub nats_url: String,
}

/// Starts `sd-rbee up` and reads its banner: the token and the NATS port.
pub fn up(data: &std::path::Path, port: u16) -> Up {
    let model = format!("tiny={}", super::fixture("tiny-sd15").display());
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
    let (mut token, mut nats_port, mut nats_url) = (None, None, None);
    let mut banner = String::new();
    while token.is_none() || nats_port.is_none() {
        let line = lines.next().unwrap_or_else(|| panic!("up ended before its banner:\n{banner}")).unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if let Some(rest) = line.trim().strip_prefix("token:") {
            token = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.trim().strip_prefix("nats:") {
            nats_url = Some(rest.trim().to_string());
            nats_port = rest.trim().rsplit(':').next().and_then(|p| p.parse().ok());
        }
    }
    assert!(banner.starts_with(&format!("sd-rbee is up: http://127.0.0.1:{port}/")), "{banner}");
    // The rest of the banner is not read: keep the pipe drained so the process never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Up { child, token: token.unwrap(), nats_port: nats_port.unwrap(), nats_url: nats_url.unwrap() }
}

// A test that fails half way leaves nothing running: `up` killed outright takes its services with it.
impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    /// The processes `up` started (nats-server, the workers), from /proc.
    pub fn children(&self) -> Vec<u32> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).unwrap();
        let mut pids = Vec::new();
        for task in tasks {
            let text = std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default();
            pids.extend(text.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
        }
        pids
    }
}

/// Whether `pid` still runs (a zombie has ended: it only waits for its parent to read its status).
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// SIGTERM, then the exit status within `limit`.
pub fn stop(mut up: Up, limit: Duration) {
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
