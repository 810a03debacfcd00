//! The header the relay writes at the start of every data stream it opens to an agent, and the
//! agent's answer.
//!
//! The header is one frame of type [`crate::message::kind::STREAM_HEADER`]; the visitor's raw
//! bytes follow it directly. The agent answers a header naming one of its tunnels at once with a
//! [`StreamAccept`] frame, before its target's bytes and whether or not the visitor has sent any:
//! a multiplexer such as yamux acknowledges a stream only with the first frame its receiver
//! sends, and caps the streams awaiting acknowledgement (256), so streams nobody writes on would
//! otherwise stall every later visitor of the session. [`AcceptReader`] takes that frame off the
//! front of what the relay reads.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::frame::{
    DecodeError, FrameHeader, HEADER_LEN, Reader, Writer, split_frame, write_frame,
};
use crate::message::{Protocol, kind};
use crate::names::TunnelId;

/// Which tunnel a data stream belongs to and who is on the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The tunnel this visitor connection was routed to.
    pub tunnel: TunnelId,
    /// The visitor's address as the relay saw it.
    pub visitor: SocketAddr,
    /// The tunnel's protocol.
    pub protocol: Protocol,
}

impl StreamHeader {
    /// Appends the header frame.
    pub fn encode(&self, dst: &mut Vec<u8>) {
        write_frame(dst, kind::STREAM_HEADER, |b| {
            b.put_u32(self.tunnel.0);
            b.socket_addr(self.visitor);
            b.put_u8(self.protocol.code());
        });
    }

    /// Decodes the header from the front of `src`, returning it and the bytes used.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let (header, mut p, used) = split_frame(src)?;
        if header.kind != kind::STREAM_HEADER {
            return Err(DecodeError::Malformed("stream header type"));
        }
        let p = &mut p;
        let tunnel = TunnelId(p.u32_("tunnel id")?);
        let visitor = p.socket_addr("visitor address")?;
        let protocol = Protocol::from_code(p.u8_("protocol")?)?;
        Ok((Self { tunnel, visitor, protocol }, used))
    }
}

/// The agent's answer to a data stream's header: "this stream is mine, bytes may flow". One frame
/// of type [`kind::STREAM_ACCEPT`] with an empty payload (a later version may append fields; a
/// reader skips them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAccept;

impl StreamAccept {
    /// The encoded frame.
    pub const BYTES: [u8; HEADER_LEN] = {
        let k = kind::STREAM_ACCEPT.to_be_bytes();
        [k[0], k[1], 0, 0, 0, 0]
    };
}

/// Takes the agent's [`StreamAccept`] frame off the front of the bytes a relay reads from a data
/// stream, fed in whatever pieces they arrive in.
#[derive(Debug, Clone, Default)]
pub struct AcceptReader {
    head: [u8; HEADER_LEN],
    have: usize,
    skip: usize,
    done: bool,
}

impl AcceptReader {
    /// A reader that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the whole frame has been read; every later byte is the agent's raw data.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Consumes the frame's bytes from the front of `src` and returns how many it used (all of
    /// `src` while the frame is incomplete, none once [`Self::done`]). Anything but a
    /// `StreamAccept` frame first is an error: the stream cannot be trusted and must be reset.
    pub fn feed(&mut self, src: &[u8]) -> Result<usize, DecodeError> {
        let mut used = 0;
        if self.done {
            return Ok(0);
        }
        if self.have < HEADER_LEN {
            let n = (HEADER_LEN - self.have).min(src.len());
            self.head[self.have..self.have + n].copy_from_slice(&src[..n]);
            self.have += n;
            used += n;
            if self.have < HEADER_LEN {
                return Ok(used);
            }
            let header = FrameHeader::peek(&self.head)?;
            if header.kind != kind::STREAM_ACCEPT {
                return Err(DecodeError::Malformed("data stream answer (expected StreamAccept)"));
            }
            self.skip = header.len;
        }
        let n = self.skip.min(src.len() - used);
        self.skip -= n;
        used += n;
        self.done = self.skip == 0;
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_is_taken_off_in_any_pieces() {
        let mut wire = StreamAccept::BYTES.to_vec();
        wire.extend_from_slice(b"payload");
        for cut in 0..=wire.len() {
            let mut r = AcceptReader::new();
            let (a, b) = wire.split_at(cut);
            let used_a = r.feed(a).expect("first piece");
            let used_b = r.feed(b).expect("second piece");
            assert!(r.done(), "cut at {cut}");
            assert_eq!(used_a + used_b, HEADER_LEN, "cut at {cut}");
        }
    }

    #[test]
    fn accept_with_appended_fields_is_skipped_whole() {
        let mut wire = Vec::new();
        write_frame(&mut wire, kind::STREAM_ACCEPT, |b| b.extend_from_slice(&[7; 5]));
        wire.extend_from_slice(b"raw");
        let mut r = AcceptReader::new();
        let mut used = 0;
        for byte in wire.chunks(1) {
            used += r.feed(byte).expect("valid");
            if r.done() {
                break;
            }
        }
        assert_eq!(used, HEADER_LEN + 5);
    }

    #[test]
    fn anything_else_first_is_refused() {
        let mut r = AcceptReader::new();
        assert!(r.feed(b"HTTP/1.1 200 OK\r\n").is_err());
        let mut r = AcceptReader::new();
        let mut huge = kind::STREAM_ACCEPT.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(r.feed(&huge), Err(DecodeError::TooLong(_))));
    }
}
