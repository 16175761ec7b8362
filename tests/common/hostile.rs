//! Helpers of the hostile-input tests (`tests/hostile/`): raw publishes, what the streams hold, images
//! built to a size (or to be a bomb), and an `sd-rbee queen` child process whose memory can be read.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event};
use uuid::Uuid;

use super::servers::{free_port, http_with};

/// Publishes raw bytes on `sd.jobs.<model>` as any client could, with a fresh `Nats-Msg-Id`.
pub async fn publish_raw(client: &BusClient, model: &str, payload: Vec<u8>, msg_id: &str) {
    let headers = sd_rbee::bus::msg_id_headers(msg_id);
    let subject = format!("sd.jobs.{model}");
    let ack = client.jetstream().publish_with_headers(subject, headers, payload.into()).await.unwrap();
    ack.await.unwrap();
}

/// A valid PNG of exactly `size` bytes (a small image, padded with a private ancillary chunk).
pub fn png_of_size(size: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128]));
    let mut base = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut base), image::ImageFormat::Png).unwrap();
    // IEND is the last 12 bytes; a chunk is length (4) + type (4) + data + CRC (4).
    let data_len = size.checked_sub(base.len() + 12).expect("size is larger than the base image");
    let (head, iend) = base.split_at(base.len() - 12);
    let mut chunk = Vec::with_capacity(data_len + 12);
    chunk.extend_from_slice(&(data_len as u32).to_be_bytes());
    chunk.extend_from_slice(b"prVt");
    chunk.extend(std::iter::repeat_n(b'x', data_len));
    let crc = crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    let out = [head, &chunk, iend].concat();
    assert_eq!(out.len(), size);
    out
}

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A 16-bit RGBA PNG of `side`×`side` zeros, written row by row: about 8 bytes per pixel once decoded, a
/// few hundred KB encoded.
pub fn png_bomb(side: u32) -> Vec<u8> {
    // The stream writer needs a 'static sink: a shared buffer, read back when it is done.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let mut encoder = png::Encoder::new(sink.clone(), side, side);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Sixteen);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().unwrap().into_stream_writer().unwrap();
    let row = vec![0u8; side as usize * 8];
    for _ in 0..side {
        std::io::Write::write_all(&mut writer, &row).unwrap();
    }
    writer.finish().unwrap();
    let bytes = sink.0.lock().unwrap().clone();
    bytes
}

/// Waits until the work queue is empty; returns how long that took.
pub async fn wait_for_empty_queue(client: &BusClient, limit: Duration) -> Duration {
    let mut jobs = client.jetstream().get_stream(client.subjects().jobs_stream()).await.unwrap();
    let start = Instant::now();
    loop {
        let left = jobs.info().await.unwrap().state.messages;
        if left == 0 {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{left} jobs are still in the work queue after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The dead-letter stream's messages.
pub async fn dead_letters(client: &BusClient) -> Vec<jetstream::Message> {
    let stream = client.jetstream().get_stream(client.subjects().dlq_stream()).await.unwrap();
    let all = client.subjects().dead_letter_wildcard();
    sd_rbee::bus::stored_messages(&stream, all, jetstream::consumer::DeliverPolicy::All).await.unwrap()
}

pub fn header(m: &jetstream::Message, name: &str) -> Option<String> {
    m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.to_string())
}

/// Every event in the events stream, by job.
pub async fn all_events(client: &BusClient) -> HashMap<Uuid, Vec<Event>> {
    let stream = client.jetstream().get_stream(client.subjects().events_stream()).await.unwrap();
    let all = client.subjects().events_wildcard();
    let messages = sd_rbee::bus::stored_messages(&stream, all, jetstream::consumer::DeliverPolicy::All).await.unwrap();
    let mut out: HashMap<Uuid, Vec<Event>> = HashMap::new();
    for m in messages {
        let event = protocol::decode_event(&m.payload).expect("workers publish readable events");
        out.entry(event.job_id()).or_default().push(event);
    }
    out
}

pub fn failure(events: &[Event]) -> Option<&protocol::Failed> {
    events.iter().find_map(|e| if let Event::Failed(f) = e { Some(f) } else { None })
}

pub async fn wait_for_terminal(client: &BusClient, job_id: Uuid, limit: Duration) -> Vec<Event> {
    let mut seen = Vec::new();
    client
        .wait(job_id, limit, |e| seen.push(e.clone()))
        .await
        .unwrap_or_else(|e| panic!("job {job_id} did not end within {limit:?}: {e:#}: {seen:?}"));
    seen
}

/// An `sd-rbee queen` child process without authentication (memory is measured on it).
pub struct QueenChild {
    pub child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl QueenChild {
    pub fn start(nats: &str, store: &str, env: &[(String, String)]) -> Self {
        Self::start_with(nats, store, env, &[])
    }

    /// [`Self::start`] with more flags.
    pub fn start_with(nats: &str, store: &str, env: &[(String, String)], extra: &[&str]) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(["queen", "--nats", nats, "--store", store, "--no-auth", "--accept-unserved-models"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .env_remove("SD_RBEE_API_TOKENS")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let queen = Self { child, port, log };
        let start = Instant::now();
        while !matches!(http_with("GET", port, "/health", &[], b""), Ok((200, _))) {
            assert!(start.elapsed() < Duration::from_secs(30), "queen not up:\n{}", queen.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        queen
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value, Vec<u8>) {
        let (status, bytes) = http_with(method, self.port, path, &["Content-Type: application/json"], body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log_text()));
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null), bytes)
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for QueenChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An error answer carries the documented JSON body.
pub fn assert_error_body(status: u16, json: &serde_json::Value, raw: &[u8], what: &str) {
    let code = json["error"]["code"].as_str();
    let message = json["error"]["message"].as_str();
    assert!(
        code.is_some_and(|c| !c.is_empty()) && message.is_some_and(|m| !m.is_empty()),
        "{what}: {status} without the JSON error body: {}",
        String::from_utf8_lossy(&raw[..raw.len().min(300)])
    );
}
