//! The protocol's unit tests; the checks of a job's fields, limits and subjects in `validation`.

use serde::Serialize;
use uuid::Uuid;

use super::strict::WireNames;
use super::*;
use crate::vocab::Priority;

mod validation;

#[test]
fn enums_by_name_and_maps_as_maps_only() {
    let base = serde_json::to_value(job()).unwrap();
    let encode_with = |field: &str, value: serde_json::Value| {
        let mut v = base.clone();
        v[field] = value;
        rmp_serde::to_vec_named(&v).unwrap()
    };
    for (field, value) in [
        ("kind", serde_json::json!(0)),
        ("resize_mode", serde_json::json!(2)),
        ("priority", serde_json::json!(0)),
        ("priority", serde_json::json!("urgent")),
        ("output", serde_json::json!(["png"])),
        ("output", serde_json::json!({"format": 1})),
        ("output", serde_json::json!([0, 80])),
    ] {
        let err = decode_job(&encode_with(field, value.clone())).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest, "{field} = {value}");
    }
    let ok = decode_job(&encode_with("resize_mode", "pad".into())).unwrap();
    assert_eq!(ok.resize_mode, ResizeMode::Pad);
    let ok = decode_job(&encode_with("priority", "high".into())).unwrap();
    assert_eq!(ok.priority, Priority::High);
    // A normal-priority job's message is what it was before priorities existed.
    assert!(base.get("priority").is_none(), "{base}");
    let ok = decode_job(&encode_with("output", serde_json::json!({"format": "webp", "quality": 80}))).unwrap();
    assert_eq!(ok.output, OutputFormat { format: ImageFormat::Webp, quality: Some(80) });
    // An unknown name is quoted short, whatever its length.
    let err = decode_job(&encode_with("kind", "k".repeat(100_000).into())).unwrap_err();
    assert!(err.message.len() < 300 && err.message.contains("100000 bytes"), "{}", err.message);
    // Image sources: one key, inline as bin only.
    let mut img = serde_json::to_value(img2img()).unwrap();
    for bad in [
        serde_json::json!({"inline": [1, 2, 3]}),
        serde_json::json!({"object_key": "a.png", "inline": "x"}),
        serde_json::json!({"url": "http://example.com/a.png"}),
        serde_json::json!({}),
        serde_json::json!(["a.png"]),
        serde_json::json!({"0": "a.png"}),
    ] {
        img["init_image"] = bad.clone();
        assert!(decode_job(&rmp_serde::to_vec_named(&img).unwrap()).is_err(), "{bad}");
    }
    img["init_image"] = serde_json::json!({"object_key": "uploads/a.png"});
    let ok = decode_job(&rmp_serde::to_vec_named(&img).unwrap()).unwrap();
    assert_eq!(ok.init_image, Some(ImageSource::ObjectKey("uploads/a.png".into())));
    for names in [JobKind::NAMES, ResizeMode::NAMES, ImageFormat::NAMES] {
        for name in names {
            assert!(rmp_serde::to_vec_named(name).is_ok());
        }
    }
    assert_eq!(encode(&ResizeMode::Stretch), encode("stretch"));
    assert_eq!(encode(&ImageFormat::Jpeg), encode("jpeg"));
    assert_eq!(encode(&JobKind::Inpaint), encode("inpaint"));
}

#[test]
fn echoed_values_and_messages_are_short() {
    assert_eq!(quoted("ddim"), "\"ddim\"");
    let long = quoted(&"\"".repeat(1_000_000));
    assert!(long.len() < 150 && long.ends_with("(1000000 bytes)"), "{long}");
    assert_eq!(truncate("ééé", 3), "é");
    let err = ProtocolError::invalid("x", "y".repeat(10_000));
    assert!(err.message.len() <= MAX_ERROR_MESSAGE_BYTES);
    let err = ProtocolError::malformed("€".repeat(10_000));
    assert!(err.message.len() <= MAX_ERROR_MESSAGE_BYTES && err.message.ends_with('€'));
    let mut j = job();
    j.scheduler = Some("\"".repeat(1_000_000));
    let err = j.validate(&Limits::default()).unwrap_err();
    assert!(err.message.len() < 300, "{}", err.message);
    for bad in ["", "a//b", "a/", "./a", "a/./b", "a/../b", "/a", "a\u{0}b"] {
        assert!(validate_object_key("k", bad).is_err(), "{bad:?}");
    }
    assert!(validate_object_key("k", &format!("a/{}", "x".repeat(256))).is_err());
    assert!(validate_object_key("k", &"k".repeat(5000)).unwrap_err().message.len() < 200);
    validate_object_key("k", "uploads/1f0e.png").unwrap();
    validate_object_key("k", "a b/ü€.png").unwrap();
}

fn job() -> JobRequest {
    let mut j = JobRequest::new(JobKind::Txt2Img, "sd-turbo", "a red fox");
    j.created_at = 1_700_000_000_000;
    j
}

fn img2img() -> JobRequest {
    let mut j = job();
    j.kind = JobKind::Img2Img;
    j.init_image = Some(ImageSource::ObjectKey("uploads/abc/init.png".into()));
    j
}

fn inpaint() -> JobRequest {
    let mut j = img2img();
    j.kind = JobKind::Inpaint;
    j.mask = Some(ImageSource::Inline(vec![7; 100]));
    j
}

fn full_job() -> JobRequest {
    let mut j = inpaint();
    j.negative_prompt = Some(String::new());
    j.width = Some(768);
    j.height = Some(512);
    j.steps = Some(25);
    j.guidance = Some(6.5);
    j.scheduler = Some("dpmpp_2m_karras".into());
    j.timestep_spacing = Some("trailing".into());
    j.seed = Some(42);
    j.num_images = 3;
    j.strength = Some(0.6);
    j.mask_blur = 8;
    j.invert_mask = true;
    j.paste_back = false;
    j.resize_mode = ResizeMode::Pad;
    j.output = OutputFormat { format: ImageFormat::Webp, quality: Some(90) };
    j.deadline = Some(j.created_at + 60_000);
    j.idempotency_key = Some("client-123".into());
    j
}

type Change = Box<dyn Fn(&mut JobRequest)>;

fn field_of(j: &JobRequest) -> String {
    let err = j.validate(&Limits::default()).expect_err("should be invalid");
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    let field = err.field.clone().expect("names a field");
    assert!(err.message.contains(&format!("`{field}`")), "{err}");
    field
}

fn id() -> Uuid {
    Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap()
}

fn events() -> Vec<Event> {
    let mut progress = Progress::new(id(), 5, 20, 11);
    progress.eta_ms = Some(1500);
    progress.preview_jpeg = Some(vec![0xff, 0xd8, 0xff, 0xd9]);
    vec![
        Event::Accepted(Accepted {
            v: 1,
            job_id: id(),
            at: 10,
            worker_id: "gpu-7".into(),
            model: "xl".into(),
            tenant: None,
        }),
        Event::Progress(progress),
        Event::Progress(Progress::new(id(), 1, 20, 12)),
        Event::Completed(Completed {
            cached: false,
            v: 1,
            job_id: id(),
            at: 13,
            images: vec![ImageResult {
                index: 0,
                key: result_key(id(), 0, "png"),
                url: Some("https://s3.example/jobs/x/0.png?sig".into()),
                width: 512,
                height: 512,
                seed: 42,
                bytes: 123_456,
                content_type: "image/png".into(),
            }],
            timings: Timings { queue_ms: 1, lora_ms: 0, load_ms: 0, generation_ms: 2, upload_ms: 3, total_ms: 6 },
            warnings: vec!["the prompt was cut to the text encoder's 77 tokens".into()],
        }),
        Event::Failed(Failed {
            v: 1,
            job_id: id(),
            at: 14,
            code: ErrorCode::OutOfMemory,
            message: "CUDA out of memory".into(),
            field: None,
        }),
        Event::Failed(Failed::from_error(id(), &ProtocolError::invalid("width", "must be ..."), 15)),
        Event::Cancelled(Cancelled { v: 1, job_id: id(), at: 16, at_step: Some(7) }),
        Event::Cancelled(Cancelled { v: 1, job_id: id(), at: 17, at_step: None }),
    ]
}

/// A MessagePack map with the given key/value pairs, built by hand.
fn map(pairs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0x80 | pairs.len() as u8];
    for (k, v) in pairs {
        out.extend(encode(k));
        out.extend(v);
    }
    out
}

#[test]
fn job_round_trips() {
    for j in [job(), img2img(), inpaint(), full_job()] {
        j.validate(&Limits::default()).unwrap();
        assert_eq!(decode_job(&encode(&j)).unwrap(), j);
    }
}

#[test]
fn job_defaults_fill_missing_fields() {
    let bytes = map(&[
        ("v", encode(&1u32)),
        ("id", encode(&id().to_string())),
        ("kind", encode("txt2img")),
        ("model", encode("xl")),
        ("prompt", encode("a cat")),
        ("width", encode(&1024u32)),
        ("height", encode(&1024u32)),
        ("created_at", encode(&5u64)),
    ]);
    let j = decode_job(&bytes).unwrap();
    assert_eq!(j.num_images, 1);
    assert_eq!(j.mask_blur, DEFAULT_MASK_BLUR);
    assert!(j.paste_back && !j.invert_mask);
    assert_eq!(j.resize_mode, ResizeMode::Fit);
    assert_eq!(j.output, OutputFormat { format: ImageFormat::Png, quality: None });
    assert_eq!((j.steps, j.guidance, j.seed, j.deadline), (None, None, None, None));
    j.validate(&Limits::default()).unwrap();
}

#[test]
fn missing_required_field_is_an_error() {
    let bytes = map(&[("v", encode(&1u32)), ("id", encode(&id().to_string()))]);
    let err = decode_job(&bytes).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert!(err.message.contains("missing field"), "{err}");
}

#[test]
fn uuids_are_strings_on_the_wire() {
    let j = job();
    let bytes = encode(&j);
    let s = j.id.to_string();
    assert!(bytes.windows(s.len()).any(|w| w == s.as_bytes()));
}

#[test]
fn every_event_round_trips() {
    for e in events() {
        let bytes = encode(&e);
        assert_eq!(decode_event(&bytes).unwrap(), e, "{}", e.type_name());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], e.type_name());
        assert_eq!(json["job_id"], id().to_string());
    }
    assert!(events().iter().filter(|e| e.is_terminal()).all(|e| e.type_name() != "progress"));
}

#[test]
fn progress_percent() {
    assert_eq!(Progress::new(id(), 5, 20, 0).percent, 25.0);
    assert_eq!(Progress::new(id(), 0, 0, 0).percent, 0.0);
    let dbg = format!("{:?}", events()[1]);
    assert!(dbg.contains("4 bytes"), "{dbg}");
}

#[test]
fn heartbeat_and_cancel_round_trip() {
    for state in [WorkerState::Idle, WorkerState::Busy { job_id: id() }] {
        let hb = Heartbeat {
            cache_hits: 0,
            v: 1,
            at: 99,
            worker_id: "gpu-7".into(),
            hostname: "node-3".into(),
            device: "cuda:0".into(),
            models: vec!["xl".into(), "sd-turbo".into()],
            loras: vec!["style".into()],
            resident: vec!["xl".into()],
            state,
            jobs_done: 10,
            jobs_failed: 1,
            uptime_s: 3600,
            version: "0.1.0".into(),
            stopping: state == WorkerState::Idle,
            max_batch: 4,
            batches: vec![3, 0, 1],
        };
        assert_eq!(decode_heartbeat(&encode(&hb)).unwrap(), hb);
    }
    let busy = serde_json::to_value(WorkerState::Busy { job_id: id() }).unwrap();
    assert_eq!(busy["status"], "busy");
    for (reason, expired) in [(None, false), (Some("user asked".to_string()), false), (None, true)] {
        let c = CancelRequest { v: 1, job_id: id(), at: 5, reason, expired };
        assert_eq!(decode_cancel(&encode(&c)).unwrap(), c);
    }
}

#[test]
fn unknown_fields_are_tolerated() {
    #[derive(Serialize)]
    struct Newer<'a> {
        #[serde(flatten)]
        job: &'a JobRequest,
        future_field: Vec<u32>,
        another: &'a str,
    }
    let j = full_job();
    let bytes = encode(&Newer { job: &j, future_field: vec![1, 2, 3], another: "x" });
    assert_eq!(decode_job(&bytes).unwrap(), j);

    let mut e = map(&[
        ("type", encode("cancelled")),
        ("v", encode(&1u32)),
        ("job_id", encode(&id().to_string())),
        ("at", encode(&3u64)),
        ("worker_hint", encode("later")),
    ]);
    assert_eq!(decode_event(&e).unwrap(), Event::Cancelled(Cancelled { v: 1, job_id: id(), at: 3, at_step: None }));
    e = map(&[("type", encode("teleported")), ("v", encode(&1u32)), ("job_id", encode(&id().to_string()))]);
    assert!(decode_event(&e).unwrap_err().message.contains("teleported"));
}

#[test]
fn unknown_error_code_reads_as_internal() {
    let bytes = map(&[
        ("type", encode("failed")),
        ("v", encode(&1u32)),
        ("job_id", encode(&id().to_string())),
        ("at", encode(&3u64)),
        ("code", encode("GPU_ON_FIRE")),
        ("message", encode("hot")),
    ]);
    match decode_event(&bytes).unwrap() {
        Event::Failed(f) => assert_eq!(f.code, ErrorCode::Internal),
        e => panic!("{e:?}"),
    }
    assert_eq!(encode(&ErrorCode::OutOfMemory), encode("OUT_OF_MEMORY"));
    assert_eq!(ErrorCode::InvalidRequest.to_string(), "INVALID_REQUEST");
}

#[test]
fn newer_version_is_rejected_naming_it() {
    let mut j = job();
    j.v = 2;
    let bytes = encode(&j);
    let err = decode_job(&bytes).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert_eq!(err.field.as_deref(), Some("v"));
    assert!(err.message.contains("version 2"), "{err}");
    assert!(err.to_string().starts_with("INVALID_REQUEST: "), "{err}");
    // The worker can still fail the job by id.
    assert_eq!(peek_job_id(&bytes), Some(j.id));

    // A v2 job with fields v1 does not know is rejected for its version, not its fields.
    let bytes = map(&[("v", encode(&2u32)), ("id", encode(&id().to_string())), ("new", encode(&[1u8]))]);
    assert!(decode_job(&bytes).unwrap_err().message.contains("version 2"));
    let bytes = map(&[("v", encode(&0u32))]);
    assert!(decode_job(&bytes).unwrap_err().message.contains("version 0"));
    let bytes = map(&[("type", encode("accepted")), ("v", encode(&7u32))]);
    assert!(decode_event(&bytes).unwrap_err().message.contains("version 7"));
    let mut hb = map(&[("v", encode(&3u32))]);
    assert!(decode_heartbeat(&hb).unwrap_err().message.contains("version 3"));
    hb = map(&[("job_id", encode(&id().to_string()))]);
    let err = decode_cancel(&hb).unwrap_err();
    assert!(err.message.contains("missing") && err.field.as_deref() == Some("v"), "{err}");
}

#[test]
fn a_field_that_does_not_decode_is_named() {
    type Change = fn(&mut serde_json::Value);
    let base = serde_json::to_value(job()).unwrap();
    let encode_with = |change: Change| {
        let mut v = base.clone();
        change(&mut v);
        rmp_serde::to_vec_named(&v).unwrap()
    };
    let cases: [(Change, &str); 6] = [
        (|v| v["output"] = serde_json::json!({"format": "jpeg", "quality": 300}), "output.quality"),
        (|v| v["width"] = serde_json::json!(-8), "width"),
        (|v| v["steps"] = serde_json::json!("20"), "steps"),
        (|v| v["scheduler"] = serde_json::json!(5), "scheduler"),
        (|v| v["loras"] = serde_json::json!([{"name": "a", "scale": "x"}]), "loras[0].scale"),
        (|v| drop(v.as_object_mut().unwrap().remove("prompt")), "prompt"),
    ];
    for (change, field) in cases {
        let err = decode_job(&encode_with(change)).unwrap_err();
        assert_eq!(err.field.as_deref(), Some(field), "{err}");
        assert!(err.message.starts_with(&format!("cannot decode job: `{field}`")), "{err}");
    }
}

#[test]
fn a_job_id_sent_as_16_raw_bytes_is_read_by_the_peek_too() {
    let j = job();
    let mut v = serde_json::to_value(&j).unwrap();
    v.as_object_mut().unwrap().remove("id");
    let mut bytes = rmp_serde::to_vec_named(&v).unwrap();
    // The map gains one entry: `id` as bin 8 of 16 bytes.
    assert!(is_fixmap(bytes[0]) && bytes[0] < 0x8f);
    bytes[0] += 1;
    bytes.extend(encode("id"));
    bytes.extend([0xc4, 16]);
    bytes.extend(j.id.as_bytes());
    assert_eq!(decode_job(&bytes).unwrap().id, j.id);
    assert_eq!(peek_job_id(&bytes), Some(j.id));
}

fn is_fixmap(b: u8) -> bool {
    (0x80..=0x8f).contains(&b)
}

#[test]
fn garbage_and_truncated_messages_are_errors() {
    let bytes = encode(&full_job());
    let inputs: Vec<Vec<u8>> = vec![
        vec![],
        b"hello world".to_vec(),
        vec![0xc1],
        vec![0xff; 64],
        vec![0x93, 1, 2, 3],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        vec![0x81, 0xa1, b'v', 0xc6, 0xff, 0xff, 0xff, 0xff],
        serde_json::to_vec(&full_job()).unwrap(),
    ];
    for (i, b) in inputs.iter().enumerate() {
        let err = decode_job(b).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest, "{i}");
        assert!(err.message.starts_with("cannot decode job") || err.field.as_deref() == Some("v"), "{i}: {err}");
        assert!(decode_event(b).is_err() && decode_heartbeat(b).is_err() && decode_cancel(b).is_err());
    }
    for cut in 1..bytes.len() {
        assert!(decode_job(&bytes[..cut]).is_err(), "truncated at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0xc0);
    assert!(decode_job(&longer).unwrap_err().message.contains("1 unexpected bytes"));
    // Every single-byte corruption either decodes or errors: no panic.
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        let _ = decode_job(&b);
        let _ = peek_job_id(&b);
    }
    assert_eq!(peek_job_id(b"nonsense"), None);
}

#[test]
fn inline_bytes_are_msgpack_bin() {
    let mut j = img2img();
    j.init_image = Some(ImageSource::Inline(vec![200u8; 1000]));
    let bytes = encode(&j);
    // bin 16 (0xc5) with a 2-byte length 1000 = 0x03e8, right before the payload.
    assert!(bytes.windows(3).any(|w| w == [0xc5, 0x03, 0xe8]), "no bin marker");
    // The image adds its bytes plus a few of framing, not ~2 bytes per pixel value as an array of ints would.
    let mut tiny = j.clone();
    tiny.init_image = Some(ImageSource::Inline(vec![200u8; 1]));
    let overhead = bytes.len() - encode(&tiny).len();
    assert!((999..=1001).contains(&overhead), "the image added {overhead} bytes");
    assert_eq!(decode_job(&bytes).unwrap(), j);

    let small = encode(&ImageSource::Inline(vec![1, 2, 3]));
    assert!(small.contains(&0xc4));
    let preview = encode(&events()[1]);
    assert!(preview.windows(2).any(|w| w == [0xc4, 4]));
    assert_eq!(format!("{:?}", j.init_image.unwrap()), "Inline(1000 bytes)");
}

#[test]
fn result_keys_round_trip() {
    let k = result_key(id(), 3, "png");
    assert_eq!(k, format!("jobs/{}/3.png", id()));
    assert!(k.starts_with(&result_prefix(id())));
    assert_eq!(parse_result_key(&k).unwrap(), ResultKey { job_id: id(), index: 3, ext: "png".into() });
    for index in [0, 10, u32::MAX] {
        for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
            let k = result_key(id(), index, f.extension());
            let p = parse_result_key(&k).unwrap();
            assert_eq!(result_key(p.job_id, p.index, &p.ext), k);
        }
    }
    let upper = id().to_string().to_uppercase();
    for bad in [
        String::new(),
        "jobs/".into(),
        format!("jobs/{}/", id()),
        format!("jobs/{}/3", id()),
        format!("jobs/{}/03.png", id()),
        format!("jobs/{}/+3.png", id()),
        format!("jobs/{}/4294967296.png", id()),
        format!("jobs/{}/3.", id()),
        format!("jobs/{}/3.p/ng", id()),
        format!("jobs/{}/3.tar.gz", id()),
        format!("jobs/{upper}/3.png"),
        format!("jobs/{}/3.png", id().simple()),
        format!("other/{}/3.png", id()),
        format!("jobs/{}/x/3.png", id()),
    ] {
        let err = parse_result_key(&bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("key"), "{bad}");
    }
    assert_eq!(ImageFormat::Jpeg.content_type(), "image/jpeg");
}

#[test]
fn only_a_jobs_own_result_keys_are_its_results() {
    let image = ImageResult::stored;
    let other = Uuid::parse_str("00000000-0000-4000-8000-000000000001").unwrap();
    for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
        assert!(is_result_of(&image(2, result_key(id(), 2, f.extension()), f.content_type()), id()), "{f:?}");
    }
    for (index, key, content_type) in [
        (0, result_key(other, 0, "png"), "image/png"),
        (0, result_key(id(), 1, "png"), "image/png"),
        (0, result_key(id(), 0, "png"), "image/jpeg"),
        (0, result_key(id(), 0, "gif"), "image/gif"),
        (0, result_key(id(), 0, "png"), "text/html"),
        (0, format!("uploads/{}.png", id()), "image/png"),
        (0, "loras/style.safetensors".into(), "image/png"),
        (0, manifest_key(id()), "image/png"),
    ] {
        assert!(!is_result_of(&image(index, key.clone(), content_type), id()), "{key} {content_type}");
    }
}

#[test]
fn enum_names_are_the_wire_names() {
    for event in events() {
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], event.type_name());
    }
    for code in [
        ErrorCode::InvalidRequest,
        ErrorCode::ModelUnavailable,
        ErrorCode::OutOfMemory,
        ErrorCode::Timeout,
        ErrorCode::Cancelled,
        ErrorCode::Storage,
        ErrorCode::Internal,
    ] {
        assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
    }
    use super::strict::WireNames;
    for (names, json) in [
        (
            JobKind::NAMES,
            [JobKind::Txt2Img, JobKind::Img2Img, JobKind::Inpaint].map(|k| serde_json::to_value(k).unwrap()),
        ),
        (
            ImageFormat::NAMES,
            [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp].map(|k| serde_json::to_value(k).unwrap()),
        ),
        (
            ResizeMode::NAMES,
            [ResizeMode::Fit, ResizeMode::Stretch, ResizeMode::Pad].map(|k| serde_json::to_value(k).unwrap()),
        ),
    ] {
        assert_eq!(names.to_vec(), json.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>());
    }
}
