//! sd-rbee's wire contract: what crosses the bus and the HTTP API, and the rules both ends check. No I/O and
//! no async, so the queen, the workers, the CLI and the WebAssembly SDK (`ui/packages/wasm`) share one
//! definition of every message and rule.
//!
//! # Layout
//!
//! - [`vocab`]: scheduler and spacing names, image formats, resize modes, job defaults (imports nothing here);
//! - [`protocol`]: the bus protocol: messages, their rules ([`protocol::Limits`]), subjects, the codec, the
//!   object-key layout;
//! - [`api`]: the queen's HTTP contract: request and answer bodies, the error-code table, job events, and
//!   how a job's status record follows its events.

pub mod api;
pub mod protocol;
pub mod vocab;
