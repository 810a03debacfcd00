//! The session preface: the agent's first bytes on the control stream.
//!
//! `b"WARREN"` then the lowest and highest protocol versions the agent speaks (`u16` each,
//! big-endian): 10 bytes. This layout and the `Error` frame are frozen across versions so that
//! any relay can tell any agent why they cannot talk.

use bytes::BufMut;

use crate::frame::DecodeError;

/// The magic bytes that open a session.
pub const MAGIC: &[u8; 6] = b"WARREN";

/// Bytes in a preface.
pub const PREFACE_LEN: usize = 10;

/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: u16 = 2;

/// The versions this crate can speak, lowest to highest.
pub const SUPPORTED_VERSIONS: std::ops::RangeInclusive<u16> = 2..=2;

/// The range of protocol versions a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preface {
    /// Lowest version spoken.
    pub min: u16,
    /// Highest version spoken.
    pub max: u16,
}

impl Preface {
    /// The preface of this implementation.
    pub fn ours() -> Self {
        Self { min: *SUPPORTED_VERSIONS.start(), max: *SUPPORTED_VERSIONS.end() }
    }

    /// Appends the preface.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_slice(MAGIC);
        dst.put_u16(self.min);
        dst.put_u16(self.max);
    }

    /// Decodes a preface from the front of `src`. Wrong magic is refused as soon as the first
    /// differing byte is seen, so a stray HTTP client is told off without waiting.
    pub fn decode(src: &[u8]) -> Result<Self, DecodeError> {
        let n = src.len().min(MAGIC.len());
        if src[..n] != MAGIC[..n] {
            return Err(DecodeError::BadMagic);
        }
        if src.len() < PREFACE_LEN {
            return Err(DecodeError::Incomplete);
        }
        let min = u16::from_be_bytes([src[6], src[7]]);
        let max = u16::from_be_bytes([src[8], src[9]]);
        if min > max {
            return Err(DecodeError::Malformed("preface version range"));
        }
        Ok(Self { min, max })
    }

    /// The highest version both this crate and the peer speak, if any.
    pub fn negotiate(&self) -> Option<u16> {
        let hi = self.max.min(*SUPPORTED_VERSIONS.end());
        let lo = self.min.max(*SUPPORTED_VERSIONS.start());
        (lo <= hi).then_some(hi)
    }
}

/// A sentence explaining a failed negotiation, for both sides' logs.
pub fn mismatch_message(peer: Preface) -> String {
    let (lo, hi) = (SUPPORTED_VERSIONS.start(), SUPPORTED_VERSIONS.end());
    let side = if peer.min > *hi { "newer" } else { "older" };
    format!(
        "protocol version mismatch: this relay speaks versions {lo}-{hi}, the agent speaks {}-{}; \
         the agent is {side} than the relay, so upgrade the {}",
        peer.min,
        peer.max,
        if side == "newer" { "relay" } else { "agent" }
    )
}
