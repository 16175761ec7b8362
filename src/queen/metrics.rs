//! The queen's own metrics, kept as things happen (a submission, an event the aggregator applies), so
//! `/metrics` reads memory, never the status bucket. Several queens share the events: each counts what it
//! applied, and their sum is the fleet's (Prometheus adds them up). Only gauges and histograms: their text
//! is the same in the Prometheus and the OpenMetrics formats, so either kind of scraper reads it.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::{JobState, JobStatus};

/// A label value from the outside world (a model name, a worker id), escaped as the text format asks
/// (`\\`, `\"`, `\n`): the encoder writes values as they are, and one stray quote would make the whole
/// exposition unreadable.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Escaped(pub String);

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: Escaped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: Escaped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantStateLabel {
    pub tenant: Escaped,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: Escaped,
}

fn seconds_histogram() -> Histogram {
    // 10 ms to ~3 minutes.
    Histogram::new(exponential_buckets(0.01, 2.5, 12))
}

/// What the queen counts; cheap to clone (the counters are shared).
#[derive(Clone)]
pub struct Metrics {
    /// Jobs that entered each state by the transitions this queen applied (a sum over queens); never lowered.
    jobs: Family<StateLabel, Gauge>,
    generation: Family<ModelLabel, Histogram, fn() -> Histogram>,
    steps: Family<ModelLabel, Histogram, fn() -> Histogram>,
    /// The model names labelled so far: anyone on the bus can publish a job's events under any model name,
    /// and each would add series to every scrape for good, so past [`MAX_MODEL_LABELS`] names the rest
    /// share [`OTHER_MODELS`].
    models: Labels,
    /// Per tenant, what its jobs used (for accounting): jobs ended in each state, images delivered, and
    /// the generation time of its completed jobs. Tenants are bounded the same way.
    tenant_jobs: Family<TenantStateLabel, Gauge>,
    tenant_images: Family<TenantLabel, Gauge>,
    tenant_generation_ms: Family<TenantLabel, Gauge>,
    tenants: Labels,
}

/// Label values given out so far, at most [`MAX_MODEL_LABELS`]; past that, one stands for the rest.
#[derive(Clone, Default)]
struct Labels(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl Labels {
    /// `value`, or `other` once [`MAX_MODEL_LABELS`] others have a label.
    fn label(&self, value: &str, other: &str) -> Escaped {
        let mut given = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = given.contains(value) || (given.len() < MAX_MODEL_LABELS && given.insert(value.to_string()));
        Escaped(if known { value } else { other }.to_string())
    }
}

/// The most model names the queen's histograms are labelled with.
pub const MAX_MODEL_LABELS: usize = 256;

/// The label of the models past [`MAX_MODEL_LABELS`] (no model name: those hold no space).
pub const OTHER_MODELS: &str = "(other models)";

/// The label of the tenants past [`MAX_MODEL_LABELS`] (no tenant name holds parentheses).
pub const OTHER_TENANTS: &str = "(other tenants)";

impl Default for Metrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            generation: Family::new_with_constructor(seconds_histogram),
            steps: Family::new_with_constructor(seconds_histogram),
            models: Default::default(),
            tenant_jobs: Family::default(),
            tenant_images: Family::default(),
            tenant_generation_ms: Family::default(),
            tenants: Default::default(),
        }
    }
}

impl Metrics {
    /// A job moved from `before` (`None`: first heard of now) to `after`. Counted into `after` only: a count
    /// of jobs in each state would be the net of what every queen applied since the fleet began, which no
    /// queen started later (or restarted) can know; entries add up over queens, and `increase()` reads them
    /// across restarts.
    pub fn transition(&self, before: Option<JobState>, after: JobState) {
        if before != Some(after) {
            self.jobs.get_or_create(&StateLabel { state: after.name() }).inc();
        }
    }

    /// The label for `model`: its name, or [`OTHER_MODELS`] once [`MAX_MODEL_LABELS`] others have one.
    pub(crate) fn model_label(&self, model: &str) -> ModelLabel {
        ModelLabel { model: self.models.label(model, OTHER_MODELS) }
    }

    /// A job's record moved from `before` to `status` (whoever wrote it: the aggregator, or a queen that
    /// took the job off the queue): [`Self::transition`], and, when it ended there, [`Self::tenant_end`].
    pub fn moved(&self, before: Option<JobState>, status: &JobStatus) {
        self.transition(before, status.state);
        if status.state.is_terminal() && before != Some(status.state) {
            self.tenant_end(status);
        }
    }

    /// A job of a tenant ended (`status`, just moved into its terminal state): counted to its tenant, with
    /// its images and generation time when it completed. An operator's job (no tenant) is not.
    fn tenant_end(&self, status: &JobStatus) {
        let Some(tenant) = &status.tenant else { return };
        let tenant = self.tenants.label(tenant, OTHER_TENANTS);
        let state = status.state.name();
        self.tenant_jobs.get_or_create(&TenantStateLabel { tenant: tenant.clone(), state }).inc();
        if status.state == JobState::Completed {
            let label = TenantLabel { tenant };
            self.tenant_images.get_or_create(&label).inc_by(status.images.len() as i64);
            let ms = status.timings.map_or(0, |t| t.generation_ms);
            self.tenant_generation_ms.get_or_create(&label).inc_by(i64::try_from(ms).unwrap_or(i64::MAX));
        }
    }

    /// A completed job's generation time.
    pub fn generation(&self, model: &str, ms: u64) {
        self.generation.get_or_create(&self.model_label(model)).observe(ms as f64 / 1000.0);
    }

    /// `steps` denoising steps took `ms` together.
    pub fn steps(&self, model: &str, steps: u32, ms: u64) {
        let histogram = self.steps.get_or_create(&self.model_label(model));
        let each = ms as f64 / 1000.0 / f64::from(steps.max(1));
        for _ in 0..steps.min(1000) {
            histogram.observe(each);
        }
    }

    /// The value of the jobs gauge for `state` (for tests and the log).
    pub fn jobs_in(&self, state: JobState) -> i64 {
        self.jobs.get_or_create(&StateLabel { state: state.name() }).get()
    }

    /// Registers the kept metrics in `registry` (the scrape adds what it reads at the time).
    pub fn register(&self, registry: &mut Registry) {
        // Every state is shown, at 0 before anything happened.
        for &state in JobState::ALL {
            let _ = self.jobs.get_or_create(&StateLabel { state: state.name() });
        }
        let jobs_help = "Jobs that entered each state by the events this queen applied since it started (a sum over \
                         queens; only ever grows)";
        registry.register("sd_rbee_jobs", jobs_help, self.jobs.clone());
        registry.register("sd_rbee_generation_seconds", "Generation time of completed jobs", self.generation.clone());
        registry.register("sd_rbee_step_seconds", "Denoising step time", self.steps.clone());
        let help = "Jobs of each tenant that ended in each state, by the events this queen applied since it \
                    started (a sum over queens; only ever grows)";
        registry.register("sd_rbee_tenant_jobs", help, self.tenant_jobs.clone());
        let help = "Images of each tenant's completed jobs (from the result cache too), as sd_rbee_tenant_jobs";
        registry.register("sd_rbee_tenant_images", help, self.tenant_images.clone());
        let help = "Generation time of each tenant's completed jobs, in milliseconds, as sd_rbee_tenant_jobs";
        registry.register("sd_rbee_tenant_generation_milliseconds", help, self.tenant_generation_ms.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_move_the_gauges_and_values_are_escaped() {
        let m = Metrics::default();
        m.transition(None, JobState::Queued);
        m.transition(Some(JobState::Queued), JobState::Running);
        m.transition(Some(JobState::Running), JobState::Completed);
        m.transition(None, JobState::Running);
        m.transition(Some(JobState::Running), JobState::Running);
        // Entries, never taken back: a queen that applied only the end of a job counts that end.
        assert_eq!([JobState::Queued, JobState::Running, JobState::Completed].map(|s| m.jobs_in(s)), [1, 2, 1]);
        m.generation(r#"a"b\c"#, 1500);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"sd_rbee_generation_seconds_count{model="a\"b\\c"} 1"#), "{text}");
        assert!(text.contains("sd_rbee_jobs{state=\"failed\"} 0"), "{text}");
    }

    #[test]
    fn model_names_past_the_bound_share_one_label() {
        let m = Metrics::default();
        for i in 0..10 * MAX_MODEL_LABELS {
            m.generation(&format!("m{i}"), 10);
            m.steps(&format!("m{i}"), 2, 10);
        }
        m.generation("m0", 10);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let counts: Vec<&str> = text.lines().filter(|l| l.starts_with("sd_rbee_generation_seconds_count")).collect();
        assert_eq!(counts.len(), MAX_MODEL_LABELS + 1);
        assert!(counts.contains(&"sd_rbee_generation_seconds_count{model=\"m0\"} 2"), "{counts:?}");
        let other = format!("sd_rbee_generation_seconds_count{{model=\"{OTHER_MODELS}\"}} {}", 9 * MAX_MODEL_LABELS);
        assert!(counts.contains(&other.as_str()), "{counts:?}");
    }
}

#[cfg(test)]
mod tenant_tests {
    use super::*;
    use crate::protocol::{ImageResult, JobKind, JobRequest, Timings};

    fn ended(tenant: Option<&str>, state: JobState, images: usize, generation_ms: u64) -> JobStatus {
        let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "a kite");
        job.tenant = tenant.map(str::to_string);
        let mut status = JobStatus::queued(&job, None);
        status.state = state;
        status.images = (0..images as u32)
            .map(|i| ImageResult {
                index: i,
                key: format!("jobs/{}/{i}.png", job.id),
                url: None,
                seed: 1,
                width: 64,
                height: 64,
                content_type: "image/png".into(),
                bytes: 1,
            })
            .collect();
        status.timings = Some(Timings { generation_ms, ..Default::default() });
        status
    }

    #[test]
    fn each_tenants_jobs_images_and_generation_time_add_up() {
        let m = Metrics::default();
        m.tenant_end(&ended(Some("acme"), JobState::Completed, 2, 1500));
        // Moved into its end once, by whoever wrote the record; a record already ended is not counted again.
        m.moved(Some(JobState::Running), &ended(Some("acme"), JobState::Completed, 1, 500));
        m.moved(Some(JobState::Completed), &ended(Some("acme"), JobState::Completed, 1, 500));
        m.tenant_end(&ended(Some("acme"), JobState::Failed, 0, 0));
        m.tenant_end(&ended(Some("globex"), JobState::Cancelled, 0, 0));
        m.tenant_end(&ended(None, JobState::Completed, 4, 9000));
        for i in 0..2 * MAX_MODEL_LABELS {
            m.tenant_end(&ended(Some(&format!("t{i}")), JobState::Failed, 0, 0));
        }
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"sd_rbee_tenant_jobs{tenant="acme",state="completed"} 2"#,
            r#"sd_rbee_tenant_jobs{tenant="acme",state="failed"} 1"#,
            r#"sd_rbee_tenant_jobs{tenant="globex",state="cancelled"} 1"#,
            r#"sd_rbee_tenant_images{tenant="acme"} 3"#,
            r#"sd_rbee_tenant_generation_milliseconds{tenant="acme"} 2000"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        // An operator's job is no tenant's; tenants past the bound share one label.
        assert!(!text.contains("tenant=\"\""), "{text}");
        let other = format!(r#"sd_rbee_tenant_jobs{{tenant="{OTHER_TENANTS}",state="failed"}} "#);
        assert!(text.lines().any(|l| l.starts_with(&other)), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("sd_rbee_tenant_jobs{")).count(), MAX_MODEL_LABELS + 2);
    }
}
