//! Job expiry through a real queen, nats-server, S3 (s3s-fs, which checks SigV4 and presigned URLs) and
//! worker: a job's `ttl_s` (or the queen's `--default-ttl`) is in its status, its presigned URLs expire no
//! later than it does, and past it the job answers `410 Gone` (status, images, cancel), leaves the list, and
//! the sweeper deletes its objects within seconds; a job still running at its expiry is stopped.

use crate::common;

use std::time::Duration;

use common::queen::{client, follow, start_queen, tiny};
use common::servers::{NatsServer, S3Server, WorkerProcess};
use sd_rbee::api::ApiError;
use sd_rbee::protocol::{now_millis, ErrorCode, Event};

fn api_error(e: anyhow::Error) -> ApiError {
    e.downcast::<ApiError>().expect("an API error")
}

async fn sleep_until(at_ms: u64) {
    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_millis()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_job_answers_410_and_its_objects_are_swept() {
    let nats = NatsServer::start();
    let s3 = S3Server::start_signed();
    let default_ttl = Duration::from_secs(3600);
    let queen = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |c| {
        c.default_ttl = Some(default_ttl);
        c.api.require_served_model = false;
    })
    .await;
    let _worker = WorkerProcess::start("w-ttl", &nats.url(), &s3.store_url(), &s3.env(), &["--step-delay", "250ms"]);
    let c = client(&queen);

    let mut zero = tiny(2, 1);
    zero.ttl_s = Some(0);
    let err = api_error(c.submit(&zero, None).await.unwrap_err());
    assert_eq!((err.status, err.field.as_deref()), (422, Some("ttl_s")), "{}", err.message);
    zero.ttl_s = Some(u64::MAX);
    let err = api_error(c.submit(&zero, None).await.unwrap_err());
    assert_eq!((err.status, err.field.as_deref()), (422, Some("ttl_s")), "a ttl past any sweep: {}", err.message);

    let ttl = 8;
    let mut job = tiny(2, 5);
    job.ttl_s = Some(ttl);
    let submitted = now_millis();
    let id = c.submit(&job, None).await.unwrap().job_id;
    assert_eq!(follow(&c, id).await.last().unwrap().event, "completed");
    let view = c.status(id).await.unwrap();
    let expires_at = view.status.expires_at.expect("the status says when the job expires");
    assert!(expires_at.abs_diff(submitted + ttl * 1000) < 1000, "{expires_at} vs {submitted} + {ttl} s");
    let url = view.status.images[0].url.clone().expect("S3 results have presigned URLs");
    let lifetime: u64 = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-Expires")
        .map(|(_, v)| v.parse().unwrap())
        .expect("a SigV4 presigned URL");
    assert!(lifetime <= ttl, "the presigned URL lives {lifetime} s, the job {ttl} s");
    assert_eq!(s3.get_url(&url).0, 200, "and serves the image meanwhile");
    assert!(!c.image(id, 0).await.unwrap().is_empty());

    // A job that gives no ttl_s takes the queen's default.
    let lasting = c.submit(&tiny(2, 6), None).await.unwrap().job_id;
    let expires = c.status(lasting).await.unwrap().status.expires_at.expect("the default ttl");
    assert!(expires.abs_diff(now_millis() + default_ttl.as_millis() as u64) < 5000);

    // A job still running when its ttl passes is stopped, and one still queued (for a model no worker
    // serves) leaves the queue: both end timed out, not cancelled (no one cancelled them).
    let mut long = tiny(40, 7);
    long.ttl_s = Some(3);
    let running = c.submit(&long, None).await.unwrap().job_id;
    let mut waiting = tiny(3, 8);
    waiting.model = "unserved".into();
    waiting.ttl_s = Some(3);
    let queued = c.submit(&waiting, None).await.unwrap().job_id;

    sleep_until(expires_at + 100).await;
    let err = api_error(c.status(id).await.unwrap_err());
    assert_eq!((err.status, err.code.as_str()), (410, "EXPIRED"), "{}", err.message);
    assert_eq!(api_error(c.image(id, 0).await.unwrap_err()).status, 410);
    assert_eq!(api_error(c.cancel(id).await.unwrap_err()).status, 410);
    let listed = c.jobs("?limit=50").await.unwrap();
    assert!(listed.jobs.iter().all(|j| j.job_id != id), "an expired job leaves the list");
    assert!(listed.jobs.iter().any(|j| j.job_id == lasting));
    let start = std::time::Instant::now();
    while !s3.list(&format!("jobs/{id}/")).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(15), "the sweeper deletes the job's objects");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = s3.get_url(&url).0;
    assert!(matches!(after, 403 | 404), "the presigned URL serves nothing any more (expired or gone): {after}");
    assert_eq!(api_error(c.status(id).await.unwrap_err()).status, 410, "410 after the sweep too");

    assert_eq!(api_error(c.status(running).await.unwrap_err()).status, 410);
    let bus = sd_rbee::bus::BusClient::connect(&nats.url(), "sd").await.unwrap();
    for (job, what) in [(running, "running"), (queued, "queued")] {
        let stored = bus.stored_events(job).await.unwrap();
        let last = stored.last().map(|(_, e)| e);
        let timed_out = matches!(last, Some(Event::Failed(f)) if f.code == ErrorCode::Timeout);
        assert!(timed_out, "the job {what} at its expiry ended timed out: {stored:?}");
    }
    assert!(s3.list(&format!("jobs/{running}/")).is_empty(), "the job stopped at its expiry stored nothing");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(s3.list(&format!("jobs/{running}/")).is_empty(), "nor later");
    assert_eq!(c.status(lasting).await.unwrap().status.state.name(), "completed", "the others stay");
}

/// The status bucket keeps records `--keep-status` from their last write; a job waiting on the queue longer
/// than that (for a model no worker serves yet) keeps its record, renewed while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_longer_than_the_status_bucket_keeps_records_keeps_its_record() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let keep = Duration::from_secs(4);
    let queen = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |c| {
        c.status_max_age = keep;
        c.publish_confirm_window = Duration::from_secs(1);
        c.api.require_served_model = false;
    })
    .await;
    let c = client(&queen);
    let mut job = tiny(2, 1);
    job.model = "nobody-serves-it-yet".into();
    let id = c.submit(&job, None).await.unwrap().job_id;
    let written = now_millis();
    tokio::time::sleep(keep * 3).await;
    let view =
        c.status(id).await.unwrap_or_else(|e| panic!("the record is gone after {} ms: {e:#}", now_millis() - written));
    assert_eq!(view.status.state.name(), "queued");
    assert_eq!(view.status.request.as_ref().map(|r| r.prompt.as_str()), Some(job.prompt.as_str()), "all of it");
}
