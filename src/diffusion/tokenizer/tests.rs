use super::*;

const PROMPT: &str = "a photograph of an astronaut riding a horse";
const NEGATIVE: &str = "blurry, low quality";

/// Reads an int64 [1, N] tensor of a fixture's `expected.safetensors` as ids.
fn reference_ids(model: &str, name: &str) -> Vec<u32> {
    let path = fixtures_dir().join(model).join("expected.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::I64);
    view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
}

fn load(rel: &str) -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures_dir().join(rel)).unwrap()
}

/// Writes vocab.json + merges.txt (+ the given configs) made from a tokenizer.json.
fn slow_files_from(tokenizer_json: &Path, dir: &Path, configs: &[(&str, &str)]) {
    let t: Value = serde_json::from_slice(&std::fs::read(tokenizer_json).unwrap()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&t["model"]["vocab"]).unwrap()).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for m in t["model"]["merges"].as_array().unwrap() {
        let line = match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            _ => panic!("unexpected merge {m}"),
        };
        merges.push_str(&line);
        merges.push('\n');
    }
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
    for (name, text) in configs {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn sd15_ids_match_the_reference() {
    let tok = load("tiny-sd15/tokenizer");
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), 49407);
    assert_eq!(tok.eos_id(), 49407);
    assert_eq!(tok.bos_id(), 49406);
    let shown = format!("{tok:?}");
    assert!(shown.contains("pad_id: 49407") && shown.contains("vocab_size: 49408"), "{shown}");
    for (text, name) in [(PROMPT, "prompt_input_ids"), (NEGATIVE, "negative_input_ids")] {
        let out = tok.encode(text).unwrap();
        assert_eq!(out.ids, reference_ids("tiny-sd15", name), "{text}");
        assert_eq!(out.truncated_text, None);
    }
}

#[test]
fn sdxl_tokenizers_pad_as_diffusers_does() {
    // tiny-sdxl's expected.safetensors holds no ids: its first tokenizer is SD 1.x's, and
    // tokenizer_2 differs only in padding with `!` (id 0) after the EOS.
    let reference = reference_ids("tiny-sd15", "prompt_input_ids");
    let tok1 = load("tiny-sdxl/tokenizer");
    assert_eq!(tok1.encode(PROMPT).unwrap().ids, reference);

    let tok2 = load("tiny-sdxl/tokenizer_2");
    assert_eq!(tok2.pad_id(), 0);
    assert_eq!(tok2.eos_id(), 49407);
    let ids = tok2.encode(PROMPT).unwrap().ids;
    let eos_at = reference.iter().position(|&i| i == 49407).unwrap();
    let mut expected = reference[..=eos_at].to_vec();
    expected.resize(77, 0);
    assert_eq!(ids, expected);
}

#[test]
fn pad_token_bang_is_split_off_as_a_special_token() {
    // diffusers issue #4153: with pad_token "!" every "!" becomes id 0.
    let tok2 = load("tiny-sdxl/tokenizer_2");
    let ids = tok2.encode("! !! !!!").unwrap().ids;
    assert_eq!(&ids[..8], &[49406, 0, 0, 0, 0, 0, 0, 49407]);
    // ...while with `<|endoftext|>` padding "!" is an ordinary BPE token.
    let tok1 = load("tiny-sdxl/tokenizer");
    let ids = tok1.encode("hello!").unwrap().ids;
    assert_eq!(&ids[..4], &[49406, 3306, 256, 49407]);
}

#[test]
fn vocab_and_merges_give_the_same_ids_as_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = fixtures_dir();
    let texts = [
        PROMPT,
        NEGATIVE,
        "",
        "  A   Cat's  PORTRAIT, 8k!!, (masterpiece:1.2) — café naïve 日本 123 <|endoftext|> end",
        "wow! an \"oil painting\" of 2 dogs & 3 cats; trending on artstation #art @home",
    ];
    for (sub, config) in [
        ("tokenizer", "tiny-sd15/tokenizer/tokenizer_config.json"),
        ("tokenizer_2", "tiny-sdxl/tokenizer_2/tokenizer_config.json"),
    ] {
        let config_text = std::fs::read_to_string(fixtures.join(config)).unwrap();
        let slow_dir = tmp.path().join(sub);
        slow_files_from(
            &fixtures.join("tiny-sd15/tokenizer/tokenizer.json"),
            &slow_dir,
            &[("tokenizer_config.json", &config_text)],
        );
        let slow = ClipTokenizer::from_dir(&slow_dir).unwrap();
        let fast = ClipTokenizer::from_dir(fixtures.join(config).parent().unwrap()).unwrap();
        assert_eq!(slow.pad_id(), fast.pad_id());
        assert_eq!(slow.max_length(), fast.max_length());
        for text in texts {
            assert_eq!(slow.encode(text).unwrap(), fast.encode(text).unwrap(), "{sub}: {text:?}");
        }
        let long = "a very long prompt about a red fox in the snow ".repeat(20);
        assert_eq!(slow.encode(&long).unwrap(), fast.encode(&long).unwrap());
    }
}

#[test]
fn long_prompts_are_truncated_with_the_cut_text_reported() {
    let tok = load("tiny-sd15/tokenizer");
    let base = ["red", "green", "blue", "fox", "dog", "cat", "tree", "house", "river", "cloud"];
    let mut words: Vec<&str> = base.iter().cycle().take(99).copied().collect();
    words.push("end");
    let prompt = words.join(" ");
    let all = tok.tokenizer.encode(prompt.as_str(), false).unwrap();
    assert_eq!(all.get_ids().len(), words.len(), "one token per word");

    let out = tok.encode(&prompt).unwrap();
    assert_eq!(out.ids.len(), 77);
    assert_eq!(out.ids[0], 49406);
    assert_eq!(out.ids[76], 49407);
    assert_eq!(&out.ids[1..76], &all.get_ids()[..75]);
    assert_eq!(out.truncated_text.as_deref(), Some(words[75..].join(" ").as_str()));

    // Digits are single tokens in CLIP, and decoding shows them as separate words.
    let out = tok.encode(&format!("{} w99", words[..74].join(" "))).unwrap();
    assert_eq!(out.truncated_text.as_deref(), Some("9 9"));

    // Exactly 75 tokens fit without truncation.
    let fits: Vec<&str> = std::iter::repeat_n("cat", 75).collect();
    let out = tok.encode(&fits.join(" ")).unwrap();
    assert_eq!(out.truncated_text, None);
    assert_eq!(out.ids[76], 49407);
    assert!(out.ids[1..76].iter().all(|&i| i == out.ids[1]));
}

#[test]
fn absurd_model_max_length_is_capped_to_77() {
    // The real CLIP tokenizer_config.json (openai/clip-vit-large-patch14, as transformers
    // saves it) has model_max_length int(1e30).
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("tiny-sd15/tokenizer/tokenizer.json");
    std::fs::copy(src, tmp.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), 49407);
    assert_eq!(parse_max_length(&json!(1e30)).unwrap(), 77);
    assert_eq!(parse_max_length(&json!(77)).unwrap(), 77);
    assert_eq!(parse_max_length(&json!(64.0)).unwrap(), 64);
    assert!(parse_max_length(&json!("77")).is_err());
}

#[test]
fn special_token_precedence_follows_transformers() {
    let eos_obj = json!({"__type": "AddedToken", "content": "<|endoftext|>", "normalized": true});
    // Legacy folder (no added_tokens_decoder): special_tokens_map.json wins (SD 2.x).
    let config = json!({"pad_token": "<|endoftext|>", "eos_token": eos_obj, "model_max_length": 77});
    let map = json!({"pad_token": "!", "eos_token": "<|endoftext|>"});
    let s = SpecialTokens::from_configs(Some(&config), Some(&map)).unwrap();
    assert_eq!(s.pad.as_deref(), Some("!"));
    assert_eq!(s.eos, "<|endoftext|>");
    // Only the config: its pad token (string or object form).
    let s = SpecialTokens::from_configs(Some(&json!({"pad_token": {"content": "!"}})), None).unwrap();
    assert_eq!(s.pad.as_deref(), Some("!"));
    // Only the map.
    let s = SpecialTokens::from_configs(None, Some(&map)).unwrap();
    assert_eq!(s.pad.as_deref(), Some("!"));
    // Modern config (added_tokens_decoder): the map is not consulted.
    let modern = json!({"pad_token": "<|endoftext|>", "added_tokens_decoder": {}});
    let s = SpecialTokens::from_configs(Some(&modern), Some(&map)).unwrap();
    assert_eq!(s.pad.as_deref(), Some("<|endoftext|>"));
    // Nothing: defaults, pad falls back to EOS at load time.
    let s = SpecialTokens::from_configs(None, None).unwrap();
    assert_eq!((s.bos.as_str(), s.eos.as_str(), s.pad.clone()), (DEFAULT_BOS, DEFAULT_EOS, None));
    assert_eq!(s.max_length, 77);
}

#[test]
fn pad_falls_back_to_special_tokens_map_then_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("tiny-sd15/tokenizer/tokenizer.json");
    // No configs at all: pad = EOS.
    let bare = tmp.path().join("bare");
    slow_files_from(&src, &bare, &[]);
    let tok = ClipTokenizer::from_dir(&bare).unwrap();
    assert_eq!((tok.pad_id(), tok.eos_id(), tok.max_length()), (49407, 49407, 77));
    // SD 2.x layout: the legacy config says <|endoftext|>, the map says "!".
    let sd2 = tmp.path().join("sd2");
    slow_files_from(
        &src,
        &sd2,
        &[
            (
                "tokenizer_config.json",
                r#"{"pad_token": "<|endoftext|>", "model_max_length": 77, "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "normalized": true}}"#,
            ),
            ("special_tokens_map.json", r#"{"pad_token": "!", "eos_token": {"content": "<|endoftext|>"}}"#),
        ],
    );
    let tok = ClipTokenizer::from_dir(&sd2).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let ids = tok.encode(NEGATIVE).unwrap().ids;
    assert_eq!(&ids[..7], &[49406, 21977, 267, 1042, 3027, 49407, 0]);
}

#[test]
fn modern_config_with_added_tokens_decoder() {
    // tokenizer_2/tokenizer_config.json as transformers 4.3x saves it for SDXL pipelines:
    // "!" is an added special token and the pad; BOS is listed as non-special.
    let config = r#"{
      "add_prefix_space": false,
      "added_tokens_decoder": {
        "0": {"content": "!", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true},
        "49406": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false, "special": false},
        "49407": {"content": "<|endoftext|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": false}
      },
      "bos_token": "<|startoftext|>", "do_lower_case": true, "eos_token": "<|endoftext|>",
      "errors": "replace", "model_max_length": 77, "pad_token": "!",
      "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"
    }"#;
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("tiny-sd15/tokenizer/tokenizer.json");
    slow_files_from(
        &src,
        tmp.path(),
        &[("tokenizer_config.json", config), ("special_tokens_map.json", r#"{"pad_token": "<|endoftext|>"}"#)],
    );
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!((tok.pad_id(), tok.eos_id(), tok.bos_id()), (0, 49407, 49406));
    let fast = load("tiny-sdxl/tokenizer_2");
    for text in [PROMPT, "! !! !!!", "wow!"] {
        assert_eq!(tok.encode(text).unwrap(), fast.encode(text).unwrap(), "{text}");
    }
}

#[test]
fn missing_folder_or_files_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = ClipTokenizer::from_dir(&missing).err().unwrap().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = ClipTokenizer::from_dir(&empty).err().unwrap().to_string();
    assert!(err.contains(&empty.display().to_string()), "{err}");
    assert!(err.contains("vocab.json + merges.txt"), "{err}");

    // vocab.json without merges.txt is not enough either.
    let half = tmp.path().join("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("vocab.json"), "{}").unwrap();
    let err = ClipTokenizer::from_dir(&half).err().unwrap().to_string();
    assert!(err.contains(&half.display().to_string()), "{err}");

    // A malformed merges.txt names the file and line.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("vocab.json"), r#"{"a": 0}"#).unwrap();
    std::fs::write(bad.join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(&bad).err().unwrap());
    assert!(err.contains("merges.txt line 2"), "{err}");

    // A broken tokenizer.json names the file.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("tokenizer.json"), "{not json").unwrap();
    let err = ClipTokenizer::from_dir(&broken).err().unwrap().to_string();
    assert!(err.contains(&broken.join("tokenizer.json").display().to_string()), "{err}");
}
