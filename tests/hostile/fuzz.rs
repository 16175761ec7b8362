//! A seeded fuzz of the job subject and the HTTP API: hostile job messages and requests, each answered by a
//! clear refusal or a failed job, never a stuck one or a crash. Same servers as [`super`].

use super::*;

use std::collections::{HashMap, HashSet};

use common::hostile::all_events;
use rand::{Rng, SeedableRng};

/// A hostile job message: random bytes, a truncated job, a field of the wrong type, an extreme value, a
/// deep nest. Returns the bytes and the job id a worker can read from them, if any.
fn hostile_message(rng: &mut rand::rngs::StdRng, base: &JobRequest) -> (Vec<u8>, Option<Uuid>) {
    let id = Uuid::new_v4();
    let mut job = serde_json::to_value(base).unwrap();
    job["id"] = id.to_string().into();
    // Every field of the job, optional ones too.
    let fields: Vec<&str> = "v kind model prompt width height steps guidance scheduler seed num_images strength \
        mask_blur resize_mode output deadline created_at invert_mask init_image mask idempotency_key \
        timestep_spacing negative_prompt paste_back"
        .split_whitespace()
        .collect();
    let field = fields[rng.random_range(0..fields.len())];
    let values: Vec<serde_json::Value> = vec![
        serde_json::json!(u64::MAX),
        serde_json::json!(-1),
        serde_json::json!(0),
        serde_json::json!(1e308),
        serde_json::json!(-0.0),
        serde_json::json!("x".repeat(rng.random_range(0..20_000))),
        serde_json::json!(""),
        serde_json::json!(["png"]),
        serde_json::json!({"format": 1}),
        serde_json::json!({"inline": "not bytes"}),
        serde_json::json!({"object_key": "../../etc/passwd"}),
        serde_json::json!({"object_key": "a", "inline": "b"}),
        serde_json::json!(2),
        serde_json::json!(null),
        serde_json::json!(true),
        serde_json::json!([1, 2, 3]),
    ];
    let case = rng.random_range(0..6);
    let bytes = match case {
        // Random bytes, sometimes starting like a map.
        0 => {
            let mut b: Vec<u8> = (0..rng.random_range(0..600)).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) && !b.is_empty() {
                b[0] = 0x80 | rng.random_range(0..16u8);
            }
            return (b, None);
        }
        // A valid job cut short.
        1 => {
            let full = rmp_serde::to_vec_named(&job).unwrap();
            let cut = rng.random_range(0..full.len());
            return (full[..cut].to_vec(), None);
        }
        // A deep nest in an unknown field.
        2 => {
            job["junk"] = serde_json::Value::Null;
            let mut b = rmp_serde::to_vec_named(&job).unwrap();
            let at = b.windows(5).position(|w| w == b"\xa4junk").unwrap() + 5;
            let depth = rng.random_range(100..100_000);
            b.splice(at..at + 1, std::iter::repeat_n(0x91u8, depth).chain([0xc0]));
            b
        }
        // Wrong types and extreme values, one or several fields.
        _ => {
            for _ in 0..rng.random_range(1..4) {
                let f = if rng.random_bool(0.7) { field } else { fields[rng.random_range(0..fields.len())] };
                job[f] = values[rng.random_range(0..values.len())].clone();
            }
            rmp_serde::to_vec_named(&job).unwrap()
        }
    };
    let readable = protocol::peek_job_id(&bytes);
    (bytes, readable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_the_job_subject_and_the_http_api() {
    const MESSAGES: usize = 1500;
    const REQUESTS: usize = 1500;
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let worker = WorkerProcess::start("w-fuzz", &nats.url(), &store_url, &[], &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5d_4bee);

    // The bus: every message with a readable id ends failed (or, if a mutation left it valid, completed),
    // every bad message is dead-lettered, the queue drains, and a valid job then completes at once.
    let base = tiny_job(1, 1);
    let mut ids = Vec::new();
    let started = Instant::now();
    for n in 0..MESSAGES {
        let (bytes, id) = hostile_message(&mut rng, &base);
        publish_raw(&client, "tiny", bytes, &format!("fuzz-{n}")).await;
        ids.extend(id);
    }
    wait_for_empty_queue(&client, Duration::from_secs(240)).await;
    let drained = started.elapsed();
    let per_message = drained / MESSAGES as u32;
    eprintln!("{MESSAGES} hostile messages drained in {drained:?} ({per_message:?} each)");
    assert!(per_message < Duration::from_millis(100), "{per_message:?} per bad message");
    let valid = tiny_job(2, 77);
    let started = Instant::now();
    client.submit(&valid).await.unwrap();
    let events = wait_for_terminal(&client, valid.id, Duration::from_secs(20)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "the valid job took {:?}", started.elapsed());

    let events = all_events(&client).await;
    let letters = dead_letters(&client).await;
    let lettered: HashSet<String> = letters.iter().filter_map(|m| header(m, "Nats-Msg-Id")).collect();
    let mut completed = 0;
    for id in &ids {
        let terminal = events.get(id).and_then(|e| e.iter().find(|e| e.is_terminal()));
        match terminal {
            Some(Event::Completed(_)) => completed += 1,
            Some(Event::Failed(f)) => {
                assert!(f.message.len() <= protocol::MAX_ERROR_MESSAGE_BYTES);
                assert!(lettered.contains(&id.to_string()), "job {id} failed without a dead letter");
            }
            other => panic!("job {id} ended {other:?}"),
        }
    }
    assert_eq!(letters.len() + completed, MESSAGES, "every bad message has one dead letter");
    let (rss, peak) = memory_mib(worker.pid().unwrap());
    eprintln!("worker memory after the fuzz: {rss} MiB, peak {peak} MiB; {completed} mutated jobs were valid");
    assert!(peak < 1024, "the worker peaked at {peak} MiB");

    // The HTTP API: no crash, no 5xx, every error with the JSON body, memory bounded.
    let mut queen = QueenChild::start(&nats.url(), &store_url, &[]);
    let submission = serde_json::to_value(sd_rbee::api::JobSubmission::new("fuzz", "p")).unwrap();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for _ in 0..REQUESTS {
        let (method, path, body): (&str, String, Vec<u8>) = match rng.random_range(0..8) {
            0 => ("GET", format!("/v1/jobs/{}", random_text(&mut rng, 40)), vec![]),
            1 => (
                "GET",
                format!("/v1/jobs?limit={}&state={}", random_text(&mut rng, 8), random_text(&mut rng, 8)),
                vec![],
            ),
            2 => (
                "DELETE",
                format!("/v1/jobs/{}/images/{}", random_text(&mut rng, 10), random_text(&mut rng, 4)),
                vec![],
            ),
            3 => ("POST", "/v1/uploads".into(), (0..rng.random_range(0..3000)).map(|_| rng.random()).collect()),
            4 => ("PUT", "/v1/jobs".into(), b"{}".to_vec()),
            5 => ("POST", "/v1/jobs".into(), (0..rng.random_range(0..300)).map(|_| rng.random()).collect()),
            _ => {
                let mut sub = submission.clone();
                let fields: Vec<&str> = "model prompt width height steps guidance scheduler seed num_images \
                    init_image mask strength resize_mode output_format quality timeout_s kind extra"
                    .split_whitespace()
                    .collect();
                for _ in 0..rng.random_range(1..4) {
                    let f = fields[rng.random_range(0..fields.len())];
                    sub[f] = match rng.random_range(0..9) {
                        0 => serde_json::json!(u64::MAX),
                        1 => serde_json::json!(-1),
                        2 => serde_json::json!(1e308),
                        3 => serde_json::json!(random_text(&mut rng, 2000)),
                        4 => serde_json::json!({"object_key": random_text(&mut rng, 300)}),
                        5 => serde_json::json!([]),
                        6 => serde_json::json!(null),
                        7 => serde_json::json!("data:image/png;base64,AAAA"),
                        _ => serde_json::json!(0),
                    };
                }
                let mut body = sub.to_string().into_bytes();
                if rng.random_bool(0.1) {
                    body = format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes();
                }
                ("POST", "/v1/jobs".into(), body)
            }
        };
        let (status, json, raw) = queen.request(method, &path, &body);
        *statuses.entry(status).or_default() += 1;
        assert!(status < 500, "{method} {path}: {status} {json}");
        if status >= 400 {
            assert_error_body(status, &json, &raw, &format!("{method} {path}"));
        }
    }
    eprintln!("HTTP answers: {statuses:?}");
    assert!(queen.alive(), "the queen died:\n{}", queen.log_text());
    let (rss, peak) = memory_mib(queen.child.id());
    eprintln!("queen memory after the fuzz: {rss} MiB, peak {peak} MiB");
    assert!(peak < 512, "the queen peaked at {peak} MiB");
    let (status, _, _) = queen.request("GET", "/health", b"");
    assert_eq!(status, 200);
}

fn random_text(rng: &mut rand::rngs::StdRng, max: usize) -> String {
    const CHARS: &[char] = &['a', 'Z', '0', '9', '-', '%', '/', '.', '"', '\\', 'é', '€', '\u{0}', ' ', '?', '&', '='];
    let n = rng.random_range(0..=max);
    let text: String = (0..n).map(|_| CHARS[rng.random_range(0..CHARS.len())]).collect();
    // Only what a request line can carry.
    url_safe(&text)
}

fn url_safe(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
