//! Serde helpers of the wire types: UUIDs as strings, and the defaults of the fields a message may leave out.

use crate::vocab::{DEFAULT_MASK_BLUR, DEFAULT_NUM_IMAGES};

/// UUIDs as canonical hyphenated strings on the wire, whatever the format's human-readability (rmp-serde
/// would otherwise write 16 raw bytes). Decoding also accepts 16 raw bytes.
pub(super) mod uuid_str {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use uuid::Uuid;

    use crate::protocol::error::quoted;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        struct UuidVisitor;
        impl Visitor<'_> for UuidVisitor {
            type Value = Uuid;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a UUID string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Uuid, E> {
                Uuid::parse_str(v).map_err(|e| E::custom(format!("invalid UUID {}: {e}", quoted(v))))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Uuid, E> {
                match std::str::from_utf8(v) {
                    Ok(s) if v.len() != 16 => self.visit_str(s),
                    _ => Uuid::from_slice(v).map_err(|e| E::custom(format!("invalid UUID bytes: {e}"))),
                }
            }
        }
        d.deserialize_str(UuidVisitor)
    }
}

pub(super) fn default_num_images() -> u32 {
    DEFAULT_NUM_IMAGES
}

pub(super) fn default_mask_blur() -> u32 {
    DEFAULT_MASK_BLUR
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) fn is_true(v: &bool) -> bool {
    *v
}

pub(super) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
