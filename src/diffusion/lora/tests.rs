use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::names::LayerIndex;
use super::*;
use crate::diffusion::adapt::{self, Adaptable};

/// The bytes of a safetensors file holding `tensors` (f32, given shapes, filled with 0.1).
fn file(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape)| {
            (name.to_string(), (Tensor::ones(*shape, DType::F32, &Device::Cpu).unwrap() * 0.1).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    std::fs::read(path).unwrap()
}

fn kohya(layer: &str) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{layer}.lora_down.weight"), vec![4, 32]),
        (format!("{layer}.lora_up.weight"), vec![32, 4]),
        (format!("{layer}.alpha"), vec![]),
    ]
}

fn parse(tensors: &[(String, Vec<usize>)]) -> Result<Lora, LoraError> {
    let refs: Vec<(&str, &[usize])> = tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    Lora::from_bytes("test.safetensors", &file(&refs))
}

#[test]
fn memory_counts_each_tensor_in_its_dtype_and_each_layer_and_too_many_layers_are_refused() {
    let layer = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let map: HashMap<String, Tensor> = [
        (format!("{layer}.lora_down.weight"), Tensor::ones((4, 32), DType::F16, &Device::Cpu).unwrap()),
        (format!("{layer}.lora_up.weight"), Tensor::ones((32, 4), DType::F64, &Device::Cpu).unwrap()),
    ]
    .into_iter()
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    let lora = Lora::from_bytes("mixed", &std::fs::read(&path).unwrap()).unwrap();
    let names = "down_blocks_0_attentions_0_proj_in".len() + format!("{layer}.lora_down.weight").len();
    assert_eq!(lora.bytes, 128 * 2 + 128 * 8 + LAYER_OVERHEAD_BYTES + names);

    // Thousands of one-element layers: each counts, and past the bound the file is refused.
    let many = |n: usize| -> Vec<(String, Vec<usize>)> {
        (0..n)
            .flat_map(|i| {
                [
                    (format!("lora_unet_a{i}.lora_down.weight"), vec![1, 1]),
                    (format!("lora_unet_a{i}.lora_up.weight"), vec![1, 1]),
                ]
            })
            .collect()
    };
    let most = parse(&many(MAX_LAYERS)).unwrap();
    assert!(most.bytes >= MAX_LAYERS * LAYER_OVERHEAD_BYTES, "{}", most.bytes);
    let err = parse(&many(MAX_LAYERS + 1)).unwrap_err().to_string();
    assert!(err.contains("4097 layers") && err.contains("at most 4096"), "{err}");
    let err = parse(&many(3 * MAX_LAYERS)).unwrap_err().to_string();
    assert!(err.contains("24576 tensors"), "{err}");
}

#[test]
fn kohya_and_peft_keys_name_the_same_layers() {
    let k = parse(&kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")).unwrap();
    assert_eq!(k.format, LoraFormat::Kohya);
    assert_eq!(k.layers[0].key, "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q");
    assert!((k.layers[0].factor() - 0.1 / 4.0).abs() < 1e-8, "alpha 0.1 over rank 4");

    let p = parse(&[
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight".into(), vec![4, 32]),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight".into(), vec![32, 4]),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight".into(), vec![4, 32]),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight".into(), vec![32, 4]),
    ])
    .unwrap();
    assert_eq!(p.format, LoraFormat::Peft);
    let keys: Vec<(Component, &str)> = p.layers.iter().map(|l| (l.component, l.key.as_str())).collect();
    assert!(keys.contains(&(Component::Unet, "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")));
    assert!(keys.contains(&(Component::TextEncoder, "encoder_layers_0_mlp_fc1")), "{keys:?}");
    assert!(p.layers.iter().all(|l| l.factor() == 1.0), "no alpha: alpha = rank");

    let te = parse(&kohya("lora_te2_text_model_encoder_layers_3_self_attn_q_proj")).unwrap();
    assert_eq!(
        (te.layers[0].component, te.layers[0].key.as_str()),
        (Component::TextEncoder2, "encoder_layers_3_self_attn_q_proj")
    );

    let old = parse(&[
        (
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight".into(),
            vec![4, 32],
        ),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight".into(), vec![32, 4]),
    ])
    .unwrap();
    assert_eq!(old.layers[0].key, "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0");
}

#[test]
fn other_formats_and_unknown_keys_are_named_never_loaded_in_part() {
    let mut loha = kohya("lora_unet_mid_block_attentions_0_proj_in");
    loha.push(("lora_unet_mid_block_attentions_0_proj_out.hada_w1_a".into(), vec![4, 32]));
    let err = parse(&loha).unwrap_err().to_string();
    assert!(err.contains("LoHa") && err.contains("hada_w1_a") && err.contains("test.safetensors"), "{err}");
    for (key, format) in [
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("unet.x.lora_magnitude_vector", "DoRA"),
        ("lora_unet_x.lora_mid.weight", "lora_mid"),
        ("lora_unet_x.diff", "difference"),
    ] {
        let mut t = kohya("lora_unet_mid_block_attentions_0_proj_in");
        t.push((key.into(), vec![4]));
        let err = parse(&t).unwrap_err().to_string();
        assert!(err.contains(format) && err.contains(key), "{key}: {err}");
    }
    let mut unknown = kohya("lora_unet_mid_block_attentions_0_proj_in");
    unknown.push(("model.diffusion_model.input_blocks.0.0.weight".into(), vec![4]));
    let err = parse(&unknown).unwrap_err().to_string();
    assert!(err.contains("`model.diffusion_model.input_blocks.0.0.weight` is not a LoRA tensor"), "{err}");

    let mut mixed = kohya("lora_unet_mid_block_attentions_0_proj_in");
    mixed.push(("unet.mid_block.attentions.0.proj_out.lora_A.weight".into(), vec![4, 32]));
    mixed.push(("unet.mid_block.attentions.0.proj_out.lora_B.weight".into(), vec![32, 4]));
    assert!(parse(&mixed).unwrap_err().to_string().contains("mixes kohya"));
}

#[test]
fn broken_files_and_shapes_are_clear_errors() {
    let whole = file(&[("lora_unet_a.lora_down.weight", &[4, 32]), ("lora_unet_a.lora_up.weight", &[32, 4])]);
    let err = Lora::from_bytes("cut.safetensors", &whole[..whole.len() - 10]).unwrap_err();
    assert!(matches!(err, LoraError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors"));
    // A header claiming more data than the file holds.
    let mut lying = whole.clone();
    let text = String::from_utf8_lossy(&lying[8..]).into_owned();
    let at = text.find("\"data_offsets\":[0,").unwrap() + 8 + 18;
    lying[at] = b'9';
    assert!(matches!(Lora::from_bytes("lies", &lying), Err(LoraError::Unreadable { .. })));
    assert!(matches!(Lora::from_bytes("empty", b""), Err(LoraError::Unreadable { .. })));

    let err = parse(&[("lora_unet_a.lora_down.weight".into(), vec![4, 32])]).unwrap_err().to_string();
    assert!(err.contains("no lora_up"), "{err}");
    let err = parse(&[
        ("lora_unet_a.lora_down.weight".into(), vec![4, 32]),
        ("lora_unet_a.lora_up.weight".into(), vec![32, 3]),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 4") && err.contains("rank 3"), "{err}");
    let err = parse(&[
        ("lora_unet_a.lora_down.weight".into(), vec![4, 32, 3]),
        ("lora_unet_a.lora_up.weight".into(), vec![32, 4]),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("[4, 32, 3]"), "{err}");

    let nan = {
        let map: HashMap<String, Tensor> = [
            ("lora_unet_a.lora_down.weight".to_string(), Tensor::new(&[[f32::NAN; 2]; 1], &Device::Cpu).unwrap()),
            ("lora_unet_a.lora_up.weight".to_string(), Tensor::new(&[[1f32]; 2], &Device::Cpu).unwrap()),
        ]
        .into();
        let dir = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(&map, dir.path().join("n.safetensors")).unwrap();
        std::fs::read(dir.path().join("n.safetensors")).unwrap()
    };
    assert!(Lora::from_bytes("nan", &nan).unwrap_err().to_string().contains("NaN"));
}

/// A table of linear layers at `paths` (each [32, 32]).
fn table(paths: &[&str]) -> crate::diffusion::adapt::LayerTable {
    let w = Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap();
    let (layers, table) = adapt::record(|| {
        paths.iter().map(|p| Adaptable::new(candle_nn::Linear::new(w.clone(), None), p)).collect::<Vec<_>>()
    });
    drop(layers);
    table
}

#[test]
fn sgm_names_follow_the_model_s_own_blocks() {
    // SDXL's layout: three down blocks of two layers (attention in the last two), a mid block, three up blocks
    // of three layers (attention in the first two).
    let mut paths = vec![
        "conv_in".to_string(),
        "conv_out".into(),
        "time_embedding.linear_1".into(),
        "add_embedding.linear_2".into(),
    ];
    for i in 0..3 {
        for j in 0..2 {
            paths.push(format!("down_blocks.{i}.resnets.{j}.conv1"));
            if i > 0 {
                paths.push(format!("down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_q"));
            }
        }
        if i < 2 {
            paths.push(format!("down_blocks.{i}.downsamplers.0.conv"));
        }
        for j in 0..3 {
            paths.push(format!("up_blocks.{i}.resnets.{j}.time_emb_proj"));
            if i < 2 {
                paths.push(format!("up_blocks.{i}.attentions.{j}.proj_in"));
            }
        }
        if i < 2 {
            paths.push(format!("up_blocks.{i}.upsamplers.0.conv"));
        }
    }
    paths.extend([
        "mid_block.resnets.0.conv2".into(),
        "mid_block.attentions.0.proj_out".into(),
        "mid_block.resnets.1.conv_shortcut".into(),
    ]);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let unet = table(&refs);
    let index = LayerIndex::new(&[(Component::Unet, &unet)]);
    let path = |key: &str| index.get(Component::Unet, key).map(|t| t.path.clone());
    for (sgm, diffusers) in [
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding.linear_1"),
        ("label_emb_0_2", "add_embedding.linear_2"),
        ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks_2_0_conv1", "down_blocks.0.resnets.1.conv1"),
        ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "input_blocks_8_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q",
        ),
        ("middle_block_0_out_layers_3", "mid_block.resnets.0.conv2"),
        ("middle_block_1_proj_out", "mid_block.attentions.0.proj_out"),
        ("middle_block_2_skip_connection", "mid_block.resnets.1.conv_shortcut"),
        ("output_blocks_0_0_emb_layers_1", "up_blocks.0.resnets.0.time_emb_proj"),
        ("output_blocks_2_1_proj_in", "up_blocks.0.attentions.2.proj_in"),
        ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks_8_0_time_emb_proj", "up_blocks.2.resnets.2.time_emb_proj"),
        (
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
    ] {
        assert_eq!(path(sgm).as_deref(), Some(diffusers), "{sgm}");
    }
    assert_eq!(path("input_blocks_9_1_proj_in"), None);
    assert_eq!(path("output_blocks_2_1_conv"), None, "the upsampler sits after the attention");
}

#[test]
fn peft_metadata_alphas_and_rslora() {
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        "lora_adapter_metadata".to_string(),
        r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": true}"#
            .to_string(),
    );
    let a = PeftAlphas::from_metadata(Some(&meta)).unwrap();
    assert_eq!(a.alpha_for(Component::Unet, "mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 4), Some(2.0));
    assert_eq!(a.alpha_for(Component::Unet, "mid_block_attentions_0_transformer_blocks_0_attn1_to_k", 4), Some(8.0));
    assert_eq!(a.alpha_for(Component::Unet, "attn1_to_q", 4), Some(2.0), "the module itself");
    assert_eq!(a.alpha_for(Component::Unet, "xattn1_to_q", 4), Some(8.0), "a suffix only after `_`");
    assert_eq!(a.alpha_for(Component::TextEncoder, "encoder_layers_0_mlp_fc1", 16), Some(16.0), "4/√16 = 16/16");
    assert_eq!(a.alpha_for(Component::TextEncoder2, "x", 4), None);

    // Each layer is looked up in the pattern: one longer than a LoRA has layers is refused before any is.
    let pattern: serde_json::Map<String, serde_json::Value> =
        (0..=MAX_LAYERS).map(|i| (format!("m{i}"), serde_json::json!(1.0))).collect();
    let json = serde_json::json!({"unet.alpha_pattern": pattern}).to_string();
    meta.insert("lora_adapter_metadata".to_string(), json);
    let err = PeftAlphas::from_metadata(Some(&meta)).err().unwrap();
    assert!(err.contains("unet.alpha_pattern names 4097 modules"), "{err}");
}

/// A header larger than any LoRA needs is refused before it is parsed (parsing it whole takes its size
/// in memory, and time).
#[test]
fn a_header_larger_than_a_lora_needs_is_refused_unparsed() {
    let mut bytes = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = Lora::from_bytes("big.safetensors", &bytes).err().unwrap();
    assert!(err.to_string().contains("its header is 16777217 bytes"), "{err}");
}

/// An f16 layer gets `W + scale · alpha/rank · up·down` computed in f32 and rounded once to f16 (not f16
/// arithmetic), and the loaded weights back when the LoRA is dropped.
#[test]
fn half_precision_layers_merge_in_f32() {
    use crate::diffusion::lora::apply::Adapters;
    use crate::diffusion::lora::LoraWeight;
    use candle_core::Module;
    let dev = Device::Cpu;
    let w32 = (Tensor::randn(0f32, 1.0, (8, 8), &dev).unwrap() * 3.0).unwrap();
    let w16 = w32.to_dtype(DType::F16).unwrap();
    let (layer, table) =
        adapt::record(|| Adaptable::new(candle_nn::Linear::new(w16.clone(), None), "mid_block.attentions.0.proj_in"));
    let index = LayerIndex::new(&[(Component::Unet, &table)]);
    let adapters = Adapters::new(index, "a test model");
    let down = Tensor::randn(0f32, 0.5, (2, 8), &dev).unwrap().to_dtype(DType::F16).unwrap();
    let up = Tensor::randn(0f32, 0.5, (8, 2), &dev).unwrap().to_dtype(DType::F16).unwrap();
    let lora = Lora {
        name: "t".into(),
        hash: [1; 32],
        format: LoraFormat::Kohya,
        layers: vec![LoraLayer {
            component: Component::Unet,
            key: "mid_block_attentions_0_proj_in".into(),
            source: "t".into(),
            down: down.clone(),
            up: up.clone(),
            alpha: Some(1.0),
        }],
        bytes: 0,
    };
    let scale = 0.7;
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let delta = (f32_of(&up).matmul(&f32_of(&down)).unwrap() * (scale * 0.5)).unwrap();
    let want = (f32_of(&w16) + delta).unwrap().to_dtype(DType::F16).unwrap();
    let eye = Tensor::eye(8, DType::F16, &dev).unwrap();
    {
        let _in_effect = adapters.enter(&[LoraWeight { lora: std::sync::Arc::new(lora), scale }]).unwrap();
        let got = layer.forward(&eye).unwrap().t().unwrap();
        let same = got.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
            == want.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "the patched f16 weight is not the f32 merge rounded once");
    }
    adapters.enter(&[]).unwrap();
    let back = layer.forward(&eye).unwrap().t().unwrap();
    assert!(
        back.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
            == w16.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
    );
}

/// A LoRA whose merge overflows the layer's dtype is refused naming the LoRA and the layer, and the layers
/// patched before it are put back: the next generation without LoRAs runs on the loaded weights.
#[test]
fn a_failed_merge_leaves_the_loaded_weights() {
    use crate::diffusion::lora::apply::Adapters;
    use crate::diffusion::lora::LoraWeight;
    use candle_core::Module;
    let dev = Device::Cpu;
    let w = Tensor::ones((4, 4), DType::F16, &dev).unwrap();
    let (layers, table) = adapt::record(|| {
        ["mid_block.attentions.0.proj_in", "mid_block.attentions.0.proj_out"]
            .map(|p| Adaptable::new(candle_nn::Linear::new(w.clone(), None), p))
    });
    let adapters = Adapters::new(LayerIndex::new(&[(Component::Unet, &table)]), "a test model");
    let layer = |key: &str, value: f32| LoraLayer {
        component: Component::Unet,
        key: key.into(),
        source: key.into(),
        down: (Tensor::ones((1, 4), DType::F16, &dev).unwrap() * value as f64).unwrap(),
        up: Tensor::ones((4, 1), DType::F16, &dev).unwrap(),
        alpha: None,
    };
    // proj_in merges fine; proj_out reaches 1 + 100 · 1000 > 65504.
    let lora = Lora {
        name: "huge".into(),
        hash: [2; 32],
        format: LoraFormat::Kohya,
        layers: vec![layer("mid_block_attentions_0_proj_in", 0.5), layer("mid_block_attentions_0_proj_out", 1000.0)],
        bytes: 0,
    };
    let err =
        adapters.enter(&[LoraWeight { lora: std::sync::Arc::new(lora), scale: 100.0 }]).err().unwrap().to_string();
    assert!(err.contains("huge") && err.contains("proj_out") && err.contains("beyond"), "{err}");
    let eye = Tensor::eye(4, DType::F16, &dev).unwrap();
    let _none = adapters.enter(&[]).unwrap();
    for l in &layers {
        let out =
            l.forward(&eye).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(out.iter().all(|&v| v == 1.0), "a layer kept its patch: {out:?}");
    }
}

/// One `[4, 4]` linear layer of ones at `mid_block.attentions.0.proj_in`, and its table (the layer must live
/// while LoRAs merge into it).
fn one_proj_in() -> (Adaptable<candle_nn::Linear>, crate::diffusion::adapt::LayerTable) {
    let w = Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap();
    adapt::record(|| Adaptable::new(candle_nn::Linear::new(w, None), "mid_block.attentions.0.proj_in"))
}

/// A merge that makes NaN (an overflowing product times a zero alpha: inf · 0) is refused like one that
/// overflows, though a max over the weights skips NaN.
#[test]
fn a_merge_that_makes_nan_is_refused() {
    use crate::diffusion::lora::apply::Adapters;
    use crate::diffusion::lora::LoraWeight;
    let dev = Device::Cpu;
    let (_layer, table) = one_proj_in();
    let adapters = Adapters::new(LayerIndex::new(&[(Component::Unet, &table)]), "a test model");
    let big = |dims: (usize, usize)| (Tensor::ones(dims, DType::F32, &dev).unwrap() * 1e20).unwrap();
    let lora = Lora {
        name: "zero-alpha".into(),
        hash: [3; 32],
        format: LoraFormat::Kohya,
        layers: vec![LoraLayer {
            component: Component::Unet,
            key: "mid_block_attentions_0_proj_in".into(),
            source: "mid_block_attentions_0_proj_in".into(),
            down: big((1, 4)),
            up: big((4, 1)),
            alpha: Some(0.0),
        }],
        bytes: 0,
    };
    let err = adapters.enter(&[LoraWeight { lora: std::sync::Arc::new(lora), scale: 1.0 }]).err().unwrap().to_string();
    assert!(err.contains("zero-alpha") && err.contains("proj_in") && err.contains("NaN"), "{err}");
}

/// A file that names one layer twice, by its diffusers name and by the original checkpoint's, is refused
/// naming both: merged, the layer would get the change twice.
#[test]
fn one_layer_named_twice_is_refused() {
    use crate::diffusion::lora::apply::Adapters;
    use crate::diffusion::lora::LoraWeight;
    let dev = Device::Cpu;
    let (_layer, table) = one_proj_in();
    let index = LayerIndex::new(&[(Component::Unet, &table)]);
    assert!(index.get(Component::Unet, "middle_block_1_proj_in").is_some(), "the SGM name of the same layer");
    let adapters = Adapters::new(index, "a test model");
    let layer = |key: &str| LoraLayer {
        component: Component::Unet,
        key: key.into(),
        source: format!("lora_unet_{key}"),
        down: Tensor::ones((1, 4), DType::F32, &dev).unwrap(),
        up: Tensor::ones((4, 1), DType::F32, &dev).unwrap(),
        alpha: None,
    };
    let lora = Lora {
        name: "twice".into(),
        hash: [4; 32],
        format: LoraFormat::Kohya,
        layers: vec![layer("mid_block_attentions_0_proj_in"), layer("middle_block_1_proj_in")],
        bytes: 0,
    };
    let err = adapters.enter(&[LoraWeight { lora: std::sync::Arc::new(lora), scale: 1.0 }]).err().unwrap().to_string();
    assert!(
        err.contains("twice")
            && err.contains("lora_unet_mid_block_attentions_0_proj_in")
            && err.contains("lora_unet_middle_block_1_proj_in"),
        "{err}"
    );
}
