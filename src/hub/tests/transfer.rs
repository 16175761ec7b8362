//! The Hub client against [`MockHub`]: downloads that stall, resume or run long, and where the token goes.

use super::*;
use crate::hub::tests::{FakeCache, MockHub, COMMIT};

const REPO: &str = "owner/silent";
const FILE: &str = "unet/diffusion_pytorch_model.safetensors";

fn setup(timeout_ms: u64) -> (FakeCache, MockHub, HubClient, CachedRepo, String) {
    let content: String = (0..100_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let hub = MockHub::start(REPO, vec![(FILE, content.clone())], vec![]);
    let cache = FakeCache::new();
    let opts = HubOptions {
        offline: false,
        download_timeout: Duration::from_millis(timeout_ms),
        etag_timeout: Duration::from_secs(5),
        ..cache.options(false)
    };
    let client = HubClient::new(&opts, Some(&hub.url));
    let repo = CachedRepo::new(opts.cache_root(), REPO, "main");
    (cache, hub, client, repo, content)
}

#[test]
fn a_download_that_goes_silent_resumes_where_it_stopped() {
    let (_cache, hub, client, repo, content) = setup(300);
    hub.silence_downloads(1, 40_000);
    let started = Instant::now();
    let path = client.download(&repo, COMMIT, FILE, None).unwrap_or_else(|e| panic!("{}", describe(e)));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
    assert_eq!(path, repo.repo_dir().join("snapshots").join(COMMIT).join(FILE));
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    assert_eq!(hub.requested("from=40000"), 1, "resumed at the first missing byte");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn a_resumed_download_answered_from_elsewhere_in_the_file_starts_again() {
    let (_cache, hub, client, repo, content) = setup(300);
    hub.silence_downloads(1, 40_000);
    hub.restart_ranges();
    let path = client.download(&repo, COMMIT, FILE, None).unwrap_or_else(|e| panic!("{}", describe(e)));
    // (Its first bytes again after byte 40 000, cut to the file's size, were taken for the rest of it.)
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
    assert_eq!(hub.requested("from=40000"), 1, "asked to resume, answered from byte 0");
}

#[test]
fn a_download_that_stays_silent_fails_in_bounded_time_keeping_its_bytes_and_the_lock() {
    let (_cache, hub, client, repo, content) = setup(200);
    hub.silence_downloads(usize::MAX, 1000);
    let started = Instant::now();
    let err = describe(client.download(&repo, COMMIT, FILE, None).unwrap_err());
    let took = started.elapsed();
    // Each attempt: 200 ms without data, then a 200 ms pause.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(err.contains("received nothing") && err.contains("1000 of 100000 bytes"), "{err}");
    assert_eq!(hub.requested("from=1000"), STALLED_ATTEMPTS as usize - 1, "{err}");
    let blobs = repo.repo_dir().join("blobs");
    let part = std::fs::read_dir(&blobs).unwrap().flatten().find(|e| e.path().extension().unwrap() == "part");
    assert_eq!(std::fs::metadata(part.unwrap().path()).unwrap().len(), 1000);

    // The Hub answers again: the next try takes up the kept bytes (the lock was released).
    hub.silence_downloads(0, 0);
    let path = client.download(&repo, COMMIT, FILE, None).unwrap_or_else(|e| panic!("{}", describe(e)));
    assert_eq!(std::fs::read_to_string(path).unwrap(), content);
    assert_eq!(hub.requested("from=1000"), STALLED_ATTEMPTS as usize);
}

#[test]
fn two_downloads_of_one_file_share_it() {
    let (_cache, hub, client, repo, content) = setup(300);
    // The first download goes silent once, so the second surely finds it under way.
    hub.silence_downloads(1, 10_000);
    let client = Arc::new(client);
    let repo = Arc::new(repo);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (client, repo) = (client.clone(), repo.clone());
            std::thread::spawn(move || client.download(&repo, COMMIT, FILE, None).map_err(describe))
        })
        .collect();
    for t in threads {
        assert_eq!(std::fs::read_to_string(t.join().unwrap().unwrap()).unwrap(), content);
    }
    let bodies = hub.requested(FILE) - 2; // less the two metadata requests
    assert_eq!(bodies, 2, "one download, resumed once");
}

#[test]
fn a_download_longer_than_its_stated_size_stops_at_that_size() {
    let (_cache, hub, client, repo, content) = setup(300);
    hub.understate_sizes(10);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(client.download(&repo, COMMIT, FILE, None).map_err(describe)));
    // (It used to start over for ever: each attempt ran past the size, and a part too long was emptied.)
    let path = rx.recv_timeout(Duration::from_secs(20)).expect("ends").unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), content[..content.len() - 10]);
    assert_eq!(hub.requested(FILE), 2, "the metadata request and one download");
}

use std::sync::Arc;

fn describe(e: HubError) -> String {
    match e {
        HubError::Http(f) => format!("HTTP {}", f.status),
        HubError::Unreachable(e) | HubError::Local(e) | HubError::TooLarge(e) => e,
    }
}

#[test]
fn the_token_goes_to_the_hubs_own_origin_only() {
    let hub = "https://huggingface.co";
    assert!(same_origin("https://huggingface.co/api/models/a/b", hub));
    assert!(same_origin("https://HuggingFace.co:443/x", hub));
    for elsewhere in [
        "https://huggingface.co.example.net/x",
        "https://huggingface.co@example.net/x",
        "http://huggingface.co/x",
        "https://huggingface.co:8443/x",
        "https://cdn-lfs.huggingface.co/x",
        "/relative",
    ] {
        assert!(!same_origin(elsewhere, hub), "{elsewhere}");
    }
    assert!(same_origin("http://127.0.0.1:9/hf/x", "http://127.0.0.1:9/hf"));
}
