//! The control stream as two sans-IO state machines: [`AgentSession`] for the agent's side and
//! [`RelaySession`] for the relay's.
//!
//! Each takes what happens in any order — a message received, the clock passing a deadline, a
//! request from the program that drives it — and answers with messages to send
//! ([`AgentSession::poll_transmit`]) and events for the driver ([`AgentSession::poll_event`]).
//! Neither owns a socket, a task or a clock: the driver reads and writes the control stream,
//! sleeps until [`AgentSession::poll_timeout`] and feeds the time in. Requests and their answers
//! are matched by request id only, never by order: a `Forward` or a `Ping` may arrive between a
//! `Bind` and its `Bound`, answers may come in any order, and an answer nobody waits for is
//! reported, not taken for another one.
//!
//! Not here: what a bind, a forward or an overlay request *means* (routing, leases, targets,
//! `--allow-forward`): the driver decides those and gives the machine its answer.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::message::{Bind, Bound, ErrorCode, Forward, Hello, Message, Welcome};
use crate::names::TunnelId;
use crate::overlay::NetMessage;
use crate::preface::SUPPORTED_VERSIONS;

/// The clock rules of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Interval between the pings a side sends.
    pub heartbeat: Duration,
    /// A session from which nothing arrived for this long is dead.
    pub dead_after: Duration,
    /// How long the agent waits for `Welcome`, and for the answer to a `Bind` or an `Unbind`.
    pub answer_within: Duration,
}

impl Default for Timing {
    /// 5 s pings, dead after 20 s of silence (PROTOCOL.md §5), answers within 10 s.
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
            answer_within: Duration::from_secs(10),
        }
    }
}

/// What the agent's side of a session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The relay accepted the session.
    Welcomed(Welcome),
    /// The relay refused the session (or chose a version this side does not speak); the session
    /// is over.
    Refused {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// A bind was answered.
    BindAnswered {
        /// The request id [`AgentSession::bind`] returned.
        req: u32,
        /// The tunnel as bound, or why not.
        result: Result<Bound, (ErrorCode, String)>,
    },
    /// An unbind was answered.
    UnbindAnswered {
        /// The request id [`AgentSession::unbind`] returned.
        req: u32,
        /// Whether the relay found the tunnel.
        result: Result<TunnelId, (ErrorCode, String)>,
    },
    /// An overlay request was answered.
    NetAnswered {
        /// The request id [`AgentSession::net_call`] returned.
        req: u32,
        /// The answer, or why there is none.
        result: Result<NetMessage, (ErrorCode, String)>,
    },
    /// The relay asks the agent to serve a forward; answer with
    /// [`AgentSession::answer_forward`].
    Forward(Forward),
    /// The relay ended one tunnel (`Removed`, `Replaced`, …).
    TunnelClosed {
        /// Which.
        tunnel: TunnelId,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// An overlay message nobody asked for (state pushed by the relay).
    NetPush(NetMessage),
    /// An error the relay reported that answers no request of this side.
    RelayError {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// A message that has no place here (an agent-to-relay type, or an answer to nothing).
    Unexpected(Message),
    /// The session is over, for the reason given; nothing more will be sent or reported.
    Lost(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `Hello` sent; waiting for `Welcome`.
    Greeting,
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Asked {
    Bind,
    Unbind,
    Net,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    asked: Asked,
    deadline: Option<Instant>,
}

/// The parts both sides' machines share: the outbox, the events, the heartbeat clock.
#[derive(Debug)]
struct Core<E> {
    phase: Phase,
    /// Who the other side is, for messages: "relay" or "agent".
    peer: &'static str,
    timing: Timing,
    out: VecDeque<Message>,
    events: VecDeque<E>,
    last_heard: Instant,
    next_ping: Instant,
    nonce: u64,
}

impl<E> Core<E> {
    fn new(peer: &'static str, now: Instant, timing: Timing) -> Self {
        Self {
            phase: Phase::Greeting,
            peer,
            timing,
            out: VecDeque::new(),
            events: VecDeque::new(),
            last_heard: now,
            next_ping: now + timing.heartbeat,
            nonce: 0,
        }
    }

    /// Sends a ping if one is due; `Some(reason)` when the peer has been silent too long.
    fn tick(&mut self, now: Instant) -> Option<String> {
        if now.saturating_duration_since(self.last_heard) >= self.timing.dead_after {
            return Some(format!(
                "no heartbeat from the {} for {} s",
                self.peer,
                self.timing.dead_after.as_secs()
            ));
        }
        if now >= self.next_ping {
            self.nonce += 1;
            self.out.push_back(Message::Ping { nonce: self.nonce });
            self.next_ping = now + self.timing.heartbeat;
        }
        None
    }

    /// Notes that the peer spoke at `now`; false when the session is over and the message is
    /// to be ignored.
    fn heard(&mut self, now: Instant) -> bool {
        if self.phase == Phase::Closed {
            return false;
        }
        self.last_heard = now;
        true
    }

    fn deadline(&self) -> Instant {
        self.next_ping.min(self.last_heard + self.timing.dead_after)
    }
}

/// The agent's side of one session's control stream.
#[derive(Debug)]
pub struct AgentSession {
    core: Core<AgentEvent>,
    greeting_deadline: Instant,
    next_req: u32,
    pending: HashMap<u32, Pending>,
    /// Forwards the relay asked for and the driver has not answered yet.
    forwards: std::collections::HashSet<u32>,
    /// Requests made before `Welcome`, sent once it arrives (PROTOCOL.md §2: nothing but
    /// `Hello` before it).
    held: Vec<Message>,
}

impl AgentSession {
    /// A session that has just sent its preface and `hello` (the first message
    /// [`Self::poll_transmit`] gives).
    pub fn new(hello: Hello, now: Instant, timing: Timing) -> Self {
        let mut core = Core::new("relay", now, timing);
        core.out.push_back(Message::Hello(hello));
        Self {
            core,
            greeting_deadline: now + timing.answer_within,
            next_req: 1,
            pending: HashMap::new(),
            forwards: Default::default(),
            held: Vec::new(),
        }
    }

    /// Whether the relay has welcomed the session and it is not over.
    pub fn is_open(&self) -> bool {
        self.core.phase == Phase::Open
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.core.phase == Phase::Closed
    }

    /// Requests in flight (binds, unbinds, overlay calls).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn take_req(&mut self, asked: Asked, deadline: Option<Instant>) -> u32 {
        let mut req = self.next_req;
        while req == 0 || self.pending.contains_key(&req) {
            req = req.wrapping_add(1);
        }
        self.next_req = req.wrapping_add(1);
        self.pending.insert(req, Pending { asked, deadline });
        req
    }

    /// Asks for a tunnel (the `req` in `bind` is replaced); the answer comes as
    /// [`AgentEvent::BindAnswered`] with the returned id, within [`Timing::answer_within`] or
    /// the session is lost. A bind asked for before `Welcome` is held until it arrives, and its
    /// clock starts then.
    pub fn bind(&mut self, mut bind: Bind, now: Instant) -> u32 {
        let req = self.take_req(Asked::Bind, Some(now + self.core.timing.answer_within));
        bind.req = req;
        self.send(Message::Bind(bind));
        req
    }

    /// Closes one of this session's tunnels; answered with [`AgentEvent::UnbindAnswered`].
    pub fn unbind(&mut self, tunnel: TunnelId, now: Instant) -> u32 {
        let req = self.take_req(Asked::Unbind, Some(now + self.core.timing.answer_within));
        self.send(Message::Unbind { req, tunnel });
        req
    }

    /// Sends an overlay request built with its request id; answered with
    /// [`AgentEvent::NetAnswered`] (no deadline: the relay may take its time).
    pub fn net_call(&mut self, make: impl FnOnce(u32) -> NetMessage) -> u32 {
        let req = self.take_req(Asked::Net, None);
        self.send(Message::Net(make(req)));
        req
    }

    /// Sends an overlay message the relay does not answer.
    pub fn net_send(&mut self, msg: NetMessage) {
        self.send(Message::Net(msg));
    }

    /// Answers a [`AgentEvent::Forward`]: served, or refused with why. An answer to a forward
    /// the relay did not ask for (or already answered) is ignored.
    pub fn answer_forward(&mut self, req: u32, result: Result<(), (ErrorCode, String)>) {
        if !self.forwards.remove(&req) {
            return;
        }
        self.send(match result {
            Ok(()) => Message::ForwardOk { req },
            Err((code, message)) => Message::Error { req, code, message },
        });
    }

    /// Ends the session politely: `GoAway` is the last message sent (none before `Welcome`).
    pub fn go_away(&mut self, code: ErrorCode, message: String) {
        if self.core.phase == Phase::Open {
            self.core.out.push_back(Message::GoAway { code, message: message.clone() });
        }
        self.close(format!("this agent is going away ({message})"));
    }

    fn send(&mut self, msg: Message) {
        match self.core.phase {
            Phase::Greeting => self.held.push(msg),
            Phase::Open => self.core.out.push_back(msg),
            Phase::Closed => {}
        }
    }

    fn close(&mut self, why: String) {
        if self.core.phase == Phase::Closed {
            return;
        }
        self.core.phase = Phase::Closed;
        self.held.clear();
        self.core.events.push_back(AgentEvent::Lost(why));
    }

    fn refused(&mut self, code: ErrorCode, message: String) {
        self.core.events.push_back(AgentEvent::Refused { code, message: message.clone() });
        self.close(format!("the relay refused the session: {code}: {message}"));
    }

    /// Takes one message from the relay.
    pub fn handle_message(&mut self, msg: Message, now: Instant) {
        if !self.core.heard(now) {
            return;
        }
        if self.core.phase == Phase::Greeting {
            match msg {
                Message::Welcome(w) if SUPPORTED_VERSIONS.contains(&w.version) => {
                    self.core.phase = Phase::Open;
                    self.core.next_ping = now + self.core.timing.heartbeat;
                    let answer_by = now + self.core.timing.answer_within;
                    for p in self.pending.values_mut() {
                        if p.deadline.is_some() {
                            p.deadline = Some(answer_by);
                        }
                    }
                    self.core.out.extend(self.held.drain(..));
                    self.core.events.push_back(AgentEvent::Welcomed(w));
                }
                Message::Welcome(w) => self.refused(
                    ErrorCode::VersionMismatch,
                    format!(
                        "the relay chose protocol version {}, which this agent does not speak; \
                         upgrade the agent",
                        w.version
                    ),
                ),
                Message::Error { code, message, .. } => self.refused(code, message),
                other => self.close(format!("unexpected first message from the relay: {other:?}")),
            }
            return;
        }
        let event = match msg {
            Message::Ping { nonce } => {
                self.core.out.push_back(Message::Pong { nonce });
                None
            }
            Message::Pong { .. } => None,
            Message::GoAway { code, message } => {
                self.close(format!("the relay is going away ({code}: {message})"));
                None
            }
            Message::Bound(b) if self.answers(b.req, Asked::Bind) => {
                Some(AgentEvent::BindAnswered { req: b.req, result: Ok(b) })
            }
            Message::Unbound { req, tunnel } if self.answers(req, Asked::Unbind) => {
                Some(AgentEvent::UnbindAnswered { req, result: Ok(tunnel) })
            }
            Message::Net(m) => match m.answers() {
                Some(req) if self.answers(req, Asked::Net) => {
                    Some(AgentEvent::NetAnswered { req, result: Ok(m) })
                }
                _ => Some(AgentEvent::NetPush(m)),
            },
            Message::Error { req, code, message }
                if req != 0 && self.pending.contains_key(&req) =>
            {
                let asked = self.pending.remove(&req).map(|p| p.asked);
                let err = (code, message);
                Some(match asked {
                    Some(Asked::Bind) => AgentEvent::BindAnswered { req, result: Err(err) },
                    Some(Asked::Unbind) => AgentEvent::UnbindAnswered { req, result: Err(err) },
                    _ => AgentEvent::NetAnswered { req, result: Err(err) },
                })
            }
            Message::Error { req: 0, code: ErrorCode::Malformed, message } => {
                self.close(format!("the relay rejected our frames: {message}"));
                None
            }
            Message::Error { code, message, .. } => Some(AgentEvent::RelayError { code, message }),
            Message::Forward(f) => {
                self.forwards.insert(f.req);
                Some(AgentEvent::Forward(f))
            }
            Message::TunnelClosed { tunnel, code, message } => {
                Some(AgentEvent::TunnelClosed { tunnel, code, message })
            }
            Message::Unknown { kind } => {
                self.core.out.push_back(Message::Error {
                    req: 0,
                    code: ErrorCode::UnknownMessage,
                    message: format!("unknown message type {kind:#x}"),
                });
                None
            }
            other => Some(AgentEvent::Unexpected(other)),
        };
        self.core.events.extend(event);
    }

    /// Whether `req` is a request of kind `asked` in flight; if so it is answered now.
    fn answers(&mut self, req: u32, asked: Asked) -> bool {
        match self.pending.get(&req) {
            Some(p) if p.asked == asked => {
                self.pending.remove(&req);
                true
            }
            _ => false,
        }
    }

    /// Lets the clock pass `now`: pings, and the deadlines of the greeting, of binds and of
    /// the peer's heartbeat.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.core.phase {
            Phase::Closed => {}
            Phase::Greeting => {
                if now >= self.greeting_deadline {
                    self.close("the relay did not answer the handshake in time".into());
                }
            }
            Phase::Open => {
                if let Some(why) = self.core.tick(now) {
                    return self.close(why);
                }
                let late = self
                    .pending
                    .iter()
                    .filter(|(_, p)| p.deadline.is_some_and(|d| now >= d))
                    .map(|(req, p)| (*req, p.asked))
                    .min();
                if let Some((req, asked)) = late {
                    let what = if asked == Asked::Bind { "bind" } else { "unbind" };
                    self.close(format!(
                        "the relay did not answer {what} request {req} within {} s",
                        self.core.timing.answer_within.as_secs()
                    ));
                }
            }
        }
    }

    /// When [`Self::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.core.phase {
            Phase::Closed => None,
            Phase::Greeting => Some(self.greeting_deadline),
            Phase::Open => {
                let bind = self.pending.values().filter_map(|p| p.deadline).min();
                Some(bind.map_or(self.core.deadline(), |d| d.min(self.core.deadline())))
            }
        }
    }

    /// The next message to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.core.out.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.core.events.pop_front()
    }
}

/// What the relay's side of a session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// The agent's `Hello`: check its token, then [`RelaySession::welcome`] or
    /// [`RelaySession::refuse`].
    Hello(Hello),
    /// The agent asks for a tunnel; answer with [`RelaySession::answer`].
    Bind(Bind),
    /// The agent closes one of its tunnels; answer with [`RelaySession::answer`].
    Unbind {
        /// The request id.
        req: u32,
        /// Which tunnel.
        tunnel: TunnelId,
    },
    /// An overlay message from the agent (a request to answer, or a report).
    Net(NetMessage),
    /// The agent answered a `Forward` this side sent (`Ok` for `ForwardOk`).
    ForwardAnswered {
        /// The forward's request id.
        req: u32,
        /// Served, or why not.
        result: Result<(), (ErrorCode, String)>,
    },
    /// An error the agent reported that answers no forward.
    AgentError {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// A message that has no place here (a relay-to-agent type).
    Unexpected(Message),
    /// The session is over, for the reason given.
    Lost(String),
}

/// The relay's side of one session's control stream, from the agent's `Hello` on (the preface
/// and its version choice come before, from the bytes alone).
#[derive(Debug)]
pub struct RelaySession {
    core: Core<RelayEvent>,
    /// Forwards sent and not yet answered.
    forwards: std::collections::HashSet<u32>,
    /// Requests of the agent not yet answered, so an answer goes out once.
    asked: std::collections::HashSet<u32>,
    greeted: bool,
}

impl RelaySession {
    /// A session whose preface has been read; the next message must be `Hello`.
    pub fn new(now: Instant, timing: Timing) -> Self {
        Self {
            core: Core::new("agent", now, timing),
            forwards: Default::default(),
            asked: Default::default(),
            greeted: false,
        }
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.core.phase == Phase::Closed
    }

    fn close(&mut self, why: String) {
        if self.core.phase != Phase::Closed {
            self.core.phase = Phase::Closed;
            self.core.events.push_back(RelayEvent::Lost(why));
        }
    }

    fn send(&mut self, msg: Message) {
        if self.core.phase != Phase::Closed {
            self.core.out.push_back(msg);
        }
    }

    /// Accepts the session after its `Hello`.
    pub fn welcome(&mut self, welcome: Welcome, now: Instant) {
        if self.core.phase == Phase::Greeting && self.greeted {
            self.core.phase = Phase::Open;
            self.core.last_heard = now;
            self.core.next_ping = now + self.core.timing.heartbeat;
            self.core.out.push_back(Message::Welcome(welcome));
        }
    }

    /// Refuses the session: the `Error` is the last message sent.
    pub fn refuse(&mut self, code: ErrorCode, message: String) {
        self.send(Message::Error { req: 0, code, message: message.clone() });
        self.close(format!("refused: {code}: {message}"));
    }

    /// Answers a [`RelayEvent::Bind`] or [`RelayEvent::Unbind`]: `Bound`/`Unbound` or `Error`.
    /// Only the first answer to a request goes out.
    pub fn answer(&mut self, req: u32, answer: Result<Message, (ErrorCode, String)>) {
        if !self.asked.remove(&req) {
            return;
        }
        self.send(match answer {
            Ok(msg) => msg,
            Err((code, message)) => Message::Error { req, code, message },
        });
    }

    /// Sends a forward (its `req` chosen by the caller, unique among forwards in flight);
    /// answered with [`RelayEvent::ForwardAnswered`].
    pub fn forward(&mut self, forward: Forward) {
        if self.core.phase == Phase::Open {
            self.forwards.insert(forward.req);
            self.send(Message::Forward(forward));
        }
    }

    /// Sends a message that answers nothing (`TunnelClosed`, overlay pushes and answers).
    pub fn notify(&mut self, msg: Message) {
        if self.core.phase == Phase::Open {
            self.send(msg);
        }
    }

    /// Ends the session: `GoAway` is the last message sent.
    pub fn go_away(&mut self, code: ErrorCode, message: String) {
        self.send(Message::GoAway { code, message: message.clone() });
        self.close(format!("the relay ended the session ({code}: {message})"));
    }

    /// Takes one message from the agent.
    pub fn handle_message(&mut self, msg: Message, now: Instant) {
        if !self.core.heard(now) {
            return;
        }
        if self.core.phase == Phase::Greeting {
            match msg {
                Message::Hello(h) if !self.greeted => {
                    self.greeted = true;
                    self.core.events.push_back(RelayEvent::Hello(h));
                }
                _ if self.greeted => {
                    self.send(Message::Error {
                        req: 0,
                        code: ErrorCode::Malformed,
                        message: "nothing may follow Hello before Welcome".into(),
                    });
                    self.close("the agent spoke before it was welcomed".into());
                }
                _ => self.refuse(ErrorCode::Malformed, "expected Hello after the preface".into()),
            }
            return;
        }
        let events = &mut self.core.events;
        match msg {
            Message::Ping { nonce } => self.core.out.push_back(Message::Pong { nonce }),
            Message::Pong { .. } => {}
            Message::GoAway { code, message } => {
                self.close(format!("the agent went away ({code}: {message})"));
            }
            Message::Bind(b) => {
                self.asked.insert(b.req);
                events.push_back(RelayEvent::Bind(b));
            }
            Message::Unbind { req, tunnel } => {
                self.asked.insert(req);
                events.push_back(RelayEvent::Unbind { req, tunnel });
            }
            Message::Net(m) => events.push_back(RelayEvent::Net(m)),
            Message::ForwardOk { req } if self.forwards.remove(&req) => {
                events.push_back(RelayEvent::ForwardAnswered { req, result: Ok(()) });
            }
            Message::Error { req, code, message } if self.forwards.remove(&req) => {
                events.push_back(RelayEvent::ForwardAnswered { req, result: Err((code, message)) });
            }
            Message::Error { code, message, .. } => {
                events.push_back(RelayEvent::AgentError { code, message });
            }
            Message::Unknown { kind } => self.core.out.push_back(Message::Error {
                req: 0,
                code: ErrorCode::UnknownMessage,
                message: format!("unknown message type {kind:#x}"),
            }),
            other => events.push_back(RelayEvent::Unexpected(other)),
        }
    }

    /// Lets the clock pass `now`: pings and the agent's heartbeat. (The handshake's deadline
    /// is the driver's, since it also covers the transport's handshake.)
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.core.phase == Phase::Open
            && let Some(why) = self.core.tick(now)
        {
            self.send(Message::GoAway { code: ErrorCode::Timeout, message: "no heartbeat".into() });
            self.close(why);
        }
    }

    /// When [`Self::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.core.phase == Phase::Open).then(|| self.core.deadline())
    }

    /// The next message to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.core.out.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.core.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
