//! UDP tunnels: how visitor packets travel between relay and agent.
//!
//! Over QUIC each packet is one QUIC datagram: `u32 tunnel id | u32 flow id | payload`. The relay
//! numbers flows (one per visitor address and tunnel); the agent keeps one socket to the target
//! per flow, so replies find their visitor. Over the TCP transport (TLS + yamux), which has no
//! datagrams, the relay opens one data stream per flow (its header names the visitor) and the
//! packets follow as `u16 length | payload` records in both directions.

use bytes::{Buf, BufMut};

use crate::names::TunnelId;

/// Bytes in front of the payload of a QUIC datagram.
pub const DATAGRAM_HEADER_LEN: usize = 8;

/// Largest packet a stream record can carry (and the largest UDP payload there is).
pub const MAX_PACKET: usize = u16::MAX as usize;

/// The header of one tunnelled datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatagramHeader {
    /// The UDP tunnel.
    pub tunnel: TunnelId,
    /// The visitor flow within the tunnel, numbered by the relay.
    pub flow: u32,
}

impl DatagramHeader {
    /// Appends the header; the payload follows it.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u32(self.tunnel.0);
        dst.put_u32(self.flow);
    }

    /// Splits a received datagram into header and payload; `None` when it is too short.
    pub fn decode(src: &[u8]) -> Option<(Self, &[u8])> {
        if src.len() < DATAGRAM_HEADER_LEN {
            return None;
        }
        let mut b = &src[..DATAGRAM_HEADER_LEN];
        let tunnel = TunnelId(b.get_u32());
        let flow = b.get_u32();
        Some((Self { tunnel, flow }, &src[DATAGRAM_HEADER_LEN..]))
    }
}

/// Appends one stream record: the packet's length, then the packet. Packets longer than
/// [`MAX_PACKET`] cannot exist in UDP; they are refused.
pub fn encode_record(packet: &[u8], dst: &mut Vec<u8>) -> bool {
    let Ok(len) = u16::try_from(packet.len()) else { return false };
    dst.put_u16(len);
    dst.put_slice(packet);
    true
}

/// The first complete record of `src`: the packet and the bytes used, or `None` if incomplete.
pub fn decode_record(src: &[u8]) -> Option<(&[u8], usize)> {
    let len = usize::from(u16::from_be_bytes([*src.first()?, *src.get(1)?]));
    let packet = src.get(2..2 + len)?;
    Some((packet, 2 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_round_trip() {
        let mut buf = Vec::new();
        let h = DatagramHeader { tunnel: TunnelId(7), flow: 0xdead_beef };
        h.encode(&mut buf);
        buf.extend_from_slice(b"payload");
        assert_eq!(DatagramHeader::decode(&buf), Some((h, &b"payload"[..])));
        assert_eq!(DatagramHeader::decode(&buf[..7]), None);
        assert_eq!(DatagramHeader::decode(&buf[..8]), Some((h, &b""[..])));
    }

    #[test]
    fn records() {
        let mut buf = Vec::new();
        assert!(encode_record(b"abc", &mut buf));
        assert!(encode_record(b"", &mut buf));
        assert!(!encode_record(&vec![0; MAX_PACKET + 1], &mut buf));
        assert_eq!(decode_record(&buf), Some((&b"abc"[..], 5)));
        assert_eq!(decode_record(&buf[5..]), Some((&b""[..], 2)));
        for cut in 0..5 {
            assert_eq!(decode_record(&buf[..cut]), None);
        }
    }
}
