//! The HAProxy PROXY protocol, versions 1 (text) and 2 (binary), sans-IO.
//!
//! A proxy that forwards a TCP connection can write one PROXY header before the client's bytes so
//! that the receiver learns the client's address. [`encode`] writes such a header; [`parse`] reads
//! one from the front of a buffer and says how many bytes it used, or that more bytes are needed,
//! or that the bytes are not a PROXY header at all. The specification is
//! <https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt>.
//!
//! Not here: reading from or writing to sockets, deciding whether a peer is trusted to send a
//! header, decoding v2 TLVs (they are skipped), and UNIX socket addresses (reported as no
//! address). IPv6 flow labels and scope ids are not carried by the protocol, so they are dropped.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest v1 header, in bytes, including the final CRLF.
pub const MAX_V1_LEN: usize = 107;

/// Cap on the variable part (addresses and TLVs) of a v2 header. Longer headers are refused as
/// soon as their length field is read, before waiting for their bytes.
pub const MAX_V2_LEN: usize = 4096;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Bytes in the fixed part of a v2 header: signature, version and command, family and
/// transport, length.
const V2_FIXED_LEN: usize = 16;

/// v2 version and command byte: version 2, command LOCAL.
const V2_LOCAL: u8 = 0x20;
/// v2 version and command byte: version 2, command PROXY.
const V2_PROXY: u8 = 0x21;

/// v2 family and transport bytes.
mod family {
    pub(super) const UNSPEC: u8 = 0x00;
    pub(super) const TCP4: u8 = 0x11;
    pub(super) const UDP4: u8 = 0x12;
    pub(super) const TCP6: u8 = 0x21;
    pub(super) const UDP6: u8 = 0x22;
    pub(super) const UNIX_STREAM: u8 = 0x31;
    pub(super) const UNIX_DGRAM: u8 = 0x32;
}

/// Bytes of a v2 address block for each family.
const INET_BLOCK: usize = 12;
const INET6_BLOCK: usize = 36;
const UNIX_BLOCK: usize = 216;

/// PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// Version 1: one human-readable line ending in CRLF.
    V1,
    /// Version 2: a binary header with a 12-byte signature.
    V2,
}

impl FromStr for ProxyVersion {
    type Err = String;

    /// Accepts `"v1"` or `"1"`, and `"v2"` or `"2"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" | "1" => Ok(Self::V1),
            "v2" | "2" => Ok(Self::V2),
            _ => Err(format!(
                "unknown PROXY protocol version {s:?}: expected \"v1\" (or \"1\") or \"v2\" (or \"2\")"
            )),
        }
    }
}

impl fmt::Display for ProxyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// What the front of a buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to decide or to finish the header; read more and call again.
    Incomplete,
    /// The bytes do not start with a PROXY header (neither "PROXY " nor the v2 signature).
    Absent,
    /// A complete header of `len` bytes. `source`/`destination` are None for v1 "UNKNOWN", v2
    /// LOCAL, or v2 families other than INET/INET6 (UNIX, UNSPEC).
    Header {
        /// Which version the header was written in.
        version: ProxyVersion,
        /// The original client, as the proxy saw it.
        source: Option<SocketAddr>,
        /// The address the client connected to, as the proxy saw it.
        destination: Option<SocketAddr>,
        /// Bytes of the header, TLVs included; the proxied stream starts right after them.
        len: usize,
    },
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// A v1 header has no CRLF within [`MAX_V1_LEN`] bytes.
    #[error("PROXY v1 line has no CRLF within {MAX_V1_LEN} bytes")]
    V1TooLong,
    /// A v1 field is missing, malformed or does not match the announced protocol; names the
    /// field.
    #[error("malformed PROXY v1 {0}")]
    V1Field(&'static str),
    /// A v2 header carries a version other than 2 (the high nibble of byte 13).
    #[error("PROXY v2 header carries version {0}, expected 2")]
    V2Version(u8),
    /// A v2 command (the low nibble of byte 13) is neither LOCAL (0) nor PROXY (1).
    #[error("PROXY v2 command {0} is neither LOCAL (0) nor PROXY (1)")]
    V2Command(u8),
    /// A v2 family and transport byte is not one the specification defines.
    #[error("PROXY v2 family and transport byte {0:#04x} is not defined")]
    V2Family(u8),
    /// A v2 header announces a variable part longer than [`MAX_V2_LEN`].
    #[error("PROXY v2 header announces {0} bytes, more than the limit of {MAX_V2_LEN}")]
    V2TooLong(usize),
    /// A v2 header announces fewer bytes than its address family needs.
    #[error("PROXY v2 address block of {len} bytes is shorter than the {need} its family needs")]
    V2AddressTooShort {
        /// The length the header announces.
        len: usize,
        /// The length the family's addresses need.
        need: usize,
    },
}

/// Appends a PROXY header for a TCP connection from `source` to `destination`.
///
/// v1: "PROXY TCP4 ..." / "TCP6"; if the families differ, both are written as IPv6
/// (IPv4-mapped).
/// v2: signature, version 2 command PROXY, family INET/INET6 + STREAM, no TLVs; mixed families
/// are written as INET6 the same way.
pub fn encode(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
    out: &mut Vec<u8>,
) {
    let (sport, dport) = (source.port(), destination.port());
    match (version, same_family(source.ip(), destination.ip())) {
        (ProxyVersion::V1, Pair::V4(src, dst)) => {
            out.extend_from_slice(format!("PROXY TCP4 {src} {dst} {sport} {dport}\r\n").as_bytes());
        }
        (ProxyVersion::V1, Pair::V6(src, dst)) => {
            out.extend_from_slice(format!("PROXY TCP6 {src} {dst} {sport} {dport}\r\n").as_bytes());
        }
        (ProxyVersion::V2, Pair::V4(src, dst)) => {
            v2_header(out, family::TCP4, INET_BLOCK);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
        }
        (ProxyVersion::V2, Pair::V6(src, dst)) => {
            v2_header(out, family::TCP6, INET6_BLOCK);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
        }
    }
}

/// Parses a PROXY header at the front of `buf`.
///
/// Bytes after the header are not looked at. Errors are reported as early as the bytes allow:
/// a bad v2 version, command, family or length fails before the rest of the header arrives.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.starts_with(V1_PREFIX) {
        parse_v1(buf)
    } else if buf.starts_with(&V2_SIGNATURE) {
        parse_v2(buf)
    } else if V1_PREFIX.starts_with(buf) || V2_SIGNATURE.starts_with(buf) {
        Ok(Parsed::Incomplete)
    } else {
        Ok(Parsed::Absent)
    }
}

// ---- encoding helpers ----------------------------------------------------------------------

/// Two addresses of one family, as both header versions need them.
enum Pair {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// Brings two addresses to one family: IPv4 stays IPv4 only if both are.
fn same_family(a: IpAddr, b: IpAddr) -> Pair {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Pair::V4(a, b),
        (a, b) => Pair::V6(to_v6(a), to_v6(b)),
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

/// Appends the fixed part of a v2 PROXY-command header.
fn v2_header(out: &mut Vec<u8>, family: u8, block_len: usize) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_PROXY);
    out.push(family);
    // Only ever called with INET_BLOCK or INET6_BLOCK, both far below u16::MAX.
    out.extend_from_slice(&u16::try_from(block_len).unwrap_or(u16::MAX).to_be_bytes());
}

// ---- v1 ------------------------------------------------------------------------------------

/// Parses a v1 header; `buf` starts with "PROXY ".
fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = buf.get(..MAX_V1_LEN).unwrap_or(buf);
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = window.get(V1_PREFIX.len()..end).ok_or(ProxyError::V1Field("line"))?;
    let len = end + 2;

    let mut parts = line.splitn(2, |&b| b == b' ');
    let protocol = parts.next().unwrap_or_default();
    let rest = parts.next();
    let v6 = match protocol {
        // The spec says to ignore whatever follows UNKNOWN up to the CRLF.
        b"UNKNOWN" => {
            return Ok(Parsed::Header {
                version: ProxyVersion::V1,
                source: None,
                destination: None,
                len,
            });
        }
        b"TCP4" => false,
        b"TCP6" => true,
        _ => return Err(ProxyError::V1Field("protocol")),
    };

    let mut fields = rest.unwrap_or_default().split(|&b| b == b' ');
    let mut next = |what| fields.next().ok_or(ProxyError::V1Field(what));
    let src = v1_ip(next("source address")?, v6, "source address")?;
    let dst = v1_ip(next("destination address")?, v6, "destination address")?;
    let sport = v1_port(next("source port")?).ok_or(ProxyError::V1Field("source port"))?;
    let dport =
        v1_port(next("destination port")?).ok_or(ProxyError::V1Field("destination port"))?;
    if fields.next().is_some() {
        return Err(ProxyError::V1Field("line (extra field)"));
    }
    Ok(Parsed::Header {
        version: ProxyVersion::V1,
        source: Some(SocketAddr::new(src, sport)),
        destination: Some(SocketAddr::new(dst, dport)),
        len,
    })
}

/// An address of the family the line announced.
fn v1_ip(field: &[u8], v6: bool, what: &'static str) -> Result<IpAddr, ProxyError> {
    let text = std::str::from_utf8(field).map_err(|_| ProxyError::V1Field(what))?;
    let ip = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| ProxyError::V1Field(what))
}

/// A decimal port, 0 to 65535, digits only (no sign, no spaces).
fn v1_port(field: &[u8]) -> Option<u16> {
    if field.is_empty() || field.len() > 5 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = field.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    u16::try_from(value).ok()
}

// ---- v2 ------------------------------------------------------------------------------------

/// Parses a v2 header; `buf` starts with the signature.
fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&ver_cmd) = buf.get(12) else { return Ok(Parsed::Incomplete) };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2Version(ver_cmd >> 4));
    }
    let proxy = match ver_cmd {
        V2_LOCAL => false,
        V2_PROXY => true,
        _ => return Err(ProxyError::V2Command(ver_cmd & 0x0f)),
    };

    let Some(&fam) = buf.get(13) else { return Ok(Parsed::Incomplete) };
    // LOCAL connections carry no addresses and the spec says to ignore their family.
    let need = if proxy {
        match fam {
            family::UNSPEC => 0,
            family::TCP4 | family::UDP4 => INET_BLOCK,
            family::TCP6 | family::UDP6 => INET6_BLOCK,
            family::UNIX_STREAM | family::UNIX_DGRAM => UNIX_BLOCK,
            _ => return Err(ProxyError::V2Family(fam)),
        }
    } else {
        0
    };

    let Some(&[hi, lo]) = buf.get(14..V2_FIXED_LEN) else { return Ok(Parsed::Incomplete) };
    let block_len = usize::from(u16::from_be_bytes([hi, lo]));
    if block_len > MAX_V2_LEN {
        return Err(ProxyError::V2TooLong(block_len));
    }
    if block_len < need {
        return Err(ProxyError::V2AddressTooShort { len: block_len, need });
    }
    let len = V2_FIXED_LEN + block_len;
    let Some(block) = buf.get(V2_FIXED_LEN..len) else { return Ok(Parsed::Incomplete) };

    let addrs = match (proxy, fam) {
        (true, family::TCP4 | family::UDP4) => {
            inet_addrs(block, |o: [u8; 4]| Ipv4Addr::from(o).into())
        }
        (true, family::TCP6 | family::UDP6) => {
            inet_addrs(block, |o: [u8; 16]| Ipv6Addr::from(o).into())
        }
        _ => None,
    };
    Ok(Parsed::Header {
        version: ProxyVersion::V2,
        source: addrs.map(|(src, _)| src),
        destination: addrs.map(|(_, dst)| dst),
        len,
    })
}

/// Reads source address, destination address, source port and destination port from the front
/// of a v2 address block whose addresses are `N` bytes each. None if the block is too short,
/// which the caller has already ruled out.
fn inet_addrs<const N: usize>(
    block: &[u8],
    ip: impl Fn([u8; N]) -> IpAddr,
) -> Option<(SocketAddr, SocketAddr)> {
    let (src, rest) = block.split_first_chunk::<N>()?;
    let (dst, rest) = rest.split_first_chunk::<N>()?;
    let (sport, rest) = rest.split_first_chunk::<2>()?;
    let (dport, _) = rest.split_first_chunk::<2>()?;
    Some((
        SocketAddr::new(ip(*src), u16::from_be_bytes(*sport)),
        SocketAddr::new(ip(*dst), u16::from_be_bytes(*dport)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn encoded(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        encode(version, src, dst, &mut out);
        out
    }

    /// What `parse` should report for a header `encode` wrote: the same ports and addresses,
    /// with IPv4 mapped into IPv6 when the families differ and no IPv6 flow label or scope.
    fn expected(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
        match same_family(src.ip(), dst.ip()) {
            Pair::V4(s, d) => {
                (SocketAddr::new(s.into(), src.port()), SocketAddr::new(d.into(), dst.port()))
            }
            Pair::V6(s, d) => {
                (SocketAddr::new(s.into(), src.port()), SocketAddr::new(d.into(), dst.port()))
            }
        }
    }

    fn header(
        version: ProxyVersion,
        src: Option<SocketAddr>,
        dst: Option<SocketAddr>,
        len: usize,
    ) -> Parsed {
        Parsed::Header { version, source: src, destination: dst, len }
    }

    /// The v2 IPv4 example, written out by hand: 192.168.0.1:56324 -> 192.168.0.11:443.
    fn v2_ipv4_by_hand() -> Vec<u8> {
        let mut b = vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
        b.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        b.extend_from_slice(&[192, 168, 0, 1]);
        b.extend_from_slice(&[192, 168, 0, 11]);
        b.extend_from_slice(&56324u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    /// A v2 header with the given command, family and address block.
    fn v2_raw(ver_cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(ver_cmd);
        b.push(fam);
        b.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        b.extend_from_slice(block);
        b
    }

    const PAIRS: &[(&str, &str)] = &[
        ("192.168.0.1:56324", "192.168.0.11:443"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::1]:1234", "[2001:db8::2]:80"),
        ("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", "[::]:0"),
        ("203.0.113.7:40000", "[2001:db8::2]:443"),
        ("[2001:db8::1]:40000", "198.51.100.1:8080"),
        ("[::ffff:10.0.0.1]:1", "[::ffff:10.0.0.2]:2"),
    ];

    #[test]
    fn round_trips_both_versions_all_families() {
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            for &(s, d) in PAIRS {
                let (src, dst) = (addr(s), addr(d));
                let mut bytes = encoded(version, src, dst);
                let len = bytes.len();
                let (es, ed) = expected(src, dst);
                let want = header(version, Some(es), Some(ed), len);
                assert_eq!(parse(&bytes), Ok(want.clone()), "{version} {s} -> {d}");
                // Whatever follows the header is not part of it.
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
                assert_eq!(parse(&bytes), Ok(want), "{version} {s} -> {d} with payload");
            }
        }
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let src = addr("203.0.113.7:40000");
        let dst = addr("[2001:db8::2]:443");
        assert_eq!(
            encoded(ProxyVersion::V1, src, dst),
            b"PROXY TCP6 ::ffff:203.0.113.7 2001:db8::2 40000 443\r\n"
        );
        let v2 = encoded(ProxyVersion::V2, src, dst);
        assert_eq!(&v2[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(v2.len(), 16 + 36);
    }

    #[test]
    fn v1_known_vectors() {
        let src = addr("192.168.0.1:56324");
        let dst = addr("192.168.0.11:443");
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        assert_eq!(encoded(ProxyVersion::V1, src, dst), line);
        assert_eq!(parse(line), Ok(header(ProxyVersion::V1, Some(src), Some(dst), line.len())));

        let worst4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(worst4.len(), 56);
        assert!(matches!(parse(worst4), Ok(Parsed::Header { len: 56, .. })));

        let worst6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                       ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst6.len(), 104);
        let all = addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
        assert_eq!(parse(worst6), Ok(header(ProxyVersion::V1, Some(all), Some(all), 104)));
        assert_eq!(encoded(ProxyVersion::V1, all, all), worst6);
    }

    #[test]
    fn v1_unknown() {
        let none = |len| header(ProxyVersion::V1, None, None, len);
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(none(15)));
        assert_eq!(parse(b"PROXY UNKNOWN\r\nGET / HTTP/1.1\r\n"), Ok(none(15)));
        // The spec's worst case is exactly 107 bytes; whatever follows UNKNOWN is ignored.
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                      ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), MAX_V1_LEN);
        assert_eq!(parse(worst), Ok(none(MAX_V1_LEN)));
        let binary = b"PROXY UNKNOWN \xff\xfe junk\r\n";
        assert_eq!(parse(binary), Ok(none(binary.len())));
    }

    #[test]
    fn v2_known_vector() {
        let bytes = v2_ipv4_by_hand();
        let src = addr("192.168.0.1:56324");
        let dst = addr("192.168.0.11:443");
        assert_eq!(encoded(ProxyVersion::V2, src, dst), bytes);
        assert_eq!(parse(&bytes), Ok(header(ProxyVersion::V2, Some(src), Some(dst), 28)));
    }

    #[test]
    fn v2_ipv6_by_hand() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&[0x04, 0xD2, 0x00, 0x50]);
        let bytes = v2_raw(0x21, 0x21, &block);
        let (src, dst) = (addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80"));
        assert_eq!(encoded(ProxyVersion::V2, src, dst), bytes);
        assert_eq!(parse(&bytes), Ok(header(ProxyVersion::V2, Some(src), Some(dst), 52)));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut bytes = v2_ipv4_by_hand();
        // PP2_TYPE_AUTHORITY "example.com", then PP2_TYPE_NOOP of 3 bytes.
        let tlvs: &[u8] = b"\x02\x00\x0bexample.com\x04\x00\x03\0\0\0";
        bytes[14..16].copy_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
        bytes.extend_from_slice(tlvs);
        let len = bytes.len();
        bytes.extend_from_slice(b"payload");
        assert_eq!(
            parse(&bytes),
            Ok(header(
                ProxyVersion::V2,
                Some(addr("192.168.0.1:56324")),
                Some(addr("192.168.0.11:443")),
                len
            ))
        );
    }

    #[test]
    fn v2_udp_gives_addresses() {
        let mut bytes = v2_ipv4_by_hand();
        bytes[13] = 0x12;
        assert!(matches!(parse(&bytes), Ok(Parsed::Header { source: Some(_), .. })));
        let mut bytes = encoded(ProxyVersion::V2, addr("[::1]:1"), addr("[::2]:2"));
        bytes[13] = 0x22;
        assert_eq!(
            parse(&bytes),
            Ok(header(ProxyVersion::V2, Some(addr("[::1]:1")), Some(addr("[::2]:2")), 52))
        );
    }

    #[test]
    fn v2_without_addresses() {
        let none = |len| Ok(header(ProxyVersion::V2, None, None, len));
        // LOCAL: no addresses, even when a block is present; the family is ignored.
        assert_eq!(parse(&v2_raw(0x20, 0x00, &[])), none(16));
        assert_eq!(parse(&v2_raw(0x20, 0x11, &[7; 12])), none(28));
        assert_eq!(parse(&v2_raw(0x20, 0xff, &[])), none(16));
        // PROXY over UNSPEC and UNIX: accepted, addresses unknown.
        assert_eq!(parse(&v2_raw(0x21, 0x00, &[])), none(16));
        assert_eq!(parse(&v2_raw(0x21, 0x31, &[0; 216])), none(232));
        assert_eq!(parse(&v2_raw(0x21, 0x32, &[0; 220])), none(236));
        assert_eq!(parse(&v2_raw(0x21, 0x00, &[0; MAX_V2_LEN])), none(16 + MAX_V2_LEN));
    }

    /// Every valid header this module knows, for the truncation test.
    fn valid_headers() -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = PAIRS
            .iter()
            .flat_map(|&(s, d)| {
                [ProxyVersion::V1, ProxyVersion::V2].map(|v| encoded(v, addr(s), addr(d)))
            })
            .collect();
        all.push(b"PROXY UNKNOWN\r\n".to_vec());
        all.push(v2_ipv4_by_hand());
        all.push(v2_raw(0x20, 0x00, &[]));
        all.push(v2_raw(0x20, 0x11, &[1; 12]));
        all.push(v2_raw(0x21, 0x31, &[0; 216]));
        all.push(v2_raw(0x21, 0x11, &[3; 40]));
        all
    }

    #[test]
    fn every_truncation_is_incomplete() {
        for bytes in valid_headers() {
            assert!(matches!(parse(&bytes), Ok(Parsed::Header { len, .. }) if len == bytes.len()));
            for n in 0..bytes.len() {
                assert_eq!(parse(&bytes[..n]), Ok(Parsed::Incomplete), "{:?}", &bytes[..n]);
            }
        }
    }

    #[test]
    fn prefixes_and_strangers() {
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"P"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY "), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUI"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Parsed::Absent));
        assert_eq!(parse(b"PROXX"), Ok(Parsed::Absent));
        assert_eq!(parse(b"PROXY\r\n"), Ok(Parsed::Absent));
        assert_eq!(parse(b"proxy TCP4"), Ok(Parsed::Absent));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX\n\x21"), Ok(Parsed::Absent));
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Ok(Parsed::Absent));
    }

    #[test]
    fn v1_too_long() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_LEN - 1, b'x');
        assert_eq!(parse(&long), Ok(Parsed::Incomplete));
        long.push(b'\r');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        long.push(b'\n');
        assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
        long.truncate(MAX_V1_LEN - 2);
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Ok(header(ProxyVersion::V1, None, None, MAX_V1_LEN)));
        let spaces = [V1_PREFIX, &[b' '; 200]].concat();
        assert_eq!(parse(&spaces), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v1_malformed() {
        let field = |f| Err(ProxyError::V1Field(f));
        let cases: &[(&[u8], Result<Parsed, ProxyError>)] = &[
            (b"PROXY \r\n", field("protocol")),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", field("protocol")),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", field("protocol")),
            (b"PROXY UNKNOWNX\r\n", field("protocol")),
            (b"PROXY TCP4\r\n", field("source address")),
            (b"PROXY TCP4 \r\n", field("source address")),
            (b"PROXY TCP4 1.2.3.4\r\n", field("destination address")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", field("destination port")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", field("line (extra field)")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", field("line (extra field)")),
            (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", field("source address")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", field("source port")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", field("destination port")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", field("source port")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n", field("destination port")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2x\r\n", field("destination port")),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n", field("destination port")),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", field("source address")),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", field("source address")),
            (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", field("destination address")),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", field("source address")),
            (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", field("destination address")),
            (b"PROXY TCP6 [::1] ::2 1 2\r\n", field("source address")),
            (b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n", field("source address")),
            (b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n", field("source address")),
        ];
        for (bytes, want) in cases {
            assert_eq!(&parse(bytes), want, "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn v1_ports_accept_every_decimal_in_range() {
        for (text, port) in [("0", 0), ("00080", 80), ("65535", 65535)] {
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {text} {text}\r\n");
            let Ok(Parsed::Header { source: Some(s), destination: Some(d), .. }) =
                parse(line.as_bytes())
            else {
                panic!("{line:?} refused");
            };
            assert_eq!((s.port(), d.port()), (port, port));
        }
    }

    #[test]
    fn v2_malformed() {
        let mut good = v2_ipv4_by_hand();
        good.extend_from_slice(b"trailing bytes do not matter");
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        assert_eq!(parse(&with(12, 0x11)), Err(ProxyError::V2Version(1)));
        assert_eq!(parse(&with(12, 0x31)), Err(ProxyError::V2Version(3)));
        assert_eq!(parse(&with(12, 0x22)), Err(ProxyError::V2Command(2)));
        assert_eq!(parse(&with(12, 0x2f)), Err(ProxyError::V2Command(15)));
        for fam in [0x01, 0x10, 0x13, 0x20, 0x23, 0x30, 0x41, 0xff] {
            assert_eq!(parse(&with(13, fam)), Err(ProxyError::V2Family(fam)), "{fam:#x}");
        }
        // Errors in the fixed part show before the rest of the header arrives.
        assert_eq!(parse(&with(12, 0x11)[..13]), Err(ProxyError::V2Version(1)));
        assert_eq!(parse(&with(13, 0x13)[..14]), Err(ProxyError::V2Family(0x13)));

        let too_long = v2_raw(0x21, 0x00, &[0; MAX_V2_LEN + 1]);
        assert_eq!(parse(&too_long[..16]), Err(ProxyError::V2TooLong(MAX_V2_LEN + 1)));
        assert_eq!(parse(&too_long), Err(ProxyError::V2TooLong(MAX_V2_LEN + 1)));
        let huge = [&V2_SIGNATURE[..], &[0x20, 0x00, 0xff, 0xff]].concat();
        assert_eq!(parse(&huge), Err(ProxyError::V2TooLong(0xffff)));

        let short = |fam, len, need| {
            assert_eq!(
                parse(&v2_raw(0x21, fam, &vec![0; len])),
                Err(ProxyError::V2AddressTooShort { len, need }),
                "{fam:#x}"
            );
        };
        short(0x11, 0, 12);
        short(0x11, 11, 12);
        short(0x12, 11, 12);
        short(0x21, 12, 36);
        short(0x22, 35, 36);
        short(0x31, 215, 216);
        short(0x32, 0, 216);
    }

    #[test]
    fn version_from_str_and_display() {
        for (text, version) in [
            ("v1", ProxyVersion::V1),
            ("1", ProxyVersion::V1),
            ("v2", ProxyVersion::V2),
            ("2", ProxyVersion::V2),
        ] {
            assert_eq!(text.parse::<ProxyVersion>(), Ok(version));
        }
        assert_eq!(ProxyVersion::V1.to_string(), "v1");
        assert_eq!(ProxyVersion::V2.to_string(), "v2");
        assert_eq!(ProxyVersion::V2.to_string().parse::<ProxyVersion>(), Ok(ProxyVersion::V2));
        for bad in ["", "v3", "3", "V 1", " v1", "version 2"] {
            let err = bad.parse::<ProxyVersion>().unwrap_err();
            assert!(err.contains("\"v1\"") && err.contains("\"v2\""), "{err}");
        }
    }

    /// Bytes that reach the deeper parts of the parser more often than uniform noise would.
    fn proxyish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let v1_tail = proptest::string::bytes_regex(
            "(?s-u)(TCP4|TCP6|UNKNOWN|[A-Z0-9]{0,8})( [0-9a-f.:]{0,45}){0,6}(\r\n)?.{0,8}",
        )
        .unwrap();
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            v1_tail.prop_map(|t| [V1_PREFIX, &t].concat()),
            (any::<[u8; 4]>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(fixed, rest)| [&V2_SIGNATURE[..], &fixed, &rest].concat()),
            (
                prop_oneof![Just(0x20u8), Just(0x21)],
                any::<u8>(),
                0u16..300,
                proptest::collection::vec(any::<u8>(), 0..320)
            )
                .prop_map(|(vc, fam, len, rest)| {
                    [&V2_SIGNATURE[..], &[vc, fam], &len.to_be_bytes(), &rest].concat()
                }),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_parse(
            v2 in any::<bool>(),
            src in any::<SocketAddr>(),
            dst in any::<SocketAddr>(),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let version = if v2 { ProxyVersion::V2 } else { ProxyVersion::V1 };
            let mut bytes = encoded(version, src, dst);
            let len = bytes.len();
            let max = if v2 { V2_FIXED_LEN + INET6_BLOCK } else { MAX_V1_LEN };
            prop_assert!(len <= max);
            let (es, ed) = expected(src, dst);
            let want = header(version, Some(es), Some(ed), len);
            prop_assert_eq!(parse(&bytes), Ok(want.clone()));
            for n in 0..len {
                prop_assert_eq!(parse(&bytes[..n]), Ok(Parsed::Incomplete));
            }
            bytes.extend_from_slice(&payload);
            prop_assert_eq!(parse(&bytes), Ok(want));
        }

        #[test]
        fn parse_never_panics(bytes in proxyish_bytes()) {
            if let Ok(Parsed::Header { version, source, destination, len }) = parse(&bytes) {
                prop_assert!(len <= bytes.len());
                prop_assert_eq!(source.is_some(), destination.is_some());
                if let (Some(src), Some(dst)) = (source, destination) {
                    let again = encoded(version, src, dst);
                    let n = again.len();
                    prop_assert_eq!(parse(&again), Ok(header(version, source, destination, n)));
                }
            }
        }
    }
}
