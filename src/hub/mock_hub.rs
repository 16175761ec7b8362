//! A local stand-in for the Hub's HTTP API in tests ([`MockHub`]), answering the way huggingface.co does
//! (repo info, ranged `resolve/` downloads, error headers), and able to go silent mid-answer the way a dead
//! connection does.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::tests::COMMIT;

/// When the mock Hub goes silent.
#[derive(Default)]
struct Silence {
    /// The next this many file downloads (not the one-byte metadata requests) send their body up to byte
    /// `after` of the file, then nothing more.
    downloads: usize,
    after: usize,
    /// Repo info requests get no answer at all.
    info: bool,
    /// Repo info requests are answered with this error status (an overloaded Hub's `503 …`).
    info_status: Option<&'static str>,
    /// The size a file's answers state is this many bytes short of its true size (a mirror that lies).
    short_by: usize,
    /// A download asked to resume past byte 0 is answered from byte 0 (a proxy that mangles ranges).
    restart_ranges: bool,
}

pub(crate) struct MockHub {
    pub(crate) url: String,
    /// Each request's path, with ` from=<N>` for a ranged one that starts past byte 0.
    requests: Arc<Mutex<Vec<String>>>,
    silence: Arc<Mutex<Silence>>,
}

impl MockHub {
    /// Serves `repo` at `COMMIT` with `files` (name -> content); `listed_only` files are
    /// in the file list but answer 404, as a file deleted meanwhile would.
    pub(crate) fn start(
        repo: &'static str,
        files: Vec<(&'static str, String)>,
        listed_only: Vec<&'static str>,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Self { url, requests: Default::default(), silence: Default::default() };
        let files: Arc<HashMap<String, String>> =
            Arc::new(files.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        let (log, silence) = (hub.requests.clone(), hub.silence.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (files, listed_only, log, silence) =
                    (files.clone(), listed_only.clone(), log.clone(), silence.clone());
                // A connection each, so that one left hanging does not hold up the next.
                std::thread::spawn(move || answer(stream, repo, &files, &listed_only, &log, &silence));
            }
        });
        hub
    }

    /// The next `count` downloads send the file up to byte `after`, then go silent.
    pub(crate) fn silence_downloads(&self, count: usize, after: usize) {
        let mut silence = self.silence.lock().unwrap();
        (silence.downloads, silence.after) = (count, after);
    }

    /// Repo info requests get no answer (or answer again).
    pub(crate) fn silence_info(&self, silent: bool) {
        self.silence.lock().unwrap().info = silent;
    }

    /// Repo info requests are answered with `status` (`"503 Service Unavailable"`), or again normally.
    pub(crate) fn fail_info(&self, status: Option<&'static str>) {
        self.silence.lock().unwrap().info_status = status;
    }

    /// Downloads asked to resume are answered from the file's first byte, saying so in `Content-Range`.
    pub(crate) fn restart_ranges(&self) {
        self.silence.lock().unwrap().restart_ranges = true;
    }

    /// Files' answers state sizes `bytes` short of the truth (their bodies stay whole).
    pub(crate) fn understate_sizes(&self, bytes: usize) {
        self.silence.lock().unwrap().short_by = bytes;
    }

    pub(crate) fn requested(&self, needle: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|p| p.contains(needle)).count()
    }
}

fn answer(
    mut stream: std::net::TcpStream,
    repo: &str,
    files: &HashMap<String, String>,
    listed_only: &[&str],
    log: &Mutex<Vec<String>>,
    silence: &Mutex<Silence>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    let _ = reader.read_line(&mut first);
    let mut range: Option<(usize, Option<usize>)> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap();
            range = Some((a.parse().unwrap(), b.parse().ok()));
        }
    }
    let path = first.split(' ').nth(1).unwrap_or("").to_string();
    let from = range.map_or(0, |(start, _)| start);
    log.lock().unwrap().push(if from > 0 { format!("{path} from={from}") } else { path.clone() });
    let info_prefix = format!("/api/models/{repo}/revision/");
    let file_prefix = format!("/{repo}/resolve/{COMMIT}/");
    let hang = || std::thread::sleep(Duration::from_secs(60));
    let mut cut_after = None;
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path.starts_with(&info_prefix) {
        if silence.lock().unwrap().info {
            return hang();
        }
        if let Some(status) = silence.lock().unwrap().info_status {
            let response = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
            let _ = stream.write_all(response.as_bytes());
            return;
        }
        let mut names: Vec<&str> = files.keys().map(String::as_str).collect();
        names.extend(listed_only.iter().copied());
        let siblings: Vec<Value> = names.iter().map(|n| serde_json::json!({"rfilename": n})).collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings});
        ("200 OK", vec!["Content-Type: application/json".into()], body.to_string().into_bytes())
    } else if let Some(file) = path.strip_prefix(&file_prefix) {
        match files.get(file) {
            Some(content) => {
                let bytes = content.as_bytes();
                let (mut start, end) = range.unwrap_or((0, None));
                if silence.lock().unwrap().restart_ranges {
                    start = 0;
                }
                let end = end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                let slice = &bytes[start..=end];
                let is_download = range != Some((0, Some(0)));
                let mut silence = silence.lock().unwrap();
                if is_download && silence.downloads > 0 {
                    silence.downloads -= 1;
                    cut_after = Some(silence.after.saturating_sub(start).min(slice.len()));
                }
                let range = format!("bytes {start}-{end}/{}", bytes.len() - silence.short_by);
                (
                    "206 Partial Content",
                    vec![
                        format!("X-Repo-Commit: {COMMIT}"),
                        format!("ETag: \"{:016x}\"", fnv(file, content)),
                        format!("Content-Range: {range}"),
                    ],
                    slice.to_vec(),
                )
            }
            None => (
                "404 Not Found",
                vec!["X-Error-Code: EntryNotFound".into(), format!("X-Repo-Commit: {COMMIT}")],
                b"Entry not found".to_vec(),
            ),
        }
    } else {
        (
            "401 Unauthorized",
            vec!["X-Error-Code: RepositoryNotFound".into(), "X-Error-Message: Repository not found".into()],
            b"{}".to_vec(),
        )
    };
    let mut response = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        response.push_str(&h);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    let _ = stream.write_all(response.as_bytes());
    match cut_after {
        Some(n) => {
            let _ = stream.write_all(&body[..n]);
            let _ = stream.flush();
            hang();
        }
        None => {
            let _ = stream.write_all(&body);
        }
    }
}

pub(crate) fn fnv(name: &str, content: &str) -> u64 {
    name.bytes()
        .chain([0])
        .chain(content.bytes())
        .fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}
