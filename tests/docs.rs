//! The documentation stays true: `docs/API.md` names every route and error code the queen has, the shell
//! examples of `docs/EXAMPLES.md` marked `<!-- test: run -->` run against a real fleet (`sd-rbee up`), and
//! every relative link in the README and `docs/` leads to a file that exists.

use crate::common;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::servers::{free_port, sd_rbee_binary};
use common::up::{stop, up};
use sd_rbee::api::ApiErrorCode;
use utoipa::OpenApi as _;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_api_reference_names_every_route_and_every_error_code() {
    let api = read("docs/API.md");
    let doc = sd_rbee::queen::http::ApiDoc::openapi();
    let missing: Vec<&String> = doc.paths.paths.keys().filter(|path| !api.contains(&format!("`{path}`"))).collect();
    assert!(missing.is_empty(), "docs/API.md does not name these routes (as `PATH`): {missing:?}");
    let missing: Vec<&str> =
        ApiErrorCode::ALL.iter().map(|c| c.as_str()).filter(|c| !api.contains(&format!("`{c}`"))).collect();
    assert!(missing.is_empty(), "docs/API.md does not name these error codes (as `CODE`): {missing:?}");
}

/// The blocks of `markdown` fenced as `sh` right after a `<!-- test: run -->` line, with their line numbers.
fn marked_blocks(markdown: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "<!-- test: run -->" {
            assert_eq!(lines.get(i + 1).map(|l| l.trim()), Some("```sh"), "line {}: a marked block is ```sh", i + 1);
            let body: Vec<&str> = lines[i + 2..].iter().take_while(|l| l.trim() != "```").copied().collect();
            blocks.push((i + 3, body.join("\n")));
            i += body.len() + 3;
        } else {
            i += 1;
        }
    }
    blocks
}

#[test]
fn the_marked_examples_run_against_a_fleet() {
    let examples = read("docs/EXAMPLES.md");
    let blocks = marked_blocks(&examples);
    assert!(blocks.len() >= 5, "docs/EXAMPLES.md has only {} runnable examples", blocks.len());

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let fleet = up(data.path(), port);
    let work = tempfile::tempdir().unwrap();
    let bin_dir = sd_rbee_binary().parent().unwrap().to_path_buf();
    let path = std::env::join_paths(
        std::iter::once(bin_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    for (line, block) in &blocks {
        let start = Instant::now();
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c", block])
            .current_dir(work.path())
            .env("PATH", &path)
            .env("SD_RBEE_QUEEN_URL", format!("http://127.0.0.1:{port}"))
            .env("SD_RBEE_API_TOKEN", &fleet.token)
            .env("SD_RBEE_NATS_URL", &fleet.nats_url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // Its own process group, so a block that hangs is stopped with everything it started.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().unwrap();
        // Read as it comes: a block that writes much must not stall on a full pipe.
        let read = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let stdout = read(Box::new(child.stdout.take().unwrap()));
        let stderr = read(Box::new(child.stderr.take().unwrap()));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > Duration::from_secs(120) {
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = std::process::Output {
            status,
            stdout: stdout.join().unwrap().into(),
            stderr: stderr.join().unwrap().into(),
        };
        assert!(
            out.status.success(),
            "docs/EXAMPLES.md line {line}: the example failed ({}):\n{block}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop(fleet, Duration::from_secs(60));
}

/// Relative links `](path)` and `](path#anchor)` in `markdown` (a file at `at`) whose target does not exist.
fn broken_links(at: &Path, markdown: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for (start, _) in markdown.match_indices("](") {
        let rest = &markdown[start + 2..];
        let Some(end) = rest.find(')') else { continue };
        let target = rest[..end].split('#').next().unwrap().trim();
        if target.is_empty() || target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
            continue;
        }
        if !at.parent().unwrap().join(target).exists() {
            broken.push(target.to_string());
        }
    }
    broken
}

#[test]
fn relative_links_in_the_docs_lead_somewhere() {
    let mut pages = vec![repo("README.md")];
    for dir in ["docs", "deploy/kubernetes"] {
        let Ok(entries) = std::fs::read_dir(repo(dir)) else { continue };
        pages.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")));
    }
    assert!(pages.iter().any(|p| p.ends_with("docs/ARCHITECTURE.md")), "{pages:?}");
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let broken = broken_links(&page, &text);
        assert!(broken.is_empty(), "{}: links to missing files: {broken:?}", page.display());
    }
}

#[test]
fn link_checking_sees_a_broken_link() {
    let page = repo("docs/API.md");
    assert_eq!(broken_links(&page, "see [x](NOPE.md) and [y](API.md#errors), [z](https://a.b/c)"), ["NOPE.md"]);
}
