//! `GET /metrics`: the fleet in the Prometheus text format, read from the status bucket, the jobs stream,
//! the heartbeats and this queen's share of the events.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::error::ApiResult;
use super::AppState;
use crate::api::JobState;
use crate::protocol;
use crate::queen::jobs::JobsError;

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")), security(("bearer" = [])))]
pub(super) async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    use std::fmt::Write;
    let now = protocol::now_millis();
    let mut out = String::new();
    let jobs = &state.jobs;
    let statuses = jobs.status.all().await.map_err(JobsError::bus)?;
    let _ = writeln!(out, "# HELP sd_rbee_jobs Jobs in the status bucket, by state.\n# TYPE sd_rbee_jobs gauge");
    for &st in JobState::ALL {
        let n = statuses.iter().filter(|s| s.state == st).count();
        let _ = writeln!(out, "sd_rbee_jobs{{state=\"{}\"}} {n}", st.name());
    }
    let _ = writeln!(out, "# HELP sd_rbee_queue_depth Jobs in the work queue (waiting or running), by model.\n# TYPE sd_rbee_queue_depth gauge");
    if let Ok(stream) = jobs.bus.jetstream().get_stream(jobs.bus.subjects().jobs_stream()).await {
        if let Ok(mut info) = stream.info_with_subjects(jobs.bus.subjects().jobs_wildcard()).await {
            let mut subjects: Vec<(String, usize)> = Vec::new();
            while let Some(Ok((subject, count))) = info.next().await {
                subjects.push((subject, count));
            }
            subjects.sort();
            for (subject, count) in subjects {
                if let Some(model) = jobs.bus.subjects().model_of_jobs_subject(&subject) {
                    let _ = writeln!(out, "sd_rbee_queue_depth{{model=\"{}\"}} {count}", label_value(model));
                }
            }
        }
    }
    let workers = jobs.fleet.workers(now);
    let _ = writeln!(out, "# HELP sd_rbee_workers Workers by liveness.\n# TYPE sd_rbee_workers gauge");
    let lost = workers.iter().filter(|w| w.liveness() == "lost").count();
    let stopped = workers.iter().filter(|w| w.liveness() == "stopped").count();
    let busy = workers.iter().filter(|w| w.liveness() == "busy").count();
    let _ = writeln!(out, "sd_rbee_workers{{state=\"busy\"}} {busy}");
    let _ = writeln!(out, "sd_rbee_workers{{state=\"idle\"}} {}", workers.len() - lost - busy - stopped);
    let _ = writeln!(out, "sd_rbee_workers{{state=\"lost\"}} {lost}");
    let _ = writeln!(out, "sd_rbee_workers{{state=\"stopped\"}} {stopped}");
    let summary = |out: &mut String, name: &str, help: &str, rows: Vec<(String, u64, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        for (model, count, sum_ms) in rows {
            let model = label_value(&model);
            let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", sum_ms as f64 / 1000.0);
            let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {count}");
        }
    };
    summary(
        &mut out,
        "sd_rbee_generation_seconds",
        "Generation time of completed jobs (this queen's share of events).",
        jobs.stats.totals(),
    );
    summary(&mut out, "sd_rbee_step_seconds", "Denoising step time, by model.", jobs.stats.step_totals());
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], out).into_response())
}

/// A Prometheus label value, escaped as the text format asks (`\\`, `\"`, `\n`): model names come from
/// whoever publishes on the bus, and one stray quote would make the whole exposition unreadable.
fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("tiny"), "tiny");
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("a\nb"), "a\\nb");
    }
}
