//! The frame format and the primitive field codecs.
//!
//! A frame is `type: u16` then `length: u32` (both big-endian) then `length` bytes of payload.
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 6;

/// Largest payload a frame may carry. Larger frames are refused before any allocation.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Longest string field, in bytes.
pub const MAX_STR_LEN: usize = 4096;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer ends before the frame does: read more bytes and try again.
    #[error("need more bytes")]
    Incomplete,
    /// The frame announces more payload than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_LEN}")]
    TooLong(usize),
    /// The preface does not start with warren's magic bytes.
    #[error("not a warren peer (bad magic bytes)")]
    BadMagic,
    /// A field is malformed.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A name field breaks its rules.
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
}

impl DecodeError {
    /// True when more input could make decoding succeed.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete)
    }
}

/// A frame's header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub kind: u16,
    /// Payload length in bytes (already checked against [`MAX_FRAME_LEN`]).
    pub len: usize,
}

impl FrameHeader {
    /// Decodes a header from the first [`HEADER_LEN`] bytes of `src`, without consuming.
    pub fn peek(src: &[u8]) -> Result<Self, DecodeError> {
        if src.len() < HEADER_LEN {
            return Err(DecodeError::Incomplete);
        }
        let kind = u16::from_be_bytes([src[0], src[1]]);
        let len = u32::from_be_bytes([src[2], src[3], src[4], src[5]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLong(len));
        }
        Ok(Self { kind, len })
    }

    /// Encodes a header.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u16(self.kind);
        dst.put_u32(self.len as u32);
    }
}

/// Splits one complete frame off the front of `src`: its header, its payload, and the number of
/// bytes it occupied. `Incomplete` when `src` does not yet hold the whole frame.
pub fn split_frame(src: &[u8]) -> Result<(FrameHeader, &[u8], usize), DecodeError> {
    let header = FrameHeader::peek(src)?;
    let total = HEADER_LEN + header.len;
    if src.len() < total {
        return Err(DecodeError::Incomplete);
    }
    Ok((header, &src[HEADER_LEN..total], total))
}

/// Writes a frame of type `kind` whose payload is produced by `body`, patching the length in.
///
/// # Panics
/// If `body` writes more than [`MAX_FRAME_LEN`] bytes: every encoder in this crate bounds its
/// fields so that cannot happen for values built through their constructors.
pub fn write_frame(dst: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = dst.len();
    FrameHeader { kind, len: 0 }.encode(dst);
    body(dst);
    let len = dst.len() - start - HEADER_LEN;
    assert!(len <= MAX_FRAME_LEN, "encoder produced an oversized frame ({len} bytes)");
    dst[start + 2..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
}

/// Reading primitive fields out of a payload; every read is bounds-checked.
pub(crate) trait Reader: Buf {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.remaining() < n { Err(DecodeError::Malformed(what)) } else { Ok(()) }
    }
    fn u8_(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.get_u8())
    }
    fn u16_(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.get_u16())
    }
    fn u32_(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.get_u32())
    }
    fn u64_(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.get_u64())
    }
    fn bool_(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8_(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Malformed(what)),
        }
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u16_(what)? as usize;
        if len > MAX_STR_LEN {
            return Err(DecodeError::Malformed(what));
        }
        self.need(len, what)?;
        let mut bytes = vec![0; len];
        self.copy_to_slice(&mut bytes);
        String::from_utf8(bytes).map_err(|_| DecodeError::Malformed(what))
    }
    fn opt<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        if self.bool_(what)? { f(self).map(Some) } else { Ok(None) }
    }
    fn socket_addr(&mut self, what: &'static str) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8_(what)? {
            4 => {
                self.need(4, what)?;
                IpAddr::V4(Ipv4Addr::from(self.get_u32()))
            }
            6 => {
                self.need(16, what)?;
                IpAddr::V6(Ipv6Addr::from(self.get_u128()))
            }
            _ => return Err(DecodeError::Malformed(what)),
        };
        Ok(SocketAddr::new(ip, self.u16_(what)?))
    }
}

impl<B: Buf + ?Sized> Reader for B {}

/// Writing primitive fields.
pub(crate) trait Writer: BufMut {
    fn string(&mut self, s: &str) {
        let s = truncate(s, MAX_STR_LEN);
        self.put_u16(s.len() as u16);
        self.put_slice(s.as_bytes());
    }
    fn bool_(&mut self, b: bool) {
        self.put_u8(u8::from(b));
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        self.bool_(v.is_some());
        if let Some(v) = v {
            f(self, v);
        }
    }
    fn socket_addr(&mut self, a: SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.put_u8(4);
                self.put_u32(ip.into());
            }
            IpAddr::V6(ip) => {
                self.put_u8(6);
                self.put_u128(ip.into());
            }
        }
        self.put_u16(a.port());
    }
}

impl<B: BufMut + ?Sized> Writer for B {}

/// The longest prefix of `s` that fits in `max` bytes and ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_length_is_refused_before_payload_arrives() {
        let mut buf = Vec::new();
        FrameHeader { kind: 1, len: 0 }.encode(&mut buf);
        buf[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(split_frame(&buf), Err(DecodeError::TooLong(u32::MAX as usize)));
    }

    #[test]
    fn partial_frames_are_incomplete() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 9, |b| b.extend_from_slice(b"hello"));
        for cut in 0..buf.len() {
            assert_eq!(split_frame(&buf[..cut]), Err(DecodeError::Incomplete), "cut at {cut}");
        }
        let (h, payload, used) = split_frame(&buf).unwrap();
        assert_eq!((h.kind, payload, used), (9, &b"hello"[..], buf.len()));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
