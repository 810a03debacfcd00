//! The two machines driven against each other, with no sockets: hand-picked orderings, and
//! property tests over random interleavings of requests, deliveries and clock ticks.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::message::{Protocol, Token};
use crate::names::{AgentId, TunnelName};
use crate::options::TunnelOptions;

fn hello() -> Hello {
    Hello {
        token: Token::new("t"),
        agent_id: AgentId::parse("laptop").expect("id"),
        agent_version: "test".into(),
    }
}

fn welcome(version: u16) -> Welcome {
    Welcome {
        version,
        session_id: 1,
        relay_version: "test".into(),
        domain: "localhost".into(),
        heartbeat_secs: 5,
        lease_grace_secs: 300,
    }
}

fn bind(name: &str) -> Bind {
    Bind {
        req: 0,
        name: TunnelName::parse(name).expect("name"),
        protocol: Protocol::Http,
        subdomain: None,
        remote_port: None,
        sticky: false,
        options: TunnelOptions::default(),
    }
}

fn bound(req: u32, tunnel: u32) -> Bound {
    Bound {
        req,
        tunnel: TunnelId(tunnel),
        url: format!("http://t{tunnel}.localhost"),
        subdomain: None,
        remote_port: None,
        notice: String::new(),
    }
}

fn forward(req: u32, tunnel: u32) -> Forward {
    Forward {
        req,
        tunnel: TunnelId(tunnel),
        name: TunnelName::parse(&format!("fwd-{tunnel}")).expect("name"),
        protocol: Protocol::Tcp,
        target: "8080".into(),
        url: "tcp://localhost:30000".into(),
    }
}

fn drain_out(a: &mut AgentSession) -> Vec<Message> {
    std::iter::from_fn(|| a.poll_transmit()).collect()
}

fn drain_events(a: &mut AgentSession) -> Vec<AgentEvent> {
    std::iter::from_fn(|| a.poll_event()).collect()
}

fn welcomed(now: Instant) -> AgentSession {
    let mut a = AgentSession::new(hello(), now, Timing::default());
    assert!(matches!(drain_out(&mut a)[..], [Message::Hello(_)]));
    a.handle_message(Message::Welcome(welcome(crate::PROTOCOL_VERSION)), now);
    assert!(matches!(drain_events(&mut a)[..], [AgentEvent::Welcomed(_)]));
    a
}

/// The sequence of issue 17's first finding: the relay reopens a forward while the agent waits
/// for the answers to its own binds. Every message is handled; nothing is taken for an answer
/// it is not.
#[test]
fn a_forward_between_binds_and_their_answers() {
    let now = Instant::now();
    let mut a = welcomed(now);
    let r1 = a.bind(bind("web"), now);
    let r2 = a.bind(bind("db"), now);
    assert_eq!(drain_out(&mut a).len(), 2);
    a.handle_message(Message::Forward(forward(r1, 9)), now);
    a.handle_message(Message::Ping { nonce: 3 }, now);
    a.handle_message(Message::Bound(bound(r2, 2)), now);
    a.handle_message(Message::Bound(bound(r1, 1)), now);
    let events = drain_events(&mut a);
    assert!(matches!(&events[0], AgentEvent::Forward(f) if f.req == r1));
    assert!(
        matches!(&events[1], AgentEvent::BindAnswered { req, result: Ok(b) } if *req == r2 && b.tunnel == TunnelId(2))
    );
    assert!(
        matches!(&events[2], AgentEvent::BindAnswered { req, result: Ok(b) } if *req == r1 && b.tunnel == TunnelId(1))
    );
    assert_eq!(events.len(), 3);
    a.answer_forward(r1, Ok(()));
    a.answer_forward(r1, Ok(()));
    assert_eq!(drain_out(&mut a), vec![Message::Pong { nonce: 3 }, Message::ForwardOk { req: r1 }]);
    assert!(a.is_open());
    assert_eq!(a.pending(), 0);
}

/// An answer to nothing, or of the wrong kind, is reported and answers nothing.
#[test]
fn answers_are_matched_by_id_and_kind() {
    let now = Instant::now();
    let mut a = welcomed(now);
    let req = a.bind(bind("web"), now);
    a.handle_message(Message::Unbound { req, tunnel: TunnelId(1) }, now);
    a.handle_message(Message::Bound(bound(req + 7, 1)), now);
    let events = drain_events(&mut a);
    assert!(matches!(events[..], [AgentEvent::Unexpected(_), AgentEvent::Unexpected(_)]));
    assert_eq!(a.pending(), 1);
    a.handle_message(
        Message::Error { req, code: ErrorCode::SubdomainTaken, message: "x".into() },
        now,
    );
    assert!(matches!(
        drain_events(&mut a)[..],
        [AgentEvent::BindAnswered { result: Err((ErrorCode::SubdomainTaken, _)), .. }]
    ));
}

/// Nothing but `Hello` goes out before `Welcome`; binds asked for meanwhile follow it.
#[test]
fn binds_wait_for_welcome() {
    let now = Instant::now();
    let mut a = AgentSession::new(hello(), now, Timing::default());
    let req = a.bind(bind("web"), now);
    assert!(matches!(drain_out(&mut a)[..], [Message::Hello(_)]));
    a.handle_message(
        Message::Welcome(welcome(crate::PROTOCOL_VERSION)),
        now + Duration::from_secs(9),
    );
    assert!(matches!(&drain_out(&mut a)[..], [Message::Bind(b)] if b.req == req));
    // Its clock started at Welcome, not at the call.
    a.handle_timeout(now + Duration::from_secs(12));
    assert!(a.is_open());
}

#[test]
fn refusals_and_wrong_versions_end_the_greeting() {
    let now = Instant::now();
    let mut a = AgentSession::new(hello(), now, Timing::default());
    a.handle_message(Message::Welcome(welcome(999)), now);
    assert!(matches!(
        drain_events(&mut a)[..],
        [AgentEvent::Refused { code: ErrorCode::VersionMismatch, .. }, AgentEvent::Lost(_)]
    ));
    let mut a = AgentSession::new(hello(), now, Timing::default());
    a.handle_message(
        Message::Error { req: 0, code: ErrorCode::Unauthorized, message: "no".into() },
        now,
    );
    assert!(matches!(
        drain_events(&mut a)[0],
        AgentEvent::Refused { code: ErrorCode::Unauthorized, .. }
    ));
    assert!(a.is_closed());
    let mut a = AgentSession::new(hello(), now, Timing::default());
    a.handle_message(Message::Ping { nonce: 1 }, now);
    assert!(
        matches!(&drain_events(&mut a)[..], [AgentEvent::Lost(why)] if why.contains("first message"))
    );
}

#[test]
fn the_clock_pings_and_gives_up() {
    let now = Instant::now();
    let t = Timing::default();
    let mut a = AgentSession::new(hello(), now, t);
    assert_eq!(a.poll_timeout(), Some(now + t.answer_within));
    a.handle_timeout(now + t.answer_within);
    assert!(
        matches!(&drain_events(&mut a)[..], [AgentEvent::Lost(why)] if why.contains("handshake"))
    );

    let mut a = welcomed(now);
    drain_out(&mut a);
    assert_eq!(a.poll_timeout(), Some(now + t.heartbeat));
    a.handle_timeout(now + t.heartbeat);
    assert!(matches!(drain_out(&mut a)[..], [Message::Ping { .. }]));
    a.handle_timeout(now + t.dead_after);
    assert!(
        matches!(&drain_events(&mut a)[..], [AgentEvent::Lost(why)] if why.contains("heartbeat"))
    );
    assert_eq!(a.poll_timeout(), None);

    let mut a = welcomed(now);
    a.bind(bind("web"), now);
    a.handle_message(Message::Pong { nonce: 1 }, now + t.answer_within - Duration::from_millis(1));
    a.handle_timeout(now + t.answer_within);
    assert!(matches!(&drain_events(&mut a)[..], [AgentEvent::Lost(why)] if why.contains("bind")));
}

#[test]
fn the_relay_wants_hello_first_and_answers_once() {
    let now = Instant::now();
    let mut r = RelaySession::new(now, Timing::default());
    r.handle_message(Message::Ping { nonce: 1 }, now);
    assert!(matches!(r.poll_transmit(), Some(Message::Error { code: ErrorCode::Malformed, .. })));
    assert!(r.is_closed());

    let mut r = RelaySession::new(now, Timing::default());
    r.handle_message(Message::Hello(hello()), now);
    assert!(matches!(r.poll_event(), Some(RelayEvent::Hello(_))));
    r.welcome(welcome(crate::PROTOCOL_VERSION), now);
    assert!(matches!(r.poll_transmit(), Some(Message::Welcome(_))));
    let mut b = bind("web");
    b.req = 4;
    r.handle_message(Message::Bind(b), now);
    assert!(matches!(r.poll_event(), Some(RelayEvent::Bind(b)) if b.req == 4));
    r.answer(4, Ok(Message::Bound(bound(4, 1))));
    r.answer(4, Err((ErrorCode::Internal, "again".into())));
    assert!(matches!(r.poll_transmit(), Some(Message::Bound(_))));
    assert_eq!(r.poll_transmit(), None);
    r.forward(forward(4, 9));
    r.handle_message(
        Message::Error { req: 4, code: ErrorCode::InvalidRequest, message: "no".into() },
        now,
    );
    r.handle_message(Message::ForwardOk { req: 4 }, now);
    assert!(matches!(r.poll_event(), Some(RelayEvent::ForwardAnswered { req: 4, result: Err(_) })));
    assert!(matches!(r.poll_event(), Some(RelayEvent::Unexpected(Message::ForwardOk { req: 4 }))));
    r.handle_timeout(now + Duration::from_secs(20));
    assert!(r.is_closed());
}

// ---- both sides, any interleaving ---------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    /// The agent's driver asks for a tunnel (names repeat, so some are refused as taken).
    Bind(u8),
    /// The agent's driver closes one of its bound tunnels (by index), or an unknown one.
    Unbind(u8),
    /// The agent's driver makes an overlay request.
    Net,
    /// The relay's driver opens a forward; odd ones are refused by the agent's driver.
    Forward,
    /// The relay removes one of the agent's tunnels.
    Remove(u8),
    /// The next `n` messages in flight to the relay, or to the agent, arrive.
    ToRelay(u8),
    ToAgent(u8),
    /// Time passes.
    Tick(u16),
    /// One side ends the session.
    AgentGoAway,
    RelayGoAway,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..6).prop_map(Step::Bind),
        1 => any::<u8>().prop_map(Step::Unbind),
        1 => Just(Step::Net),
        2 => Just(Step::Forward),
        1 => any::<u8>().prop_map(Step::Remove),
        4 => (1u8..4).prop_map(Step::ToRelay),
        4 => (1u8..4).prop_map(Step::ToAgent),
        2 => (1u16..3000).prop_map(Step::Tick),
        1 => Just(Step::AgentGoAway),
        1 => Just(Step::RelayGoAway),
    ]
}

/// Both sides with their drivers, and the control stream's two directions in flight.
struct World {
    now: Instant,
    agent: AgentSession,
    relay: RelaySession,
    to_relay: std::collections::VecDeque<Message>,
    to_agent: std::collections::VecDeque<Message>,
    /// Agent's driver: what each request asked.
    binds: HashMap<u32, TunnelName>,
    unbinds: HashSet<u32>,
    nets: HashSet<u32>,
    answered: HashSet<u32>,
    agent_tunnels: Vec<TunnelId>,
    /// Relay's driver.
    names: HashMap<TunnelName, TunnelId>,
    /// What the relay's driver answered each bind with.
    granted: HashMap<u32, (TunnelName, TunnelId)>,
    next_tunnel: u32,
    forwards: HashSet<u32>,
    forwards_answered: HashSet<u32>,
    next_forward: u32,
    ended_by_choice: bool,
}

impl World {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            now,
            agent: AgentSession::new(hello(), now, Timing::default()),
            relay: RelaySession::new(now, Timing::default()),
            to_relay: Default::default(),
            to_agent: Default::default(),
            binds: HashMap::new(),
            unbinds: HashSet::new(),
            nets: HashSet::new(),
            answered: HashSet::new(),
            agent_tunnels: Vec::new(),
            names: HashMap::new(),
            granted: HashMap::new(),
            next_tunnel: 1,
            forwards: HashSet::new(),
            forwards_answered: HashSet::new(),
            next_forward: 1,
            ended_by_choice: false,
        }
    }

    /// Moves what both machines want to send onto the wire, and runs both drivers.
    fn pump(&mut self) -> Result<(), TestCaseError> {
        loop {
            let mut moved = false;
            while let Some(m) = self.agent.poll_transmit() {
                self.to_relay.push_back(m);
                moved = true;
            }
            while let Some(m) = self.relay.poll_transmit() {
                self.to_agent.push_back(m);
                moved = true;
            }
            while let Some(e) = self.agent.poll_event() {
                moved = true;
                self.on_agent_event(e)?;
            }
            while let Some(e) = self.relay.poll_event() {
                moved = true;
                self.on_relay_event(e)?;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn on_agent_event(&mut self, e: AgentEvent) -> Result<(), TestCaseError> {
        match e {
            AgentEvent::Welcomed(_) | AgentEvent::NetPush(_) => {}
            AgentEvent::BindAnswered { req, result } => {
                prop_assert!(self.answered.insert(req), "bind {} answered twice", req);
                let name = self.binds.get(&req).cloned();
                prop_assert!(name.is_some(), "answer to a bind never asked: {}", req);
                match result {
                    Ok(b) => {
                        prop_assert_eq!(b.req, req);
                        prop_assert_eq!(
                            self.granted.get(&req),
                            Some(&(name.unwrap_or_else(|| unreachable!()), b.tunnel))
                        );
                        self.agent_tunnels.push(b.tunnel);
                    }
                    Err((code, _)) => prop_assert_eq!(code, ErrorCode::SubdomainTaken),
                }
            }
            AgentEvent::UnbindAnswered { req, .. } => {
                prop_assert!(self.unbinds.contains(&req) && self.answered.insert(req));
            }
            AgentEvent::NetAnswered { req, result } => {
                prop_assert!(self.nets.contains(&req) && self.answered.insert(req));
                prop_assert!(result.is_ok());
            }
            AgentEvent::Forward(f) => {
                let answer = if f.req % 2 == 0 {
                    Ok(())
                } else {
                    Err((ErrorCode::InvalidRequest, "not allowed".into()))
                };
                self.agent.answer_forward(f.req, answer);
            }
            AgentEvent::TunnelClosed { tunnel, code, .. } => {
                prop_assert_eq!(code, ErrorCode::Removed);
                self.agent_tunnels.retain(|t| *t != tunnel);
            }
            AgentEvent::Lost(why) => {
                prop_assert!(
                    self.ended_by_choice
                        || why.contains("heartbeat")
                        || why.contains("did not answer"),
                    "agent lost the session: {}",
                    why
                );
            }
            other => prop_assert!(false, "agent: {:?}", other),
        }
        Ok(())
    }

    fn on_relay_event(&mut self, e: RelayEvent) -> Result<(), TestCaseError> {
        match e {
            RelayEvent::Hello(_) => self.relay.welcome(welcome(crate::PROTOCOL_VERSION), self.now),
            RelayEvent::Bind(b) => {
                let answer = if self.names.contains_key(&b.name) {
                    Err((ErrorCode::SubdomainTaken, "taken".into()))
                } else {
                    let id = TunnelId(self.next_tunnel);
                    self.next_tunnel += 1;
                    self.names.insert(b.name.clone(), id);
                    self.granted.insert(b.req, (b.name.clone(), id));
                    Ok(Message::Bound(bound(b.req, id.0)))
                };
                self.relay.answer(b.req, answer);
            }
            RelayEvent::Unbind { req, tunnel } => {
                let known = self.names.values().any(|t| *t == tunnel);
                self.names.retain(|_, t| *t != tunnel);
                self.relay.answer(
                    req,
                    if known {
                        Ok(Message::Unbound { req, tunnel })
                    } else {
                        Err((ErrorCode::UnknownTunnel, "unknown".into()))
                    },
                );
            }
            RelayEvent::Net(m) => {
                if let Some(req) = m.request() {
                    self.relay.notify(Message::Net(NetMessage::Ok { req }));
                }
            }
            RelayEvent::ForwardAnswered { req, result } => {
                prop_assert!(self.forwards.contains(&req), "answer to a forward never sent");
                prop_assert!(self.forwards_answered.insert(req), "forward {} answered twice", req);
                prop_assert_eq!(result.is_ok(), req % 2 == 0);
            }
            RelayEvent::Lost(why) => {
                prop_assert!(
                    self.ended_by_choice || why.contains("heartbeat"),
                    "relay lost the session: {}",
                    why
                );
            }
            other => prop_assert!(false, "relay: {:?}", other),
        }
        Ok(())
    }

    fn apply(&mut self, s: Step) -> Result<(), TestCaseError> {
        let now = self.now;
        match s {
            Step::Bind(n) => {
                let name = TunnelName::parse(&format!("t{n}")).expect("name");
                let req = self.agent.bind(bind(name.as_str()), now);
                self.binds.insert(req, name);
            }
            Step::Unbind(i) => {
                let tunnel = match self.agent_tunnels.len() {
                    0 => TunnelId(9999),
                    n => self.agent_tunnels.remove(i as usize % n),
                };
                if self.agent.is_open() {
                    self.unbinds.insert(self.agent.unbind(tunnel, now));
                }
            }
            Step::Net => {
                let req = self.agent.net_call(|req| NetMessage::Watch { req });
                self.nets.insert(req);
            }
            Step::Forward => {
                if !self.relay.is_closed() && self.relay.poll_timeout().is_some() {
                    let req = self.next_forward;
                    self.next_forward += 1;
                    self.forwards.insert(req);
                    self.relay.forward(forward(req, 1000 + req));
                }
            }
            Step::Remove(i) => {
                let ids: Vec<TunnelId> = self.names.values().copied().collect();
                if !ids.is_empty() {
                    let tunnel = ids[i as usize % ids.len()];
                    self.names.retain(|_, t| *t != tunnel);
                    self.relay.notify(Message::TunnelClosed {
                        tunnel,
                        code: ErrorCode::Removed,
                        message: "removed".into(),
                    });
                }
            }
            Step::ToRelay(n) => {
                for _ in 0..n {
                    if let Some(m) = self.to_relay.pop_front() {
                        self.relay.handle_message(m, now);
                    }
                }
            }
            Step::ToAgent(n) => {
                for _ in 0..n {
                    if let Some(m) = self.to_agent.pop_front() {
                        self.agent.handle_message(m, now);
                    }
                }
            }
            Step::Tick(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                self.agent.handle_timeout(self.now);
                self.relay.handle_timeout(self.now);
            }
            Step::AgentGoAway => {
                self.ended_by_choice = true;
                self.agent.go_away(ErrorCode::ShuttingDown, "bye".into());
            }
            Step::RelayGoAway => {
                self.ended_by_choice = true;
                self.relay.go_away(ErrorCode::ShuttingDown, "bye".into());
            }
        }
        self.pump()
    }

    /// Delivers everything in flight, both ways, without letting time pass.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..1000 {
            if self.to_relay.is_empty() && self.to_agent.is_empty() {
                return Ok(());
            }
            self.apply(Step::ToRelay(u8::MAX))?;
            self.apply(Step::ToAgent(u8::MAX))?;
        }
        prop_assert!(false, "the two sides never went quiet");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any interleaving of requests from both sides, deliveries and clock ticks: nothing is
    /// unexpected, nothing is answered twice or to the wrong request, and once everything in
    /// flight has arrived, every request of a session still open has been answered.
    #[test]
    fn any_interleaving_keeps_both_sides_in_step(steps in proptest::collection::vec(step(), 1..80)) {
        let mut w = World::new();
        w.pump()?;
        for s in steps {
            w.apply(s)?;
        }
        w.settle()?;
        if !w.agent.is_closed() && !w.relay.is_closed() {
            prop_assert_eq!(w.agent.pending(), 0, "requests left unanswered");
            let asked: HashSet<u32> = w.binds.keys().chain(&w.unbinds).chain(&w.nets).copied().collect();
            prop_assert_eq!(&asked, &w.answered);
            prop_assert_eq!(&w.forwards, &w.forwards_answered);
        }
    }
}
