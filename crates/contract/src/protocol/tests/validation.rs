//! A job's fields checked one rule at a time (each error names its field), its limits and defaults, and
//! the subjects and streams it travels on.

use super::*;

#[test]
fn each_validation_rule_names_its_field() {
    let l = Limits::default();
    let cases: Vec<(&str, Change)> = vec![
        ("v", Box::new(|j| j.v = 2)),
        ("id", Box::new(|j| j.id = Uuid::nil())),
        ("model", Box::new(|j| j.model = "sd.turbo".into())),
        ("model", Box::new(|j| j.model = String::new())),
        ("prompt", Box::new(|j| j.prompt = "   ".into())),
        ("tenant", Box::new(|j| j.tenant = Some("a/b".into()))),
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
        ("strength", Box::new(|j| (j.strength, j.steps) = (Some(0.09), Some(10)))),
        ("strength", Box::new(|j| (j.strength, j.steps) = (None, Some(1)))),
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
    let mut j = img2img();
    (j.strength, j.steps) = (Some(0.1), Some(10));
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
    assert_eq!(s.job_of_events_subject(&s.events(id())), Some(id()));
    let simple = id().simple().to_string();
    for other in [format!("sd.events.{simple}"), format!("sd.events.{}.x", id()), format!("sd.cancel.{}", id())] {
        assert_eq!(s.job_of_events_subject(&other), None, "{other}");
    }

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
fn tenant_names_are_one_object_key_segment() {
    for ok in ["acme", "team-2", "a.b_c", &"t".repeat(MAX_TENANT_BYTES)] {
        validate_tenant("tenant", ok).unwrap();
        assert_eq!(uploads_prefix(Some(ok)), format!("uploads/{ok}/"));
    }
    for bad in ["", ".", "..", ".hidden", "Acme", "a/b", "a b", "ü", "a\nb", &"t".repeat(MAX_TENANT_BYTES + 1)] {
        let err = validate_tenant("tenant", bad).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("tenant"), "{bad:?}");
        assert!(err.message.contains("not a tenant name"), "{err}");
    }
    assert_eq!(uploads_prefix(None), "uploads/");
}
