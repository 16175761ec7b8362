//! The queen's HTTP contract: the types, error codes and events of [`sd_rbee_contract::api`] (shared with the
//! WebAssembly SDK), and [`QueenClient`], the API as the CLI and the tests use it.

mod client;

pub use client::{QueenClient, SseMessage};
pub use sd_rbee_contract::api::*;
