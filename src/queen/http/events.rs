//! `GET /v1/jobs/{id}/events`: the job's feed as Server-Sent Events, each with its `id:`; a `Last-Event-ID`
//! header (or `?last_event_id=`) resumes right after that event.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Extension;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiPath, ApiQuery, ApiResult};
use super::{AppError, AppState};
use crate::api::{ApiErrorBody, EventId};

#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    last_event_id: Option<String>,
}

/// Everything that happened (replayed from the events stream), then live, ending after the terminal event.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = Uuid, Path), ("Last-Event-ID" = Option<String>, Header, description = "resume after this event id"),
        ("last_event_id" = Option<String>, Query, description = "the same, for clients that cannot set headers")),
    responses((status = 200, description = "Server-Sent Events: queued, started, progress, preview, completed, failed, cancelled",
        content_type = "text/event-stream"), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
        (status = 410, description = "the job's ttl passed", body = ApiErrorBody),
        (status = 429, description = "the token holds --max-streams-per-caller streams already", body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    // The header (a reconnecting EventSource's) wins over the query; an error names the one given.
    let given = match headers.get("last-event-id") {
        Some(v) => Some((
            "Last-Event-ID",
            v.to_str().map_err(|_| AppError::malformed("Last-Event-ID", "is not visible ASCII"))?.to_string(),
        )),
        None => query.last_event_id.map(|text| ("last_event_id", text)),
    };
    let after = given
        .map(|(field, text)| text.trim().parse::<EventId>().map_err(|e| AppError::malformed(field, e)))
        .transpose()?;
    let slot = caller.open_stream(&state)?;
    let status = state.jobs.get(id, &caller.scope).await?;
    let feed =
        crate::queen::feed::feed(&state.jobs.bus, &state.jobs.status, &status, after, state.jobs.feed_recheck).await?;
    let frames = feed
        .map(move |(id, event)| {
            // The caller's place is held while the stream is open.
            let _held = &slot;
            // `event:` last, so a frame reads from its data to what it is (and a stream ends with its type).
            Ok(SseEvent::default().data(event.data().to_string()).id(id.to_string()).event(event.name()))
        })
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(frames).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
