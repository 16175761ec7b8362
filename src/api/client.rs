//! [`QueenClient`]: the queen's HTTP API as the CLI and the tests use it, typed with this module's
//! contract; Server-Sent Events read with `eventsource-stream`.

use std::time::Duration;

use anyhow::Context as _;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use uuid::Uuid;

use super::{
    ApiError, ApiErrorBody, ApiErrorCode, ApiEvent, CancelResponse, JobList, JobSubmission, LimitsView, ModelInfo,
    StatusView, SubmitResponse, TokenInfo, UploadResponse, WorkerInfo,
};

/// One Server-Sent Event from the queen as it came: its name, id and JSON data. [`SseMessage::event`]
/// reads it as an [`ApiEvent`].
#[derive(Clone, Debug, PartialEq)]
pub struct SseMessage {
    pub event: String,
    /// The frame's `id:` (send it back as `Last-Event-ID` to resume after it).
    pub id: String,
    pub data: serde_json::Value,
}

impl SseMessage {
    /// `completed`, `failed` or `cancelled`.
    pub fn is_terminal(&self) -> bool {
        matches!(self.event.as_str(), "completed" | "failed" | "cancelled")
    }

    /// The typed event; `None` for an event this build does not know.
    pub fn typed(&self) -> anyhow::Result<Option<ApiEvent>> {
        ApiEvent::from_frame(&self.event, &self.data.to_string())
            .with_context(|| format!("unreadable {} event from the queen", self.event))
    }
}

/// The longest an ordinary request (not an event stream) may take, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An event stream this long without a byte is dead (the queen's keep-alive comes every 15 s).
const STREAM_SILENCE: Duration = Duration::from_secs(45);

/// The queen's HTTP API.
#[derive(Clone)]
pub struct QueenClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    stream_silence: Duration,
}

impl QueenClient {
    /// `base` like `http://127.0.0.1:8080`; `token` for `Authorization: Bearer`.
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
        Ok(Self { base: base.trim_end_matches('/').to_string(), token, http, stream_silence: STREAM_SILENCE })
    }

    /// How long an event stream may go without a byte before it counts as broken (default 45 s).
    pub fn with_stream_silence(mut self, silence: Duration) -> Self {
        self.stream_silence = silence;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.streaming(method, path).timeout(REQUEST_TIMEOUT)
    }

    /// A request without a time limit on its body (a stream of events).
    fn streaming(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.with_context(|| format!("cannot reach the queen at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        // Whatever is in front of the queen (a proxy) may answer without the API's error body.
        let error = match serde_json::from_str::<ApiErrorBody>(&text) {
            Ok(body) => {
                ApiError { status, code: body.error.code, message: body.error.message, field: body.error.field }
            }
            Err(_) => ApiError {
                status,
                code: ApiErrorCode::Other,
                message: crate::protocol::truncate(text.trim(), 200).to_string(),
                field: None,
            },
        };
        Err(error.into())
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, method: reqwest::Method, path: &str) -> anyhow::Result<T> {
        let response = self.send(self.request(method, path)).await?;
        response.json().await.with_context(|| format!("unreadable answer from the queen to {path}"))
    }

    /// `POST /v1/jobs`.
    pub async fn submit(&self, job: &JobSubmission, idempotency_key: Option<&str>) -> anyhow::Result<SubmitResponse> {
        let mut r = self.request(reqwest::Method::POST, "/v1/jobs").json(job);
        if let Some(k) = idempotency_key {
            r = r.header("Idempotency-Key", k);
        }
        Ok(self.send(r).await?.json().await?)
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn status(&self, job_id: Uuid) -> anyhow::Result<StatusView> {
        self.json(reqwest::Method::GET, &format!("/v1/jobs/{job_id}")).await
    }

    /// `DELETE /v1/jobs/{id}`.
    pub async fn cancel(&self, job_id: Uuid) -> anyhow::Result<CancelResponse> {
        self.json(reqwest::Method::DELETE, &format!("/v1/jobs/{job_id}")).await
    }

    /// `GET /v1/jobs?...` (`query` is empty or starts with `?`).
    pub async fn jobs(&self, query: &str) -> anyhow::Result<JobList> {
        self.json(reqwest::Method::GET, &format!("/v1/jobs{query}")).await
    }

    /// `GET /v1/workers`.
    pub async fn workers(&self) -> anyhow::Result<Vec<WorkerInfo>> {
        self.json(reqwest::Method::GET, "/v1/workers").await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> anyhow::Result<Vec<ModelInfo>> {
        self.json(reqwest::Method::GET, "/v1/models").await
    }

    /// `GET /v1/limits`: what a job may ask for, and the values of the choice fields.
    pub async fn limits(&self) -> anyhow::Result<LimitsView> {
        self.json(reqwest::Method::GET, "/v1/limits").await
    }

    /// `GET /v1/me`: what this client's token may do (its tenant, priorities and submission rate).
    pub async fn me(&self) -> anyhow::Result<TokenInfo> {
        self.json(reqwest::Method::GET, "/v1/me").await
    }

    /// `POST /v1/uploads`: an input image (PNG, JPEG or WebP bytes), to name by its `object_key` as a job's
    /// `init_image` or `mask`.
    pub async fn upload(&self, image: Vec<u8>, content_type: &str) -> anyhow::Result<UploadResponse> {
        let r = self.request(reqwest::Method::POST, "/v1/uploads").header("Content-Type", content_type).body(image);
        Ok(self.send(r).await?.json().await?)
    }

    /// Image `n` of a completed job, through the queen.
    pub async fn image(&self, job_id: Uuid, n: u32) -> anyhow::Result<Vec<u8>> {
        let r = self.request(reqwest::Method::GET, &format!("/v1/jobs/{job_id}/images/{n}"));
        Ok(self.send(r).await?.bytes().await?.to_vec())
    }

    /// `GET /v1/jobs/{id}/events` as a stream of frames, from the first event or right after
    /// `last_event_id`; it ends after the terminal event.
    pub async fn events(
        &self,
        job_id: Uuid,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<SseMessage>>> {
        let mut r = self.streaming(reqwest::Method::GET, &format!("/v1/jobs/{job_id}/events"));
        if let Some(id) = last_event_id {
            r = r.header("Last-Event-ID", id);
        }
        let bytes = Box::pin(self.send(r).await?.bytes_stream());
        // The queen sends a comment every 15 s on an idle stream: a longer silence is a connection that died
        // without closing (a proxy, a queen that stalled), reported as a break the caller can resume.
        let silence = self.stream_silence;
        let bytes = futures::stream::unfold(Some(bytes), move |bytes| async move {
            let mut bytes = bytes?;
            match tokio::time::timeout(silence, bytes.next()).await {
                Ok(Some(chunk)) => Some((chunk.map_err(|e| e.to_string()), Some(bytes))),
                Ok(None) => None,
                Err(_) => Some((Err(format!("nothing from the queen for {silence:?}")), None)),
            }
        });
        let frames = bytes.eventsource();
        Ok(frames.map(|frame| {
            let frame = frame.map_err(|e| anyhow::anyhow!("the queen's event stream broke: {e}"))?;
            let data = serde_json::from_str(&frame.data).unwrap_or(serde_json::Value::String(frame.data));
            Ok(SseMessage { event: frame.event, id: frame.id, data })
        }))
    }

    /// Follows the job's events, calling `on_event` for each, until the terminal one, which it returns.
    pub async fn follow(&self, job_id: Uuid, mut on_event: impl FnMut(&SseMessage)) -> anyhow::Result<SseMessage> {
        let events = self.events(job_id, None).await?;
        tokio::pin!(events);
        while let Some(message) = events.next().await {
            let message = message?;
            on_event(&message);
            if message.is_terminal() {
                return Ok(message);
            }
        }
        anyhow::bail!("the event stream of job {job_id} ended before the job did")
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A queen that answers the events request's headers, sends one keep-alive, then nothing, never closing.
    #[tokio::test]
    async fn an_event_stream_gone_silent_breaks_instead_of_waiting_for_ever() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(b"3\r\n:\n\n\r\n").unwrap();
            std::thread::sleep(Duration::from_secs(30));
        });
        let client = QueenClient::new(&base, None).unwrap().with_stream_silence(Duration::from_millis(700));
        let started = std::time::Instant::now();
        let error = client.follow(Uuid::nil(), |_| {}).await.unwrap_err();
        let waited = started.elapsed();
        assert!(format!("{error:#}").contains("nothing from the queen"), "{error:#}");
        assert!(waited >= Duration::from_millis(700) && waited < Duration::from_secs(5), "{waited:?}");
    }
}
