//! The integration tests, in one binary: one link instead of twenty-four, and the shared helpers (`common`)
//! compiled once. Each module is one area, run against the fixture models and, where it says so, real
//! servers (nats-server, moto, s3s-fs) and `sd-rbee` child processes that the tests start themselves.
//! Two suites stay binaries of their own: `batching_bus.rs` measures images per second and must not share
//! the cores with other tests, and `parity_blas.rs` runs `parity.rs` again with a vendor BLAS loaded into its
//! process.
//!
//! Run one area with `cargo test --test integration worker::` (or one test by name).

mod common;

/// Read by `parity`'s model loader: this binary runs the parity suite on the built-in matrix kernels.
const VENDOR_BLAS: bool = false;

mod api;
mod batching;
mod cache;
mod cli_generate;
mod compat;
mod deploy;
mod docs;
mod expiry;
mod hostile;
mod lora;
mod models;
mod parity;
mod pipeline;
mod priorities;
mod publish_confirm;
mod queen;
mod resume;
mod servers;
mod single_file;
mod tokens;
mod ui;
mod up;
mod vae_tiling;
mod webhooks;
mod worker;
