//! Property tests: every encoding round-trips, partial input is `Incomplete`, and no input panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::collection::vec;
use proptest::prelude::*;

use crate::frame::{DecodeError, HEADER_LEN, MAX_FRAME_LEN, MAX_STR_LEN, truncate};
use crate::message::{Bind, Bound, ErrorCode, Hello, Message, Protocol, Token, Welcome, kind};
use crate::names::{AgentId, Label, Subdomain, TunnelId, TunnelName};
use crate::options::{BasicAuth, Cidr, TunnelOptions};
use crate::overlay::{
    self, Endpoint, NetDef, NetMessage, PathKind, PathReport, Peer, Service, ServiceMode, Subnet,
    Vni,
};
use crate::preface::{MAGIC, PREFACE_LEN, Preface, SUPPORTED_VERSIONS, mismatch_message};
use crate::stream::StreamHeader;

// ---- strategies ----------------------------------------------------------------------------

fn agent_id() -> impl Strategy<Value = AgentId> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| AgentId::parse(&s).unwrap())
}

fn tunnel_name() -> impl Strategy<Value = TunnelName> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| TunnelName::parse(&s).unwrap())
}

/// Upper case is included on purpose: parsing folds it, and the folded value must round-trip.
fn subdomain() -> impl Strategy<Value = Subdomain> {
    "[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?".prop_map(|s| Subdomain::parse(&s).unwrap())
}

/// Any text that fits a string field: mostly short, sometimes up to `MAX_STR_LEN` bytes
/// (1024 characters of at most 4 bytes each).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "(?s).{0,40}",
        1 => "(?s).{0,1024}",
    ]
    .prop_map(|s| {
        assert!(s.len() <= MAX_STR_LEN);
        s
    })
}

/// A token within `Token::MAX_LEN` bytes (128 characters of at most 4 bytes each).
fn token() -> impl Strategy<Value = Token> {
    "(?s).{0,128}".prop_map(Token::new)
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Http), Just(Protocol::Tcp), Just(Protocol::Tls), Just(Protocol::Udp)]
}

/// Codes as they come out of `from_code`: `Other` never holds a known number.
fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        3 => (1u16..=18).prop_map(ErrorCode::from_code),
        1 => any::<u16>().prop_map(ErrorCode::from_code),
    ]
}

fn tunnel_id() -> impl Strategy<Value = TunnelId> {
    any::<u32>().prop_map(TunnelId)
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn hello() -> impl Strategy<Value = Message> {
    (token(), agent_id(), text()).prop_map(|(token, agent_id, agent_version)| {
        Message::Hello(Hello { token, agent_id, agent_version })
    })
}

fn welcome() -> impl Strategy<Value = Message> {
    (any::<u16>(), any::<u64>(), text(), text(), any::<u16>(), any::<u32>()).prop_map(
        |(version, session_id, relay_version, domain, heartbeat_secs, lease_grace_secs)| {
            Message::Welcome(Welcome {
                version,
                session_id,
                relay_version,
                domain,
                heartbeat_secs,
                lease_grace_secs,
            })
        },
    )
}

fn bind() -> impl Strategy<Value = Message> {
    (
        any::<u32>(),
        tunnel_name(),
        protocol(),
        proptest::option::of(subdomain()),
        any::<Option<u16>>(),
        any::<bool>(),
        options(),
    )
        .prop_map(|(req, name, protocol, subdomain, remote_port, sticky, options)| {
            Message::Bind(Bind { req, name, protocol, subdomain, remote_port, sticky, options })
        })
}

fn cidr() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Cidr::new(Ipv4Addr::from(a).into(), p)),
        (any::<u128>(), 0u8..=128).prop_map(|(a, p)| Cidr::new(Ipv6Addr::from(a).into(), p)),
    ]
    .prop_map(|c| c.unwrap_or_else(|| unreachable!("prefix within range")))
}

fn options() -> impl Strategy<Value = TunnelOptions> {
    let short = || "(?s).{0,40}";
    let pairs = || proptest::collection::vec((short(), short()), 0..3);
    let names = || proptest::collection::vec(short(), 0..3);
    (
        proptest::collection::vec(
            (short(), any::<[u8; 32]>()).prop_map(|(user, digest)| BasicAuth { user, digest }),
            0..3,
        ),
        proptest::collection::vec(cidr(), 0..3),
        proptest::collection::vec(cidr(), 0..3),
        any::<Option<u32>>(),
        (pairs(), names(), pairs(), names()),
        any::<Option<u64>>(),
        any::<(bool, bool)>(),
    )
        .prop_map(|(basic_auth, allow, deny, rate_limit, headers, max_body, flags)| {
            TunnelOptions {
                basic_auth,
                allow,
                deny,
                rate_limit,
                request_header_add: headers.0,
                request_header_remove: headers.1,
                response_header_add: headers.2,
                response_header_remove: headers.3,
                max_body,
                https_only: flags.0,
                upstream_http2: flags.1,
                unknown: Vec::new(),
            }
        })
}

fn bound() -> impl Strategy<Value = Message> {
    (
        any::<u32>(),
        tunnel_id(),
        text(),
        proptest::option::of(subdomain()),
        any::<Option<u16>>(),
        text(),
    )
        .prop_map(|(req, tunnel, url, subdomain, remote_port, notice)| {
            Message::Bound(Bound { req, tunnel, url, subdomain, remote_port, notice })
        })
}

/// Every known message variant (never `Unknown`, which does not round-trip by design).
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello(),
        welcome(),
        bind(),
        bound(),
        (any::<u32>(), tunnel_id()).prop_map(|(req, tunnel)| Message::Unbind { req, tunnel }),
        (any::<u32>(), tunnel_id()).prop_map(|(req, tunnel)| Message::Unbound { req, tunnel }),
        (any::<u32>(), error_code(), text()).prop_map(|(req, code, message)| Message::Error {
            req,
            code,
            message
        }),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        (error_code(), text()).prop_map(|(code, message)| Message::GoAway { code, message }),
        (tunnel_id(), error_code(), text()).prop_map(|(tunnel, code, message)| {
            Message::TunnelClosed { tunnel, code, message }
        }),
        (any::<u32>(), tunnel_id(), tunnel_name(), protocol(), text(), text()).prop_map(
            |(req, tunnel, name, protocol, target, url)| {
                Message::Forward(crate::message::Forward {
                    req,
                    tunnel,
                    name,
                    protocol,
                    target,
                    url,
                })
            }
        ),
        any::<u32>().prop_map(|req| Message::ForwardOk { req }),
        net_message().prop_map(Message::Net),
    ]
}

fn label() -> impl Strategy<Value = Label> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?".prop_map(|s| Label::parse(&s).unwrap())
}

fn labels(max: usize) -> impl Strategy<Value = Vec<Label>> {
    vec(label(), 0..max)
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn subnet() -> impl Strategy<Value = Subnet> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, p)| {
        let mask = if p == 0 { 0 } else { u32::MAX << (32 - u32::from(p)) };
        Subnet::new(Ipv4Addr::from(a & mask), p).unwrap()
    })
}

fn vni() -> impl Strategy<Value = Vni> {
    (0..=Vni::MAX).prop_map(|v| Vni::new(v).unwrap())
}

fn net_def() -> impl Strategy<Value = NetDef> {
    (label(), vni(), subnet(), ipv4(), any::<u16>())
        .prop_map(|(name, vni, subnet, gateway, mtu)| NetDef { name, vni, subnet, gateway, mtu })
}

fn service_mode() -> impl Strategy<Value = ServiceMode> {
    prop_oneof![Just(ServiceMode::Vip), Just(ServiceMode::Dnsrr)]
}

fn path_report() -> impl Strategy<Value = PathReport> {
    (ipv4(), prop_oneof![Just(PathKind::Direct), Just(PathKind::Relay)], any::<u32>())
        .prop_map(|(peer, path, rtt_us)| PathReport { peer, path, rtt_us })
}

/// Every overlay message.
fn net_message() -> impl Strategy<Value = NetMessage> {
    prop_oneof![
        any::<u32>().prop_map(|req| NetMessage::Watch { req }),
        (any::<u32>(), label(), proptest::option::of(subnet()), proptest::option::of(any::<u16>()))
            .prop_map(|(req, name, subnet, mtu)| NetMessage::Create { req, name, subnet, mtu }),
        (any::<u32>(), label()).prop_map(|(req, name)| NetMessage::Delete { req, name }),
        (any::<u32>(), label(), ipv4(), labels(40)).prop_map(|(req, name, vtep, endpoints)| {
            NetMessage::Join { req, name, vtep, endpoints }
        }),
        (any::<u32>(), label(), label(), proptest::option::of(ipv4()), labels(8)).prop_map(
            |(req, network, name, ip, aliases)| NetMessage::Attach {
                req,
                network,
                name,
                ip,
                aliases
            }
        ),
        (any::<u32>(), label(), label()).prop_map(|(req, network, name)| NetMessage::Detach {
            req,
            network,
            name
        }),
        (any::<u32>(), label(), label(), service_mode(), labels(16)).prop_map(
            |(req, network, name, mode, endpoints)| NetMessage::ServiceCreate {
                req,
                network,
                name,
                mode,
                endpoints
            }
        ),
        (any::<u32>(), label(), label())
            .prop_map(|(req, network, name)| NetMessage::ServiceDelete { req, network, name }),
        (label(), vec(path_report(), 0..16))
            .prop_map(|(network, paths)| NetMessage::Paths { network, paths }),
        any::<u32>().prop_map(|req| NetMessage::Ok { req }),
        (any::<u32>(), ipv4()).prop_map(|(req, ip)| NetMessage::Address { req, ip }),
        (any::<u32>(), net_def(), proptest::option::of(ipv4()))
            .prop_map(|(req, def, host_addr)| NetMessage::Info { req, def, host_addr }),
        net_def().prop_map(NetMessage::Defined),
        label().prop_map(|name| NetMessage::Removed { name }),
        (label(), ipv4(), agent_id(), ipv4(), any::<bool>()).prop_map(
            |(network, addr, agent, vtep, online)| {
                NetMessage::Peer(Peer { network, addr, agent, vtep, online })
            }
        ),
        (label(), ipv4()).prop_map(|(network, peer)| NetMessage::PeerGone { network, peer }),
        (label(), label(), ipv4(), ipv4(), labels(8)).prop_map(
            |(network, name, ip, peer, aliases)| {
                NetMessage::Endpoint(Endpoint { network, name, ip, peer, aliases })
            }
        ),
        (label(), label()).prop_map(|(network, name)| NetMessage::EndpointGone { network, name }),
        (label(), label(), service_mode(), proptest::option::of(ipv4()), labels(16)).prop_map(
            |(network, name, mode, vip, endpoints)| {
                NetMessage::Service(Service { network, name, mode, vip, endpoints })
            }
        ),
        (label(), label()).prop_map(|(network, name)| NetMessage::ServiceGone { network, name }),
    ]
}

fn stream_header() -> impl Strategy<Value = StreamHeader> {
    (tunnel_id(), socket_addr(), protocol()).prop_map(|(tunnel, visitor, protocol)| StreamHeader {
        tunnel,
        visitor,
        protocol,
    })
}

fn preface() -> impl Strategy<Value = Preface> {
    (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Preface { min: a.min(b), max: a.max(b) })
}

fn is_known_kind(k: u16) -> bool {
    (kind::HELLO..=kind::FORWARD_OK).contains(&k)
        || (overlay::kind::FIRST..=overlay::kind::LAST).contains(&k)
}

fn encoded(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    buf
}

/// Rewrites the length field of the frame at the start of `buf` after its payload grew.
fn patch_len(buf: &mut [u8]) {
    let len = (buf.len() - HEADER_LEN) as u32;
    buf[2..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

// ---- properties ----------------------------------------------------------------------------

proptest! {
    #[test]
    fn message_round_trips(msg in message(), trailing in vec(any::<u8>(), 0..16)) {
        let mut buf = encoded(&msg);
        let len = buf.len();
        prop_assert!(len >= HEADER_LEN && len - HEADER_LEN <= MAX_FRAME_LEN);
        prop_assert_eq!(Message::decode(&buf), Ok((msg.clone(), len)));
        // Bytes after the frame belong to the next frame and are not consumed.
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(Message::decode(&buf), Ok((msg, len)));
    }

    #[test]
    fn message_strict_prefixes_are_incomplete(msg in message()) {
        let buf = encoded(&msg);
        for cut in 0..buf.len() {
            prop_assert_eq!(Message::decode(&buf[..cut]), Err(DecodeError::Incomplete), "cut {}", cut);
        }
    }

    /// Later versions may append fields: a receiver ignores payload bytes after the known ones.
    #[test]
    fn appended_payload_bytes_are_ignored(msg in message(), extra in vec(any::<u8>(), 1..32)) {
        let mut buf = encoded(&msg);
        buf.extend_from_slice(&extra);
        patch_len(&mut buf);
        prop_assert_eq!(Message::decode(&buf), Ok((msg, buf.len())));
    }

    #[test]
    fn messages_decode_one_after_another(msgs in vec(message(), 0..8)) {
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        let mut rest = &buf[..];
        for m in &msgs {
            let (got, used) = Message::decode(rest).unwrap();
            prop_assert_eq!(&got, m);
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
        prop_assert_eq!(Message::decode(rest), Err(DecodeError::Incomplete));
    }

    /// A receiver fed arbitrary chunks (as a socket delivers them) sees the same messages.
    #[test]
    fn messages_decode_from_chunked_input(
        msgs in vec(message(), 1..6),
        chunk_lens in vec(1usize..200, 1..64),
    ) {
        let mut wire = Vec::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        let mut pending = Vec::new();
        let mut got = Vec::new();
        let mut at = 0;
        let mut chunks = chunk_lens.iter().cycle();
        while at < wire.len() {
            let n = (*chunks.next().unwrap()).min(wire.len() - at);
            pending.extend_from_slice(&wire[at..at + n]);
            at += n;
            loop {
                match Message::decode(&pending) {
                    Ok((m, used)) => {
                        got.push(m);
                        pending.drain(..used);
                    }
                    Err(DecodeError::Incomplete) => break,
                    Err(e) => return Err(TestCaseError::fail(format!("decode error {e}"))),
                }
            }
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn unknown_types_decode_as_unknown(
        k in any::<u16>().prop_filter("known type", |k| !is_known_kind(*k)),
        payload in vec(any::<u8>(), 0..256),
        trailing in vec(any::<u8>(), 0..16),
    ) {
        let mut buf = Vec::new();
        crate::frame::write_frame(&mut buf, k, |b| b.extend_from_slice(&payload));
        let len = buf.len();
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(Message::decode(&buf), Ok((Message::Unknown { kind: k }, len)));
        // An unknown message re-encodes as an empty frame of its type.
        let again = encoded(&Message::Unknown { kind: k });
        prop_assert_eq!(Message::decode(&again), Ok((Message::Unknown { kind: k }, HEADER_LEN)));
    }

    #[test]
    fn stream_header_round_trips(h in stream_header(), trailing in vec(any::<u8>(), 0..64)) {
        let mut buf = Vec::new();
        h.encode(&mut buf);
        let len = buf.len();
        let expected = HEADER_LEN + 4 + if h.visitor.is_ipv4() { 1 + 4 } else { 1 + 16 } + 2 + 1;
        prop_assert_eq!(len, expected);
        for cut in 0..len {
            prop_assert_eq!(StreamHeader::decode(&buf[..cut]), Err(DecodeError::Incomplete));
        }
        // The visitor's raw bytes follow the header directly and are not consumed.
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(StreamHeader::decode(&buf), Ok((h, len)));
    }

    #[test]
    fn stream_header_is_not_a_control_message(h in stream_header()) {
        let mut buf = Vec::new();
        h.encode(&mut buf);
        prop_assert_eq!(
            Message::decode(&buf),
            Ok((Message::Unknown { kind: kind::STREAM_HEADER }, buf.len()))
        );
    }

    #[test]
    fn preface_round_trips(p in preface(), trailing in vec(any::<u8>(), 0..16)) {
        let mut buf = Vec::new();
        p.encode(&mut buf);
        prop_assert_eq!(buf.len(), PREFACE_LEN);
        prop_assert_eq!(&buf[..MAGIC.len()], &MAGIC[..]);
        for cut in 0..PREFACE_LEN {
            prop_assert_eq!(Preface::decode(&buf[..cut]), Err(DecodeError::Incomplete));
        }
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(Preface::decode(&buf), Ok(p));
    }

    #[test]
    fn preface_with_wrong_magic_is_refused_at_first_byte(
        p in preface(),
        at in 0..MAGIC.len(),
        flip in 1u8..=255,
    ) {
        let mut buf = Vec::new();
        p.encode(&mut buf);
        buf[at] ^= flip;
        for cut in at + 1..=PREFACE_LEN {
            prop_assert_eq!(Preface::decode(&buf[..cut]), Err(DecodeError::BadMagic));
        }
    }

    #[test]
    fn negotiation_picks_highest_common_version(p in preface()) {
        let (lo, hi) = (*SUPPORTED_VERSIONS.start(), *SUPPORTED_VERSIONS.end());
        match p.negotiate() {
            Some(v) => {
                prop_assert!(p.min <= v && v <= p.max && lo <= v && v <= hi);
                prop_assert_eq!(v, p.max.min(hi));
            }
            None => {
                prop_assert!(p.max < lo || p.min > hi);
                let text = mismatch_message(p);
                let ours = format!("{lo}-{hi}");
                let theirs = format!("{}-{}", p.min, p.max);
                prop_assert!(text.contains(&ours) && text.contains(&theirs), "{}", text);
            }
        }
    }

    /// Over-long strings are cut on a character boundary when encoded, never refused or split.
    #[test]
    fn long_strings_are_truncated_on_encode(s in "(?s).{1000,1400}", pad in 0usize..4) {
        let message = format!("{}{s}", "é".repeat(pad)).repeat(4);
        let msg = Message::Error { req: 7, code: ErrorCode::Internal, message: message.clone() };
        let (got, _) = Message::decode(&encoded(&msg)).unwrap();
        let want = truncate(&message, MAX_STR_LEN).to_owned();
        prop_assert_eq!(got, Message::Error { req: 7, code: ErrorCode::Internal, message: want });
    }

    #[test]
    fn long_tokens_are_truncated_on_encode(s in "(?s).{129,300}", id in agent_id()) {
        let hello = Hello { token: Token::new(s.clone()), agent_id: id, agent_version: String::new() };
        let (got, _) = Message::decode(&encoded(&Message::Hello(hello.clone()))).unwrap();
        let want = Token::new(truncate(&s, Token::MAX_LEN));
        prop_assert_eq!(got, Message::Hello(Hello { token: want, ..hello }));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        let mut rest = &bytes[..];
        while let Ok((_, used)) = Message::decode(rest) {
            prop_assert!((HEADER_LEN..=rest.len()).contains(&used));
            rest = &rest[used..];
        }
        let _ = StreamHeader::decode(&bytes);
        if let Ok(p) = Preface::decode(&bytes) {
            prop_assert!(p.min <= p.max);
            let _ = p.negotiate();
            let _ = mismatch_message(p);
        }
    }

    /// Whatever an agent writes first on a data stream, in whatever pieces, the relay's
    /// `AcceptReader` never panics, never claims more bytes than it was given, and finishes only
    /// on a `StreamAccept` frame.
    #[test]
    fn accept_reader_takes_any_bytes(bytes in vec(any::<u8>(), 0..64), cut in 0usize..64) {
        let cut = cut.min(bytes.len());
        let mut r = crate::stream::AcceptReader::new();
        let mut used = 0;
        for piece in [&bytes[..cut], &bytes[cut..]] {
            match r.feed(piece) {
                Ok(n) => {
                    prop_assert!(n <= piece.len());
                    used += n;
                }
                Err(_) => break,
            }
        }
        if r.done() {
            prop_assert_eq!(u16::from_be_bytes([bytes[0], bytes[1]]), kind::STREAM_ACCEPT);
            prop_assert!(used >= HEADER_LEN);
        }
    }

    /// Random payloads behind a valid header of a known type reach deep into the field decoders.
    /// Whatever decodes must re-encode to something that decodes to the same value.
    #[test]
    fn arbitrary_payloads_never_panic(
        k in prop_oneof![kind::HELLO..=kind::TUNNEL_CLOSED, Just(kind::STREAM_HEADER)],
        payload in vec(any::<u8>(), 0..128),
    ) {
        let mut buf = Vec::new();
        crate::frame::write_frame(&mut buf, k, |b| b.extend_from_slice(&payload));
        match Message::decode(&buf) {
            Ok((Message::Unknown { kind }, used)) => {
                prop_assert_eq!((kind, used), (k, buf.len()));
            }
            Ok((msg, used)) => {
                prop_assert_eq!(used, buf.len());
                prop_assert_eq!(Message::decode(&encoded(&msg)), Ok((msg.clone(), encoded(&msg).len())));
            }
            Err(e) => prop_assert!(!e.is_incomplete(), "complete frame reported {:?}", e),
        }
        if let Ok((h, used)) = StreamHeader::decode(&buf) {
            prop_assert_eq!(used, buf.len());
            let mut again = Vec::new();
            h.encode(&mut again);
            prop_assert_eq!(StreamHeader::decode(&again), Ok((h, again.len())));
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header_alone(
        k in any::<u16>(),
        len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
    ) {
        let mut buf = k.to_be_bytes().to_vec();
        buf.extend_from_slice(&len.to_be_bytes());
        prop_assert_eq!(Message::decode(&buf), Err(DecodeError::TooLong(len as usize)));
        prop_assert_eq!(StreamHeader::decode(&buf), Err(DecodeError::TooLong(len as usize)));
    }
}

#[test]
fn over_long_token_is_malformed() {
    let mut buf = Vec::new();
    crate::frame::write_frame(&mut buf, kind::HELLO, |b| {
        let token = "t".repeat(Token::MAX_LEN + 1);
        b.extend_from_slice(&(token.len() as u16).to_be_bytes());
        b.extend_from_slice(token.as_bytes());
        b.extend_from_slice(&[0, 1, b'a', 0, 0]);
    });
    assert_eq!(Message::decode(&buf), Err(DecodeError::Malformed("token")));
}

/// The byte-level examples in PROTOCOL.md.
#[test]
fn protocol_md_examples() {
    let ping = encoded(&Message::Ping { nonce: 0x0102_0304_0506_0708 });
    assert_eq!(ping, [0, 8, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let mut preface = Vec::new();
    Preface { min: 1, max: 1 }.encode(&mut preface);
    assert_eq!(preface, b"WARREN\x00\x01\x00\x01");
}
