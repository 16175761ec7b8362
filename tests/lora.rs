//! LoRAs: `sd-rbee generate --lora FILE[:SCALE]` against the images diffusers + PEFT computed with the
//! fixtures' kohya LoRAs (SD 1.x names, SDXL's SGM names), no leak from one generation into the next, and
//! clear errors for files that are not LoRAs sd-rbee can apply.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, copy_dir, expected, fixture, reference, NEGATIVE, PROMPT};
use sd_rbee::diffusion::lora::Lora;
use sd_rbee::diffusion::{GenerationRequest, LoadOptions, LoraWeight, SchedulerKind, StableDiffusion};

fn sd_rbee(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-rbee")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("sd-rbee runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lora_file(model: &str, name: &str) -> PathBuf {
    fixture(model).join("lora").join(format!("{name}.safetensors"))
}

/// A LoRA reference run (10 steps from the model's `initial_latents`), with `loras` as `--lora` values.
fn generate_args(model_dir: &Path, loras: &[String], out: &Path, tensor: &Path) -> Vec<String> {
    let xl = model_dir.join("text_encoder_2").is_dir();
    let (scheduler, guidance) = if xl { ("euler", "5.0") } else { ("ddim", "7.5") };
    let mut args = common::reference_run(model_dir, &model_dir.join("expected.safetensors"), scheduler, guidance, out);
    args.extend(["--save-tensor".to_string(), tensor.display().to_string(), "--json".to_string()]);
    for l in loras {
        args.push("--lora".into());
        args.push(l.clone());
    }
    args
}

fn lora_references(lora_dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_dir.join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// The models and LoRAs with diffusers references: the shared fixtures' own (kohya, SD 1.x names and SDXL SGM
/// names) and `lora-variants/` (LoCon convolutions, SGM names with LoCon, UNets with three blocks of one layer,
/// the shared LoRAs saved in the diffusers/PEFT layout; made by `scripts/make_lora_variants.py`): `(label, pipeline folder, LoRA folder)`.
fn cases(scratch: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let mut out = vec![
        ("tiny-sd15".to_string(), fixture("tiny-sd15"), fixture("tiny-sd15").join("lora")),
        ("tiny-sdxl".to_string(), fixture("tiny-sdxl"), fixture("tiny-sdxl").join("lora")),
    ];
    for (variant, base) in [
        ("sd15-locon", "tiny-sd15"),
        ("sdxl-locon-sgm", "tiny-sdxl"),
        ("sd15-3blocks", "tiny-sd15"),
        ("sdxl-3blocks-sgm", "tiny-sdxl"),
        ("sd15-peft", "tiny-sd15"),
        ("sdxl-peft", "tiny-sdxl"),
    ] {
        let own = fixture("lora-variants").join(variant);
        let model = if own.join("unet").is_dir() {
            let dir = scratch.join(variant);
            copy_dir(&fixture(base), &dir);
            std::fs::remove_dir_all(dir.join("unet")).unwrap();
            copy_dir(&own.join("unet"), &dir.join("unet"));
            dir
        } else {
            fixture(base)
        };
        out.push((variant.to_string(), model, own.join("lora")));
    }
    out
}

#[test]
fn generate_with_loras_matches_diffusers_and_peft() {
    let dir = tempfile::tempdir().unwrap();
    for (label, model, lora_dir) in cases(dir.path()) {
        let refs = lora_references(&lora_dir);
        let style = lora_dir.join("style.safetensors").display().to_string();
        let detail = lora_dir.join("detail.safetensors").display().to_string();
        for (case, loras) in [
            ("lora_style_1.0_image", vec![style.clone()]),
            ("lora_style_0.6_image", vec![format!("{style}:0.6")]),
            ("lora_style_0.8_detail_-0.5_image", vec![format!("{style}:0.8"), format!("{detail}:-0.5")]),
        ] {
            let out = dir.path().join(format!("{label}-{case}.png"));
            let tensor = dir.path().join(format!("{label}-{case}.safetensors"));
            let o = sd_rbee(&generate_args(&model, &loras, &out, &tensor));
            assert!(o.status.success(), "{label} {case}: {}", stderr(&o));
            let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert!(summary["timings"]["lora_ms"].as_f64().unwrap() > 0.0, "{summary}");
            let image = candle_core::safetensors::load(&tensor, &Device::Cpu).unwrap()["image"].clone();
            let want = reference(&refs, case);
            assert_close(&format!("{label} {case}"), &image, &want, 1e-4, 1e-5);
            // The LoRA changed the picture (by far more than the tolerance): it was applied.
            let (moved, _) = common::diff(&image, &reference(&refs, "base_image"));
            assert!(moved > 0.05, "{label} {case}: the LoRA barely changed the image ({moved})");
        }
    }
}

fn load(model: &str) -> StableDiffusion {
    StableDiffusion::load(
        &fixture(model),
        &LoadOptions { device: Device::Cpu, dtype: DType::F32, ..Default::default() },
    )
    .unwrap()
}

fn request(model: &str, loras: Vec<LoraWeight>) -> GenerationRequest {
    let exp = expected(model);
    let mut req = GenerationRequest::new(PROMPT);
    req.negative_prompt = Some(NEGATIVE.into());
    (req.width, req.height, req.steps) = (96, 64, 10);
    let xl = model == "tiny-sdxl";
    req.guidance_scale = if xl { 5.0 } else { 7.5 };
    req.scheduler = Some(if xl { SchedulerKind::Euler } else { SchedulerKind::Ddim });
    req.initial_latents = Some(reference(&exp, "initial_latents"));
    req.loras = loras;
    req
}

fn parsed(model: &str, name: &str) -> Arc<Lora> {
    let path = lora_file(model, name);
    Arc::new(Lora::from_bytes(name, &std::fs::read(path).unwrap()).unwrap())
}

fn pixels(sd: &StableDiffusion, req: &GenerationRequest) -> Vec<f32> {
    let out = sd.generate(req, &mut |_| {}, None).unwrap();
    out.images[0].pixels.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_generation_after_a_lora_one_runs_on_the_loaded_weights_bit_for_bit() {
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let sd = load(model);
        let base = pixels(&sd, &request(model, vec![]));
        let refs = lora_references(&fixture(model).join("lora"));
        let (max, _) = common::diff(
            &Tensor::from_vec(base.clone(), (1, 3, 64, 96), &Device::Cpu).unwrap(),
            &reference(&refs, "base_image"),
        );
        assert!(max < 1e-4, "{model}: base image off by {max}");

        let style = LoraWeight { lora: parsed(model, "style"), scale: 1.0 };
        let detail = LoraWeight { lora: parsed(model, "detail"), scale: -0.5 };
        let with = pixels(&sd, &request(model, vec![style.clone(), detail]));
        assert_ne!(with, base, "{model}: the LoRAs changed nothing");
        let after = pixels(&sd, &request(model, vec![]));
        assert!(after == base, "{model}: the image after a LoRA generation differs from the one before");

        // Same set twice: the second pays nothing to apply it, and gives the same image.
        let first = sd.generate(&request(model, vec![style.clone()]), &mut |_| {}, None).unwrap();
        let second = sd.generate(&request(model, vec![style]), &mut |_| {}, None).unwrap();
        assert!(first.timings.lora_ms > 0.0);
        assert_eq!(second.timings.lora_ms, 0.0);
        let flat = |o: &sd_rbee::diffusion::GenerationOutput| -> Vec<f32> {
            o.images[0].pixels.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert!(flat(&first) == flat(&second));
        assert!(pixels(&sd, &request(model, vec![])) == base);
    }
}

#[test]
fn a_lora_for_another_family_is_refused_by_name() {
    let sd15 = load("tiny-sd15");
    let xl_lora = LoraWeight { lora: parsed("tiny-sdxl", "style"), scale: 1.0 };
    let err = sd15.generate(&request("tiny-sd15", vec![xl_lora]), &mut |_| {}, None).unwrap_err().to_string();
    assert!(err.contains("loras") && err.contains("SDXL"), "{err}");

    let sdxl = load("tiny-sdxl");
    let sd_lora = LoraWeight { lora: parsed("tiny-sd15", "style"), scale: 1.0 };
    let err = sdxl.generate(&request("tiny-sdxl", vec![sd_lora]), &mut |_| {}, None).unwrap_err().to_string();
    assert!(err.contains("loras") && err.contains("SDXL"), "{err}");
    // The refusal left the model as loaded.
    let base = lora_references(&fixture("tiny-sdxl").join("lora"));
    let img = pixels(&sdxl, &request("tiny-sdxl", vec![]));
    let img = Tensor::from_vec(img, (1, 3, 64, 96), &Device::Cpu).unwrap();
    assert!(common::diff(&img, &reference(&base, "base_image")).0 < 1e-4);
}

mod bus {
    //! LoRAs through the bus: a worker with `--lora-dir` applies them by name, gives `sd-rbee generate`'s
    //! bytes, runs the next job on the loaded weights, and fails (and dead-letters) jobs whose LoRAs it
    //! cannot use while it keeps serving.

    use std::time::Duration;

    use super::common::{self, hostile::QueenChild, servers::NatsServer, servers::S3Server, servers::WorkerProcess};
    use async_nats::jetstream;
    use sd_rbee::bus::BusClient;
    use sd_rbee::protocol::{self, ErrorCode, Event, JobKind, JobRequest, LoraRef};

    fn job(seed: u64, loras: &[(&str, f64)]) -> JobRequest {
        let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", super::PROMPT);
        (job.width, job.height, job.steps, job.seed) = (Some(64), Some(64), Some(4), Some(seed));
        job.loras = loras.iter().map(|(n, s)| LoraRef { name: n.to_string(), scale: *s }).collect();
        job
    }

    fn generate_png(seed: u64, loras: &[String]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.png");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"));
        cmd.args(["generate", "--model"]).arg(common::fixture("tiny-sd15"));
        cmd.args(["--prompt", super::PROMPT, "--width", "64", "--height", "64", "--steps", "4"]);
        cmd.args(["--seed", &seed.to_string(), "--out"]).arg(&out);
        for l in loras {
            cmd.args(["--lora", l]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&out).unwrap()
    }

    async fn last_event(client: &BusClient, job: &JobRequest) -> Event {
        let mut seen = Vec::new();
        client
            .wait(job.id, Duration::from_secs(60), |e| seen.push(e.clone()))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        seen.pop().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_applies_catalogue_loras_as_generate_does_and_refuses_bad_ones() {
        let nats = NatsServer::start();
        let store = tempfile::tempdir().unwrap();
        let store_url = format!("file://{}", store.path().display());
        let catalogue = tempfile::tempdir().unwrap();
        let cat = catalogue.path();
        for name in ["style", "detail"] {
            std::fs::copy(super::lora_file("tiny-sd15", name), cat.join(format!("{name}.safetensors"))).unwrap();
        }
        std::fs::copy(super::lora_file("tiny-sdxl", "style"), cat.join("xl-style.safetensors")).unwrap();
        let whole = std::fs::read(super::lora_file("tiny-sd15", "style")).unwrap();
        std::fs::write(cat.join("broken.safetensors"), &whole[..whole.len() / 2]).unwrap();
        std::fs::write(cat.join("pickle.ckpt"), b"not listed: not a .safetensors file").unwrap();
        // Finite but huge: the weights it makes overflow the activations into NaN and infinities.
        let style = super::lora_file("tiny-sd15", "style");
        let mut huge = candle_core::safetensors::load(&style, &candle_core::Device::Cpu).unwrap();
        for t in huge.values_mut().filter(|t| t.rank() >= 2) {
            *t = (t.to_dtype(candle_core::DType::F32).unwrap() * 1e15).unwrap();
        }
        candle_core::safetensors::save(&huge, cat.join("blowup.safetensors")).unwrap();

        let dir_arg = cat.display().to_string();
        let _worker = WorkerProcess::start("w-lora", &nats.url(), &store_url, &[], &["--lora-dir", &dir_arg]);
        let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

        // The heartbeat lists the catalogue, and the queen lists it with the model.
        let mut beats = client.nats().subscribe(client.subjects().heartbeat("w-lora").unwrap()).await.unwrap();
        let beat = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut beats)).await.unwrap();
        let beat = protocol::decode_heartbeat(&beat.unwrap().payload).unwrap();
        assert_eq!(beat.loras, ["blowup", "broken", "detail", "style", "xl-style"]);
        let queen = QueenChild::start(&nats.url(), &store_url, &[]);
        let start = std::time::Instant::now();
        let models = loop {
            let (status, models, _) = queen.request("GET", "/v1/models", b"");
            assert_eq!(status, 200);
            if models.as_array().is_some_and(|m| !m.is_empty()) {
                break models;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "the queen never saw the worker");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(models[0]["name"], "tiny");
        assert_eq!(models[0]["loras"], serde_json::json!(["blowup", "broken", "detail", "style", "xl-style"]));
        let body = serde_json::json!({"model": "tiny", "prompt": "x", "loras": [{"name": "a\\b"}]});
        let (status, answer, _) = queen.request("POST", "/v1/jobs", body.to_string().as_bytes());
        assert_eq!((status, answer["error"]["field"].as_str()), (422, Some("loras[0].name")), "{answer}");

        // Two LoRAs, then none: the same bytes as generate each time (nothing leaks into the second job).
        let with = job(21, &[("style", 0.8), ("detail.safetensors", -0.5)]);
        let without = job(21, &[]);
        client.submit(&with).await.unwrap();
        client.submit(&without).await.unwrap();
        let style = super::lora_file("tiny-sd15", "style").display().to_string();
        let detail = super::lora_file("tiny-sd15", "detail").display().to_string();
        let expected_with = generate_png(21, &[format!("{style}:0.8"), format!("{detail}:-0.5")]);
        let expected_without = generate_png(21, &[]);
        assert!(expected_with != expected_without);
        let files = store.path();
        for (job, expected) in [(&with, &expected_with), (&without, &expected_without)] {
            let Event::Completed(done) = last_event(&client, job).await else {
                panic!("job {} did not complete", job.id)
            };
            let stored = std::fs::read(files.join(&done.images[0].key)).unwrap();
            assert!(&stored == expected, "job with {:?}: the worker's PNG differs from generate's", job.loras);
        }

        // Through the queen's HTTP API: the same job, the same bytes.
        let body = serde_json::json!({"model": "tiny", "prompt": super::PROMPT, "width": 64, "height": 64, "steps": 4,
            "seed": 21, "loras": [{"name": "style", "scale": 0.8}, {"name": "detail", "scale": -0.5}]});
        let (status, answer, _) = queen.request("POST", "/v1/jobs", body.to_string().as_bytes());
        assert_eq!(status, 202, "{answer}");
        let mut via_http = with.clone();
        via_http.id = answer["job_id"].as_str().unwrap().parse().unwrap();
        let Event::Completed(done) = last_event(&client, &via_http).await else {
            panic!("the HTTP job did not complete")
        };
        assert!(std::fs::read(files.join(&done.images[0].key)).unwrap() == expected_with);

        // Jobs whose LoRAs cannot be used are failed with the field and the reason, and dead-lettered.
        let js = client.jetstream();
        let subject = client.subjects().jobs("tiny").unwrap();
        let publish_raw = |job: JobRequest| {
            let subject = subject.clone();
            async move {
                let headers = sd_rbee::bus::msg_id_headers(&job.id.to_string());
                js.publish_with_headers(subject, headers, protocol::encode(&job).into()).await.unwrap().await.unwrap();
                job
            }
        };
        let many: Vec<(&str, f64)> = vec![("style", 0.1); 1000];
        let cases = [
            (publish_raw(job(1, &[("../style", 1.0)])).await, "loras[0].name", "not a path"),
            (publish_raw(job(2, &[("style", f64::NAN)])).await, "loras[0].scale", "NaN"),
            (publish_raw(job(3, &[("style", 1e6)])).await, "loras[0].scale", "1000000"),
            (publish_raw(job(4, &many)).await, "loras", "1000 LoRAs"),
            (
                publish_raw(job(5, &[("style", 1.0), ("missing", 1.0)])).await,
                "loras[1].name",
                "not in this worker's catalogue",
            ),
            (publish_raw(job(6, &[("pickle", 1.0)])).await, "loras[0].name", "not in this worker's catalogue"),
            (publish_raw(job(7, &[("broken", 1.0)])).await, "loras[0].name", "broken"),
            (publish_raw(job(8, &[("xl-style", 1.0)])).await, "loras", "SDXL"),
            (publish_raw(job(9, &[("owner/style", 1.0)])).await, "loras[0].name", "--lora-hub"),
            (publish_raw(job(10, &[("a/b/c/d", 1.0)])).await, "loras[0].name", "not a path"),
            (publish_raw(job(11, &[("blowup", 1.0)])).await, "loras", "(blowup × 1) made the model produce NaN"),
        ];
        for (job, field, needle) in &cases {
            let Event::Failed(f) = last_event(&client, job).await else {
                panic!("job {:?} did not fail", job.loras.first())
            };
            assert_eq!((f.code, f.field.as_deref()), (ErrorCode::InvalidRequest, Some(*field)), "{f:?}");
            assert!(f.message.contains(needle), "{needle:?} not in {:?}", f.message);
            assert!(f.message.len() <= protocol::MAX_ERROR_MESSAGE_BYTES);
        }
        let stream = client.jetstream().get_stream(client.subjects().dlq_stream()).await.unwrap();
        let all = client.subjects().dead_letter_wildcard();
        let letters =
            sd_rbee::bus::stored_messages(&stream, all, jetstream::consumer::DeliverPolicy::All).await.unwrap();
        assert_eq!(letters.len(), cases.len());

        // The worker still serves, on the loaded weights.
        let after = job(21, &[]);
        client.submit(&after).await.unwrap();
        let Event::Completed(done) = last_event(&client, &after).await else { panic!("the last job did not complete") };
        let stored = std::fs::read(files.join(&done.images[0].key)).unwrap();
        assert!(stored == generate_png(21, &[]));
    }

    /// LoRAs kept in the object store (`--lora-store-prefix`): listed in heartbeats, applied by name, and read
    /// again when the object is replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loras_from_the_object_store() {
        let nats = NatsServer::start();
        let s3 = S3Server::start();
        let style = std::fs::read(super::lora_file("tiny-sd15", "style")).unwrap();
        let detail = std::fs::read(super::lora_file("tiny-sd15", "detail")).unwrap();
        s3.put("shared/loras/style.safetensors", &style);
        s3.put("shared/loras/detail.safetensors", &detail);
        let extra = ["--lora-store-prefix", "shared/loras/"];
        let _worker = WorkerProcess::start("w-lora-s3", &nats.url(), &s3.store_url(), &s3.env(), &extra);
        let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
        let mut beats = client.nats().subscribe(client.subjects().heartbeat("w-lora-s3").unwrap()).await.unwrap();
        let beat = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut beats)).await.unwrap();
        assert_eq!(protocol::decode_heartbeat(&beat.unwrap().payload).unwrap().loras, ["detail", "style"]);

        let style_path = super::lora_file("tiny-sd15", "style").display().to_string();
        let detail_path = super::lora_file("tiny-sd15", "detail").display().to_string();
        let cases = [
            (job(31, &[("style", 0.8)]), generate_png(31, &[format!("{style_path}:0.8")]), None),
            // The object replaced by another LoRA: the next job reads the new one.
            (job(31, &[("style", 0.8)]), generate_png(31, &[format!("{detail_path}:0.8")]), Some(&detail)),
        ];
        for (job, expected, replace) in cases {
            if let Some(bytes) = replace {
                s3.put("shared/loras/style.safetensors", bytes);
            }
            client.submit(&job).await.unwrap();
            let Event::Completed(done) = last_event(&client, &job).await else { panic!("job did not complete") };
            assert!(s3.get(&done.images[0].key).unwrap() == expected, "the stored LoRA was not the one applied");
        }
        let missing = job(32, &[("nope", 1.0)]);
        client.submit(&missing).await.unwrap();
        let Event::Failed(f) = last_event(&client, &missing).await else {
            panic!("a missing LoRA did not fail the job")
        };
        assert_eq!(f.field.as_deref(), Some("loras[0].name"));
        assert!(f.message.contains("nope"), "{}", f.message);
    }
}

/// `--lora owner/name:SCALE` takes the LoRA from the Hugging Face cache (offline here; online the same path
/// downloads into it first, see hub::lora's tests).
#[test]
fn a_hub_lora_from_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub").join("models--someone--tiny-style");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::copy(lora_file("tiny-sd15", "style"), snapshot.join("pytorch_lora_weights.safetensors")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (out, tensor) = (dir.path().join("hub.png"), dir.path().join("hub.safetensors"));
    let args = generate_args(&fixture("tiny-sd15"), &["someone/tiny-style:0.6".to_string()], &out, &tensor);
    let o = Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(&args)
        .arg("--offline")
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let image = candle_core::safetensors::load(&tensor, &Device::Cpu).unwrap()["image"].clone();
    let refs = lora_references(&fixture("tiny-sd15").join("lora"));
    assert_close("hub LoRA", &image, &reference(&refs, "lora_style_0.6_image"), 1e-4, 1e-5);

    let args = generate_args(&fixture("tiny-sd15"), &["someone/not-cached".to_string()], &out, &tensor);
    let o = Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(&args)
        .arg("--offline")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("someone/not-cached") && err.contains("offline"), "{err}");
}
