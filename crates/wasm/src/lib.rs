//! sd-rbee's contract as a WebAssembly module for browsers and Node (`ui/packages/wasm` wraps it for
//! TypeScript): a job submission checked by the queen's own code ([`check_submission`]), the queen's
//! default limits, and the error-code table. It has no JavaScript glue generator: every function takes and
//! returns UTF-8 JSON through the module's memory, so any host that can call a wasm export can use it.
//!
//! The calling convention: the host asks [`alloc`] for `len` bytes, writes its JSON there, calls the
//! function with `(ptr, len)` pairs, and gets back a `u64` holding the answer's pointer (high 32 bits) and
//! length (low 32 bits); it reads the answer and hands both buffers back with [`dealloc`].

use sd_rbee_contract::api::{check_submission, ApiErrorCode, ApiErrorDetail, LimitsView};
use sd_rbee_contract::protocol::Limits;
use serde_json::{json, Value};

/// `len` bytes for the host to write into.
#[no_mangle]
pub extern "C" fn alloc(len: usize) -> *mut u8 {
    let mut buffer = Vec::<u8>::with_capacity(len);
    let ptr = buffer.as_mut_ptr();
    std::mem::forget(buffer);
    ptr
}

/// Frees what [`alloc`] gave, or an answer.
///
/// # Safety
/// `ptr` and `len` must be those of one [`alloc`] or one answer, freed once.
#[no_mangle]
pub unsafe extern "C" fn dealloc(ptr: *mut u8, len: usize) {
    drop(Vec::from_raw_parts(ptr, 0, len));
}

/// The bytes the host wrote at `ptr`.
///
/// # Safety
/// `ptr` and `len` must be those of an [`alloc`] the host wrote.
unsafe fn input<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

/// `value` as JSON in a buffer the host frees, packed as `ptr << 32 | len`.
fn answer(value: &Value) -> u64 {
    // A boxed slice's capacity is its length, as `dealloc` rebuilds it.
    let bytes = value.to_string().into_bytes().into_boxed_slice();
    let len = bytes.len();
    let ptr = Box::into_raw(bytes) as *mut u8;
    ((ptr as usize as u64) << 32) | len as u64
}

fn error_json(e: &ApiErrorDetail) -> Value {
    json!({"ok": false, "status": e.code.status(), "error": e})
}

/// The answer to [`check`]: `{"ok": true, "job": {kind, width, height, steps, ...}}`, or `{"ok": false,
/// "status": 422, "error": {code, message, field}}` as the queen would answer.
pub fn check(body: &[u8], limits: &[u8]) -> Value {
    let limits: Limits = if limits.is_empty() {
        Limits::default()
    } else {
        match serde_json::from_slice::<LimitsOrView>(limits) {
            Ok(l) => l.into_limits(),
            Err(e) => {
                let detail = ApiErrorDetail {
                    code: ApiErrorCode::MalformedRequest,
                    message: format!("the limits are not the queen's limits JSON: {e}"),
                    field: Some("limits".into()),
                };
                return error_json(&detail);
            }
        }
    };
    // The queen gives a fresh id and the time; neither changes what is checked.
    match check_submission(body, &limits, uuid::Uuid::from_u128(1), 1) {
        Ok(job) => json!({"ok": true, "job": {
            "kind": job.kind, "model": job.model, "width": job.width, "height": job.height, "steps": job.steps,
            "num_images": job.num_images, "seed": job.seed, "loras": job.loras,
        }}),
        Err(e) => error_json(&e),
    }
}

/// `GET /v1/limits`'s answer, or the bare limits.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum LimitsOrView {
    View(Box<LimitsView>),
    Bare(Limits),
}

impl LimitsOrView {
    fn into_limits(self) -> Limits {
        match self {
            LimitsOrView::View(v) => v.limits,
            LimitsOrView::Bare(l) => l,
        }
    }
}

/// Checks a `POST /v1/jobs` body against limits (`GET /v1/limits`'s answer; empty: the queen's defaults).
///
/// # Safety
/// Both pairs must be [`alloc`]s the host wrote.
#[no_mangle]
pub unsafe extern "C" fn check_submission_json(
    body: *const u8,
    body_len: usize,
    limits: *const u8,
    limits_len: usize,
) -> u64 {
    answer(&check(input(body, body_len), input(limits, limits_len)))
}

/// The queen's default limits, as `GET /v1/limits` shows them.
#[no_mangle]
pub extern "C" fn default_limits_json() -> u64 {
    let view = LimitsView::new(Limits::default(), 16 * 1024 * 1024);
    answer(&serde_json::to_value(view).unwrap_or_default())
}

/// The error-code table: each code with its HTTP status.
#[no_mangle]
pub extern "C" fn error_codes_json() -> u64 {
    let known = ApiErrorCode::ALL.iter().filter(|&&c| c != ApiErrorCode::Other);
    let table: serde_json::Map<String, Value> = known.map(|c| (c.as_str().to_string(), json!(c.status()))).collect();
    answer(&Value::Object(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_say_what_the_queen_would() {
        let ok = check(br#"{"model": "tiny", "prompt": "a kite", "width": 64}"#, b"");
        assert_eq!((ok["ok"].as_bool(), ok["job"]["width"].as_u64()), (Some(true), Some(64)));
        let refused = check(br#"{"model": "tiny", "prompt": "a kite", "steps": 20}"#, br#"{"max_steps": 10}"#);
        assert_eq!((refused["status"].as_u64(), refused["error"]["field"].as_str()), (Some(422), Some("steps")));
        let bad = check(b"{", b"");
        assert_eq!(bad["error"]["code"], "MALFORMED_REQUEST");
    }
}
