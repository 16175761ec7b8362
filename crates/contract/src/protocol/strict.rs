//! Decoding exactly the shapes `docs/PROTOCOL.md` allows. Serde's derived decoders are lenient in ways a
//! MessagePack peer can reach: an enum also decodes from its variant's index (`resize_mode: 2`), a struct
//! from an array of its fields (`output: ["png"]`), and an unknown name is quoted back whole in the error.
//! These helpers accept names and maps only, and quote at most a short prefix.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, MapAccess, Visitor};

use super::error::quoted;

/// An enum that travels as one of a fixed set of names.
pub trait WireNames: DeserializeOwned {
    const NAMES: &'static [&'static str];
}

/// `#[serde(deserialize_with = "strict::by_name")]`: the variant's name, never its index.
pub fn by_name<'de, D: Deserializer<'de>, T: WireNames>(d: D) -> Result<T, D::Error> {
    struct NameVisitor<T>(PhantomData<T>);
    impl<T: WireNames> Visitor<'_> for NameVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "one of the names {}", T::NAMES.join(", "))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            if !T::NAMES.contains(&v) {
                return Err(E::custom(format!("{} is not one of: {}", quoted(v), T::NAMES.join(", "))));
            }
            T::deserialize(v.into_deserializer())
        }
    }
    d.deserialize_str(NameVisitor(PhantomData))
}

/// `#[serde(deserialize_with = "strict::map_only")]`: a struct from a map, never from an array.
pub fn map_only<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    struct MapVisitor<T>(PhantomData<T>);
    impl<'de, T: DeserializeOwned> Visitor<'de> for MapVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map with named fields")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(MapVisitor(PhantomData))
}

/// An image source is a map of exactly one key, `inline` (bin) or `object_key` (str).
impl<'de> serde::Deserialize<'de> for super::ImageSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SourceVisitor;
        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = super::ImageSource;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map with one key, inline or object_key")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("an empty map; expected inline or object_key"));
                };
                let source = match key.as_str() {
                    "inline" => super::ImageSource::Inline(map.next_value::<Bin>()?.0),
                    "object_key" => super::ImageSource::ObjectKey(map.next_value()?),
                    other => return Err(de::Error::custom(format!("{} is not inline or object_key", quoted(other)))),
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("more than one key; expected inline or object_key alone"));
                }
                Ok(source)
            }
        }
        d.deserialize_map(SourceVisitor)
    }
}

/// MessagePack `bin` only (serde_bytes would also take an array of numbers).
struct Bin(Vec<u8>);

impl<'de> serde::Deserialize<'de> for Bin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BinVisitor;
        impl Visitor<'_> for BinVisitor {
            type Value = Bin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("binary data (MessagePack bin)")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bin, E> {
                Ok(Bin(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bin, E> {
                Ok(Bin(v))
            }
        }
        d.deserialize_byte_buf(BinVisitor)
    }
}
