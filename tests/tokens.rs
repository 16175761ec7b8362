//! What a token may do, through real nats-server, store and worker processes. Tenants: a tenant's token
//! sees, follows, fetches, lists and cancels its own jobs alone (another tenant's answer 404 as if there were
//! none), names only its own uploads as input images, is refused the fleet's workers and metrics, and shares
//! no result-cache entry with another tenant; an operator's token sees every job and can list one tenant's.
//! Submission rates: a token over its `submit_rate` is answered 429 through every way in, other tokens not.
//! The token file is read again when it changes: tokens are added and revoked without a restart, and a file
//! that does not read keeps the tokens in force; a token given twice with other options stops the queen.

use crate::common;

use common::queen::{client, follow, start_queen, tiny, wait_for_fleet, wait_state, TOKEN};
use common::servers::{NatsServer, WorkerProcess};
use sd_rbee::api::{ApiError, ImageInput, JobSubmission, QueenClient};
use sd_rbee::protocol::JobKind;
use sd_rbee::queen::http::{load_tokens, TokenPolicy, TokenSource, Tokens};
use sd_rbee::queen::rate::SubmitRate;
use uuid::Uuid;

const ACME: &str = "acme-token-0123456789abcdef";
const GLOBEX: &str = "globex-token-0123456789abcdef";

fn api_error<T: std::fmt::Debug>(r: anyhow::Result<T>) -> ApiError {
    r.expect_err("an error").downcast::<ApiError>().expect("an API error")
}

fn tenant(name: &str) -> TokenPolicy {
    TokenPolicy { tenant: Some(name.into()), ..Default::default() }
}

/// `job` run to its end as `c`: its id, and whether it came from the result cache.
async fn run(c: &QueenClient, job: &JobSubmission) -> (Uuid, bool) {
    let id = c.submit(job, None).await.unwrap().job_id;
    let last = follow(c, id).await.pop().unwrap();
    assert_eq!(last.event, "completed", "{last:?}");
    (id, last.data["cached"].as_bool().unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_token_sees_and_acts_on_its_own_jobs_alone() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let _worker = WorkerProcess::start("w-ten", &nats.url(), &store, &[], &["--step-delay", "100ms"]);
    let queen = start_queen(&nats.url(), &store, &[], |c| {
        c.api.tokens.extend([ACME.to_string(), GLOBEX.to_string()]);
        c.api.token_policies.insert(ACME.into(), tenant("acme"));
        c.api.token_policies.insert(GLOBEX.into(), tenant("globex"));
    })
    .await;
    let operator = client(&queen);
    let acme = QueenClient::new(&queen.base, Some(ACME.into())).unwrap();
    let globex = QueenClient::new(&queen.base, Some(GLOBEX.into())).unwrap();
    wait_for_fleet(&operator).await;

    // Acme's job: its own to follow, fetch and list; globex's token finds nothing there.
    let (ours, cached) = run(&acme, &tiny(3, 21)).await;
    assert!(!cached);
    let status = acme.status(ours).await.unwrap();
    assert_eq!(status.status.tenant.as_deref(), Some("acme"));
    assert!(!acme.image(ours, 0).await.unwrap().is_empty());
    for refused in [
        api_error(globex.status(ours).await),
        api_error(globex.image(ours, 0).await),
        api_error(globex.cancel(ours).await),
        api_error(globex.follow(ours, |_| {}).await),
    ] {
        assert_eq!((refused.status, refused.code.as_str()), (404, "NOT_FOUND"), "{refused}");
    }

    // The same seeded request from another tenant is generated again, not answered from acme's entry;
    // acme's own second one is.
    let (theirs, cached) = run(&globex, &tiny(3, 21)).await;
    assert!(!cached, "a cache hit would tell globex that acme asked for this image");
    let (_, cached) = run(&acme, &tiny(3, 21)).await;
    assert!(cached, "a tenant's own repeat comes from the cache");

    // Lists: each tenant its own; an operator every job, or one tenant's.
    let listed = |list: sd_rbee::api::JobList| list.jobs.iter().map(|j| j.job_id).collect::<Vec<_>>();
    let acmes = acme.jobs("").await.unwrap();
    assert_eq!((acmes.jobs.len(), acmes.total), (2, 2), "{acmes:?}");
    assert!(acmes.jobs.iter().all(|j| j.tenant.as_deref() == Some("acme")) && listed(acmes.clone()).contains(&ours));
    assert_eq!(listed(globex.jobs("").await.unwrap()), [theirs]);
    let refused = api_error(acme.jobs("?tenant=globex").await);
    assert_eq!((refused.status, refused.code.as_str(), refused.field.as_deref()), (403, "FORBIDDEN", Some("tenant")));
    assert_eq!(listed(acme.jobs("?tenant=acme").await.unwrap()), listed(acmes));
    assert_eq!(operator.jobs("").await.unwrap().total, 3);
    assert_eq!(listed(operator.jobs("?tenant=globex").await.unwrap()), [theirs]);
    assert_eq!(operator.status(theirs).await.unwrap().status.tenant.as_deref(), Some("globex"));

    // Uploads: a tenant's under its own prefix, the only keys its jobs may name.
    let mut png = Vec::new();
    image::RgbImage::new(64, 64).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let acme_upload = acme.upload(png.clone(), "image/png").await.unwrap().object_key;
    let globex_upload = globex.upload(png.clone(), "image/png").await.unwrap().object_key;
    assert!(acme_upload.starts_with("uploads/acme/"), "{acme_upload}");
    let img2img = |key: &str| {
        let mut job = tiny(4, 5);
        job.kind = Some(JobKind::Img2Img);
        job.init_image = Some(ImageInput::Upload { object_key: key.into() });
        job
    };
    let results_key = format!("jobs/{theirs}/0.png");
    for key in [globex_upload.as_str(), results_key.as_str()] {
        let refused = api_error(acme.submit(&img2img(key), None).await);
        assert_eq!(
            (refused.status, refused.code.as_str(), refused.field.as_deref()),
            (403, "FORBIDDEN", Some("init_image")),
            "{key}: {refused}"
        );
    }
    let own = acme.submit(&img2img(&acme_upload), None).await.unwrap().job_id;
    wait_state(&acme, own, "completed").await;

    // A job of acme's that has not ended: globex cannot cancel it, acme can.
    let open = acme.submit(&tiny(40, 6), None).await.unwrap().job_id;
    assert_eq!(api_error(globex.cancel(open).await).status, 404);
    acme.cancel(open).await.unwrap();
    wait_state(&operator, open, "cancelled").await;

    // The fleet's workers and metrics are the operator's.
    let refused = api_error(acme.workers().await);
    assert_eq!((refused.status, refused.code.as_str()), (403, "FORBIDDEN"), "{refused}");
    let http = reqwest::Client::new();
    let metrics = |token: &'static str| http.get(format!("{}/metrics", queen.base)).bearer_auth(token).send();
    assert_eq!(metrics(ACME).await.unwrap().status(), 403);
    // What each tenant's jobs used, for accounting: acme's three completed jobs (one from the cache) and
    // its cancelled one, globex's one.
    let usage = [
        r#"sd_rbee_tenant_jobs{tenant="acme",state="completed"} 3"#,
        r#"sd_rbee_tenant_jobs{tenant="acme",state="cancelled"} 1"#,
        r#"sd_rbee_tenant_jobs{tenant="globex",state="completed"} 1"#,
        r#"sd_rbee_tenant_images{tenant="acme"} 3"#,
    ];
    let start = std::time::Instant::now();
    loop {
        let text = metrics(TOKEN).await.unwrap().text().await.unwrap();
        let missing: Vec<_> = usage.iter().filter(|l| !text.lines().any(|t| t == **l)).collect();
        if missing.is_empty() {
            let generation =
                text.lines().find(|l| l.starts_with(r#"sd_rbee_tenant_generation_milliseconds{tenant="acme"}"#));
            let ms: u64 = generation.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
            assert!(ms > 0, "{text}");
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{missing:?} in {text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!operator.workers().await.unwrap().is_empty());
    // What a tenant needs to submit stays open to it, and it can ask what its token may do.
    assert!(acme.models().await.unwrap().iter().any(|m| m.name == "tiny"));
    let me = acme.me().await.unwrap();
    assert_eq!((me.tenant.as_deref(), me.submit_rate, me.authenticated), (Some("acme"), None, true));
    assert_eq!(operator.me().await.unwrap().tenant, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_submit_rate_waits_through_every_way_in() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    // No worker: the jobs wait in the queue.
    let queen = start_queen(&nats.url(), &store, &[], |c| {
        c.api.model_catalogue = vec!["tiny".into()];
        c.api.tokens.push(ACME.into());
        let submit_rate = Some(SubmitRate::parse("2/min").unwrap());
        c.api.token_policies.insert(ACME.into(), TokenPolicy { submit_rate, ..Default::default() });
    })
    .await;
    let limited = QueenClient::new(&queen.base, Some(ACME.into())).unwrap();
    let first = limited.submit(&tiny(2, 0), Some("order-1")).await.unwrap();
    // A refused submission takes no place.
    let mut invalid = tiny(2, 1);
    invalid.steps = Some(100_000);
    assert_eq!(api_error(limited.submit(&invalid, None).await).status, 422);
    limited.submit(&tiny(2, 1), None).await.unwrap();
    let refused = api_error(limited.submit(&tiny(2, 3), None).await);
    assert_eq!((refused.status, refused.code.as_str()), (429, "RATE_LIMITED"), "{refused}");
    assert!(refused.message.contains("2/min"), "{refused}");
    // A retry that its key maps to the job it queued takes none either: answered, over the rate.
    let again = limited.submit(&tiny(2, 0), Some("order-1")).await.unwrap();
    assert_eq!((again.job_id, again.created), (first.job_id, false));
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{}{path}", queen.base)).bearer_auth(ACME).json(&body).send()
    };
    // The same through the compatible endpoints, with how long to wait (a job's share of the minute).
    for (path, body) in [
        ("/v1/jobs", serde_json::to_value(tiny(2, 4)).unwrap()),
        ("/v1/images/generations", serde_json::json!({"prompt": "a kite", "size": "256x256"})),
        ("/sdapi/v1/txt2img", serde_json::json!({"prompt": "a kite", "steps": 2, "width": 64, "height": 64})),
    ] {
        let r = post(path, body).await.unwrap();
        assert_eq!(r.status(), 429, "{path}");
        let wait: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=30).contains(&wait), "{path}: Retry-After {wait}");
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "RATE_LIMITED", "{path}");
    }
    let me = limited.me().await.unwrap();
    assert_eq!((me.tenant, me.submit_rate.as_deref()), (None, Some("2/min")));
    // Nothing refused was queued; another token is not held back.
    assert_eq!(client(&queen).jobs("").await.unwrap().total, 2);
    client(&queen).submit(&tiny(2, 5), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_added_and_revoked_by_editing_the_token_file() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().display());
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{ACME} tenant=acme\n")).unwrap();
    let queen = start_queen(&nats.url(), &store, &[], |c| {
        let tokens = Tokens::from_loaded(load_tokens(Some(&file), None).unwrap());
        (c.api.tokens, c.api.token_policies) = (tokens.tokens, tokens.policies);
        c.api.token_source = Some(TokenSource { file: Some(file.clone()), env: None });
    })
    .await;
    let acme = QueenClient::new(&queen.base, Some(ACME.into())).unwrap();
    let globex = QueenClient::new(&queen.base, Some(GLOBEX.into())).unwrap();
    assert_eq!(acme.me().await.unwrap().tenant.as_deref(), Some("acme"));
    assert_eq!(api_error(globex.me().await).status, 401);

    // Acme's token revoked, globex's added as an operator's: in force within seconds, no restart.
    std::fs::write(&file, format!("# acme revoked\n{GLOBEX}\n")).unwrap();
    let start = std::time::Instant::now();
    while globex.me().await.is_err() || acme.me().await.is_ok() {
        assert!(start.elapsed() < std::time::Duration::from_secs(15), "the token file was not read again");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(api_error(acme.me().await).status, 401);
    assert_eq!(globex.me().await.unwrap().tenant, None);

    // A file that does not read (a short token) changes nothing: globex's token stays in force.
    std::fs::write(&file, "short\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    globex.me().await.expect("the tokens in force are kept");
    assert_eq!(api_error(acme.me().await).status, 401);
}

/// A token given twice with other options (a tenant's on one line, an operator's on another) stops the queen
/// from starting, naming both places and none of the secret: one of the two policies would have been dropped,
/// silently.
#[test]
fn a_token_given_twice_with_other_options_stops_the_queen() {
    let dir = tempfile::tempdir().unwrap();
    for (lines, env, expected) in [
        ("s3cret-token-0123456789 tenant=acme\n\ns3cret-token-0123456789\n", None, "line 3 of --token-file"),
        (
            "s3cret-token-0123456789 tenant=acme\n",
            Some("s3cret-token-0123456789"),
            "entry 1 of SD_RBEE_API_TOKENS is also at line 1 of --token-file",
        ),
    ] {
        let file = dir.path().join("tokens");
        std::fs::write(&file, lines).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"));
        command.args(["queen", "--nats", "nats://127.0.0.1:1", "--store", "memory://", "--token-file"]).arg(&file);
        command.env_remove("SD_RBEE_API_TOKENS");
        if let Some(tokens) = env {
            command.env("SD_RBEE_API_TOKENS", tokens);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected) && stderr.contains("give each token once"), "{stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}
