//! How many event streams each caller holds open, and the cap on it (`--max-streams-per-caller`). A stream
//! (`GET /v1/jobs/{id}/events`, or an OpenAI or A1111 request waiting for its job) holds a consumer of the
//! events stream in NATS for as long as it is open, so one token that opened thousands would weigh on the
//! whole fleet's bus. Without authentication there is no caller to tell apart, and no cap.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// The open streams, by caller.
#[derive(Clone, Default)]
pub struct OpenStreams(Arc<Mutex<HashMap<String, usize>>>);

/// One open stream of a caller; closing it (dropping the slot) frees its place.
pub struct StreamSlot {
    streams: OpenStreams,
    caller: String,
}

impl OpenStreams {
    /// A slot for one more stream of `caller`, unless it holds `max` already (then how many it holds).
    pub fn open(&self, caller: &str, max: usize) -> Result<StreamSlot, usize> {
        let mut open = self.0.lock();
        let held = open.entry(caller.to_string()).or_insert(0);
        if *held >= max {
            return Err(*held);
        }
        *held += 1;
        Ok(StreamSlot { streams: self.clone(), caller: caller.to_string() })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.0.lock();
        if let Some(held) = open.get_mut(&self.caller) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(streams: &OpenStreams, caller: &str) -> usize {
        streams.0.lock().get(caller).copied().unwrap_or(0)
    }

    #[test]
    fn a_caller_holds_at_most_its_share_and_a_closed_stream_frees_its_place() {
        let streams = OpenStreams::default();
        let first = streams.open("a", 2).unwrap();
        let _second = streams.open("a", 2).unwrap();
        assert_eq!(streams.open("a", 2).err(), Some(2));
        let _other = streams.open("b", 2).expect("another caller has its own share");
        drop(first);
        assert_eq!(held(&streams, "a"), 1);
        let _again = streams.open("a", 2).expect("a place was freed");
        assert_eq!(held(&streams, "a"), 2);
        assert!(streams.0.lock().len() == 2);
        drop((_again, _second, _other));
        assert!(streams.0.lock().is_empty(), "no caller is remembered once its streams are closed");
    }
}
