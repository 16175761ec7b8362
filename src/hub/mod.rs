//! Where a model comes from: a local diffusers pipeline folder, a built-in short name, or a
//! Hugging Face Hub repo (`owner/name[@revision]`).
//!
//! Hub models are fetched into the standard Hugging Face cache, laid out as the `hf-hub` crate lays it out
//! (`models--owner--name/snapshots/<commit>/...`, shared with Python's `huggingface_hub`), and
//! only the files a Candle Stable Diffusion pipeline needs are fetched: `model_index.json`, then
//! for each component it lists the config, the tokenizer files and the `.safetensors` weights
//! (the `.fp16.` variant when asked for and present, single-file or sharded), never `.bin`
//! files nor the safety checker. A snapshot folder is laid out exactly like a local pipeline folder, so the rest of
//! the program only ever sees a folder.
//!
//! Offline (`--offline` / `HF_HUB_OFFLINE=1`) nothing touches the network: the same files are
//! looked up in the cache, and a missing one is a clear error. The file selection is one
//! function ([`resolve_pipeline`](pipeline::resolve_pipeline)) fed by a `fetch(file)` closure, so the online and offline
//! paths differ only in that closure.
//!
//! # Layout
//!
//! - `registry`: the built-in short names and their generation defaults ([`RegistryEntry`]).
//! - `model_ref`: parsing a `--model` value ([`ModelRef`]) and validating repo ids and revisions.
//! - `options`: [`HubOptions`] from the environment (offline, cache folder, token).
//! - `resolve`: resolving a model to a pipeline folder ([`resolve()`]), once per process with [`Pins`].
//! - `pipeline`: which files of each pipeline component are fetched (pure over a `fetch(file)` closure).
//! - `cache`: one repo revision in the hf-hub cache (lookups, missing-file errors, offline resolution).
//! - `transfer`: the Hub's HTTP with every wait bounded: the repo info request, resumable downloads into the
//!   cache, the Hub's error answers in words.
//! - `online`: online resolution (downloads pinned to a commit; the cache standing in for an unreachable Hub).
//! - [`lora`]: LoRAs on the Hub; [`lora_cache`]: the disk they take, kept under a bound.
//! - `tests`: the tests, and the fake cache `lora`'s tests share; `mock_hub`: a local stand-in for the Hub.

pub mod lora;
pub mod lora_cache;

mod cache;
#[cfg(test)]
mod mock_hub;
mod model_ref;
mod online;
mod options;
mod pipeline;
mod registry;
mod resolve;
#[cfg(test)]
pub(crate) mod tests;
mod transfer;

pub use model_ref::{parse_model_ref, ModelRef};
pub use options::HubOptions;
pub use registry::{registry, registry_entry, RegistryEntry};
pub use resolve::{resolve, Pins, ResolvedModel};
