//! Online resolution against a local mock Hub: downloads into a snapshot the offline path reuses,
//! sharded weights, errors that name the repo, and a Hub that does not answer.

use super::*;

#[test]
fn sharded_weights_are_fetched_shard_by_shard() {
    let cache = FakeCache::new();
    let repo = "owner/sharded";
    let mut files = sd15_repo_files(false, true);
    files.retain(|f| *f != "unet/diffusion_pytorch_model.safetensors");
    fill(&cache, repo, COMMIT, &files);
    let index = r#"{"metadata": {"total_size": 8}, "weight_map": {
        "a.weight": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "b.weight": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "c.weight": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"}}"#;
    cache.add(repo, COMMIT, "unet/diffusion_pytorch_model.safetensors.index.fp16.json", index);
    cache.add(repo, COMMIT, "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "1");
    cache.set_ref(repo, "main", COMMIT);

    // Only one shard cached: the error names the other.
    let err = resolve(repo, &cache.options(true)).unwrap_err().to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"), "{err}");
    // Both cached: resolved; with fp16 not preferred the sharded fp16 still stands in.
    cache.add(repo, COMMIT, "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "2");
    let dir = resolve(repo, &cache.options(true)).unwrap().dir;
    assert_eq!(dir, cache.repo_dir(repo).join("snapshots").join(COMMIT));
    assert!(resolve(repo, &cache.options(false)).is_ok());
}

fn online(cache: &FakeCache, prefer_fp16: bool) -> HubOptions {
    HubOptions { offline: false, ..cache.options(prefer_fp16) }
}

#[test]
fn online_resolution_downloads_into_a_snapshot_offline_can_reuse() {
    let repo = "owner/online";
    // unet has both variants, vae only the plain file, text_encoder's fp16 is listed but
    // answers 404 (gone meanwhile): each falls back to the plain file.
    let mut files: Vec<(&str, String)> =
        sd15_repo_files(false, true).into_iter().map(|f| (f, format!("{{\"file\": \"{f}\"}}"))).collect();
    files.retain(|(f, _)| *f != "model_index.json");
    files.push(("model_index.json", SD15_INDEX.to_string()));
    files.push(("unet/diffusion_pytorch_model.fp16.safetensors", "fp16 unet".into()));
    let hub = MockHub::start(repo, files, vec!["text_encoder/model.fp16.safetensors"]);

    let cache = FakeCache::new();
    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
    let dir = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap();
    let snapshot = cache.repo_dir(repo).join("snapshots").join(COMMIT);
    assert_eq!(dir, snapshot);
    assert_eq!(
        std::fs::read_to_string(snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap(),
        "fp16 unet"
    );
    assert!(!snapshot.join("unet/diffusion_pytorch_model.safetensors").exists());
    assert_eq!(std::fs::read_to_string(snapshot.join("model_index.json")).unwrap(), SD15_INDEX);
    for file in [
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(
            std::fs::read_to_string(snapshot.join(file)).unwrap(),
            format!("{{\"file\": \"{file}\"}}"),
            "{file}"
        );
    }
    assert_eq!(hub.requested("safety_checker"), 0);
    assert_eq!(hub.requested("feature_extractor"), 0);
    assert_eq!(hub.requested("vae/diffusion_pytorch_model.fp16"), 0, "not listed: not asked");
    assert_eq!(hub.requested("tokenizer/tokenizer.json"), 0);
    assert!(hub.requested("text_encoder/model.fp16.safetensors") > 0);
    assert_eq!(std::fs::read_to_string(cache.repo_dir(repo).join("refs/main")).unwrap(), COMMIT);

    // The cache hf-hub wrote is what offline mode reads.
    assert_eq!(resolve(repo, &cache.options(true)).unwrap().dir, snapshot);
    // A second online run downloads nothing new (it only asks again for the listed fp16
    // file that answered 404).
    let others = || hub.requested("/resolve/") - hub.requested("text_encoder/model.fp16");
    let before = others();
    resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap();
    assert_eq!(others(), before);
}

#[test]
fn online_errors_name_the_repo_and_fall_back_to_the_cache_when_unreachable() {
    let hub = MockHub::start("owner/exists", vec![("model_index.json", SD15_INDEX.into())], vec![]);
    let cache = FakeCache::new();

    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), "owner/absent", "main");
    let err = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap_err().to_string();
    assert!(err.contains("owner/absent") && err.contains("needs a token (set HF_TOKEN)"), "{err}");
    // With a token, the refusal is that token's: it is not asked for again.
    let with_token = HubOptions { token: Some("hf_not_valid".into()), ..online(&cache, true) };
    let err = resolve_online(&lookup, &with_token, Some(&hub.url)).unwrap_err().to_string();
    assert!(err.contains("owner/absent") && err.contains("the token in HF_TOKEN cannot read it"), "{err}");

    // The repo exists but is not a complete pipeline.
    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), "owner/exists", "main");
    let err = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap_err().to_string();
    assert!(err.contains("owner/exists") && err.contains("scheduler/scheduler_config.json"), "{err}");

    // Nothing listens: the cache stands in when it can, else both reasons are given.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let repo = "owner/cached";
    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
    let err = resolve_online(&lookup, &online(&cache, true), Some(&closed)).unwrap_err().to_string();
    assert!(err.contains("cannot reach") && err.contains("not in the Hugging Face cache"), "{err}");
    fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
    cache.set_ref(repo, "main", COMMIT);
    let dir = resolve_online(&lookup, &online(&cache, true), Some(&closed)).unwrap();
    assert_eq!(dir, cache.repo_dir(repo).join("snapshots").join(COMMIT));
}

#[test]
fn a_hub_that_does_not_answer_is_unreachable_within_the_etag_timeout() {
    let repo = "owner/cached";
    let hub = MockHub::start(repo, vec![("model_index.json", SD15_INDEX.into())], vec![]);
    hub.silence_info(true);
    let cache = FakeCache::new();
    let opts = HubOptions { etag_timeout: std::time::Duration::from_millis(300), ..online(&cache, true) };
    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");

    let started = std::time::Instant::now();
    let err = resolve_online(&lookup, &opts, Some(&hub.url)).unwrap_err().to_string();
    assert!(err.contains("cannot reach") && err.contains("not in the Hugging Face cache"), "{err}");
    // With the cache filled, it stands in for the silent Hub.
    fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
    cache.set_ref(repo, "main", COMMIT);
    assert_eq!(
        resolve_online(&lookup, &opts, Some(&hub.url)).unwrap(),
        cache.repo_dir(repo).join("snapshots").join(COMMIT)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "{:?}", started.elapsed());
}

#[test]
fn an_overloaded_hub_lets_the_cache_stand_in() {
    let repo = "owner/cached";
    let hub = MockHub::start(repo, vec![("model_index.json", SD15_INDEX.into())], vec![]);
    hub.fail_info(Some("503 Service Unavailable"));
    let cache = FakeCache::new();
    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
    let err = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap_err().to_string();
    assert!(err.contains("HTTP 503") && err.contains("not in the Hugging Face cache"), "{err}");
    fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
    cache.set_ref(repo, "main", COMMIT);
    let dir = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap();
    assert_eq!(dir, cache.repo_dir(repo).join("snapshots").join(COMMIT));

    // A refusal that says something of the repo is not papered over by the cache.
    hub.fail_info(Some("404 Not Found"));
    let err = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap_err().to_string();
    assert!(err.contains("was not found"), "{err}");
}

/// A worker resolves each Hub model once: loaded again after an eviction, sized, or described to the result
/// cache, it is the same commit's, though the branch moved meanwhile.
#[test]
fn a_pinned_model_stays_at_the_commit_it_first_resolved_to() {
    let cache = FakeCache::new();
    let repo = "owner/moving";
    let later = "b".repeat(40);
    fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
    fill(&cache, repo, &later, &sd15_repo_files(true, true));
    cache.set_ref(repo, "main", COMMIT);
    let opts = cache.options(true);
    let pins = crate::hub::Pins::default();
    let first = pins.resolve(repo, &opts).unwrap();
    assert!(first.dir.ends_with(COMMIT), "{first:?}");
    cache.set_ref(repo, "main", &later);
    assert_eq!(pins.resolve(repo, &opts).unwrap(), first, "pinned");
    assert!(crate::hub::resolve(repo, &opts).unwrap().dir.ends_with(&later), "the branch did move");
    // A pinned folder that is gone (the cache cleared) is resolved again.
    std::fs::remove_dir_all(&first.dir).unwrap();
    assert!(pins.resolve(repo, &opts).unwrap().dir.ends_with(&later));
}
