//! The one module that knows how records are laid out on disk, so the encoding can be
//! swapped (bincode 2.0.1 is flagged unmaintained; 3.0.0 is an empty placeholder).
//!
//! A stored value is `[schema version: u16 BE][crc32 of payload: u32 BE][payload]`, the
//! payload being bincode 2 (standard config) of the record's serde form. A record of a
//! version this build does not know, with a bad checksum, or that does not decode
//! exactly, is an error: never skipped, never rewritten.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The record layout this build writes and reads. Bump it whenever a stored type changes
/// shape; `tests::encoding_is_stable` fails when the bytes of a fixed record change.
pub const SCHEMA_VERSION: u16 = 1;

const HEADER: usize = 6;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record is {0} bytes, shorter than its 6-byte header")]
    Truncated(usize),
    #[error("record has schema version {found}; this build reads version {SCHEMA_VERSION}")]
    UnknownVersion { found: u16 },
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record does not decode: {0}")]
    Malformed(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let payload =
        bincode::serde::encode_to_vec(value, config()).expect("in-memory records always encode");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&SCHEMA_VERSION.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks a stored value's header and checksum without decoding its payload.
pub fn check(bytes: &[u8]) -> Result<(), CodecError> {
    payload(bytes).map(|_| ())
}

fn payload(bytes: &[u8]) -> Result<&[u8], CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Truncated(bytes.len()));
    }
    let found = u16::from_be_bytes([bytes[0], bytes[1]]);
    if found != SCHEMA_VERSION {
        return Err(CodecError::UnknownVersion { found });
    }
    let stored = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    let payload = &bytes[HEADER..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok(payload)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let payload = payload(bytes)?;
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes",
            payload.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct R {
        a: u64,
        b: String,
        c: Option<f64>,
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let r = R {
            a: 7,
            b: "x".into(),
            c: Some(1.5),
        };
        let bytes = encode(&r);
        assert_eq!(decode::<R>(&bytes).unwrap(), r);

        let mut future = bytes.clone();
        future[1] = 9;
        assert_eq!(
            decode::<R>(&future),
            Err(CodecError::UnknownVersion { found: 9 })
        );

        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 0xff;
        assert!(matches!(
            decode::<R>(&flipped),
            Err(CodecError::Checksum { .. })
        ));

        assert_eq!(decode::<R>(&bytes[..3]), Err(CodecError::Truncated(3)));
    }

    #[test]
    fn encoding_is_stable() {
        // If this fails, the stored layout changed: bump SCHEMA_VERSION (and write a
        // migration) before updating the expected bytes.
        let bytes = encode(&R {
            a: 300,
            b: "hi".into(),
            c: None,
        });
        assert_eq!(
            bytes,
            [
                0, 1, 0xee, 0xe9, 0xdf, 0x5d, 0xfb, 0x2c, 0x01, 2, b'h', b'i', 0
            ]
        );
    }
}
