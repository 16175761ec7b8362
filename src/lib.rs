//! sd-rbee: Stable Diffusion as a service. Workers pull jobs from NATS JetStream, generate with Candle and
//! store results in object storage; the queen publishes jobs, follows them and serves the HTTP API.
//!
//! # Layout
//!
//! Shared vocabulary and wire formats, used by everything above them, from the `sd-rbee-contract` crate
//! (`crates/contract`: no I/O, no async, so it also builds to WebAssembly for the browser SDK):
//! - [`vocab`]: scheduler and spacing names, image formats, resize modes, job defaults;
//! - [`protocol`]: the bus protocol: messages, their rules, subjects, the codec, the object-key layout;
//! - [`api`]: the queen's HTTP contract, shared by the queen and its clients, with [`api::QueenClient`].
//!
//! Generation, with no I/O beyond reading weights:
//! - [`diffusion`]: models, schedulers, LoRA merging, single-file checkpoints, the pipeline;
//! - [`generation`]: from parameters (flags, a job) to a core request, and back to encoded images;
//! - [`image_input`]: untrusted input images, decoded within limits; [`device`]: where models run.
//!
//! Where things come from and go to:
//! - [`hub`]: model folders (local, the Hugging Face Hub, built-in short names) and Hub LoRAs;
//! - [`loras`]: the LoRA catalogue of a worker; [`storage`]: the object store behind one URL;
//! - [`bus`]: NATS and JetStream (streams, consumers, publishing) and [`bus::BusClient`].
//!
//! The services and the command line:
//! - [`worker`]: pulls jobs, batches the ones that can share UNet passes, generates, uploads, reports; its
//!   ack/retry policy is a pure function;
//! - [`queen`]: the control plane: HTTP handlers over a job service, status, fleet, metrics, the embedded web UI;
//! - [`shutdown`]: SIGINT/SIGTERM for both; [`http_server`]: their HTTP serving, with a timeout on request heads;
//! - [`cli`]: the `sd-rbee` command line (`main.rs` only calls it).

pub mod api;
pub use sd_rbee_contract::{protocol, vocab};
pub mod bus;
pub mod cli;
pub mod device;
pub mod diffusion;
pub mod generation;
pub mod http_server;
pub mod hub;
pub mod image_input;
pub mod loras;
pub mod queen;
pub mod shutdown;
pub mod storage;
pub mod worker;
