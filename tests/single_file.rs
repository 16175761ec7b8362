//! Single-file checkpoints through `sd-rbee generate`: the tiny fixtures written in the original LDM/SGM layout
//! by scripts/make_single_file_fixtures.py (which checks with diffusers' `from_single_file` that they hold the
//! same model) reproduce their folders' references with `--config FOLDER`; `--vae`, `--prediction-type` and
//! the refusals (pickles, other families, a wrong size without `--config`) as a user meets them.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::{assert_close, expected, fixture, reference, PROMPT};

fn sd_rbee(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-rbee")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("sd-rbee runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn single_file(name: &str) -> PathBuf {
    fixture("single-file").join(format!("{name}.safetensors"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn single_file_checkpoints_reproduce_their_folders() {
    let dir = tempfile::tempdir().unwrap();
    let sd15 = fixture("tiny-sd15");
    let init = sd15.join("init_image.png").display().to_string();
    let mask = sd15.join("mask.png").display().to_string();
    for (name, scheduler, guidance, case, extra) in [
        ("tiny-sd15", "ddim", "7.5", "txt2img_ddim_image", vec![]),
        ("tiny-sdxl", "euler", "5.0", "txt2img_euler_image", vec![]),
        ("tiny-sd15-inpaint", "ddim", "7.5", "txt2img_ddim_image", vec!["--init-image", &init, "--mask", &mask]),
    ] {
        let folder = fixture(name);
        let tensor = dir.path().join(format!("{name}.safetensors"));
        let out = dir.path().join(format!("{name}.png"));
        let mut args =
            common::reference_run(&single_file(name), &folder.join("expected.safetensors"), scheduler, guidance, &out);
        args.extend(strings(&["--config", folder.to_str().unwrap(), "--save-tensor", tensor.to_str().unwrap()]));
        args.extend(strings(&extra));
        let o = sd_rbee(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let image = candle_core::safetensors::load(&tensor, &Device::Cpu).unwrap()["image"].clone();
        assert_close(&format!("{name} single file"), &image, &reference(&expected(name), case), 1e-4, 1e-5);
    }
}

/// `generate` on the tiny SD 1.5 single file, 64×64, 3 steps, seed 5, plus `extra`: the PNG, or the error.
fn small(extra: &[&str]) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let mut args = strings(&["generate", "--prompt", PROMPT, "--width", "64", "--height", "64", "--steps", "3"]);
    args.extend(strings(&["--seed", "5", "--out", out.to_str().unwrap()]));
    if !extra.contains(&"--model") {
        args.extend(strings(&["--model", single_file("tiny-sd15").to_str().unwrap()]));
    }
    args.extend(strings(extra));
    let o = sd_rbee(&args);
    if o.status.success() {
        Ok(std::fs::read(&out).unwrap())
    } else {
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        Err(err)
    }
}

fn write_safetensors(path: &Path, tensors: HashMap<String, Tensor>) {
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn vae_prediction_type_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture("tiny-sd15");
    let config = config.to_str().unwrap();
    let base = small(&["--config", config]).unwrap();

    // The VAE given apart: a diffusers vae/ folder, or a VAE-only file in the original layout.
    let all = candle_core::safetensors::load(single_file("tiny-sd15"), &Device::Cpu).unwrap();
    let vae_only: HashMap<String, Tensor> = all
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let vae_file = dir.path().join("vae.safetensors");
    write_safetensors(&vae_file, vae_only);
    assert!(small(&["--config", config, "--vae", vae_file.to_str().unwrap()]).unwrap() == base);
    let vae_folder = fixture("tiny-sd15").join("vae");
    assert!(small(&["--config", config, "--vae", vae_folder.to_str().unwrap()]).unwrap() == base);
    // A checkpoint without a VAE needs one.
    let no_vae: HashMap<String, Tensor> =
        all.iter().filter(|(k, _)| !k.starts_with("first_stage_model.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let bare = dir.path().join("bare.safetensors");
    write_safetensors(&bare, no_vae);
    let bare_s = bare.to_str().unwrap();
    assert!(small(&["--model", bare_s, "--config", config]).unwrap_err().contains("--vae"));
    assert!(small(&["--model", bare_s, "--config", config, "--vae", vae_file.to_str().unwrap()]).unwrap() == base);

    // The prediction type overrides the scheduler config's.
    assert!(small(&["--config", config, "--prediction-type", "epsilon"]).unwrap() == base);
    assert!(small(&["--config", config, "--prediction-type", "v-prediction"]).unwrap() != base);

    // Refusals, each one line naming what is wrong.
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02pickle").unwrap();
    let err = small(&["--model", ckpt.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("pickle") && err.contains("arbitrary code") && err.contains("safetensors"), "{err}");
    let err = small(&[]).unwrap_err();
    assert!(err.contains("SD 1.x") && err.contains("--config"), "{err}");
    let err = small(&["--config", fixture("tiny-sdxl").to_str().unwrap()]).unwrap_err();
    assert!(err.contains("SDXL") && err.contains("SD 1.x"), "{err}");
    let err = small(&["--model", fixture("tiny-sd15").to_str().unwrap(), "--config", config]).unwrap_err();
    assert!(err.contains("--config") && err.contains("folder"), "{err}");
    let bytes = std::fs::read(single_file("tiny-sd15")).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = small(&["--model", cut.to_str().unwrap(), "--config", config]).unwrap_err();
    assert!(err.contains("not a readable safetensors file"), "{err}");
    let lora = fixture("tiny-sd15").join("lora").join("style.safetensors");
    let err = small(&["--model", lora.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("--lora"), "{err}");
}

/// `--clip-skip N` as A1111 means it (diffusers' `clip_skip = N - 1`), against diffusers
/// (scripts/make_clip_skip_reference.py); SDXL refuses it.
#[test]
fn clip_skip_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let folder = fixture("tiny-sd15");
    let refs = candle_core::safetensors::load(folder.join("clip_skip.safetensors"), &Device::Cpu).unwrap();
    for skip in ["2", "3"] {
        let tensor = dir.path().join(format!("skip{skip}.safetensors"));
        let out = dir.path().join("x.png");
        let mut args = common::reference_run(&folder, &folder.join("expected.safetensors"), "ddim", "7.5", &out);
        args.extend(strings(&["--clip-skip", skip, "--save-tensor", tensor.to_str().unwrap()]));
        let o = sd_rbee(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let image = candle_core::safetensors::load(&tensor, &Device::Cpu).unwrap()["image"].clone();
        assert_close(&format!("clip skip {skip}"), &image, &refs[&format!("clip_skip_{skip}_image")], 1e-4, 1e-5);
    }
    let xl = fixture("tiny-sdxl");
    let err = small(&["--model", xl.to_str().unwrap(), "--clip-skip", "2"]).unwrap_err();
    assert!(err.contains("clip_skip") && err.contains("SDXL"), "{err}");
    let err = small(&["--model", folder.to_str().unwrap(), "--clip-skip", "9"]).unwrap_err();
    assert!(err.contains("between 1 and 5"), "{err}");
}
