//! `GET /v1/jobs/{id}/events`: the Server-Sent Events of a job, typed. [`ApiEvent`] is the one mapping from
//! the bus's events and the queen's status records to what a client reads; its name is the SSE `event:`
//! and its data the JSON `data:`. [`EventId`] is each frame's `id:`, which `Last-Event-ID` resumes after.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::views::{JobState, JobStatus};
use crate::protocol::{ErrorCode, Event, ImageResult, JobPhase, Timings};

/// One event of a job as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum ApiEvent {
    /// The queen accepted the job (always the first event).
    Queued { job_id: Uuid, at: u64, model: String },
    /// A worker took it.
    Started { job_id: Uuid, at: u64, worker_id: String },
    /// A denoising step finished (step 0 with `phase: loading` while the worker loads the model).
    Progress {
        job_id: Uuid,
        at: u64,
        step: u32,
        total: u32,
        percent: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phase: Option<JobPhase>,
        /// The step a worker took the job up from after another's delivery ended early (a crash, a
        /// preemption): the job continued from its last checkpoint instead of step 0.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_from_step: Option<u32>,
    },
    /// A small JPEG of the image so far, as a `data:image/jpeg;base64,` URL.
    Preview { job_id: Uuid, step: u32, image: String },
    /// Every image is stored; `warnings` say what the submitter should know (a prompt cut to 77 tokens).
    Completed {
        job_id: Uuid,
        at: u64,
        images: Vec<ImageResult>,
        timings: Timings,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
        /// From the result cache: nothing was generated.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cached: bool,
    },
    /// The job failed; `field` names the offending field of the request, when there is one.
    Failed {
        job_id: Uuid,
        at: u64,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
    },
    /// The job was cancelled (`at_step`: steps done; absent when it never started).
    Cancelled {
        job_id: Uuid,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at_step: Option<u32>,
    },
}

impl ApiEvent {
    /// The SSE event name: `queued`, `started`, `progress`, `preview`, `completed`, `failed`, `cancelled`.
    pub fn name(&self) -> &'static str {
        match self {
            ApiEvent::Queued { .. } => "queued",
            ApiEvent::Started { .. } => "started",
            ApiEvent::Progress { .. } => "progress",
            ApiEvent::Preview { .. } => "preview",
            ApiEvent::Completed { .. } => "completed",
            ApiEvent::Failed { .. } => "failed",
            ApiEvent::Cancelled { .. } => "cancelled",
        }
    }

    /// Whether this is the job's last event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, ApiEvent::Completed { .. } | ApiEvent::Failed { .. } | ApiEvent::Cancelled { .. })
    }

    /// The JSON `data:` of the frame.
    pub fn data(&self) -> serde_json::Value {
        serde_json::to_value(self).map(|mut v| v["data"].take()).unwrap_or_default()
    }

    /// An event from its SSE name and JSON data; `None` for a name this build does not know (a newer queen).
    pub fn from_frame(name: &str, data: &str) -> Result<Option<Self>, serde_json::Error> {
        let data: serde_json::Value = serde_json::from_str(data)?;
        match serde_json::from_value(serde_json::json!({"event": name, "data": data})) {
            Ok(event) => Ok(Some(event)),
            Err(_) if !KNOWN.contains(&name) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `queued`, the first event of every job.
    pub fn queued(status: &JobStatus) -> Self {
        ApiEvent::Queued { job_id: status.job_id, at: status.created_at, model: status.model.clone() }
    }

    /// The events a bus event shows as: one, or two for a progress event with a preview.
    pub fn from_bus(event: &Event) -> Vec<Self> {
        match event {
            Event::Accepted(a) => {
                vec![ApiEvent::Started { job_id: a.job_id, at: a.at, worker_id: a.worker_id.clone() }]
            }
            Event::Progress(p) => {
                let mut out = vec![ApiEvent::Progress {
                    job_id: p.job_id,
                    at: p.at,
                    step: p.step,
                    total: p.total,
                    percent: p.percent,
                    eta_ms: p.eta_ms,
                    phase: p.phase,
                    resumed_from_step: p.resumed_from_step,
                }];
                if let Some(jpeg) = &p.preview_jpeg {
                    use base64::Engine;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(jpeg);
                    let image = format!("data:image/jpeg;base64,{b64}");
                    out.push(ApiEvent::Preview { job_id: p.job_id, step: p.step, image });
                }
                out
            }
            Event::Completed(c) => {
                // (The OpenAI and A1111 routes read what these name.)
                vec![ApiEvent::Completed {
                    job_id: c.job_id,
                    at: c.at,
                    images: c.own_images(),
                    timings: c.timings,
                    warnings: c.warnings.clone(),
                    cached: c.cached,
                }]
            }
            Event::Failed(f) => vec![ApiEvent::Failed {
                job_id: f.job_id,
                at: f.at,
                code: f.code,
                message: f.message.clone(),
                field: f.field.clone(),
            }],
            Event::Cancelled(c) => vec![ApiEvent::Cancelled { job_id: c.job_id, at: c.at, at_step: c.at_step }],
        }
    }

    /// The terminal event of a finished job, from its status record (when the events stream no longer has
    /// it); `None` while the job runs.
    pub fn terminal_of(s: &JobStatus) -> Option<Self> {
        let at = s.finished_at.unwrap_or(s.updated_at);
        let job_id = s.job_id;
        Some(match s.state {
            JobState::Completed => ApiEvent::Completed {
                job_id,
                at,
                images: s.images.clone(),
                timings: s.timings.unwrap_or_default(),
                warnings: s.warnings.clone(),
                cached: s.cached,
            },
            JobState::Failed => {
                let e = s.error.clone();
                ApiEvent::Failed {
                    job_id,
                    at,
                    code: e.as_ref().map_or(ErrorCode::Internal, |e| e.code),
                    message: e.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
                    field: e.and_then(|e| e.field),
                }
            }
            JobState::Cancelled => ApiEvent::Cancelled { job_id, at, at_step: s.cancelled_at_step },
            JobState::Queued | JobState::Running => return None,
        })
    }
}

const KNOWN: [&str; 7] = ["queued", "started", "progress", "preview", "completed", "failed", "cancelled"];

/// A frame's `id:`: `0` for `queued`; for the rest, the bus event's sequence in the events stream, and
/// `.N` for the N-th further frame made from the same bus event (the preview after its progress); `end`
/// for a terminal event read from the status record. `Last-Event-ID` resumes right after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventId {
    Frame { seq: u64, part: u32 },
    End,
}

impl EventId {
    pub const QUEUED: EventId = EventId::Frame { seq: 0, part: 0 };
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventId::Frame { seq, part: 0 } => write!(f, "{seq}"),
            EventId::Frame { seq, part } => write!(f, "{seq}.{part}"),
            EventId::End => f.write_str("end"),
        }
    }
}

impl std::str::FromStr for EventId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{} is not an event id of this API (N, N.M or end)", crate::protocol::quoted(text));
        if text == "end" {
            return Ok(EventId::End);
        }
        let (seq, part) = text.split_once('.').unwrap_or((text, "0"));
        let number = |s: &str| s.parse::<u64>().ok().filter(|_| s.bytes().all(|b| b.is_ascii_digit()));
        let seq = number(seq).ok_or_else(bad)?;
        let part = number(part).and_then(|p| u32::try_from(p).ok()).ok_or_else(bad)?;
        Ok(EventId::Frame { seq, part })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Progress, PROTOCOL_VERSION};

    #[test]
    fn events_keep_their_names_and_data_through_a_frame() {
        let id = Uuid::new_v4();
        let mut p = Progress::new(id, 3, 10, 1000);
        p.preview_jpeg = Some(vec![0xff, 0xd8]);
        let frames = ApiEvent::from_bus(&Event::Progress(p));
        assert_eq!(frames.iter().map(ApiEvent::name).collect::<Vec<_>>(), ["progress", "preview"]);
        for frame in &frames {
            let back = ApiEvent::from_frame(frame.name(), &frame.data().to_string()).unwrap();
            assert_eq!(back.as_ref(), Some(frame));
        }
        assert_eq!(frames[0].data()["step"], 3);
        assert_eq!(ApiEvent::from_frame("party", "{}").unwrap(), None, "a newer event is skipped");
        assert!(ApiEvent::from_frame("progress", "{}").is_err(), "a known event must read");
        let cancelled =
            Event::Cancelled(crate::protocol::Cancelled { v: PROTOCOL_VERSION, job_id: id, at: 5, at_step: None });
        assert!(ApiEvent::from_bus(&cancelled)[0].is_terminal());
        // A completed frame lists only the job's own result keys.
        let own = crate::protocol::ImageResult::stored(0, crate::protocol::result_key(id, 0, "png"), "image/png");
        let done = Event::Completed(crate::protocol::Completed {
            cached: false,
            v: PROTOCOL_VERSION,
            job_id: id,
            at: 6,
            images: vec![own.clone(), crate::protocol::ImageResult::stored(1, "uploads/x.png".into(), "image/png")],
            timings: Default::default(),
            warnings: vec![],
        });
        assert_eq!(ApiEvent::from_bus(&done)[0].data()["images"], serde_json::json!([own]));
    }

    #[test]
    fn event_ids_print_and_parse_in_order() {
        let ids = [
            EventId::QUEUED,
            EventId::Frame { seq: 7, part: 0 },
            EventId::Frame { seq: 7, part: 1 },
            EventId::Frame { seq: 12, part: 0 },
            EventId::End,
        ];
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1]);
        }
        for id in ids {
            assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        }
        assert_eq!("7".parse::<EventId>(), Ok(EventId::Frame { seq: 7, part: 0 }));
        for bad in ["", "x", "-1", "1.", ".1", "1.2.3", "+4", "99999999999999999999999"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
    }
}
