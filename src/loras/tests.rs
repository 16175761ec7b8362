use super::*;

#[test]
fn pickles_are_refused_as_checkpoints_are() {
    let library = LoraLibrary::new(None, LoraLimits::default()).unwrap();
    let err = library.load_file(Path::new("style.ckpt"), "style.ckpt").unwrap_err().to_string();
    assert!(err.contains("style.ckpt") && err.contains("arbitrary code") && err.contains(".safetensors"), "{err}");
}

#[test]
fn a_job_whose_loras_take_more_memory_than_its_budget_is_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15/lora");
    let (style, detail) = (dir.join("style.safetensors"), dir.join("detail.safetensors"));
    let one = LoraLibrary::new(None, LoraLimits::default()).unwrap().load_file(&style, "style").unwrap().bytes;
    let limits = LoraLimits { max_job_bytes: one as u64 + 1, ..LoraLimits::default() };
    let library = LoraLibrary::new(None, limits).unwrap();
    // The same file twice is held once.
    assert_eq!(library.resolve_files(&[(style.clone(), 1.0), (style.clone(), 0.5)]).unwrap().len(), 2);
    let err = library.resolve_files(&[(style.clone(), 1.0), (detail.clone(), 1.0)]).unwrap_err().to_string();
    assert!(err.contains("detail.safetensors") && err.contains("--max-lora-bytes-per-job"), "{err}");
    assert!(err.contains(&format!("take {} bytes", 2 * one)), "{err}");
}

#[test]
fn loras_held_by_jobs_wait_for_room_and_the_cache_gives_way_first() {
    let style = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15/lora/style.safetensors");
    let dir = tempfile::tempdir().unwrap();
    // Other LoRAs of the same size: a low mantissa byte of the last value changed.
    let variant = |i: u8| {
        let mut bytes = std::fs::read(&style).unwrap();
        let n = bytes.len();
        bytes[n - 4] ^= i;
        let path = dir.path().join(format!("v{i}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let one = LoraLibrary::new(None, LoraLimits::default()).unwrap().load_file(&style, "style").unwrap().bytes;
    // Room for two alive at once.
    let limits = LoraLimits { max_cached_bytes: one, max_job_bytes: one as u64, ..LoraLimits::default() };
    let mut library = LoraLibrary::new(None, limits).unwrap();
    library.room_patience = std::time::Duration::from_millis(300);
    let a = library.load_file(&variant(1), "a").unwrap();
    let b = library.load_file(&variant(2), "b").unwrap();
    let started = std::time::Instant::now();
    let err = library.load_file(&variant(3), "c").unwrap_err();
    assert!(matches!(err, LoraSourceError::NotReadNow(_)), "{err}");
    assert!(err.to_string().contains(&format!("{} bytes of LoRAs the jobs in hand hold", 2 * one)), "{err}");
    assert!(started.elapsed() >= library.room_patience);
    // Let go by its job, `b` is held by the cache alone, which gives it up for `c` at once.
    drop(b);
    let started = std::time::Instant::now();
    let c = library.load_file(&variant(3), "c").unwrap();
    assert!(started.elapsed() < library.room_patience, "{:?}", started.elapsed());
    assert_eq!(library.cache.lock().held_bytes(), 2 * one);
    drop((a, c));
}

#[test]
fn a_file_that_is_no_lora_is_refused_again_without_being_read_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vae.safetensors");
    let tensors: HashMap<String, candle_core::Tensor> = [(
        "decoder.conv_in.weight".to_string(),
        candle_core::Tensor::ones(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let library = LoraLibrary::new(None, LoraLimits::default()).unwrap();
    let first = library.load_file(&path, "vae").unwrap_err().to_string();
    assert!(first.contains("decoder.conv_in.weight"), "{first}");
    // Same size and time, other bytes: the refusal is remembered, the file not read again.
    let (len, modified) =
        (std::fs::metadata(&path).unwrap().len(), std::fs::metadata(&path).unwrap().modified().unwrap());
    std::fs::write(&path, vec![b'x'; len as usize]).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
    assert_eq!(library.load_file(&path, "vae").unwrap_err().to_string(), first);
    // Changed (another time): read again.
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified + Duration::from_secs(1)).unwrap();
    let again = library.load_file(&path, "vae").unwrap_err().to_string();
    assert!(again.contains("not a readable safetensors file"), "{again}");
}

#[test]
fn lora_args_and_names() {
    assert_eq!(parse_lora_arg("a.safetensors").unwrap(), (PathBuf::from("a.safetensors"), 1.0));
    assert_eq!(parse_lora_arg("a.safetensors:-0.5").unwrap(), (PathBuf::from("a.safetensors"), -0.5));
    assert_eq!(parse_lora_arg("dir:x/a.safetensors").unwrap(), (PathBuf::from("dir:x/a.safetensors"), 1.0));
    assert!(parse_lora_arg(":0.5").is_err());
    for good in ["style", "my-lora_v1.2", "style.safetensors", "owner/repo", "owner/repo/x.safetensors@v2"] {
        assert!(validate_lora_name(good).is_ok(), "{good}");
    }
    let bad_hub = ["a/b/c", "a/b/c/d.safetensors", "a//b", "a/.b", "a/b@", "style@v1", "a/b/../c.safetensors"];
    for bad in ["", "../x", "a\\b", ".hidden", "a..b", "x y", &"a".repeat(129)].into_iter().chain(bad_hub) {
        assert!(validate_lora_name(bad).is_err(), "{bad}");
    }
}
