//! The overlay's data plane in the agent: the tap port of each overlay bridge, probes of the
//! direct (VXLAN) path to every peer, and frames over the relay when that path is down.
//!
//! Frames between hosts normally never touch the agent: the kernel's VXLAN device carries
//! them, steered by the forwarding entries the manager programs. The agent probes that very
//! path to each peer twice a second: it writes a probe frame into its tap, addressed to the
//! peer's probe MAC, which the bridge sends into the VXLAN device like any frame; the peer's
//! bridge hands it to the peer's tap, and the peer's agent answers the same way. While answers
//! come, the peer's MACs point at the VXLAN port ([`PathKind::Direct`]); after
//! [`DIRECT_TIMEOUT`] without one they point at the tap ([`PathKind::Relay`]), and the agent
//! carries the frames over its relay session: cut into pieces of at most
//! [`overlay::MAX_PIECE`] bytes, as overlay datagrams the relay forwards to the peer's agent,
//! which puts them together and writes them into its own tap. Frames from the relay are
//! written only if they come from a MAC of the peer that sent them and go to a MAC of this
//! host, so a peer can neither spoof another one nor reach anything else through the tap.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::task::AbortOnDropHandle;
use warren_proto::datagram::{decode_record, encode_record};
use warren_proto::overlay::{self, FrameHeader, PathKind, Vni};
use warren_transport::{Session, Stream};

use super::model::{NetError, mac_for, probe_mac_for};

/// The EtherType of probe frames (IEEE 802 local experimental).
pub const PROBE_ETHERTYPE: u16 = 0x88b5;

/// How often each peer's direct path is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Without a probe answer for this long (three probes), frames to a peer go over the relay.
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(1600);

const PROBE_MAGIC: &[u8; 4] = b"WRPB";
const PROBE_REQUEST: u8 = 1;
const PROBE_ANSWER: u8 = 2;

/// Partly received frames kept at once, and how long a piece waits for the others.
const REASSEMBLY_SLOTS: usize = 512;
const REASSEMBLY_WAIT: Duration = Duration::from_secs(1);

/// Frames queued towards the relay stream (TLS + yamux) before newer ones are dropped.
const STREAM_QUEUE: usize = 1024;

/// How frames reach the relay now.
#[derive(Debug, Clone)]
pub enum RelaySender {
    /// QUIC datagrams.
    Quic(Session),
    /// Records on the relay's overlay stream.
    Stream(mpsc::Sender<Bytes>),
}

impl RelaySender {
    fn send(&self, d: Bytes) -> bool {
        match self {
            Self::Quic(s) => s.send_datagram(d).is_ok(),
            Self::Stream(tx) => tx.try_send(d).is_ok(),
        }
    }
}

/// One peer as the data plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSpec {
    /// Its address in the network.
    pub addr: Ipv4Addr,
    /// Its VXLAN endpoint.
    pub vtep: Ipv4Addr,
    /// Its relay session is up.
    pub online: bool,
}

/// What the data plane knows about its path to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathState {
    /// Where frames go now.
    pub path: PathKind,
    /// The last probe's round trip.
    pub rtt: Option<Duration>,
}

#[derive(Debug)]
struct Peer {
    spec: PeerSpec,
    last_answer: Option<Instant>,
    rtt: Option<Duration>,
    path: PathKind,
    seq: u32,
    sent: HashMap<u32, Instant>,
}

#[derive(Debug, Default)]
struct Macs {
    /// Remote MAC → the peer it lives on.
    remote: HashMap<[u8; 6], Ipv4Addr>,
    /// MACs on this host (endpoints, the bridge).
    local: HashSet<[u8; 6]>,
}

#[derive(Debug)]
struct Partial {
    pieces: Vec<Option<Bytes>>,
    missing: usize,
    at: Instant,
}

/// Counters of one network's relay path.
#[derive(Debug, Default)]
pub struct PathCounters {
    /// Frames sent over the relay.
    pub frames_out: AtomicU64,
    /// Frames received over the relay and written to the tap.
    pub frames_in: AtomicU64,
    /// Frames dropped: unknown destination, failed checks, lost pieces, full queues.
    pub dropped: AtomicU64,
}

struct NetPath {
    vni: Vni,
    me: Ipv4Addr,
    tap: Arc<tokio_tun::Tun>,
    peers: Mutex<HashMap<Ipv4Addr, Peer>>,
    macs: RwLock<Macs>,
    next_frame: AtomicU16,
    partial: Mutex<HashMap<(Ipv4Addr, u16), Partial>>,
    counters: PathCounters,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

/// A network's data plane and the tasks (tap reader, prober) that serve it.
type NetEntry = (Arc<NetPath>, Vec<AbortOnDropHandle<()>>);

/// The data plane of every overlay network of this host.
pub struct Datapath {
    nets: Mutex<HashMap<Vni, NetEntry>>,
    link: RwLock<Option<RelaySender>>,
    /// Woken when a path changes (the manager reprograms the bridges).
    changed: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn probe_frame(kind: u8, vni: Vni, from: Ipv4Addr, to: Ipv4Addr, seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&probe_mac_for(to));
    f.extend_from_slice(&probe_mac_for(from));
    f.extend_from_slice(&PROBE_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(PROBE_MAGIC);
    f.push(kind);
    f.extend_from_slice(&vni.get().to_be_bytes());
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(60, 0);
    f
}

/// A probe's (kind, vni, sender, seq), if `f` is one.
fn parse_probe(f: &[u8]) -> Option<(u8, u32, Ipv4Addr, u32)> {
    if f.len() < 31 || f[12..14] != PROBE_ETHERTYPE.to_be_bytes() || &f[14..18] != PROBE_MAGIC {
        return None;
    }
    let mut b = &f[18..31];
    let kind = b.get_u8();
    let vni = b.get_u32();
    let from = Ipv4Addr::from(b.get_u32());
    Some((kind, vni, from, b.get_u32()))
}

fn dst_mac(f: &[u8]) -> Option<[u8; 6]> {
    f.get(..6).and_then(|m| <[u8; 6]>::try_from(m).ok())
}

fn src_mac(f: &[u8]) -> Option<[u8; 6]> {
    f.get(6..12).and_then(|m| <[u8; 6]>::try_from(m).ok())
}

impl NetPath {
    async fn handle_probe(&self, kind: u8, from: Ipv4Addr, seq: u32) {
        match kind {
            PROBE_REQUEST => {
                let known = lock(&self.peers).contains_key(&from);
                if known {
                    let answer = probe_frame(PROBE_ANSWER, self.vni, self.me, from, seq);
                    let _ = self.tap.send(&answer).await;
                }
            }
            PROBE_ANSWER => {
                let mut peers = lock(&self.peers);
                if let Some(p) = peers.get_mut(&from)
                    && let Some(at) = p.sent.remove(&seq)
                {
                    p.last_answer = Some(Instant::now());
                    p.rtt = Some(at.elapsed());
                }
            }
            _ => {}
        }
    }

    /// Sends one frame from the tap to `peer` over the relay.
    fn to_relay(&self, link: &RelaySender, peer: Ipv4Addr, frame: &[u8]) {
        let id = self.next_frame.fetch_add(1, Ordering::Relaxed);
        let parts = frame.len().div_ceil(overlay::MAX_PIECE).max(1);
        let Ok(parts) = u8::try_from(parts) else { return };
        if parts > overlay::MAX_PARTS {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for (i, piece) in frame.chunks(overlay::MAX_PIECE).enumerate() {
            let mut d = BytesMut::with_capacity(overlay::FRAME_HEADER_LEN + piece.len());
            FrameHeader { vni: self.vni, peer, frame: id, part: i as u8, parts }.encode(&mut d);
            d.extend_from_slice(piece);
            if !link.send(d.freeze()) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.counters.frames_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts a piece from the relay with the others of its frame; the whole frame once
    /// complete.
    fn reassemble(&self, h: &FrameHeader, piece: &[u8]) -> Option<Bytes> {
        if h.parts == 1 {
            return Some(Bytes::copy_from_slice(piece));
        }
        let mut partial = lock(&self.partial);
        let now = Instant::now();
        if partial.len() >= REASSEMBLY_SLOTS {
            partial.retain(|_, p| now.duration_since(p.at) < REASSEMBLY_WAIT);
            if partial.len() >= REASSEMBLY_SLOTS {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let key = (h.peer, h.frame);
        let slot = partial.entry(key).or_insert_with(|| Partial {
            pieces: vec![None; usize::from(h.parts)],
            missing: usize::from(h.parts),
            at: now,
        });
        if slot.pieces.len() != usize::from(h.parts) {
            // A stale frame id reused with another cut: start over.
            *slot = Partial {
                pieces: vec![None; usize::from(h.parts)],
                missing: usize::from(h.parts),
                at: now,
            };
        }
        let i = usize::from(h.part);
        if slot.pieces[i].is_none() {
            slot.pieces[i] = Some(Bytes::copy_from_slice(piece));
            slot.missing -= 1;
        }
        if slot.missing > 0 {
            return None;
        }
        let done = partial.remove(&key)?;
        let mut out = BytesMut::new();
        for p in done.pieces.into_iter().flatten() {
            out.extend_from_slice(&p);
        }
        Some(out.freeze())
    }

    /// One datagram from the relay.
    fn deliver(&self, h: FrameHeader, piece: &[u8]) {
        let dropped = || {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        };
        if !lock(&self.peers).contains_key(&h.peer) {
            return dropped();
        }
        let Some(frame) = self.reassemble(&h, piece) else { return };
        let allowed = {
            let macs = self.macs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let from_peer = src_mac(&frame).and_then(|m| macs.remote.get(&m)) == Some(&h.peer);
            let to_here = dst_mac(&frame).is_some_and(|m| macs.local.contains(&m));
            from_peer && to_here
        };
        if !allowed {
            return dropped();
        }
        // A full tap queue drops the frame, as a full NIC queue would.
        if self.tap.try_send(&frame).is_ok() {
            self.counters.frames_in.fetch_add(1, Ordering::Relaxed);
        } else {
            dropped();
        }
    }
}

impl Datapath {
    /// A data plane with no networks yet; `changed` is woken when a path changes.
    pub fn new(changed: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self { nets: Mutex::default(), link: RwLock::default(), changed })
    }

    /// Where frames for the relay go now (`None` while the agent has no session).
    pub fn set_link(&self, link: Option<RelaySender>) {
        *self.link.write().unwrap_or_else(std::sync::PoisonError::into_inner) = link;
        self.changed.notify_one();
    }

    fn link(&self) -> Option<RelaySender> {
        self.link.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether the relay path is usable now.
    pub fn linked(&self) -> bool {
        self.link.read().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }

    /// Makes sure network `vni` has its tap `tap_name` (created here, owned by this process:
    /// it goes when the agent does) and its reader and prober.
    pub fn ensure(
        self: &Arc<Self>,
        vni: Vni,
        me: Ipv4Addr,
        tap_name: &str,
        mtu: u32,
    ) -> Result<(), NetError> {
        let mut nets = lock(&self.nets);
        if let Some((n, _)) = nets.get(&vni) {
            if n.me == me {
                return Ok(());
            }
            nets.remove(&vni);
        }
        let tun = tokio_tun::Tun::builder()
            .name(tap_name)
            .tap()
            .mtu(i32::try_from(mtu).unwrap_or(1450))
            .up()
            .build()
            .map_err(|e| NetError::System(format!("cannot create the tap {tap_name}: {e}")))?
            .pop()
            .ok_or_else(|| NetError::System(format!("cannot create the tap {tap_name}")))?;
        super::kernel::disable_ipv6(tap_name);
        let path = Arc::new(NetPath {
            vni,
            me,
            tap: Arc::new(tun),
            peers: Mutex::default(),
            macs: RwLock::default(),
            next_frame: AtomicU16::new(rand::random()),
            partial: Mutex::default(),
            counters: PathCounters::default(),
        });
        let reader = {
            let (path, me) = (path.clone(), Arc::downgrade(self));
            AbortOnDropHandle::new(tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                let probe_mac = probe_mac_for(path.me);
                loop {
                    let n = match path.tap.recv(&mut buf).await {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::warn!(error = %e, "overlay tap read failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let f = &buf[..n];
                    let Some(dst) = dst_mac(f) else { continue };
                    if dst == probe_mac {
                        if let Some((kind, v, from, seq)) = parse_probe(f)
                            && v == path.vni.get()
                        {
                            path.handle_probe(kind, from, seq).await;
                        }
                        continue;
                    }
                    let peer = path
                        .macs
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remote
                        .get(&dst)
                        .copied();
                    let (Some(peer), Some(link)) = (peer, me.upgrade().and_then(|d| d.link()))
                    else {
                        continue;
                    };
                    path.to_relay(&link, peer, f);
                }
            }))
        };
        let prober = {
            let (path, me) = (path.clone(), Arc::downgrade(self));
            AbortOnDropHandle::new(tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROBE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(dp) = me.upgrade() else { break };
                    let linked = dp.linked();
                    let mut probes = Vec::new();
                    let mut changed = false;
                    {
                        let mut peers = lock(&path.peers);
                        let now = Instant::now();
                        for (addr, p) in peers.iter_mut() {
                            if !p.spec.vtep.is_unspecified() {
                                p.seq = p.seq.wrapping_add(1);
                                p.sent.retain(|_, at| now.duration_since(*at) < DIRECT_TIMEOUT);
                                p.sent.insert(p.seq, now);
                                probes.push(probe_frame(
                                    PROBE_REQUEST,
                                    path.vni,
                                    path.me,
                                    *addr,
                                    p.seq,
                                ));
                            }
                            let answered = p
                                .last_answer
                                .is_some_and(|t| now.duration_since(t) < DIRECT_TIMEOUT);
                            // The relay path needs both sessions; without them the direct
                            // path is all there is.
                            let path_now = if answered || !linked || !p.spec.online {
                                PathKind::Direct
                            } else {
                                PathKind::Relay
                            };
                            if path_now != p.path {
                                tracing::info!(
                                    vni = %path.vni,
                                    peer = %addr,
                                    from = p.path.as_str(),
                                    to = path_now.as_str(),
                                    "overlay path changed"
                                );
                                p.path = path_now;
                                changed = true;
                            }
                        }
                    }
                    for f in probes {
                        let _ = path.tap.send(&f).await;
                    }
                    if changed {
                        dp.changed.notify_one();
                    }
                }
            }))
        };
        nets.insert(vni, (path, vec![reader, prober]));
        Ok(())
    }

    /// Stops network `vni`'s data plane; its tap goes.
    pub fn remove(&self, vni: Vni) {
        lock(&self.nets).remove(&vni);
    }

    /// The networks with a data plane.
    pub fn networks(&self) -> Vec<Vni> {
        lock(&self.nets).keys().copied().collect()
    }

    /// Tells network `vni` its peers and which MACs live where: remote MACs (endpoints and the
    /// peers' bridges) with their peer, and this host's.
    pub fn set_peers(
        &self,
        vni: Vni,
        peers: &[PeerSpec],
        remote: HashMap<[u8; 6], Ipv4Addr>,
        local: HashSet<[u8; 6]>,
    ) {
        let Some(path) = lock(&self.nets).get(&vni).map(|(p, _)| p.clone()) else { return };
        {
            let mut have = lock(&path.peers);
            have.retain(|a, _| peers.iter().any(|p| p.addr == *a));
            for p in peers {
                have.entry(p.addr).and_modify(|x| x.spec = *p).or_insert(Peer {
                    spec: *p,
                    last_answer: None,
                    rtt: None,
                    path: if p.online && self.linked() {
                        PathKind::Relay
                    } else {
                        PathKind::Direct
                    },
                    seq: 0,
                    sent: HashMap::new(),
                });
            }
        }
        let mut local = local;
        local.insert(mac_for(path.me));
        *path.macs.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Macs { remote, local };
    }

    /// The path to each peer of network `vni`.
    pub fn paths(&self, vni: Vni) -> HashMap<Ipv4Addr, PathState> {
        let Some(path) = lock(&self.nets).get(&vni).map(|(p, _)| p.clone()) else {
            return HashMap::new();
        };
        lock(&path.peers)
            .iter()
            .map(|(a, p)| (*a, PathState { path: p.path, rtt: p.rtt }))
            .collect()
    }

    /// Frames over the relay path of network `vni`: (out, in, dropped).
    pub fn counters(&self, vni: Vni) -> (u64, u64, u64) {
        let Some(path) = lock(&self.nets).get(&vni).map(|(p, _)| p.clone()) else {
            return (0, 0, 0);
        };
        let c = &path.counters;
        (
            c.frames_out.load(Ordering::Relaxed),
            c.frames_in.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
        )
    }

    /// One overlay datagram from the relay.
    pub fn inbound(&self, d: &[u8]) {
        let Some((h, piece)) = FrameHeader::decode(d) else { return };
        let Some(path) = lock(&self.nets).get(&h.vni).map(|(p, _)| p.clone()) else { return };
        path.deliver(h, piece);
    }

    /// Serves the relay's overlay stream (TLS + yamux) until it ends: frames for the relay
    /// are written to it, frames from it go to the taps.
    pub async fn serve_stream(self: Arc<Self>, stream: Stream) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
        self.set_link(Some(RelaySender::Stream(tx)));
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = async {
            let mut out = Vec::with_capacity(64 * 1024);
            while let Some(d) = rx.recv().await {
                out.clear();
                encode_record(&d, &mut out);
                while out.len() < 60 * 1024 {
                    let Ok(more) = rx.try_recv() else { break };
                    encode_record(&more, &mut out);
                }
                if wr.write_all(&out).await.is_err() {
                    break;
                }
            }
        };
        let reader = async {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                while let Some((d, used)) = decode_record(&buf) {
                    self.inbound(d);
                    buf.advance(used);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            () = writer => {}
            () = reader => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_and_strangers_are_not_probes() {
        let vni = Vni::new(4242).expect("vni");
        let (a, b) = (Ipv4Addr::new(10, 214, 0, 254), Ipv4Addr::new(10, 214, 0, 253));
        let f = probe_frame(PROBE_REQUEST, vni, a, b, 7);
        assert_eq!(f.len(), 60);
        assert_eq!(dst_mac(&f), Some(probe_mac_for(b)));
        assert_eq!(src_mac(&f), Some(probe_mac_for(a)));
        assert_eq!(parse_probe(&f), Some((PROBE_REQUEST, 4242, a, 7)));
        let mut ipv4 = f.clone();
        ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse_probe(&ipv4), None);
        assert_eq!(parse_probe(&f[..20]), None);
    }
}
