//! Webhooks: what a job asks for ([`WebhookSpec`], the `webhook` of a submission), what its status shows of
//! the deliveries ([`WebhookInfo`]), the body each delivery carries ([`WebhookBody`]) and how it is signed
//! ([`WebhookSecret`]).
//!
//! Signatures follow the Standard Webhooks scheme (standardwebhooks.com), so its libraries verify them:
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`, one `v1,`
//! entry per secret the queen signs with (several while a secret is rotated), separated by spaces. The
//! `webhook-id` is the delivery's idempotency key: every attempt at the same event carries the same one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::events::ApiEvent;
use crate::protocol::{Event, ProtocolError};

/// The header with the delivery's idempotency key (the same on every attempt).
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";
/// The header with the attempt's time, in seconds since the Unix epoch (part of what is signed).
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// The header with the signatures (`v1,<base64>` entries separated by spaces).
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";
/// The longest webhook URL.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;

/// An event a job's webhook may ask for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema, strum::EnumIter,
)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A worker took the job (again after a redelivery).
    Started,
    /// Steps done, throttled (at most one per `progress_interval_s`).
    Progress,
    Completed,
    Failed,
    Cancelled,
}

impl WebhookEvent {
    pub fn name(self) -> &'static str {
        match self {
            WebhookEvent::Started => "started",
            WebhookEvent::Progress => "progress",
            WebhookEvent::Completed => "completed",
            WebhookEvent::Failed => "failed",
            WebhookEvent::Cancelled => "cancelled",
        }
    }

    /// The webhook event a bus event is.
    pub fn of(event: &Event) -> Self {
        match event {
            Event::Accepted(_) => WebhookEvent::Started,
            Event::Progress(_) => WebhookEvent::Progress,
            Event::Completed(_) => WebhookEvent::Completed,
            Event::Failed(_) => WebhookEvent::Failed,
            Event::Cancelled(_) => WebhookEvent::Cancelled,
        }
    }

    /// The body's `type`: `job.started`, `job.progress`, ...
    pub fn type_name(self) -> String {
        format!("job.{}", self.name())
    }
}

fn terminal_events() -> Vec<WebhookEvent> {
    vec![WebhookEvent::Completed, WebhookEvent::Failed, WebhookEvent::Cancelled]
}

/// `webhook` on a submission: where to POST the job's events, and which ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// An `http` or `https` URL that receives a POST per event. Its host must resolve to addresses the queen
    /// allows: private, loopback and link-local ones are refused unless the queen's `--webhook-allow` names
    /// their range. Redirects are not followed.
    pub url: String,
    /// The events to deliver; default: `completed`, `failed`, `cancelled`.
    #[serde(default = "terminal_events")]
    pub events: Vec<WebhookEvent>,
    /// The least seconds between two `progress` deliveries of the job; none, or less than the queen's
    /// `--webhook-progress-interval`: that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_interval_s: Option<u32>,
}

impl WebhookSpec {
    pub fn new(url: impl Into<String>, events: &[WebhookEvent]) -> Self {
        Self { url: url.into(), events: events.to_vec(), progress_interval_s: None }
    }

    /// The rules that need no network: an absolute http(s) URL with a host, of bounded length, and at least
    /// one event (duplicates are dropped). Errors name `webhook.url` or `webhook.events`. Where the host
    /// leads is the queen's to check.
    pub fn normalize(&mut self) -> Result<url::Url, ProtocolError> {
        let field = "webhook.url";
        if self.url.len() > MAX_WEBHOOK_URL_BYTES {
            let n = self.url.len();
            return Err(ProtocolError::invalid(field, format!("is {n} bytes, over the {MAX_WEBHOOK_URL_BYTES} limit")));
        }
        let url = url::Url::parse(&self.url).map_err(|e| {
            ProtocolError::invalid(field, format!("{} is not a URL: {e}", crate::protocol::quoted(&self.url)))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ProtocolError::invalid(
                field,
                format!("{} is not an http or https URL", crate::protocol::quoted(&self.url)),
            ));
        }
        if url.host().is_none() {
            return Err(ProtocolError::invalid(field, "has no host"));
        }
        self.events.sort();
        self.events.dedup();
        if self.events.is_empty() {
            return Err(ProtocolError::invalid(
                "webhook.events",
                "is empty: name at least one of started, progress, completed, failed, cancelled (or leave it out \
                 for completed, failed and cancelled)",
            ));
        }
        Ok(url)
    }
}

/// The most dead letters a job's status keeps (the newest).
pub const MAX_DEAD_LETTERS: usize = 20;

/// A job's webhook as its status shows it: what was asked, how many deliveries its receiver took, and the
/// deliveries given up on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookInfo {
    pub url: String,
    pub events: Vec<WebhookEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_interval_s: Option<u32>,
    /// Deliveries the receiver answered with a 2xx status.
    #[serde(default)]
    pub delivered: u32,
    /// Deliveries given up on after retrying for the queen's `--webhook-retry-for` (the newest
    /// [`MAX_DEAD_LETTERS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<WebhookDeadLetter>,
}

impl WebhookInfo {
    pub fn new(spec: &WebhookSpec) -> Self {
        Self {
            url: spec.url.clone(),
            events: spec.events.clone(),
            progress_interval_s: spec.progress_interval_s,
            delivered: 0,
            dead_letters: Vec::new(),
        }
    }

    /// The webhook as a job's status shows it to any reader of the API: its URL's scheme, host and port alone
    /// ([`shown_url`]: a receiver's token travels in the path, query or userinfo), since any token may read any
    /// job's status.
    pub fn shown(mut self) -> Self {
        self.url = shown_url(&self.url);
        self
    }

    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.events.contains(&event)
    }

    /// Records a dead letter (once per delivery id), keeping the newest [`MAX_DEAD_LETTERS`].
    pub fn dead_lettered(&mut self, letter: WebhookDeadLetter) -> bool {
        if self.dead_letters.iter().any(|d| d.id == letter.id) {
            return false;
        }
        self.dead_letters.push(letter);
        let excess = self.dead_letters.len().saturating_sub(MAX_DEAD_LETTERS);
        self.dead_letters.drain(..excess);
        true
    }
}

/// A delivery given up on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDeadLetter {
    /// Its `webhook-id`.
    pub id: String,
    pub event: WebhookEvent,
    pub attempts: u32,
    /// When the event was queued for delivery, and the last attempt (ms since the Unix epoch).
    pub queued_at: u64,
    pub last_attempt_at: u64,
    /// What the last attempt got: the receiver's status and the start of its answer, or why there was none.
    pub last_error: String,
}

/// The JSON body of a delivery: `{"id", "type", "timestamp", "job_id", "event", "data"}`, where `event`
/// and `data` are the job's event as `GET /v1/jobs/{id}/events` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookBody {
    /// The idempotency key, as in the `webhook-id` header.
    pub id: String,
    /// `job.started`, `job.progress`, `job.completed`, `job.failed` or `job.cancelled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened (RFC 3339).
    pub timestamp: String,
    pub job_id: Uuid,
    #[serde(flatten)]
    pub event: ApiEvent,
}

/// A signing secret: `whsec_` and base64 (the Standard Webhooks form), or any other text of at least
/// [`MIN_SECRET_BYTES`], used as its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

/// The shortest secret key, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl std::str::FromStr for WebhookSecret {
    type Err = String;

    /// The error never shows the secret.
    fn from_str(text: &str) -> Result<Self, String> {
        use base64::Engine;
        let text = text.trim();
        let key = match text.strip_prefix("whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                // Not the decoder's words: they quote the offending byte and where it is.
                .map_err(|_| "a whsec_ secret must be standard base64 after its prefix".to_string())?,
            None => text.as_bytes().to_vec(),
        };
        if key.len() < MIN_SECRET_BYTES {
            return Err(format!("a webhook secret is {} bytes; use at least {MIN_SECRET_BYTES}", key.len()));
        }
        Ok(Self(key))
    }
}

impl WebhookSecret {
    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        use base64::Engine;
        use hmac::Mac;
        let mac = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac))
    }

    fn mac(&self, id: &str, timestamp: u64, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&self.0).expect("any key length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header of a delivery signed with every one of `secrets`.
    pub fn header(secrets: &[WebhookSecret], id: &str, timestamp: u64, body: &[u8]) -> String {
        secrets.iter().map(|s| s.sign(id, timestamp, body)).collect::<Vec<_>>().join(" ")
    }

    /// Whether a delivery's headers carry a valid signature by this secret (compared in constant time), with a
    /// timestamp within `tolerance_s` of `now_s` (what a receiver checks against replays).
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now_s: u64,
        tolerance_s: u64,
    ) -> Result<(), String> {
        use base64::Engine;
        use hmac::Mac;
        let at: u64 = timestamp.trim().parse().map_err(|_| format!("{timestamp:?} is not a timestamp"))?;
        if at.abs_diff(now_s) > tolerance_s {
            return Err(format!("the timestamp {at} is more than {tolerance_s} s from now ({now_s})"));
        }
        for entry in signatures.split_whitespace() {
            let Some(b64) = entry.strip_prefix("v1,") else { continue };
            let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(b64) else { continue };
            if self.mac(id, at, body).verify_slice(&tag).is_ok() {
                return Ok(());
            }
        }
        Err("no v1 signature matches".into())
    }
}

/// `url` as its scheme, host and port alone, `/…` standing for any path, query or fragment (Slack's and
/// Discord's webhook URLs carry their token in the path; others in the query or the userinfo, which goes
/// too); what does not parse (no record the queen wrote) is hidden.
pub fn shown_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let origin = u.origin().ascii_serialization();
            let more = u.path() != "/" || u.query().is_some() || u.fragment().is_some();
            format!("{origin}/{}", if more { "…" } else { "" })
        }
        Err(_) => "(hidden)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_vector_and_verify() {
        // The test vector of the Standard Webhooks libraries.
        let secret: WebhookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let (id, at, body) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        let sig = secret.sign(id, at, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let other: WebhookSecret = "another-secret-of-enough-bytes".parse().unwrap();
        let header = WebhookSecret::header(&[other.clone(), secret.clone()], id, at, body);
        assert!(secret.verify(id, "1614265330", &header, body, at + 10, 300).is_ok(), "any entry may match");
        assert!(other.verify(id, "1614265330", &header, body, at, 300).is_ok());
        assert!(secret.verify(id, "1614265330", &header, b"{}", at, 300).is_err(), "another body");
        assert!(secret.verify("msg_other", "1614265330", &header, body, at, 300).is_err(), "another id");
        assert!(secret.verify(id, "1614265331", &header, body, at, 300).is_err(), "another timestamp");
        assert!(secret.verify(id, "1614265330", &header, body, at + 301, 300).is_err(), "too old");
        assert!("short".parse::<WebhookSecret>().unwrap_err().contains("at least 16"));
        assert!("whsec_!!".parse::<WebhookSecret>().is_err());
        // The error says nothing of the secret: not which byte is wrong, nor where.
        let err = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZ!".parse::<WebhookSecret>().unwrap_err();
        assert!(!err.contains("33") && !err.contains("23") && !err.contains("symbol"), "{err}");
        assert_eq!(format!("{secret:?}"), "WebhookSecret(..)", "never printed");
    }

    #[test]
    fn a_spec_needs_an_http_url_and_an_event() {
        let mut spec: WebhookSpec = serde_json::from_str(r#"{"url": "https://hooks.example.com/x"}"#).unwrap();
        assert_eq!(spec.events, terminal_events(), "terminal events by default");
        assert!(spec.normalize().is_ok());
        for (url, field) in [
            ("ftp://example.com/x", "webhook.url"),
            ("not a url", "webhook.url"),
            ("http://", "webhook.url"),
            ("file:///etc/passwd", "webhook.url"),
        ] {
            let err = WebhookSpec::new(url, &[WebhookEvent::Completed]).normalize().unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{url}: {}", err.message);
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_BYTES));
        assert!(WebhookSpec::new(long, &[WebhookEvent::Completed]).normalize().is_err());
        let err = WebhookSpec::new("https://example.com", &[]).normalize().unwrap_err();
        assert_eq!(err.field.as_deref(), Some("webhook.events"));
        let mut twice = WebhookSpec::new("https://example.com", &[WebhookEvent::Failed, WebhookEvent::Failed]);
        twice.normalize().unwrap();
        assert_eq!(twice.events, [WebhookEvent::Failed]);
        assert!(serde_json::from_str::<WebhookSpec>(r#"{"url": "https://e.com", "secret": "x"}"#).is_err());
    }

    #[test]
    fn a_body_carries_the_event_as_the_event_stream_shows_it() {
        let job_id = Uuid::nil();
        let event = ApiEvent::Cancelled { job_id, at: 5, at_step: Some(3) };
        let body = WebhookBody {
            id: "k".into(),
            kind: WebhookEvent::Cancelled.type_name(),
            timestamp: "1970-01-01T00:00:00.005Z".into(),
            job_id,
            event: event.clone(),
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!((json["type"].as_str(), json["event"].as_str()), (Some("job.cancelled"), Some("cancelled")));
        assert_eq!(json["data"], event.data());
        assert_eq!(serde_json::from_value::<WebhookBody>(json).unwrap(), body);
    }

    #[test]
    fn dead_letters_are_kept_once_and_bounded() {
        let mut info = WebhookInfo::new(&WebhookSpec::new("https://e.com", &[WebhookEvent::Completed]));
        let letter = |i: usize| WebhookDeadLetter {
            id: format!("d{i}"),
            event: WebhookEvent::Progress,
            attempts: 3,
            queued_at: 1,
            last_attempt_at: 2,
            last_error: "503".into(),
        };
        assert!(info.dead_lettered(letter(0)));
        assert!(!info.dead_lettered(letter(0)), "the same delivery once");
        for i in 1..=MAX_DEAD_LETTERS {
            info.dead_lettered(letter(i));
        }
        assert_eq!(info.dead_letters.len(), MAX_DEAD_LETTERS);
        assert_eq!(info.dead_letters[0].id, "d1", "the oldest dropped");
    }

    #[test]
    fn a_shown_webhook_url_is_its_origin_alone() {
        assert_eq!(
            shown_url("https://user:pa55@hooks.example:8443/in/x?token=S3CRET#frag"),
            "https://hooks.example:8443/…"
        );
        assert_eq!(shown_url("https://hooks.slack.com/services/T0/B0/S3CRET"), "https://hooks.slack.com/…");
        assert_eq!(shown_url("https://hooks.example"), "https://hooks.example/");
        assert_eq!(shown_url("http://[::1]:80/"), "http://[::1]/");
        assert_eq!(shown_url("not a url"), "(hidden)");
    }
}
