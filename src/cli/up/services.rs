//! The processes `up` runs (nats-server, the workers): started in their own process group with their output
//! appended to a log, watched while the fleet runs (a worker that dies is started again, unless it died at
//! its start), and stopped together with SIGTERM, then SIGKILL past their grace or on a second signal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A worker that exits sooner than this after its start failed to start (a bad flag, a model it cannot
/// find): starting it again would fail the same way, so `up` stops instead of looping.
const STARTUP: Duration = Duration::from_secs(10);

/// A child process, stopped with SIGTERM (then SIGKILL after `grace`) when dropped.
pub(super) struct Service {
    name: String,
    child: Child,
    grace: Duration,
    log: PathBuf,
    started: Instant,
}

impl Service {
    pub(super) fn start(name: &str, command: &mut Command, log: &Path, grace: Duration) -> anyhow::Result<Self> {
        // Appended to: the log of a run that failed is still there when `up` is started again to look.
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot write {}", log.display()))?;
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        std::io::Write::write_all(&mut log_file, format!("--- sd-rbee up: {name} started at {now}\n").as_bytes())?;
        // Its own process group: Ctrl-C in a terminal signals `up` alone, which stops the services in order
        // (workers before the server they report to).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(command, 0);
        // And SIGTERM when `up` dies without stopping them (SIGKILL, a crash), so nothing is left running. The
        // signal follows the thread that started the child: `up` starts them all from its main thread.
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: prctl, getppid and _exit are async-signal-safe, as pre_exec requires.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(command, move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    // `up` died before the line above: nobody would ever stop this child.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name: name.into(), child, grace, log: log.to_path_buf(), started: Instant::now() })
    }

    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Why it stopped, for the person at the terminal: its exit and where its log is.
    pub(super) fn ended(&self, status: std::process::ExitStatus) -> String {
        format!("{} exited ({status}); see {}", self.name, self.log.display())
    }

    /// Whether it ran for less than [`STARTUP`].
    pub(super) fn just_started(&self) -> bool {
        self.started.elapsed() < STARTUP
    }

    /// Asks it to stop (SIGTERM), if it runs.
    fn terminate(&mut self) {
        if self.exited().is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Waits for it to exit until `deadline`, or until `hurry` is set; then kills it.
    fn wait_until(&mut self, deadline: Instant, hurry: &AtomicBool) {
        while self.exited().is_none() && Instant::now() < deadline && !hurry.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.exited().is_none() {
            if hurry.load(Ordering::Relaxed) {
                eprintln!("{}: killed on a second Ctrl-C or SIGTERM", self.name);
            } else {
                eprintln!("{} did not stop within its grace ({:?}): killed", self.name, self.grace);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.terminate();
        self.wait_until(Instant::now() + self.grace, &AtomicBool::new(false));
    }
}

/// Stops `services` together: SIGTERM to each, then one wait for them all, as long as the longest grace
/// (or until `hurry` is set, by a second Ctrl-C), then SIGKILL to those still running.
pub(super) fn stop_all(services: &mut [Service], hurry: &AtomicBool) {
    for service in services.iter_mut() {
        service.terminate();
    }
    let deadline = Instant::now() + services.iter().map(|s| s.grace).max().unwrap_or_default();
    for service in services.iter_mut() {
        service.wait_until(deadline, hurry);
    }
}

/// Watches the services while the fleet runs; returns why `up` must stop: nats-server exited, or a worker
/// exited at its start or could not be started again. A worker that exits later (a crash, a stalled device
/// it left so that its supervisor restarts it) is started again by `restart(index)`.
/// Once `stopping` is set (`up` was told to stop), exits are what was asked for: it watches no more.
pub(super) async fn supervise(
    nats: &mut Service,
    workers: &mut [Service],
    restart: impl Fn(usize) -> anyhow::Result<Service>,
    stopping: &AtomicBool,
) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if stopping.load(Ordering::Relaxed) {
            return std::future::pending().await;
        }
        if let Some(status) = nats.exited() {
            return nats.ended(status);
        }
        for (index, worker) in workers.iter_mut().enumerate() {
            let Some(status) = worker.exited() else { continue };
            let why = worker.ended(status);
            if worker.just_started() {
                return format!("{why}: it failed at its start");
            }
            eprintln!("{why}; starting it again");
            match restart(index) {
                Ok(again) => *worker = again,
                Err(e) => return format!("{why}, and it could not be started again: {e:#}"),
            }
        }
    }
}

/// The grace a worker's flags give it (`--grace`, default 30 s), so that `up` waits for it that long and
/// a minute more (to hand its jobs back) before killing it.
pub(super) fn worker_grace(worker_args: &[String]) -> Duration {
    let mut grace = None;
    let mut args = worker_args.iter();
    while let Some(arg) = args.next() {
        if arg == "--grace" {
            grace = args.next().cloned();
        } else if let Some(value) = arg.strip_prefix("--grace=") {
            grace = Some(value.to_string());
        }
    }
    // Read as the worker reads it (bare seconds too).
    let grace = grace.and_then(|g| crate::cli::parse_duration(&g).ok()).unwrap_or(Duration::from_secs(30));
    grace + Duration::from_secs(60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_grace_is_read_from_its_flags() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(worker_grace(&args(&["--offline"])), Duration::from_secs(90));
        assert_eq!(worker_grace(&args(&["--grace", "5m", "--offline"])), Duration::from_secs(360));
        assert_eq!(worker_grace(&args(&["--grace=2s"])), Duration::from_secs(62));
        assert_eq!(worker_grace(&args(&["--grace", "300"])), Duration::from_secs(360));
    }
}
