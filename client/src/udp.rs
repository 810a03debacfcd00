//! UDP tunnels at the agent: one socket to the target per visitor flow, so replies find their
//! visitor.
//!
//! Over QUIC the relay sends each visitor packet as a datagram (`tunnel | flow | payload`);
//! [`serve_datagrams`] keeps a flow table and answers with datagrams of the same header. Over
//! TLS and yamux each flow is a data stream of length-prefixed packets ([`serve_stream`]). A
//! flow with no packet either way for the idle timeout is closed.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};
use warren_proto::datagram::{DATAGRAM_HEADER_LEN, DatagramHeader, decode_record, encode_record};
use warren_proto::{Protocol, TunnelId};
use warren_transport::Session;

use crate::forward::Tunnels;
use crate::tunnel::Target;

/// A flow with no packet either way for this long is closed.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);

/// Most flows tracked at once; packets for further flows are dropped until some idle out.
const MAX_FLOWS: usize = 8192;

/// A UDP socket connected to the target, from an address of the target's family.
async fn target_socket(target: &Target) -> io::Result<UdpSocket> {
    let addr = match target.socket_addr() {
        Some(a) => a,
        None => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await?
            .next()
            .ok_or_else(|| io::Error::other(format!("{} resolves to no address", target.host)))?,
    };
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

struct Flow {
    socket: Arc<UdpSocket>,
    last: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    _reader: AbortOnDropHandle<()>,
}

/// Milliseconds since `epoch`, for activity stamps shared between tasks.
fn stamp(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Serves the UDP tunnels of a QUIC session until it ends; overlay datagrams go to `overlay`.
pub async fn serve_datagrams(
    session: Session,
    tunnels: Tunnels,
    idle: Duration,
    overlay: Option<Arc<dyn crate::agent::OverlayHooks>>,
) {
    let epoch = Instant::now();
    let mut flows: HashMap<(TunnelId, u32), Flow> = HashMap::new();
    while let Ok(d) = session.read_datagram().await {
        if warren_proto::overlay::FrameHeader::is_overlay(&d) {
            if let Some(h) = &overlay {
                h.datagram(d);
            }
            continue;
        }
        let Some((h, payload)) = DatagramHeader::decode(&d) else { continue };
        let Some(spec) =
            crate::forward::lookup(&tunnels, h.tunnel).filter(|s| s.protocol == Protocol::Udp)
        else {
            debug!(tunnel = %h.tunnel, "datagram for a tunnel that is not a udp tunnel here");
            continue;
        };
        let key = (h.tunnel, h.flow);
        if flows.get(&key).is_some_and(|f| f.done.load(Ordering::Relaxed)) {
            flows.remove(&key);
        }
        if !flows.contains_key(&key) {
            if flows.len() >= MAX_FLOWS {
                flows.retain(|_, f| !f.done.load(Ordering::Relaxed));
                if flows.len() >= MAX_FLOWS {
                    debug!(tunnel = %spec.name, "too many udp flows; packet dropped");
                    continue;
                }
            }
            let socket = match tokio::time::timeout(
                Duration::from_secs(2),
                target_socket(&spec.target),
            )
            .await
            {
                Ok(Ok(s)) => Arc::new(s),
                Ok(Err(e)) => {
                    warn!(tunnel = %spec.name, target = %spec.target, error = %e, "cannot reach the udp target");
                    continue;
                }
                Err(_) => continue,
            };
            let last = Arc::new(AtomicU64::new(stamp(epoch)));
            let done = Arc::new(AtomicBool::new(false));
            let reader = tokio::spawn(reply_pump(
                session.clone(),
                socket.clone(),
                h,
                last.clone(),
                done.clone(),
                epoch,
                idle,
            ));
            debug!(tunnel = %spec.name, flow = h.flow, "udp flow opened");
            flows.insert(key, Flow { socket, last, done, _reader: AbortOnDropHandle::new(reader) });
        }
        if let Some(f) = flows.get(&key) {
            f.last.store(stamp(epoch), Ordering::Relaxed);
            if let Err(e) = f.socket.send(payload).await {
                debug!(tunnel = %spec.name, error = %e, "udp packet not delivered to the target");
            }
        }
    }
}

/// Sends the target's replies of one flow back as datagrams; ends when the flow idles out.
async fn reply_pump(
    session: Session,
    socket: Arc<UdpSocket>,
    h: DatagramHeader,
    last: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    epoch: Instant,
    idle: Duration,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match tokio::time::timeout(idle, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                last.store(stamp(epoch), Ordering::Relaxed);
                let mut d = BytesMut::with_capacity(DATAGRAM_HEADER_LEN + n);
                h.encode(&mut d);
                d.extend_from_slice(&buf[..n]);
                if let Err(e) = session.send_datagram(d.freeze()) {
                    debug!(size = n, error = %e, "udp reply not sent to the relay");
                }
            }
            // ICMP "port unreachable" from a target that is not listening: keep the flow.
            Ok(Err(e)) => debug!(error = %e, "udp target error"),
            Err(_) => {
                let quiet = stamp(epoch).saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= idle.as_millis() as u64 {
                    done.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Serves one flow that arrived as a data stream (TCP transport) until it ends or idles out.
pub async fn serve_stream<S>(stream: S, target: &Target, idle: Duration) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send,
{
    let socket =
        tokio::time::timeout(Duration::from_secs(2), target_socket(target)).await.map_err(
            |_| io::Error::new(io::ErrorKind::TimedOut, "resolving the udp target timed out"),
        )??;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut pkt = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(2048);
    loop {
        while let Some((packet, used)) = decode_record(&inbuf) {
            let packet = Bytes::copy_from_slice(packet);
            let _ = inbuf.split_to(used);
            if let Err(e) = socket.send(&packet).await {
                debug!(error = %e, "udp packet not delivered to the target");
            }
        }
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => {
                if r? == 0 {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
            }
            r = socket.recv(&mut pkt) => match r {
                Ok(n) => {
                    out.clear();
                    encode_record(&pkt[..n], &mut out);
                    wr.write_all(&out).await?;
                }
                Err(e) => debug!(error = %e, "udp target error"),
            },
            () = tokio::time::sleep(idle) => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
    }
}
