//! The configurations of the real SD 1.5, 2.1 and XL (and their inpainting variants), for single-file
//! checkpoints loaded without `--config`: written out as a diffusers config folder (model_index.json, each
//! component's config.json, the tokenizers, the scheduler), so a checkpoint then loads exactly as with
//! `--config` pointing at that folder. The CLIP BPE tokenizer that all three use ships inside the binary, so
//! this works offline.
//!
//! Schedulers: DDIM for SD 1.x and 2.x (what diffusers' `from_single_file` picks), Euler for SDXL.
//! Prediction: SD 2.x checkpoints are taken as the 768-pixel v-prediction models (SD 2.0/2.1, the ones
//! published as single files), SD 2.x inpainting as epsilon (as `stabilityai/stable-diffusion-2-inpainting`);
//! nothing in the weights tells them apart, so `--prediction-type` overrides it.

use std::path::Path;

use serde_json::{json, Value};

use super::{Architecture, Family};

const TOKENIZER_JSON: &[u8] = include_bytes!("../../../assets/clip-tokenizer.json");

fn tokenizer_config(pad: &str) -> Value {
    json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": pad, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
}

fn clip_l() -> Value {
    json!({"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
           "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408,
           "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768, "eos_token_id": 49407})
}

fn open_clip_h() -> Value {
    // SD 2.x uses the penultimate of OpenCLIP-H's 24 layers, so diffusers' text encoder keeps 23.
    json!({"architectures": ["CLIPTextModel"], "hidden_size": 1024, "intermediate_size": 4096,
           "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408,
           "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 512, "eos_token_id": 49407})
}

fn open_clip_big_g() -> Value {
    json!({"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
           "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77, "vocab_size": 49408,
           "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1280, "eos_token_id": 49407})
}

fn vae(scaling: f64, force_upcast: bool) -> Value {
    json!({"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
           "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
           "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
           "sample_size": 512, "scaling_factor": scaling, "force_upcast": force_upcast})
}

fn unet(arch: Architecture) -> Value {
    let in_channels = if arch.inpainting { 9 } else { 4 };
    match arch.family {
        Family::Sd1 | Family::Sd2 => {
            let v2 = arch.family == Family::Sd2;
            json!({"_class_name": "UNet2DConditionModel", "act_fn": "silu",
                   "attention_head_dim": if v2 { json!([5, 10, 20, 20]) } else { json!(8) },
                   "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
                   "cross_attention_dim": if v2 { 1024 } else { 768 },
                   "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                   "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1, "flip_sin_to_cos": true,
                   "freq_shift": 0, "in_channels": in_channels, "out_channels": 4, "layers_per_block": 2,
                   "norm_eps": 1e-5, "norm_num_groups": 32, "sample_size": if v2 && !arch.inpainting { 96 } else { 64 },
                   "use_linear_projection": v2})
        }
        Family::Sdxl => json!({"_class_name": "UNet2DConditionModel", "act_fn": "silu",
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1, "flip_sin_to_cos": true,
            "freq_shift": 0, "in_channels": in_channels, "out_channels": 4, "layers_per_block": 2, "norm_eps": 1e-5,
            "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true}),
    }
}

fn scheduler(arch: Architecture) -> Value {
    let mut config = json!({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": false,
        "set_alpha_to_one": false, "prediction_type": "epsilon"});
    let (class, prediction) = match arch.family {
        Family::Sd1 => ("DDIMScheduler", "epsilon"),
        Family::Sd2 if arch.inpainting => ("DDIMScheduler", "epsilon"),
        Family::Sd2 => ("DDIMScheduler", "v_prediction"),
        Family::Sdxl => ("EulerDiscreteScheduler", "epsilon"),
    };
    config["_class_name"] = json!(class);
    config["prediction_type"] = json!(prediction);
    config
}

/// The files of a diffusers config folder for `arch`: `(relative path, contents)`.
pub fn files(arch: Architecture) -> Vec<(String, Vec<u8>)> {
    let xl = arch.family == Family::Sdxl;
    let pipeline = match (xl, arch.inpainting) {
        (true, true) => "StableDiffusionXLInpaintPipeline",
        (true, false) => "StableDiffusionXLPipeline",
        (false, true) => "StableDiffusionInpaintPipeline",
        (false, false) => "StableDiffusionPipeline",
    };
    let mut index = json!({"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]});
    let json_file = |path: &str, v: &Value| (path.to_string(), serde_json::to_vec_pretty(v).expect("JSON"));
    let (te, pad) = match arch.family {
        Family::Sd1 => (clip_l(), "<|endoftext|>"),
        Family::Sd2 => (open_clip_h(), "!"),
        Family::Sdxl => (clip_l(), "<|endoftext|>"),
    };
    let mut out = vec![
        json_file("unet/config.json", &unet(arch)),
        json_file("vae/config.json", &if xl { vae(0.13025, true) } else { vae(0.18215, false) }),
        json_file("text_encoder/config.json", &te),
        json_file("tokenizer/tokenizer_config.json", &tokenizer_config(pad)),
        ("tokenizer/tokenizer.json".to_string(), TOKENIZER_JSON.to_vec()),
        json_file("scheduler/scheduler_config.json", &scheduler(arch)),
    ];
    if xl {
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
        index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
        index["force_zeros_for_empty_prompt"] = json!(true);
        out.push(json_file("text_encoder_2/config.json", &open_clip_big_g()));
        out.push(json_file("tokenizer_2/tokenizer_config.json", &tokenizer_config("!")));
        out.push(("tokenizer_2/tokenizer.json".to_string(), TOKENIZER_JSON.to_vec()));
    }
    out.push(json_file("model_index.json", &index));
    out
}

/// A built-in config folder written to a new private temporary directory (random name, owner-only), removed
/// when dropped.
pub struct ConfigFolder(tempfile::TempDir);

impl ConfigFolder {
    pub fn write(arch: Architecture) -> anyhow::Result<Self> {
        let folder = Self(tempfile::Builder::new().prefix("sd-rbee-config-").tempdir()?);
        for (path, bytes) in files(arch) {
            let target = folder.path().join(path);
            std::fs::create_dir_all(target.parent().expect("a file in a folder"))?;
            std::fs::write(&target, bytes)?;
        }
        Ok(folder)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}
