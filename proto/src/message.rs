//! Control messages: what agent and relay say to each other on a session's control stream.

use std::fmt;

use bytes::BufMut;

use crate::frame::{DecodeError, Reader, Writer, split_frame, write_frame};
use crate::names::{AgentId, Subdomain, TunnelId, TunnelName};
use crate::options::TunnelOptions;
use crate::overlay::NetMessage;

/// A tunnel's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// HTTP, routed by `Host` on the relay's HTTP listener.
    Http,
    /// Raw TCP on a public port from the relay's port pool.
    Tcp,
    /// TLS passed through by SNI on the relay's HTTPS listener, never decrypted by the relay.
    Tls,
    /// UDP packets on a public port from the relay's port pool.
    Udp,
}

impl Protocol {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Http => 1,
            Self::Tcp => 2,
            Self::Tls => 3,
            Self::Udp => 4,
        }
    }

    pub(crate) fn from_code(c: u8) -> Result<Self, DecodeError> {
        match c {
            1 => Ok(Self::Http),
            2 => Ok(Self::Tcp),
            3 => Ok(Self::Tls),
            4 => Ok(Self::Udp),
            _ => Err(DecodeError::Malformed("protocol")),
        }
    }

    /// Lower-case name, as used in URLs and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error codes carried by [`Message::Error`], [`Message::GoAway`] and
/// [`Message::TunnelClosed`]. Codes unknown to this version decode as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The token was not accepted.
    Unauthorized,
    /// No protocol version in common.
    VersionMismatch,
    /// The subdomain is leased to someone else.
    SubdomainTaken,
    /// The port is leased to someone else or used by another program on the relay.
    PortTaken,
    /// No free port is left in the relay's pool.
    PortPoolExhausted,
    /// A requested port lies outside the relay's pool.
    PortOutOfRange,
    /// A name or field was refused.
    InvalidRequest,
    /// The tunnel id is not bound on this session.
    UnknownTunnel,
    /// The message type is not known to the receiver.
    UnknownMessage,
    /// Bytes that could not be decoded; the sender closes the session after this.
    Malformed,
    /// The same agent bound this tunnel from another session.
    Replaced,
    /// The relay is shutting down.
    ShuttingDown,
    /// A heartbeat went unanswered.
    Timeout,
    /// Something failed inside the relay.
    Internal,
    /// The tunnel was removed through the relay's API; the agent keeps running.
    Removed,
    /// An overlay network, endpoint or service that does not exist.
    NotFound,
    /// An overlay name or address that is taken, a subnet that overlaps, a pool that is
    /// exhausted, a network still in use.
    Conflict,
    /// Too many failed authentications came from the agent's address: the relay refuses its
    /// sessions for a while without looking at the token. Not fatal: the message says when to
    /// try again, and the right token works then.
    Throttled,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::Unauthorized => 1,
            Self::VersionMismatch => 2,
            Self::SubdomainTaken => 3,
            Self::PortTaken => 4,
            Self::PortPoolExhausted => 5,
            Self::PortOutOfRange => 6,
            Self::InvalidRequest => 7,
            Self::UnknownTunnel => 8,
            Self::UnknownMessage => 9,
            Self::Malformed => 10,
            Self::Replaced => 11,
            Self::ShuttingDown => 12,
            Self::Timeout => 13,
            Self::Internal => 14,
            Self::Removed => 15,
            Self::NotFound => 16,
            Self::Conflict => 17,
            Self::Throttled => 18,
            Self::Other(c) => c,
        }
    }

    /// The code for a number from the wire.
    pub fn from_code(c: u16) -> Self {
        match c {
            1 => Self::Unauthorized,
            2 => Self::VersionMismatch,
            3 => Self::SubdomainTaken,
            4 => Self::PortTaken,
            5 => Self::PortPoolExhausted,
            6 => Self::PortOutOfRange,
            7 => Self::InvalidRequest,
            8 => Self::UnknownTunnel,
            9 => Self::UnknownMessage,
            10 => Self::Malformed,
            11 => Self::Replaced,
            12 => Self::ShuttingDown,
            13 => Self::Timeout,
            14 => Self::Internal,
            15 => Self::Removed,
            16 => Self::NotFound,
            17 => Self::Conflict,
            18 => Self::Throttled,
            c => Self::Other(c),
        }
    }

    /// True for errors that retrying the same request cannot fix.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            Self::Unauthorized
                | Self::VersionMismatch
                | Self::SubdomainTaken
                | Self::PortTaken
                | Self::PortPoolExhausted
                | Self::PortOutOfRange
                | Self::InvalidRequest
                | Self::Replaced
                | Self::NotFound
                | Self::Conflict
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Unauthorized => "unauthorized",
            Self::VersionMismatch => "version mismatch",
            Self::SubdomainTaken => "subdomain taken",
            Self::PortTaken => "port taken",
            Self::PortPoolExhausted => "port pool exhausted",
            Self::PortOutOfRange => "port out of range",
            Self::InvalidRequest => "invalid request",
            Self::UnknownTunnel => "unknown tunnel",
            Self::UnknownMessage => "unknown message",
            Self::Malformed => "malformed",
            Self::Replaced => "replaced",
            Self::ShuttingDown => "shutting down",
            Self::Timeout => "timeout",
            Self::Internal => "internal error",
            Self::Removed => "removed",
            Self::NotFound => "not found",
            Self::Conflict => "conflict",
            Self::Throttled => "throttled",
            Self::Other(c) => return write!(f, "error {c}"),
        };
        f.write_str(s)
    }
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Longest token accepted, in bytes.
    pub const MAX_LEN: usize = 512;

    /// Wraps a token.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself: only for comparison and for sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The agent's first message: who it is and how it proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The shared secret the relay checks.
    pub token: Token,
    /// The agent's stable identity; leases belong to (token, identity, tunnel name).
    pub agent_id: AgentId,
    /// The agent's software version, for logs.
    pub agent_version: String,
}

/// The relay's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The protocol version in use for this session.
    pub version: u16,
    /// The relay's number for this session, for logs.
    pub session_id: u64,
    /// The relay's software version.
    pub relay_version: String,
    /// The domain under which HTTP tunnels get names.
    pub domain: String,
    /// Seconds between heartbeats the relay expects.
    pub heartbeat_secs: u16,
    /// Seconds a tunnel's name and port stay leased after its session ends.
    pub lease_grace_secs: u32,
}

/// Asks for a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Request number, echoed in the answer.
    pub req: u32,
    /// The tunnel's name, unique per agent.
    pub name: TunnelName,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// The subdomain wanted (HTTP, TLS).
    pub subdomain: Option<Subdomain>,
    /// The public port wanted (TCP, UDP).
    pub remote_port: Option<u16>,
    /// When set, `subdomain` and `remote_port` are what an earlier bind was given and are only
    /// preferences: if they are no longer free the relay picks others instead of refusing.
    pub sticky: bool,
    /// Access control and HTTP behaviour the relay enforces for this tunnel.
    pub options: TunnelOptions,
}

/// A tunnel is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The request this answers.
    pub req: u32,
    /// The relay's number for the tunnel; data streams carry it.
    pub tunnel: TunnelId,
    /// The public URL, e.g. `http://shop.example.com` or `tcp://example.com:20417`.
    pub url: String,
    /// The subdomain granted (HTTP).
    pub subdomain: Option<Subdomain>,
    /// The port granted (TCP).
    pub remote_port: Option<u16>,
    /// A remark for the user (for example "port 20001 was taken, got 20002"), or empty.
    pub notice: String,
}

/// A tunnel the relay bound on the agent's behalf, for the agent to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The relay's request number, echoed in the answer.
    pub req: u32,
    /// The tunnel's id; data streams carry it.
    pub tunnel: TunnelId,
    /// The tunnel's name.
    pub name: TunnelName,
    /// Its protocol.
    pub protocol: Protocol,
    /// Where the agent sends its traffic: `PORT` or `HOST:PORT`, as on the command line.
    pub target: String,
    /// The public URL.
    pub url: String,
}

/// Every control message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Agent → relay, first frame after the preface.
    Hello(Hello),
    /// Relay → agent, accepts the session.
    Welcome(Welcome),
    /// Agent → relay: open a tunnel.
    Bind(Bind),
    /// Relay → agent: a tunnel is open.
    Bound(Bound),
    /// Agent → relay: close a tunnel and release its lease.
    Unbind {
        /// Request number.
        req: u32,
        /// Which tunnel.
        tunnel: TunnelId,
    },
    /// Relay → agent: the tunnel is closed.
    Unbound {
        /// The request this answers.
        req: u32,
        /// Which tunnel.
        tunnel: TunnelId,
    },
    /// Either way: a request failed (`req` is 0 when no request is concerned).
    Error {
        /// The request that failed, or 0.
        req: u32,
        /// What kind of failure.
        code: ErrorCode,
        /// A sentence for a human.
        message: String,
    },
    /// Either way: are you there?
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Either way: the session is ending; open no new streams.
    GoAway {
        /// Why.
        code: ErrorCode,
        /// A sentence for a human.
        message: String,
    },
    /// Relay → agent: a tunnel was closed without being asked (taken over by another session).
    TunnelClosed {
        /// Which tunnel.
        tunnel: TunnelId,
        /// Why.
        code: ErrorCode,
        /// A sentence for a human.
        message: String,
    },
    /// Relay → agent: serve a tunnel the relay bound for this session (a forward created through
    /// the relay's API). The agent answers [`Message::ForwardOk`] or [`Message::Error`].
    Forward(Forward),
    /// Agent → relay: the forward is served.
    ForwardOk {
        /// The [`Forward`] this answers.
        req: u32,
    },
    /// Overlay networks (types 0x10 to 0x22): requests, answers and pushes.
    Net(NetMessage),
    /// A message type this version does not know; its payload was skipped.
    Unknown {
        /// The type number.
        kind: u16,
    },
}

/// Frame type numbers.
pub mod kind {
    /// [`super::Message::Hello`]
    pub const HELLO: u16 = 0x01;
    /// [`super::Message::Welcome`]
    pub const WELCOME: u16 = 0x02;
    /// [`super::Message::Bind`]
    pub const BIND: u16 = 0x03;
    /// [`super::Message::Bound`]
    pub const BOUND: u16 = 0x04;
    /// [`super::Message::Unbind`]
    pub const UNBIND: u16 = 0x05;
    /// [`super::Message::Unbound`]
    pub const UNBOUND: u16 = 0x06;
    /// [`super::Message::Error`]
    pub const ERROR: u16 = 0x07;
    /// [`super::Message::Ping`]
    pub const PING: u16 = 0x08;
    /// [`super::Message::Pong`]
    pub const PONG: u16 = 0x09;
    /// [`super::Message::GoAway`]
    pub const GO_AWAY: u16 = 0x0a;
    /// [`super::Message::TunnelClosed`]
    pub const TUNNEL_CLOSED: u16 = 0x0b;
    /// [`super::Message::Forward`]
    pub const FORWARD: u16 = 0x0c;
    /// [`super::Message::ForwardOk`]
    pub const FORWARD_OK: u16 = 0x0d;
    /// [`crate::StreamHeader`], only at the start of a data stream.
    pub const STREAM_HEADER: u16 = 0x40;
    /// [`crate::stream::StreamAccept`], the agent's first frame on a data stream.
    pub const STREAM_ACCEPT: u16 = 0x41;
}

impl Message {
    /// Appends this message as one frame.
    pub fn encode(&self, dst: &mut Vec<u8>) {
        match self {
            Self::Hello(h) => write_frame(dst, kind::HELLO, |b| {
                b.string(crate::frame::truncate(h.token.expose(), Token::MAX_LEN));
                b.string(h.agent_id.as_str());
                b.string(&h.agent_version);
            }),
            Self::Welcome(w) => write_frame(dst, kind::WELCOME, |b| {
                b.put_u16(w.version);
                b.put_u64(w.session_id);
                b.string(&w.relay_version);
                b.string(&w.domain);
                b.put_u16(w.heartbeat_secs);
                b.put_u32(w.lease_grace_secs);
            }),
            Self::Bind(r) => write_frame(dst, kind::BIND, |b| {
                b.put_u32(r.req);
                b.string(r.name.as_str());
                b.put_u8(r.protocol.code());
                b.opt(r.subdomain.as_ref(), |b, s| b.string(s.as_str()));
                b.opt(r.remote_port, |b, p| b.put_u16(p));
                b.bool_(r.sticky);
                r.options.encode(b);
            }),
            Self::Bound(r) => write_frame(dst, kind::BOUND, |b| {
                b.put_u32(r.req);
                b.put_u32(r.tunnel.0);
                b.string(&r.url);
                b.opt(r.subdomain.as_ref(), |b, s| b.string(s.as_str()));
                b.opt(r.remote_port, |b, p| b.put_u16(p));
                b.string(&r.notice);
            }),
            Self::Unbind { req, tunnel } => write_frame(dst, kind::UNBIND, |b| {
                b.put_u32(*req);
                b.put_u32(tunnel.0);
            }),
            Self::Unbound { req, tunnel } => write_frame(dst, kind::UNBOUND, |b| {
                b.put_u32(*req);
                b.put_u32(tunnel.0);
            }),
            Self::Error { req, code, message } => write_frame(dst, kind::ERROR, |b| {
                b.put_u32(*req);
                b.put_u16(code.code());
                b.string(message);
            }),
            Self::Ping { nonce } => write_frame(dst, kind::PING, |b| b.put_u64(*nonce)),
            Self::Pong { nonce } => write_frame(dst, kind::PONG, |b| b.put_u64(*nonce)),
            Self::GoAway { code, message } => write_frame(dst, kind::GO_AWAY, |b| {
                b.put_u16(code.code());
                b.string(message);
            }),
            Self::TunnelClosed { tunnel, code, message } => {
                write_frame(dst, kind::TUNNEL_CLOSED, |b| {
                    b.put_u32(tunnel.0);
                    b.put_u16(code.code());
                    b.string(message);
                })
            }
            Self::Forward(f) => write_frame(dst, kind::FORWARD, |b| {
                b.put_u32(f.req);
                b.put_u32(f.tunnel.0);
                b.string(f.name.as_str());
                b.put_u8(f.protocol.code());
                b.string(&f.target);
                b.string(&f.url);
            }),
            Self::ForwardOk { req } => write_frame(dst, kind::FORWARD_OK, |b| b.put_u32(*req)),
            Self::Net(n) => n.encode(dst),
            // An unknown message cannot be re-encoded meaningfully; it is sent as an empty frame
            // of its type so round trips stay lossless for what was decoded.
            Self::Unknown { kind } => write_frame(dst, *kind, |_| {}),
        }
    }

    /// Decodes one frame from the front of `src`, returning the message and the bytes used.
    ///
    /// `Err(Incomplete)` means `src` holds only part of a frame. Unknown types decode as
    /// [`Message::Unknown`] (their payload skipped); a frame whose payload has bytes left over
    /// after its fields is accepted, so later versions may append fields.
    pub fn decode(src: &[u8]) -> Result<(Self, usize), DecodeError> {
        let (header, mut p, used) = split_frame(src)?;
        let p = &mut p;
        let msg = match header.kind {
            kind::HELLO => Self::Hello(Hello {
                token: {
                    let token = p.string("token")?;
                    if token.len() > Token::MAX_LEN {
                        return Err(DecodeError::Malformed("token"));
                    }
                    Token::new(token)
                },
                agent_id: AgentId::parse(&p.string("agent id")?)?,
                agent_version: p.string("agent version")?,
            }),
            kind::WELCOME => Self::Welcome(Welcome {
                version: p.u16_("version")?,
                session_id: p.u64_("session id")?,
                relay_version: p.string("relay version")?,
                domain: p.string("domain")?,
                heartbeat_secs: p.u16_("heartbeat")?,
                lease_grace_secs: p.u32_("lease grace")?,
            }),
            kind::BIND => Self::Bind(Bind {
                req: p.u32_("request id")?,
                name: TunnelName::parse(&p.string("tunnel name")?)?,
                protocol: Protocol::from_code(p.u8_("protocol")?)?,
                subdomain: p
                    .opt("subdomain", |p| p.string("subdomain"))?
                    .map(|s| Subdomain::parse(&s))
                    .transpose()?,
                remote_port: p.opt("remote port", |p| p.u16_("remote port"))?,
                sticky: p.bool_("sticky")?,
                options: TunnelOptions::decode(p)?,
            }),
            kind::BOUND => Self::Bound(Bound {
                req: p.u32_("request id")?,
                tunnel: TunnelId(p.u32_("tunnel id")?),
                url: p.string("url")?,
                subdomain: p
                    .opt("subdomain", |p| p.string("subdomain"))?
                    .map(|s| Subdomain::parse(&s))
                    .transpose()?,
                remote_port: p.opt("remote port", |p| p.u16_("remote port"))?,
                notice: p.string("notice")?,
            }),
            kind::UNBIND => {
                Self::Unbind { req: p.u32_("request id")?, tunnel: TunnelId(p.u32_("tunnel id")?) }
            }
            kind::UNBOUND => {
                Self::Unbound { req: p.u32_("request id")?, tunnel: TunnelId(p.u32_("tunnel id")?) }
            }
            kind::ERROR => Self::Error {
                req: p.u32_("request id")?,
                code: ErrorCode::from_code(p.u16_("error code")?),
                message: p.string("message")?,
            },
            kind::PING => Self::Ping { nonce: p.u64_("nonce")? },
            kind::PONG => Self::Pong { nonce: p.u64_("nonce")? },
            kind::GO_AWAY => Self::GoAway {
                code: ErrorCode::from_code(p.u16_("error code")?),
                message: p.string("message")?,
            },
            kind::TUNNEL_CLOSED => Self::TunnelClosed {
                tunnel: TunnelId(p.u32_("tunnel id")?),
                code: ErrorCode::from_code(p.u16_("error code")?),
                message: p.string("message")?,
            },
            kind::FORWARD => Self::Forward(Forward {
                req: p.u32_("request id")?,
                tunnel: TunnelId(p.u32_("tunnel id")?),
                name: TunnelName::parse(&p.string("tunnel name")?)?,
                protocol: Protocol::from_code(p.u8_("protocol")?)?,
                target: p.string("target")?,
                url: p.string("url")?,
            }),
            kind::FORWARD_OK => Self::ForwardOk { req: p.u32_("request id")? },
            k @ crate::overlay::kind::FIRST..=crate::overlay::kind::LAST => {
                Self::Net(NetMessage::decode(k, p)?)
            }
            other => Self::Unknown { kind: other },
        };
        Ok((msg, used))
    }
}
