//! How a job's status record ([`JobStatus`]) is made and moved along by the bus's events: pure rules, so
//! every queen folds the same events into the same record whatever order its updates land in (a terminal
//! state is final; older events never overwrite newer).

use uuid::Uuid;

use super::views::{ErrorInfo, JobState, JobStatus, ProgressInfo, RequestSummary};
use crate::protocol::{Event, JobKind, JobRequest};

/// The most images a [slimmed](JobStatus::slim) record keeps.
pub const MAX_SLIM_IMAGES: usize = 64;

impl JobStatus {
    /// A job just submitted.
    pub fn queued(job: &JobRequest, stream_seq: Option<u64>) -> Self {
        Self {
            cached: false,
            priority: job.priority,
            expires_at: job.expires_at,
            webhook: None,
            job_id: job.id,
            model: job.model.clone(),
            kind: Some(job.kind),
            state: JobState::Queued,
            created_at: job.created_at,
            updated_at: job.created_at,
            started_at: None,
            finished_at: None,
            worker_id: None,
            deliveries: 0,
            progress: None,
            images: Vec::new(),
            timings: None,
            warnings: Vec::new(),
            error: None,
            cancelled_at_step: None,
            request: Some(RequestSummary::of(job)),
            stream_seq,
            last_event_at: 0,
            tenant: job.tenant.clone(),
        }
    }

    /// A job first heard of through an event (published on the bus without the queen).
    pub fn unknown(job_id: Uuid, at: u64) -> Self {
        let mut s = Self::queued(&JobRequest::with_id(job_id, at, JobKind::Txt2Img, "", ""), None);
        s.kind = None;
        s.request = None;
        s
    }

    /// What is kept of a record that has grown too large to store (the bus's events and a submission at
    /// the limits can add up past it): its state, times, error and images, without their URLs (the API
    /// serves each image by its key), the request, or warnings but one saying so. Keeps a terminal event
    /// from being lost, which would leave the job running for good.
    pub fn slim(&mut self) {
        self.request = None;
        self.images.truncate(MAX_SLIM_IMAGES);
        for image in &mut self.images {
            image.url = None;
        }
        self.warnings =
            vec!["the record grew too large to store: the request, image URLs and warnings are left out".into()];
    }

    /// What is left of the record once the job expired: its identity, state and times, without its request,
    /// images, progress, warnings or error (the `410 Gone` answer needs no more).
    pub fn expire(&mut self) {
        self.request = None;
        self.images.clear();
        self.progress = None;
        self.timings = None;
        self.warnings.clear();
        self.error = None;
    }

    /// Moves the status along by `event`. Returns false when the event changes nothing (a terminal state
    /// is final; an event older than the newest applied is ignored, except a terminal one).
    pub fn apply(&mut self, event: &Event) -> bool {
        let at = event.at();
        // An expired job's record is a tombstone: a late terminal event still ends it (its state and times),
        // but nothing a worker says brings its content back.
        let expired = self.is_expired(at);
        if self.state.is_terminal() || (expired && !event.is_terminal()) {
            return false;
        }
        if !event.is_terminal() && at < self.last_event_at {
            return false;
        }
        match event {
            // Anyone on the bus can publish events: a worker id that is no subject token is not kept.
            Event::Accepted(a) if crate::protocol::validate_worker_id(&a.worker_id).is_err() => return false,
            Event::Accepted(a) => {
                // A job published without the queen learns its model from the worker that took it.
                if self.model.is_empty() && crate::protocol::validate_model_name(&a.model).is_ok() {
                    self.model = a.model.clone();
                    // And its tenant, so that the tenant that submitted it still sees it.
                    if self.tenant.is_none() {
                        let valid = |t: &&String| crate::protocol::validate_tenant("tenant", t).is_ok();
                        self.tenant = a.tenant.as_ref().filter(valid).cloned();
                    }
                }
                self.state = JobState::Running;
                self.worker_id = Some(a.worker_id.clone());
                self.started_at.get_or_insert(a.at);
                self.deliveries += 1;
                self.progress = None;
            }
            Event::Progress(p) => {
                self.state = JobState::Running;
                self.progress = Some(ProgressInfo {
                    step: p.step,
                    total: p.total,
                    percent: p.checked_percent(),
                    eta_ms: p.eta_ms,
                    phase: p.phase,
                });
            }
            Event::Completed(c) => {
                self.state = JobState::Completed;
                // Anyone on the bus can publish events: what the record keeps of one is bounded, and only this
                // job's own result keys are kept as its images (the API serves what they name).
                self.images = c.own_images();
                let left_out = c.images.len() - self.images.len();
                self.warnings = c
                    .warnings
                    .iter()
                    .take(crate::protocol::MAX_WARNINGS - usize::from(left_out > 0))
                    .map(|w| crate::protocol::truncate(w, crate::protocol::MAX_WARNING_BYTES).to_string())
                    .collect();
                if left_out > 0 {
                    self.warnings.push(format!(
                        "{left_out} image(s) of the completed event left out: not this job's result keys, or listed twice"
                    ));
                }
                self.timings = Some(c.timings);
                self.cached = c.cached;
                self.finished_at = Some(c.at);
                if let Some(p) = &mut self.progress {
                    p.step = p.total;
                    p.percent = 100.0;
                    p.eta_ms = Some(0);
                }
            }
            Event::Failed(f) => {
                self.state = JobState::Failed;
                // Anyone on the bus can publish events: what the record keeps of one is bounded.
                let message = crate::protocol::truncate(&f.message, crate::protocol::MAX_ERROR_MESSAGE_BYTES);
                let field = f.field.as_deref().map(|x| crate::protocol::truncate(x, 128).to_string());
                self.error = Some(ErrorInfo { code: f.code, message: message.to_string(), field });
                self.finished_at = Some(f.at);
            }
            Event::Cancelled(c) => {
                self.state = JobState::Cancelled;
                self.cancelled_at_step = c.at_step;
                self.finished_at = Some(c.at);
            }
        }
        self.last_event_at = self.last_event_at.max(at);
        self.updated_at = self.updated_at.max(at);
        if expired {
            self.expire();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Accepted, Cancelled, Completed, ErrorCode, Failed, Progress, Timings, PROTOCOL_VERSION};

    fn accepted(id: Uuid, at: u64, w: &str) -> Event {
        Event::Accepted(Accepted {
            v: PROTOCOL_VERSION,
            job_id: id,
            at,
            worker_id: w.into(),
            model: "tiny".into(),
            tenant: None,
        })
    }

    #[test]
    fn a_jobs_tenant_comes_from_its_submission_or_for_a_record_made_from_events_from_its_start() {
        let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "x");
        job.tenant = Some("acme".into());
        let started = |tenant: &str| {
            Event::Accepted(Accepted {
                v: PROTOCOL_VERSION,
                job_id: job.id,
                at: job.created_at + 10,
                worker_id: "w1".into(),
                model: "tiny".into(),
                tenant: Some(tenant.into()),
            })
        };
        let mut submitted = JobStatus::queued(&job, Some(1));
        assert_eq!(submitted.tenant.as_deref(), Some("acme"));
        // A worker's event does not move a job to another tenant.
        assert!(submitted.apply(&started("other")));
        assert_eq!(submitted.tenant.as_deref(), Some("acme"));
        let mut operators = JobStatus::queued(&JobRequest { tenant: None, ..job.clone() }, Some(1));
        assert!(operators.apply(&started("acme")));
        assert_eq!(operators.tenant, None, "an operator's job stays an operator's");
        // A record first made from an event (its submission's record lost) learns the tenant with the model.
        let mut rebuilt = JobStatus::unknown(job.id, job.created_at);
        assert!(rebuilt.apply(&started("acme")));
        assert_eq!((rebuilt.model.as_str(), rebuilt.tenant.as_deref()), ("tiny", Some("acme")));
        let mut invalid = JobStatus::unknown(job.id, job.created_at);
        assert!(invalid.apply(&started("../x")));
        assert_eq!(invalid.tenant, None, "not a tenant name: kept for operators only");
    }

    #[test]
    fn events_move_the_status_and_terminal_states_are_final() {
        let job = JobRequest::new(JobKind::Txt2Img, "tiny", "x");
        let mut s = JobStatus::queued(&job, Some(4));
        assert!(s.apply(&accepted(job.id, job.created_at + 10, "w1")));
        assert_eq!((s.state, s.worker_id.as_deref(), s.deliveries), (JobState::Running, Some("w1"), 1));
        assert!(s.apply(&Event::Progress(Progress::new(job.id, 2, 4, job.created_at + 20))));
        assert_eq!(s.progress.as_ref().unwrap().step, 2);
        // An older progress event arriving late changes nothing.
        assert!(!s.apply(&Event::Progress(Progress::new(job.id, 1, 4, job.created_at + 15))));
        assert_eq!(s.progress.as_ref().unwrap().step, 2);
        let done = Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: job.id,
            at: job.created_at + 30,
            images: vec![],
            timings: Timings::default(),
            warnings: vec!["the prompt was cut".into()],
        };
        assert!(s.apply(&Event::Completed(done)));
        assert_eq!(s.state, JobState::Completed);
        let failed = Failed {
            v: PROTOCOL_VERSION,
            job_id: job.id,
            at: job.created_at + 40,
            code: ErrorCode::Internal,
            message: "late".into(),
            field: None,
        };
        assert!(!s.apply(&Event::Failed(failed)));
        assert!(!s.apply(&Event::Cancelled(Cancelled { v: 1, job_id: job.id, at: 1, at_step: None })));
        assert_eq!(s.state, JobState::Completed);
    }

    #[test]
    fn a_bus_job_learns_its_model_and_keeps_bounded_warnings() {
        let id = Uuid::new_v4();
        let mut s = JobStatus::unknown(id, 5);
        assert!(s.apply(&accepted(id, 10, "w1")));
        assert_eq!(s.model, "tiny", "named by the worker that took it");
        let done = Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 20,
            images: vec![],
            timings: Timings::default(),
            warnings: vec!["w".repeat(10_000); 100],
        };
        assert!(s.apply(&Event::Completed(done)));
        assert_eq!(s.warnings.len(), crate::protocol::MAX_WARNINGS);
        assert!(s.warnings.iter().all(|w| w.len() <= crate::protocol::MAX_WARNING_BYTES));
    }

    #[test]
    fn only_the_jobs_own_result_keys_are_kept_as_its_images() {
        let id = Uuid::new_v4();
        let mut s = JobStatus::unknown(id, 5);
        let image = |index: u32, key: String| crate::protocol::ImageResult::stored(index, key, "image/png");
        let own = image(0, crate::protocol::result_key(id, 0, "png"));
        let done = Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 20,
            images: vec![
                own.clone(),
                image(1, "uploads/someone-elses.png".into()),
                image(2, crate::protocol::result_key(Uuid::new_v4(), 2, "png")),
            ],
            timings: Timings::default(),
            warnings: vec!["w".into(); crate::protocol::MAX_WARNINGS],
        };
        assert!(s.apply(&Event::Completed(done)));
        assert_eq!(s.images, vec![own.clone()]);
        assert_eq!(s.warnings.len(), crate::protocol::MAX_WARNINGS);
        assert!(
            s.warnings.last().unwrap().starts_with("2 image(s) of the completed event left out"),
            "{:?}",
            s.warnings
        );

        // An index listed twice is one image; a URL that is no plain http(s) one is left out.
        let mut s = JobStatus::unknown(id, 5);
        let with_url = |url: &str| crate::protocol::ImageResult { url: Some(url.into()), ..own.clone() };
        let one = image(1, crate::protocol::result_key(id, 1, "png"));
        for (url, kept) in [
            ("https://bucket.s3.amazonaws.com/jobs/x/0.png?X-Amz-Signature=ab%20cd", true),
            ("HTTP://minio:9000/b/0.png", true),
            ("javascript:alert(1)", false),
            ("data:image/png;base64,AAAA", false),
            ("https://host/\u{1}", false),
            ("https://host/a b", false),
            ("https://host/a\"onerror=x", false),
            ("https://host/<script>", false),
            (&format!("https://host/{}", "a".repeat(5000)), false),
        ] {
            let done = Completed {
                cached: false,
                v: PROTOCOL_VERSION,
                job_id: id,
                at: 20,
                images: vec![with_url(url), one.clone(), one.clone(), with_url("https://x/dup")],
                timings: Timings::default(),
                warnings: vec![],
            };
            let mut s = s.clone();
            assert!(s.apply(&Event::Completed(done)));
            assert_eq!(s.images.len(), 2, "{:?}", s.images);
            assert_eq!(s.images[0].url.is_some(), kept, "{url}");
            assert_eq!(
                s.warnings,
                ["2 image(s) of the completed event left out: not this job's result keys, or listed twice"]
            );
        }
        s.apply(&Event::Completed(Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 20,
            images: vec![with_url("https://bucket/0.png")],
            timings: Timings::default(),
            warnings: vec!["w".into()],
        }));
        s.slim();
        assert_eq!((s.state, s.images.len(), s.images[0].url.as_deref()), (JobState::Completed, 1, None));
        assert_eq!(s.warnings.len(), 1);
    }

    #[test]
    fn a_progress_percent_that_is_no_number_is_computed_and_the_record_reads_back() {
        let id = Uuid::new_v4();
        for (percent, want) in [(f32::NAN, 30.0), (f32::INFINITY, 30.0), (-5.0, 0.0), (1e9, 100.0), (42.5, 42.5)] {
            let mut s = JobStatus::unknown(id, 5);
            assert!(s.apply(&Event::Progress(Progress { percent, ..Progress::new(id, 3, 10, 20) })));
            assert_eq!(s.progress.as_ref().unwrap().percent, want, "{percent}");
            let json = serde_json::to_vec(&s).unwrap();
            assert_eq!(serde_json::from_slice::<JobStatus>(&json).unwrap(), s);
        }
        // A record an older queen wrote with the NaN as null reads back, at 0.
        let mut s = JobStatus::unknown(id, 5);
        s.apply(&Event::Progress(Progress::new(id, 3, 10, 20)));
        let json = serde_json::to_string(&s).unwrap().replace("\"percent\":30.0", "\"percent\":null");
        assert!(json.contains("\"percent\":null"), "{json}");
        assert_eq!(serde_json::from_str::<JobStatus>(&json).unwrap().progress.unwrap().percent, 0.0);
        // Decoded from the bus, the event itself carries the computed percent.
        let event = Event::Progress(Progress { percent: f32::NAN, ..Progress::new(id, 1, 4, 20) });
        let Event::Progress(p) = crate::protocol::decode_event(&crate::protocol::encode(&event)).unwrap() else {
            panic!("not a progress event")
        };
        assert_eq!(p.percent, 25.0);
    }

    #[test]
    fn a_redelivery_counts_and_resets_progress() {
        let job = JobRequest::new(JobKind::Txt2Img, "tiny", "x");
        let mut s = JobStatus::queued(&job, None);
        s.apply(&accepted(job.id, 10, "w1"));
        s.apply(&Event::Progress(Progress::new(job.id, 3, 10, 20)));
        s.apply(&accepted(job.id, 30, "w2"));
        assert_eq!((s.deliveries, s.worker_id.as_deref(), s.progress.is_none()), (2, Some("w2"), true));
    }

    #[test]
    fn an_expired_record_ends_on_a_terminal_event_but_keeps_no_content() {
        let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "x");
        job.expires_at = Some(job.created_at + 1000);
        let (id, t) = (job.id, job.created_at);
        let mut s = JobStatus::queued(&job, Some(1));
        assert!(s.apply(&accepted(id, t + 10, "w")));
        assert!(!s.is_expired(t + 999) && s.is_expired(t + 1000));
        assert!(!s.apply(&Event::Progress(Progress::new(id, 3, 10, t + 1500))), "no progress after expiry");
        let cancelled = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: id, at: t + 1500, at_step: None });
        assert!(s.apply(&cancelled), "a terminal event still ends it");
        assert_eq!(s.state, JobState::Cancelled);
        assert!(s.request.is_none() && s.progress.is_none(), "but the record keeps nothing of the job");
    }
}
