//! `sd-rbee generate` end to end, as a user runs it: parity through the binary (`--initial-latents`,
//! `--save-tensor`, PNGs as diffusers writes them), determinism, batches, and one-line errors for bad input.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;
use common::{assert_close, copy_dir, expected, fixture, png_diff, read_png, reference};

fn sd_rbee(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-rbee")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("sd-rbee runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails_cleanly(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    assert!(err.contains(needle), "error should mention {needle:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "error should be one line: {err}");
}

fn model(name: &str) -> String {
    fixture(name).display().to_string()
}

/// `sd-rbee generate` on `model_dir` at 64×64 with `steps` steps into `out`, plus `extra` flags.
fn generate_small(model_dir: &str, prompt: &str, steps: &str, out: &Path, extra: &[&str]) -> Output {
    let base = [
        "generate",
        "--model",
        model_dir,
        "--prompt",
        prompt,
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        steps,
        "--out",
        out.to_str().unwrap(),
    ];
    sd_rbee(&[&base[..], extra].concat())
}

fn generate_fixture(model_name: &str, scheduler: &str, guidance: &str, out: &Path, extra: &[&str]) -> Output {
    let folder = fixture(model_name);
    let mut args = common::reference_run(&folder, &folder.join("expected.safetensors"), scheduler, guidance, out);
    args.extend(extra.iter().map(|s| s.to_string()));
    sd_rbee(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn generate_matches_diffusers_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    for (model_name, scheduler, guidance, case) in [
        ("tiny-sd15", "ddim", "7.5", "ddim"),
        ("tiny-sd15", "dpmpp_2m", "7.5", "dpmpp_2m"),
        ("tiny-sdxl", "euler", "5.0", "euler"),
    ] {
        let out = dir.path().join(format!("{model_name}-{case}.png"));
        let tensor = dir.path().join(format!("{model_name}-{case}.safetensors"));
        let o = generate_fixture(model_name, scheduler, guidance, &out, &["--save-tensor", tensor.to_str().unwrap()]);
        assert!(o.status.success(), "generate failed: {}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("seed") && stdout.contains("ms/step"), "summary line: {stdout}");

        let saved = candle_core::safetensors::load(&tensor, &Device::Cpu).unwrap();
        let image = &saved["image"];
        assert_eq!(image.dims(), &[1, 3, 64, 96]);
        let exp = expected(model_name);
        assert_close(
            &format!("{model_name} {case} (cli)"),
            image,
            &reference(&exp, &format!("txt2img_{case}_image")),
            1e-4,
            1e-5,
        );

        // The PNG is diffusers' round(x * 255): it equals our saved tensor rounded, and wherever it differs
        // from diffusers' PNG, diffusers' value sits within our float error of a rounding boundary.
        let ours = read_png(&out);
        let ours_tensor: Vec<f32> =
            image.squeeze(0).unwrap().permute((1, 2, 0)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (byte, v) in ours.as_raw().iter().zip(&ours_tensor) {
            assert_eq!(*byte, (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8, "PNG is not round(x * 255)");
        }
        let theirs = read_png(&fixture(model_name).join(format!("expected_{case}.png")));
        let reference_values: Vec<f32> = reference(&exp, &format!("txt2img_{case}_image"))
            .squeeze(0)
            .unwrap()
            .permute((1, 2, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut differing = 0;
        for ((a, b), r) in ours.as_raw().iter().zip(theirs.as_raw()).zip(&reference_values) {
            if a != b {
                differing += 1;
                let scaled = r * 255.0;
                let to_boundary = (scaled - scaled.floor() - 0.5).abs();
                assert!(a.abs_diff(*b) == 1 && to_boundary <= 255.0 * 1e-4, "{case}: byte {a} vs {b} for value {r}");
            }
        }
        eprintln!("{case}: {differing} of {} PNG values differ by one at a rounding boundary", ours_tensor.len());
    }
}

/// `SD_RBEE_BLAS` puts the CPU's matrix multiplies on the library it names (the numerics are checked by
/// tests/parity_blas.rs); a library that cannot be used stops the command before any work, naming the variable.
#[test]
fn a_vendor_blas_is_named_by_sd_rbee_blas() {
    let dir = tempfile::tempdir().unwrap();
    let run = |blas: &str, out: &Path| {
        let folder = fixture("tiny-sd15");
        let mut args = common::reference_run(&folder, &folder.join("expected.safetensors"), "ddim", "7.5", out);
        args.extend(["--log-level", "info"].map(String::from));
        Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(&args)
            .env("HF_HUB_OFFLINE", "1")
            .env("SD_RBEE_BLAS", blas)
            .output()
            .expect("sd-rbee runs")
    };
    let out = dir.path().join("blas.png");
    let o = run("libopenblas.so.0", &out);
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    assert!(stderr(&o).contains("CPU matrix multiplies run on this BLAS") && stderr(&o).contains("libopenblas.so.0"));
    let (max, _) = png_diff(&read_png(&out), &read_png(&fixture("tiny-sd15").join("expected_ddim.png")));
    assert!(max <= 1, "the PNG moved by {max} levels from diffusers'");

    for (blas, needle) in [
        ("/nonexistent/libmkl_rt.so", "SD_RBEE_BLAS: cannot load '/nonexistent/libmkl_rt.so'"),
        ("libc.so.6", "SD_RBEE_BLAS: 'libc.so.6' has no cblas_sgemm"),
    ] {
        let out = dir.path().join("refused.png");
        let o = run(blas, &out);
        assert!(!o.status.success() && stderr(&o).contains(needle), "{blas}: {}", stderr(&o));
        assert!(!out.exists(), "nothing written when the BLAS is refused");
    }
}

/// `bench unet --profile` times every component of one UNet call on its own: it finds each component
/// diffusers' module hooks find, as many times (`scripts/make_profile_references.py` counted them), and its
/// components' own times add up to the call's time.
#[test]
fn bench_unet_profile_finds_diffusers_components_call_for_call() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("profile-calls.json")).unwrap()).unwrap();
    let latent = want["latent"].to_string();
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let unet = fixture(model).join("unet");
        let o = sd_rbee(&["bench", "unet", unet.to_str().unwrap(), "--latent", &latent, "--runs", "1", "--profile"]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        let field = |line: &str, name: &str| -> f64 {
            let at = line.find(&format!(" {name}=")).unwrap_or_else(|| panic!("{name} missing: {line}"));
            let value = line[at + name.len() + 2..].split([' ', '%']).next().unwrap();
            value.parse().unwrap_or_else(|_| panic!("{name} is not a number: {line}"))
        };
        let prefix = "profile: sd-rbee unet images 1 component=";
        let mut calls = serde_json::Map::new();
        let (mut own_sum, mut wall) = (0.0, None);
        for line in stdout.lines().filter_map(|l| l.strip_prefix(prefix)) {
            let name = line.split(' ').next().unwrap();
            if name == "total" {
                wall = Some(field(line, "wall_ms"));
                assert!((field(line, "covered_ms") - own_sum).abs() < 0.01 * own_sum.max(1.0), "{line}");
            } else {
                calls.insert(name.into(), (field(line, "calls") as u64).into());
                own_sum += field(line, "own_ms");
            }
        }
        assert_eq!(serde_json::Value::Object(calls), want[model], "{model}: components and calls\n{stdout}");
        let wall = wall.unwrap_or_else(|| panic!("{model}: no total line\n{stdout}"));
        assert!(own_sum <= wall + 0.05 && own_sum >= 0.9 * wall, "{model}: own times {own_sum} ms of {wall} ms");
    }
}

#[test]
fn same_seed_same_bytes_different_seed_different_image() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let run = |seed: &str, name: &str| {
        let out = dir.path().join(name);
        let o = generate_small(&m, "a red house", "4", &out, &["--seed", seed]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    let a = run("7", "a.png");
    let b = run("7", "b.png");
    let c = run("8", "c.png");
    assert_eq!(a, b, "same seed must give identical bytes");
    assert_ne!(a, c, "different seeds must give different images");
}

#[test]
fn batch_images_get_their_own_seeds_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = dir.path().join("batch.png");
    let o = generate_small(&m, "a red house", "3", &out, &["--seed", "100", "--num-images", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints one JSON object");
    let seeds: Vec<u64> = summary["images"].as_array().unwrap().iter().map(|i| i["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, vec![100, 101, 102]);
    for name in ["batch.png", "batch-1.png", "batch-2.png"] {
        assert!(dir.path().join(name).is_file(), "{name} written");
    }
    // Image 1 of the batch is the image a single run with its seed gives.
    let single = dir.path().join("single.png");
    let o = generate_small(&m, "a red house", "3", &single, &["--seed", "101"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (max, _) = png_diff(&read_png(&single), &read_png(&dir.path().join("batch-1.png")));
    assert!(max <= 1, "batch image 1 differs from the single run with seed 101 by {max}");
}

#[test]
fn no_seed_means_a_random_reported_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let o = generate_small(&model("tiny-sd15"), "x", "2", &out, &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["images"][0]["seed"].is_u64());
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("long.png");
    let prompt = "a very detailed painting of a lighthouse on a cliff ".repeat(12);
    let o = generate_small(&model("tiny-sd15"), &prompt, "2", &out, &["--seed", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let warnings = summary["warnings"].as_array().unwrap();
    assert!(warnings.iter().any(|w| w.as_str().unwrap().contains("77 tokens")), "{warnings:?}");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    let m = model("tiny-sd15");
    let base = ["generate", "--prompt", "x", "--out", out];

    let missing = dir.path().join("no-such-model");
    let o = sd_rbee(&[&base[..], &["--model", missing.to_str().unwrap()]].concat());
    assert_fails_cleanly(&o, "no-such-model");

    let o = sd_rbee(&[&base[..], &["--model", &m, "--scheduler", "plms"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("unknown scheduler 'plms'"), "{}", stderr(&o));

    let o = sd_rbee(&[&base[..], &["--model", &m, "--width", "100"]].concat());
    assert_fails_cleanly(&o, "`width` must be a positive multiple of 8");

    let o = sd_rbee(&[&base[..], &["--model", &m, "--steps", "0"]].concat());
    assert_fails_cleanly(&o, "`steps`");

    let o = sd_rbee(&[&base[..], &["--model", &m, "--initial-latents", "nope.safetensors"]].concat());
    assert_fails_cleanly(&o, "nope.safetensors");

    let latents = fixture("tiny-sd15").join("expected.safetensors");
    let spec = format!("{}:prompt_embeds", latents.display());
    let o =
        sd_rbee(&[&base[..], &["--model", &m, "--width", "96", "--height", "64", "--initial-latents", &spec]].concat());
    assert_fails_cleanly(&o, "`initial_latents` must have shape [1, 4, 8, 12]");

    let o = sd_rbee(&[&base[..], &["--model", &m, "--device", "cuda"]].concat());
    if !cfg!(feature = "cuda") {
        assert_fails_cleanly(&o, "--features cuda");
    }
    assert!(!Path::new(out).exists(), "nothing written on error");
}

#[test]
fn a_config_the_code_cannot_express_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model");
    copy_dir(&fixture("tiny-sd15"), &copy);
    let cfg_path = copy.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["time_embedding_type"] = "fourier".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = dir.path().join("x.png");
    let o = sd_rbee(&["generate", "--model", copy.to_str().unwrap(), "--prompt", "x", "--out", out.to_str().unwrap()]);
    assert_fails_cleanly(&o, "`time_embedding_type`");

    // Zero groups: an error naming the key, not a division by zero.
    for part in ["unet", "vae"] {
        let copy = dir.path().join(format!("zero-groups-{part}"));
        copy_dir(&fixture("tiny-sd15"), &copy);
        let cfg_path = copy.join(part).join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["norm_num_groups"] = 0.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let model = copy.to_str().unwrap();
        let o = sd_rbee(&["generate", "--model", model, "--prompt", "x", "--out", out.to_str().unwrap()]);
        assert_fails_cleanly(&o, &format!("{part} config: `norm_num_groups` must be at least 1"));
    }
}

#[test]
fn nan_weights_are_reported_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model");
    copy_dir(&fixture("tiny-sd15"), &copy);
    // Poison the VAE's last convolution.
    let vae = copy.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&vae, &Device::Cpu).unwrap();
    let w = tensors["decoder.conv_out.bias"].clone();
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert("decoder.conv_out.bias".into(), nan);
    candle_core::safetensors::save(&tensors, &vae).unwrap();
    let out = dir.path().join("nan.png");
    let o = generate_small(copy.to_str().unwrap(), "x", "2", &out, &["--seed", "1"]);
    assert_fails_cleanly(&o, "NaN");
    assert!(!out.exists());
}

#[test]
fn models_lists_the_registry() {
    let o = sd_rbee(&["models"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for name in ["v1-5", "v1-5-inpaint", "v2-1", "v2-inpaint", "xl", "xl-inpaint", "turbo", "sd-turbo"] {
        assert!(text.lines().any(|l| l.split_whitespace().next() == Some(name)), "{name} missing:\n{text}");
    }
}

#[test]
fn img2img_and_inpainting_match_diffusers_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let sd15 = fixture("tiny-sd15");
    let noise = format!("{}:img2img_noise", sd15.join("expected.safetensors").display());
    let init = sd15.join("init_image.png");
    let mask = sd15.join("mask.png");
    let inpaint_model = fixture("tiny-sd15-inpaint");
    let inpaint_latents = inpaint_model.join("expected.safetensors");
    let cases: [(&Path, &str, Vec<&str>); 3] = [
        (
            &sd15,
            "img2img_ddim_s0.6_image",
            vec!["--init-image", init.to_str().unwrap(), "--strength", "0.6", "--noise", &noise],
        ),
        (
            &sd15,
            "inpaint_blend_ddim_s0.75_image",
            vec![
                "--init-image",
                init.to_str().unwrap(),
                "--mask",
                mask.to_str().unwrap(),
                "--strength",
                "0.75",
                "--noise",
                &noise,
                "--no-paste-back",
            ],
        ),
        (
            &inpaint_model,
            "txt2img_ddim_image",
            vec![
                "--init-image",
                init.to_str().unwrap(),
                "--mask",
                mask.to_str().unwrap(),
                "--initial-latents",
                inpaint_latents.to_str().unwrap(),
            ],
        ),
    ];
    for (model_dir, case, extra) in cases {
        let out = dir.path().join(format!("{case}.png"));
        let tensor = dir.path().join(format!("{case}.safetensors"));
        let base = [
            "generate",
            "--model",
            model_dir.to_str().unwrap(),
            "--prompt",
            "a photograph of an astronaut riding a horse",
            "--negative-prompt",
            "blurry, low quality",
            "--steps",
            "10",
            "--guidance",
            "7.5",
            "--scheduler",
            "ddim",
            "--out",
            out.to_str().unwrap(),
            "--save-tensor",
            tensor.to_str().unwrap(),
        ];
        let o = sd_rbee(&[&base[..], &extra[..]].concat());
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let saved = candle_core::safetensors::load(&tensor, &Device::Cpu).unwrap();
        let exp = expected(model_dir.file_name().unwrap().to_str().unwrap());
        assert_close(&format!("{case} (cli)"), &saved["image"], &reference(&exp, case), 1e-4, 1e-5);
    }
}

#[test]
fn bad_init_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let m = model("tiny-sd15");
    let init = fixture("tiny-sd15").join("init_image.png");
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"not an image at all").unwrap();
    let o = generate_small(&m, "x", "2", &out, &["--init-image", garbage.to_str().unwrap()]);
    assert_fails_cleanly(&o, "init image");
    let o = generate_small(&m, "x", "2", &out, &["--init-image", init.to_str().unwrap(), "--strength", "1.5"]);
    assert_fails_cleanly(&o, "`strength`");
    let o = generate_small(&m, "x", "2", &out, &["--mask", init.to_str().unwrap()]);
    assert_fails_cleanly(&o, "--mask needs --init-image");
    let o = generate_small(&fixture("tiny-sd15-inpaint").display().to_string(), "x", "2", &out, &[]);
    assert_fails_cleanly(&o, "`mask`");
    assert!(!out.exists());
}

#[test]
fn paste_back_keeps_the_original_outside_the_mask_and_formats_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let sd15 = fixture("tiny-sd15");
    let (init, mask) = (sd15.join("init_image.png"), sd15.join("mask.png"));
    let out = dir.path().join("pasted.png");
    let args =
        ["--init-image", init.to_str().unwrap(), "--mask", mask.to_str().unwrap(), "--mask-blur", "0", "--seed", "3"];
    let o = generate_small(&model("tiny-sd15"), "a red door", "4", &out, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (pasted, original, m) = (read_png(&out), read_png(&init), read_png(&mask));
    // (--width/--height 64 crops the 96x64 init image to its centre 64x64.)
    let crop = image::imageops::crop_imm(&original, 16, 0, 64, 64).to_image();
    let mask_crop = image::imageops::crop_imm(&m, 16, 0, 64, 64).to_image();
    let mut inside_changed = 0;
    for ((p, o), k) in pasted.pixels().zip(crop.pixels()).zip(mask_crop.pixels()) {
        if k[0] < 128 {
            assert_eq!(p, o, "outside the mask the original is kept");
        } else if p != o {
            inside_changed += 1;
        }
    }
    assert!(inside_changed > 100, "the masked region is repainted ({inside_changed} pixels changed)");

    for (format, magic) in [("jpeg", &b"\xff\xd8"[..]), ("webp", &b"RIFF"[..])] {
        let path = dir.path().join(format!("x.{format}"));
        let o = generate_small(&model("tiny-sd15"), "x", "2", &path, &["--seed", "1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(std::fs::read(&path).unwrap().starts_with(magic), "{format} written");
        let low = dir.path().join(format!("low.{format}"));
        let o = generate_small(&model("tiny-sd15"), "x", "2", &low, &["--seed", "1", "--quality", "10"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let (big, small) = (std::fs::metadata(&path).unwrap().len(), std::fs::metadata(&low).unwrap().len());
        assert!(small < big, "{format}: quality 10 gives {small} bytes, quality 90 {big}");
    }
}
