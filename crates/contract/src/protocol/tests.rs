//! The protocol's unit tests.

use serde::Serialize;
use uuid::Uuid;

use super::strict::WireNames;
use super::*;
use crate::vocab::Priority;

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
        Event::Accepted(Accepted { v: 1, job_id: id(), at: 10, worker_id: "gpu-7".into(), model: "xl".into() }),
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
    for reason in [None, Some("user asked".to_string())] {
        let c = CancelRequest { v: 1, job_id: id(), at: 5, reason };
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
fn each_validation_rule_names_its_field() {
    let l = Limits::default();
    let cases: Vec<(&str, Change)> = vec![
        ("v", Box::new(|j| j.v = 2)),
        ("id", Box::new(|j| j.id = Uuid::nil())),
        ("model", Box::new(|j| j.model = "sd.turbo".into())),
        ("model", Box::new(|j| j.model = String::new())),
        ("prompt", Box::new(|j| j.prompt = "   ".into())),
        ("prompt", Box::new(|j| j.prompt = "x".repeat(4097))),
        ("negative_prompt", Box::new(|j| j.negative_prompt = Some("x".repeat(4097)))),
        ("width", Box::new(|j| j.width = Some(0))),
        ("width", Box::new(|j| j.width = Some(100))),
        ("height", Box::new(|j| j.height = Some(4104))),
        ("width", Box::new(|j| (j.width, j.height) = (Some(4096), Some(4096)))),
        ("steps", Box::new(|j| j.steps = Some(0))),
        ("steps", Box::new(|j| j.steps = Some(151))),
        ("guidance", Box::new(|j| j.guidance = Some(f64::NAN))),
        ("guidance", Box::new(|j| j.guidance = Some(-1.0))),
        ("guidance", Box::new(|j| j.guidance = Some(31.0))),
        ("scheduler", Box::new(|j| j.scheduler = Some("Euler".into()))),
        ("timestep_spacing", Box::new(|j| j.timestep_spacing = Some("random".into()))),
        ("num_images", Box::new(|j| j.num_images = 0)),
        ("num_images", Box::new(|j| j.num_images = 9)),
        ("seed", Box::new(|j| (j.seed, j.num_images) = (Some(u64::MAX), 2))),
        ("init_image", Box::new(|j| j.init_image = Some(ImageSource::Inline(vec![1])))),
        ("mask", Box::new(|j| j.mask = Some(ImageSource::Inline(vec![1])))),
        ("strength", Box::new(|j| j.strength = Some(0.5))),
        ("mask_blur", Box::new(|j| j.mask_blur = 65)),
        ("output.quality", Box::new(|j| j.output.quality = Some(80))),
        ("output.quality", Box::new(|j| j.output = OutputFormat { format: ImageFormat::Jpeg, quality: Some(0) })),
        ("output.quality", Box::new(|j| j.output = OutputFormat { format: ImageFormat::Jpeg, quality: Some(101) })),
        ("deadline", Box::new(|j| j.deadline = Some(j.created_at))),
        ("idempotency_key", Box::new(|j| j.idempotency_key = Some(String::new()))),
        ("idempotency_key", Box::new(|j| j.idempotency_key = Some("x".repeat(257)))),
    ];
    for (want, change) in &cases {
        let mut j = job();
        change(&mut j);
        assert_eq!(field_of(&j), *want);
    }

    let img_cases: Vec<(&str, Change)> = vec![
        ("init_image", Box::new(|j| j.init_image = None)),
        ("init_image", Box::new(|j| j.init_image = Some(ImageSource::Inline(vec![])))),
        ("init_image", Box::new(|j| j.init_image = Some(ImageSource::Inline(vec![0; MAX_INLINE_IMAGE_BYTES + 1])))),
        ("init_image", Box::new(|j| j.init_image = Some(ImageSource::ObjectKey(String::new())))),
        ("init_image", Box::new(|j| j.init_image = Some(ImageSource::ObjectKey("/abs/key.png".into())))),
        ("init_image", Box::new(|j| j.init_image = Some(ImageSource::ObjectKey("a/../b.png".into())))),
        ("mask", Box::new(|j| j.mask = Some(ImageSource::Inline(vec![1])))),
        ("strength", Box::new(|j| j.strength = Some(0.0))),
        ("strength", Box::new(|j| j.strength = Some(1.01))),
        ("strength", Box::new(|j| j.strength = Some(f64::NAN))),
    ];
    for (want, change) in &img_cases {
        let mut j = img2img();
        change(&mut j);
        assert_eq!(field_of(&j), *want);
    }
    let mut j = inpaint();
    j.mask = None;
    assert_eq!(field_of(&j), "mask");
    let mut j = inpaint();
    j.mask = Some(ImageSource::Inline(vec![0; MAX_INLINE_IMAGE_BYTES + 1]));
    assert_eq!(field_of(&j), "mask");

    // Edges that are fine.
    let mut j = img2img();
    j.strength = Some(1.0);
    j.init_image = Some(ImageSource::Inline(vec![0; MAX_INLINE_IMAGE_BYTES]));
    (j.width, j.height, j.steps, j.guidance, j.num_images) = (Some(2048), Some(2048), Some(150), Some(0.0), 8);
    j.seed = Some(u64::MAX - 7);
    j.validate(&l).unwrap();
    for s in SCHEDULERS {
        let mut j = job();
        j.scheduler = Some(s.into());
        j.validate(&l).unwrap();
    }
    for s in TIMESTEP_SPACINGS {
        let mut j = job();
        j.timestep_spacing = Some(s.into());
        j.validate(&l).unwrap();
    }
    // Tighter limits apply.
    let tight = Limits { max_inline_image_bytes: 10, ..Limits::default() };
    let mut j = img2img();
    j.init_image = Some(ImageSource::Inline(vec![0; 11]));
    assert_eq!(j.validate(&tight).unwrap_err().field.as_deref(), Some("init_image"));
}

#[test]
fn limits_defaults_and_overrides() {
    let l = Limits::default();
    assert_eq!(l.max_inline_image_bytes, 8 * 1024 * 1024);
    assert_eq!((l.max_side, l.max_pixels, l.max_steps, l.max_images), (4096, 2048 * 2048, 150, 8));
    let partial: Limits = serde_json::from_str(r#"{"max_images": 2}"#).unwrap();
    assert_eq!(partial, Limits { max_images: 2, ..Limits::default() });
}

#[test]
fn strength_defaults_and_deadline() {
    assert_eq!(job().strength_or_default(), None);
    assert_eq!(img2img().strength_or_default(), Some(DEFAULT_IMG2IMG_STRENGTH));
    assert_eq!(inpaint().strength_or_default(), Some(DEFAULT_INPAINT_STRENGTH));
    let mut j = job();
    assert!(!j.is_expired(u64::MAX));
    j.deadline = Some(100);
    assert!(!j.is_expired(99) && j.is_expired(100));
    assert_eq!(j.msg_id(), j.id.to_string());
    assert!(now_millis() > 1_600_000_000_000);
}

#[test]
fn subjects_and_streams() {
    let s = Subjects::default();
    assert_eq!(s.prefix(), "sd");
    assert_eq!(s.jobs("xl").unwrap(), "sd.jobs.xl");
    assert_eq!(s.jobs_wildcard(), "sd.jobs.>");
    assert_eq!(s.events(id()), format!("sd.events.{}", id()));
    assert_eq!(s.events_wildcard(), "sd.events.>");
    assert_eq!(s.cancel(id()), format!("sd.cancel.{}", id()));
    assert_eq!(s.cancel_wildcard(), "sd.cancel.>");
    assert_eq!(s.heartbeat("gpu-7").unwrap(), "sd.workers.gpu-7");
    assert_eq!(s.heartbeats_wildcard(), "sd.workers.>");
    assert_eq!(s.dead_letter("xl").unwrap(), "sd.dlq.xl");
    assert_eq!(s.dead_letter_wildcard(), "sd.dlq.>");
    assert_eq!(
        (s.jobs_stream(), s.events_stream(), s.dlq_stream()),
        ("SD_JOBS".into(), "SD_EVENTS".into(), "SD_DLQ".into())
    );
    assert_eq!(s.model_of_jobs_subject("sd.jobs.xl"), Some("xl"));
    assert_eq!(s.model_of_jobs_subject("sd.jobs.a.b"), None);
    assert_eq!(s.model_of_jobs_subject("sd.jobs.xl.high"), Some("xl"));
    assert_eq!(s.parse_jobs_subject("sd.jobs.xl.low"), Some(("xl", Priority::Low)));
    assert_eq!(s.parse_jobs_subject("sd.jobs.xl"), Some(("xl", Priority::Normal)));
    assert_eq!(s.parse_jobs_subject("sd.jobs.xl.high.x"), None);
    for priority in Priority::ALL {
        let subject = s.jobs_at("xl", priority).unwrap();
        assert_eq!(s.parse_jobs_subject(&subject), Some(("xl", priority)), "{subject}");
    }
    assert_eq!(s.jobs_at("xl", Priority::Normal).unwrap(), s.jobs("xl").unwrap());
    assert_eq!(s.model_of_jobs_subject("sd.events.xl"), None);

    let p = Subjects::new("acme.img-gen").unwrap();
    assert_eq!(p.jobs("v1-5").unwrap(), "acme.img-gen.jobs.v1-5");
    assert_eq!(p.jobs_stream(), "ACME_IMG_GEN_JOBS");
    assert_eq!(p.dlq_stream(), "ACME_IMG_GEN_DLQ");
    for bad in ["", "a..b", "a.*", ">", "a b", "$JS", "sd."] {
        assert!(Subjects::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn subject_tokens_are_validated() {
    let s = Subjects::default();
    for ok in ["xl", "v1-5", "sd_turbo", "ü", &"m".repeat(128)] {
        validate_model_name(ok).unwrap();
    }
    // A model name also names a JetStream consumer, which cannot hold a path separator.
    for bad in ["owner/name", "a\\b"] {
        assert_eq!(validate_model_name(bad).unwrap_err().field.as_deref(), Some("model"), "{bad:?}");
    }
    for bad in ["", "a.b", "a*", "a>", "a b", "a\tb", "a\nb", "\u{7}", &"m".repeat(129)] {
        let err = s.jobs(bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("model"), "{bad:?}");
        assert!(s.dead_letter(bad).is_err());
        let err = s.heartbeat(bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("worker_id"));
        assert!(err.message.starts_with("`worker_id` "), "{err}");
    }
    assert!(s.jobs("a.b").unwrap_err().message.contains("'.'"));
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
