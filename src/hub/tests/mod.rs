//! Tests of model references, options and offline resolution; online resolution against a local mock Hub
//! in `online_resolution`; the fixtures `lora`'s tests share ([`FakeCache`], [`MockHub`], [`COMMIT`]).

use super::*;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::anyhow;
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;

use super::cache::CachedRepo;
pub(crate) use super::mock_hub::MockHub;
use super::model_ref::validate_repo_id;
use super::online::resolve_online;
use super::pipeline::{component_files, pipeline_components, resolve_pipeline, ComponentKind, FilePlan};
use super::transfer::HttpFailure;
use crate::diffusion::weights::{weight_layouts, WeightLayout};

mod online_resolution;

pub(crate) const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A fake cache laid out as hf-hub 0.4.3 writes it: blobs/<etag> holding the content,
/// snapshots/<commit>/<file> symlinks to them, refs/<revision> holding the commit.
pub(crate) struct FakeCache {
    root: tempfile::TempDir,
}

impl FakeCache {
    pub(crate) fn new() -> Self {
        Self { root: tempfile::tempdir().unwrap() }
    }

    pub(crate) fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.path().join(format!("models--{}", repo.replace('/', "--")))
    }

    pub(crate) fn add(&self, repo: &str, commit: &str, file: &str, content: &str) {
        let repo_dir = self.repo_dir(repo);
        let etag = format!("etag{:x}", file.len() * 7919 + content.len());
        let blob = repo_dir.join("blobs").join(format!("{etag}-{}", file.replace('/', "_")));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, content).unwrap();
        let pointer = repo_dir.join("snapshots").join(commit).join(file);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        // A relative link, as hf-hub makes: up to the repo folder, then into blobs/.
        let up = "../".repeat(2 + file.matches('/').count());
        let target = format!("{up}blobs/{}", blob.file_name().unwrap().to_str().unwrap());
        #[cfg(unix)]
        std::os::unix::fs::symlink(target, &pointer).unwrap();
        #[cfg(not(unix))]
        {
            let _ = target;
            std::fs::copy(&blob, &pointer).unwrap();
        }
    }

    pub(crate) fn set_ref(&self, repo: &str, revision: &str, commit: &str) {
        // What hf-hub's CacheRepo::create_ref writes: the bare hash, no newline.
        Cache::new(self.root.path().to_path_buf())
            .repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()))
            .create_ref(commit)
            .unwrap();
    }

    pub(crate) fn options(&self, prefer_fp16: bool) -> HubOptions {
        HubOptions {
            offline: true,
            cache_dir: Some(self.root.path().to_path_buf()),
            token: None,
            prefer_fp16,
            etag_timeout: options::DEFAULT_HUB_TIMEOUT,
            download_timeout: options::DEFAULT_HUB_TIMEOUT,
        }
    }
}

const SD15_INDEX: &str = r#"{
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "image_encoder": [null, null], "requires_safety_checker": true,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"]
}"#;

/// The files of a hub SD 1.5 repo (vocab/merges tokenizer, plain and fp16 weights).
fn sd15_repo_files(fp16: bool, plain: bool) -> Vec<&'static str> {
    let mut files = vec![
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "unet/config.json",
        "vae/config.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ];
    if plain {
        files.extend([
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]);
    }
    if fp16 {
        files.extend([
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]);
    }
    files
}

fn fill(cache: &FakeCache, repo: &str, commit: &str, files: &[&str]) {
    for file in files {
        let content = if *file == "model_index.json" { SD15_INDEX } else { "{}" };
        cache.add(repo, commit, file, content);
    }
}

#[test]
fn registry_names_resolve_and_parse() {
    let names: Vec<&str> = registry().iter().map(|e| e.name).collect();
    assert_eq!(names, ["v1-5", "v1-5-inpaint", "v2-1", "v2-inpaint", "xl", "xl-inpaint", "turbo", "sd-turbo"]);
    let schedulers = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"];
    for entry in registry() {
        assert_eq!(registry_entry(entry.name), Some(entry));
        assert_eq!(parse_model_ref(entry.name).unwrap(), ModelRef::Registry(entry));
        assert!(validate_repo_id(entry.repo).is_ok(), "{}", entry.repo);
        assert!(schedulers.contains(&entry.scheduler), "{}", entry.scheduler);
        assert!(entry.width % 8 == 0 && entry.height % 8 == 0 && entry.steps > 0);
    }
    assert_eq!(registry_entry("XL").unwrap().repo, "stabilityai/stable-diffusion-xl-base-1.0");
    let turbo = registry_entry("turbo").unwrap();
    assert_eq!((turbo.steps, turbo.guidance, turbo.timestep_spacing), (1, 0.0, Some("trailing")));
    assert!(registry_entry("v1-5-inpaint").unwrap().inpainting);
    assert!(registry_entry("v3").is_none());
}

#[test]
fn repo_ids_are_validated_like_huggingface_hub() {
    for good in
        ["stabilityai/sdxl-turbo", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "user_1/my.model_v2", "a/b"]
    {
        assert!(validate_repo_id(good).is_ok(), "{good}");
    }
    for bad in [
        "sdxl-turbo",
        "a/b/c",
        "/name",
        "owner/",
        "-owner/name",
        "owner/name-",
        "owner/.name",
        "owner/na--me",
        "owner/na..me",
        "owner/name.git",
        "owner/na me",
        "owner/naïve",
        "owner/na:me",
    ] {
        assert!(validate_repo_id(bad).is_err(), "{bad}");
    }
    assert!(validate_repo_id(&format!("o/{}", "x".repeat(96))).is_ok());
    assert!(validate_repo_id(&format!("o/{}", "x".repeat(97))).is_err());
}

#[test]
fn hub_refs_parse_with_optional_revision() {
    assert_eq!(
        parse_model_ref("stabilityai/sdxl-turbo").unwrap(),
        ModelRef::Hub { repo: "stabilityai/sdxl-turbo".into(), revision: "main".into() }
    );
    assert_eq!(
        parse_model_ref("owner/name@fp16").unwrap(),
        ModelRef::Hub { repo: "owner/name".into(), revision: "fp16".into() }
    );
    assert_eq!(
        parse_model_ref(&format!("owner/name@{COMMIT}")).unwrap(),
        ModelRef::Hub { repo: "owner/name".into(), revision: COMMIT.into() }
    );
    assert_eq!(
        parse_model_ref("owner/name@refs/pr/12").unwrap(),
        ModelRef::Hub { repo: "owner/name".into(), revision: "refs/pr/12".into() }
    );
    for bad in ["owner/name@", "owner/name@../../x", "owner/name@a b", "owner/name@a//b", "owner/name@/x"] {
        let err = parse_model_ref(bad).unwrap_err().to_string();
        assert!(err.contains("revision"), "{bad}: {err}");
    }
    let err = parse_model_ref("owner/na--me").unwrap_err().to_string();
    assert!(err.contains("not a valid Hugging Face repo id"), "{err}");
}

#[test]
fn existing_dirs_are_local_and_unknown_names_list_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-model");
    std::fs::create_dir(&dir).unwrap();
    let arg = dir.to_str().unwrap();
    assert_eq!(parse_model_ref(arg).unwrap(), ModelRef::Local(dir.clone()));

    // A folder named like a registry entry wins over the registry.
    let shadow = tmp.path().join("xl");
    std::fs::create_dir(&shadow).unwrap();
    assert_eq!(parse_model_ref(shadow.to_str().unwrap()).unwrap(), ModelRef::Local(shadow));

    let missing = tmp.path().join("absent");
    let err = parse_model_ref(missing.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
    assert!(err.contains("v1-5") && err.contains("sd-turbo"), "{err}");

    let err = parse_model_ref("no-such-model").unwrap_err().to_string();
    assert!(err.contains("no local folder"), "{err}");
    for entry in registry() {
        assert!(err.contains(entry.name), "{err}");
    }

    let file = tmp.path().join("model.safetensors");
    std::fs::write(&file, b"x").unwrap();
    let err = parse_model_ref(file.to_str().unwrap()).unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
    assert!(parse_model_ref("  ").is_err());
}

#[test]
fn local_folders_need_model_index_json() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions::from_vars(|_| None);
    let err = resolve(tmp.path().to_str().unwrap(), &opts).unwrap_err().to_string();
    assert!(err.contains("model_index.json"), "{err}");
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");

    std::fs::write(tmp.path().join("model_index.json"), SD15_INDEX).unwrap();
    let resolved = resolve(tmp.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(resolved.dir, tmp.path());
    assert_eq!(resolved.entry, None);
}

#[test]
fn options_come_from_the_environment() {
    let vars = |pairs: &[(&str, &str)]| {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubOptions::from_vars(move |k| map.get(k).cloned())
    };
    for yes in ["1", "true", "TRUE", "yes", "On"] {
        assert!(vars(&[("HF_HUB_OFFLINE", yes)]).offline, "{yes}");
    }
    for no in ["0", "false", "no", "off", ""] {
        assert!(!vars(&[("HF_HUB_OFFLINE", no)]).offline, "{no:?}");
    }
    assert!(vars(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
    assert!(!vars(&[]).offline);

    let o = vars(&[("HOME", "/home/u")]);
    assert_eq!(o.cache_dir, Some(PathBuf::from("/home/u/.cache/huggingface/hub")));
    assert!(o.prefer_fp16);
    let o = vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
    assert_eq!(o.cache_dir, Some(PathBuf::from("/xdg/huggingface/hub")));
    let o = vars(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")]);
    assert_eq!(o.cache_dir, Some(PathBuf::from("/home/u/hf/hub")));
    let o = vars(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/cache")]);
    assert_eq!(o.cache_dir, Some(PathBuf::from("/cache")));
    assert_eq!(vars(&[]).cache_dir, None);

    assert_eq!(vars(&[("HF_TOKEN", " hf_abc \n")]).token.as_deref(), Some("hf_abc"));
    assert_eq!(vars(&[("HUGGING_FACE_HUB_TOKEN", "hf_old")]).token.as_deref(), Some("hf_old"));

    // The token file `huggingface-cli login` writes, found through hf-hub's Cache.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
    let home = tmp.path().to_str().unwrap();
    assert_eq!(vars(&[("HF_HOME", home)]).token.as_deref(), Some("hf_file"));
    assert_eq!(vars(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]).token.as_deref(), Some("hf_env"));
    let path = tmp.path().join("token");
    assert_eq!(vars(&[("HF_TOKEN_PATH", path.to_str().unwrap())]).token.as_deref(), Some("hf_file"));
    assert_eq!(vars(&[("HF_HOME", "/nonexistent")]).token, None);

    use std::time::Duration;
    assert_eq!(
        (vars(&[]).etag_timeout, vars(&[]).download_timeout),
        (Duration::from_secs(10), Duration::from_secs(10))
    );
    let o = vars(&[("HF_HUB_ETAG_TIMEOUT", "2.5"), ("HF_HUB_DOWNLOAD_TIMEOUT", " 60 ")]);
    assert_eq!((o.etag_timeout, o.download_timeout), (Duration::from_millis(2500), Duration::from_secs(60)));
    for bad in ["0", "-3", "soon", "inf"] {
        assert_eq!(vars(&[("HF_HUB_DOWNLOAD_TIMEOUT", bad)]).download_timeout, Duration::from_secs(10), "{bad}");
    }

    let shown = format!("{:?}", vars(&[("HF_TOKEN", "hf_secret")]));
    assert!(!shown.contains("hf_secret"), "{shown}");
}

#[test]
fn offline_resolution_returns_the_snapshot_and_prefers_fp16() {
    let cache = FakeCache::new();
    let repo = "stable-diffusion-v1-5/stable-diffusion-v1-5";
    fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
    cache.set_ref(repo, "main", COMMIT);
    let snapshot = cache.repo_dir(repo).join("snapshots").join(COMMIT);

    let resolved = resolve("v1-5", &cache.options(true)).unwrap();
    assert_eq!(resolved.dir, snapshot);
    assert_eq!(resolved.entry, registry_entry("v1-5"));
    assert!(resolved.display.contains(repo));
    assert!(resolved.dir.join("tokenizer/vocab.json").is_file());

    // Which files the selection picks, recorded through the same fetch closure.
    let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
    let pick = |prefer_fp16: bool| {
        let mut asked = Vec::new();
        let mut fetch = |file: &str| {
            let found = lookup.get(file);
            if found.is_some() {
                asked.push(file.to_string());
            }
            Ok(found)
        };
        let dir = resolve_pipeline(&mut fetch, &|f| lookup.offline_missing(f), prefer_fp16).unwrap();
        assert_eq!(dir, snapshot);
        asked
    };
    let fp16 = pick(true);
    assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
    assert!(fp16.contains(&"text_encoder/model.fp16.safetensors".to_string()));
    assert!(!fp16.iter().any(|f| f == "unet/diffusion_pytorch_model.safetensors"));
    assert!(!fp16.iter().any(|f| f.starts_with("safety_checker") || f.starts_with("feature_extractor")));
    assert!(fp16.contains(&"tokenizer/special_tokens_map.json".to_string()));
    let plain = pick(false);
    assert!(plain.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
    assert!(!plain.iter().any(|f| f.contains(".fp16.")));
}

#[test]
fn offline_fp16_falls_back_to_the_plain_file_and_back() {
    let cache = FakeCache::new();
    let repo = "owner/plain-only";
    fill(&cache, repo, COMMIT, &sd15_repo_files(false, true));
    cache.set_ref(repo, "main", COMMIT);
    let dir = resolve(repo, &cache.options(true)).unwrap().dir;
    assert!(dir.join("vae/diffusion_pytorch_model.safetensors").is_file());

    let repo = "owner/fp16-only";
    fill(&cache, repo, COMMIT, &sd15_repo_files(true, false));
    cache.set_ref(repo, "main", COMMIT);
    let resolved = resolve(repo, &cache.options(false)).unwrap();
    assert_eq!(resolved.display, repo);
    assert!(resolved.dir.join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
}

#[test]
fn offline_revisions_tokenizer_json_and_sdxl_components() {
    let cache = FakeCache::new();
    let repo = "owner/sdxl";
    let index = r#"{"_class_name": "StableDiffusionXLPipeline",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "force_zeros_for_empty_prompt": true}"#;
    cache.add(repo, COMMIT, "model_index.json", index);
    for file in [
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        cache.add(repo, COMMIT, file, "{}");
    }
    // A branch ref as huggingface_hub writes it, and a bare commit without any ref.
    cache.set_ref(repo, "v1.0", COMMIT);
    let snapshot = cache.repo_dir(repo).join("snapshots").join(COMMIT);
    let resolved = resolve(&format!("{repo}@v1.0"), &cache.options(true)).unwrap();
    assert_eq!(resolved.dir, snapshot);
    assert_eq!(resolved.display, format!("{repo}@v1.0"));
    let resolved = resolve(&format!("{repo}@{COMMIT}"), &cache.options(true)).unwrap();
    assert_eq!(resolved.dir, snapshot);
    // A ref file with a trailing newline still works.
    std::fs::write(cache.repo_dir(repo).join("refs/main"), format!("{COMMIT}\n")).unwrap();
    assert_eq!(resolve(repo, &cache.options(true)).unwrap().dir, snapshot);

    // tokenizer_2 lost merges.txt: the error names it.
    std::fs::remove_file(snapshot.join("tokenizer_2/merges.txt")).unwrap();
    let err = resolve(repo, &cache.options(true)).unwrap_err().to_string();
    assert!(err.contains("tokenizer_2/merges.txt"), "{err}");
}

#[test]
fn offline_missing_files_are_named_with_the_way_out() {
    let cache = FakeCache::new();
    let repo = "stable-diffusion-v1-5/stable-diffusion-v1-5";
    let mut files = sd15_repo_files(true, true);
    files.retain(|f| !f.starts_with("unet/diffusion_pytorch_model"));
    fill(&cache, repo, COMMIT, &files);
    cache.set_ref(repo, "main", COMMIT);

    let err = resolve("v1-5", &cache.options(true)).unwrap_err().to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.fp16.safetensors"), "{err}");
    assert!(err.contains(repo), "{err}");
    assert!(err.contains(&cache.root.path().display().to_string()), "{err}");
    assert!(err.contains("without --offline"), "{err}");
    assert!(err.contains("local folder"), "{err}");
    let err = resolve("v1-5", &cache.options(false)).unwrap_err().to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors"), "{err}");

    // A repo never downloaded.
    let err = resolve("xl", &cache.options(true)).unwrap_err().to_string();
    assert!(err.contains("stabilityai/stable-diffusion-xl-base-1.0 is not in the Hugging Face cache"), "{err}");
    assert!(err.contains("model_index.json"), "{err}");
    // A revision never downloaded.
    let err = resolve(&format!("{repo}@other"), &cache.options(true)).unwrap_err().to_string();
    assert!(err.contains("revision other"), "{err}");
}

#[test]
fn pipeline_selection_skips_unused_and_null_components() {
    let index: Value = serde_json::from_str(SD15_INDEX).unwrap();
    assert_eq!(
        pipeline_components(&index).unwrap(),
        ["feature_extractor", "safety_checker", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    );
    assert_eq!(ComponentKind::of("safety_checker"), None);
    assert_eq!(ComponentKind::of("tokenizer_2"), Some(ComponentKind::Tokenizer));
    assert_eq!(ComponentKind::of("text_encoder_2"), Some(ComponentKind::TextEncoder));
    for unused in ["text_encoder_3", "tokenizer_3", "text_encoder/../../x", "tokenizer/../x"] {
        assert_eq!(ComponentKind::of(unused), None, "{unused}");
    }
    assert_eq!(
        component_files("unet", ComponentKind::DiffusersModel),
        vec![
            FilePlan::Required("unet/config.json".into()),
            FilePlan::Weights { dir: "unet".into(), stem: "diffusion_pytorch_model" },
        ]
    );
    let single = |n: &str| WeightLayout::Single(n.to_string());
    let sharded = |n: &str| WeightLayout::Sharded(n.to_string());
    assert_eq!(
        weight_layouts("model", false),
        [
            single("model.safetensors"),
            sharded("model.safetensors.index.json"),
            single("model.fp16.safetensors"),
            sharded("model.safetensors.index.fp16.json"),
            sharded("model.fp16.safetensors.index.json"),
        ]
    );
    assert_eq!(weight_layouts("model", true)[0], single("model.fp16.safetensors"));

    // A fetch that never finds .bin files is never asked for them, and a pipeline with no
    // usable component is refused.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": "X", "prior": ["a", "B"]}"#).unwrap();
    let mut asked = Vec::new();
    let mut fetch = |file: &str| {
        asked.push(file.to_string());
        Ok(Some(tmp.path().join(file)).filter(|p| p.exists()))
    };
    let err = resolve_pipeline(&mut fetch, &|f| anyhow!("missing {f}"), true).unwrap_err();
    assert!(err.to_string().contains("not a Stable Diffusion pipeline"), "{err}");
    assert_eq!(asked, ["model_index.json"]);
}

#[test]
fn hub_failures_read_clearly() {
    let failure = |status, code: Option<&str>| HttpFailure {
        status,
        error_code: code.map(str::to_string),
        message: None,
        token_sent: false,
    };
    let r = "owner/name";
    assert!(failure(401, Some("RepositoryNotFound")).explain(r, "main", None).contains("HF_TOKEN"));
    assert!(failure(403, Some("GatedRepo")).explain(r, "main", None).contains("gated"));
    assert!(failure(404, Some("RevisionNotFound")).explain(r, "dev", None).contains("revision dev"));
    assert!(failure(404, Some("EntryNotFound"))
        .explain(r, "main", Some("unet/config.json"))
        .contains("unet/config.json"));
    assert!(failure(500, None).explain(r, "main", None).contains("500"));
}
