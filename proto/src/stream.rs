//! The header the relay writes at the start of every data stream it opens to an agent.
//!
//! It is one frame of type [`crate::message::kind::STREAM_HEADER`]; the visitor's raw bytes follow
//! it directly.

use std::net::SocketAddr;

use bytes::BufMut;

use crate::frame::{DecodeError, Reader, Writer, split_frame, write_frame};
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
