//! UDP tunnels at the relay: one public socket per tunnel, visitor flows keyed by address.
//!
//! Each visitor address is a flow with a number. Over QUIC a visitor's packet goes to the agent
//! as one datagram (`tunnel | flow | payload`) and replies come back the same way, read by the
//! session's datagram reader and handed to the tunnel through [`DatagramRoutes`]. Over TLS +
//! yamux, which has no datagrams, each flow is a data stream of length-prefixed packets. Flows
//! that see no packet either way for the idle timeout are forgotten.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info};
use warren_proto::datagram::{DatagramHeader, decode_record, encode_record};
use warren_proto::{Protocol, TunnelId};
use warren_transport::{Session, TransportKind};

use crate::edge::EdgeConfig;
use crate::ingress::open_data_stream;
use crate::policy::Admit;
use crate::router::Live;

/// Where a session delivers the UDP replies it receives, by tunnel: flow number and payload.
pub type DatagramRoutes = Arc<Mutex<HashMap<TunnelId, mpsc::Sender<(u32, Bytes)>>>>;

/// Most flows one UDP tunnel tracks; packets from further visitors are dropped until some idle
/// out.
pub const MAX_FLOWS: usize = 4096;

/// Packets queued towards one flow's stream (TCP transport) before newer ones are dropped.
const FLOW_QUEUE: usize = 256;

struct Flow {
    id: u32,
    last: Instant,
    /// The flow's stream pump (TCP transport only); dropping it ends the stream.
    stream: Option<(mpsc::Sender<Bytes>, AbortOnDropHandle<()>)>,
}

/// Reads datagrams from a QUIC session and hands each to its tunnel, or overlay datagrams to
/// the relay path. Ends with the session.
pub async fn read_datagrams(
    session: Session,
    routes: DatagramRoutes,
    overlay: Option<(std::sync::Arc<crate::overlay::Overlays>, u64)>,
) {
    while let Ok(d) = session.read_datagram().await {
        if warren_proto::overlay::FrameHeader::is_overlay(&d) {
            if let Some((overlays, id)) = &overlay {
                overlays.forward(*id, d);
            }
            continue;
        }
        let Some((h, _)) = DatagramHeader::decode(&d) else {
            debug!("datagram too short for its header; dropped");
            continue;
        };
        let tx = routes.lock().unwrap_or_else(|p| p.into_inner()).get(&h.tunnel).cloned();
        match tx {
            // A full queue drops the packet, as a full socket buffer would.
            Some(tx) => {
                let _ =
                    tx.try_send((h.flow, d.slice(warren_proto::datagram::DATAGRAM_HEADER_LEN..)));
            }
            None => {
                debug!(tunnel = %h.tunnel, "datagram for a tunnel that is not a live UDP tunnel")
            }
        }
    }
}

/// Serves one UDP tunnel's public socket until the handle is dropped.
pub fn spawn_udp_tunnel(
    socket: UdpSocket,
    live: watch::Receiver<Option<Live>>,
    edge: Arc<EdgeConfig>,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(serve(socket, live, edge)))
}

async fn serve(socket: UdpSocket, mut live: watch::Receiver<Option<Live>>, edge: Arc<EdgeConfig>) {
    let (reply_tx, mut replies) = mpsc::channel::<(u32, Bytes)>(1024);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut by_id: HashMap<u32, SocketAddr> = HashMap::new();
    let mut next_id: u32 = 0;
    let mut current: Option<(u64, TunnelId)> = None;
    let mut stats: Option<Arc<crate::router::TunnelStats>> = None;
    let mut buf = vec![0u8; 65_536];
    let idle = edge.udp_idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(250)));
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, visitor) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors surface here on some systems; they concern one peer only.
                        debug!(error = %e, "udp receive error");
                        continue;
                    }
                };
                let Some(l) = live.borrow().clone() else { continue };
                if current != Some((l.session_id, l.tunnel)) {
                    // A new session serves the tunnel: old flows belonged to the old one.
                    flows.clear();
                    by_id.clear();
                    l.datagrams.lock().unwrap_or_else(|p| p.into_inner()).insert(l.tunnel, reply_tx.clone());
                    current = Some((l.session_id, l.tunnel));
                    stats = Some(l.stats.clone());
                }
                if l.policy.admit(visitor.ip()) != Admit::Yes {
                    continue;
                }
                let packet = Bytes::copy_from_slice(&buf[..n]);
                let flow = match flows.get_mut(&visitor) {
                    Some(f) => f,
                    None => {
                        if flows.len() >= MAX_FLOWS {
                            debug!(tunnel = %l.name, %visitor, "too many udp flows; packet dropped");
                            continue;
                        }
                        next_id = next_id.wrapping_add(1);
                        while by_id.contains_key(&next_id) {
                            next_id = next_id.wrapping_add(1);
                        }
                        if edge.access_log {
                            info!(target: "warren_server::access", %visitor, proto = "udp", tunnel = %l.name, flow = next_id, "flow");
                        } else {
                            debug!(tunnel = %l.name, %visitor, flow = next_id, "udp flow opened");
                        }
                        by_id.insert(next_id, visitor);
                        flows.entry(visitor).or_insert(Flow { id: next_id, last: Instant::now(), stream: None })
                    }
                };
                flow.last = Instant::now();
                match l.session.kind() {
                    TransportKind::Quic => {
                        let mut d = BytesMut::with_capacity(8 + n);
                        DatagramHeader { tunnel: l.tunnel, flow: flow.id }.encode(&mut d);
                        d.extend_from_slice(&packet);
                        match l.session.send_datagram(d.freeze()) {
                            Ok(()) => {
                                l.stats.bytes_in.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => debug!(tunnel = %l.name, size = n, error = %e, "udp packet not sent to the agent"),
                        }
                    }
                    TransportKind::Tcp => {
                        let (tx, _) = flow.stream.get_or_insert_with(|| {
                            let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                            let task = tokio::spawn(stream_flow(l.clone(), visitor, flow.id, rx, reply_tx.clone()));
                            (tx, AbortOnDropHandle::new(task))
                        });
                        let _ = tx.try_send(packet);
                    }
                }
            }
            Some((id, payload)) = replies.recv() => {
                let Some(visitor) = by_id.get(&id).copied() else { continue };
                if let Some(f) = flows.get_mut(&visitor) {
                    f.last = Instant::now();
                }
                match socket.send_to(&payload, visitor).await {
                    // Over the TCP transport the flow's data stream counted it already.
                    Ok(n) if stats.is_some() && live.borrow().as_ref().is_some_and(|l| l.session.kind() == TransportKind::Quic) => {
                        if let Some(s) = &stats {
                            s.bytes_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => debug!(%visitor, error = %e, "udp reply not delivered"),
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                flows.retain(|visitor, f| {
                    let keep = now.duration_since(f.last) < idle;
                    if !keep {
                        debug!(%visitor, flow = f.id, "udp flow idle; forgotten");
                        by_id.remove(&f.id);
                    }
                    keep
                });
            }
            r = live.changed() => {
                if r.is_err() {
                    return;
                }
                if live.borrow().is_none() {
                    flows.clear();
                    by_id.clear();
                    current = None;
                }
            }
        }
    }
}

/// One flow over the TCP transport: a data stream carrying length-prefixed packets both ways.
async fn stream_flow(
    live: Live,
    visitor: SocketAddr,
    id: u32,
    mut packets: mpsc::Receiver<Bytes>,
    replies: mpsc::Sender<(u32, Bytes)>,
) {
    let stream = match open_data_stream(&live, visitor, Protocol::Udp).await {
        Ok(s) => s,
        Err(e) => {
            debug!(tunnel = %live.name, error = %e, "cannot open a udp flow stream");
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let up = async {
        let mut out = Vec::with_capacity(2048);
        while let Some(p) = packets.recv().await {
            out.clear();
            if encode_record(&p, &mut out) && wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            while let Some((packet, used)) = decode_record(&buf) {
                let packet = Bytes::copy_from_slice(packet);
                let _ = buf.split_to(used);
                if replies.send((id, packet)).await.is_err() {
                    return;
                }
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::join!(up, down);
}
