//! The relay path over TLS + yamux: one data stream per session, opened by the relay, whose
//! header names tunnel 0, carrying overlay datagrams as length-prefixed records both ways.
//! (Over QUIC the same datagrams are QUIC datagrams and need no stream.)

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use warren_proto::datagram::{decode_record, encode_record};
use warren_proto::{Protocol, StreamHeader, TunnelId};
use warren_transport::Session;

use super::{Overlays, Sink};

/// Frames queued towards one session before newer ones are dropped (as a full socket would).
const QUEUE: usize = 1024;

/// The header of the overlay stream.
pub fn stream_header() -> StreamHeader {
    StreamHeader {
        tunnel: TunnelId(0),
        visitor: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        protocol: Protocol::Udp,
    }
}

/// Opens the overlay stream of session `id` and registers it as the session's sink; the
/// stream ends when the handle is dropped or the session ends.
pub fn open_stream(overlays: Arc<Overlays>, session: Session, id: u64) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut stream = match session.open().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the overlay stream");
                return;
            }
        };
        let mut head = Vec::new();
        stream_header().encode(&mut head);
        if stream.write_all(&head).await.is_err() {
            return;
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
        overlays.set_sink(id, Sink::Stream(tx));
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = async {
            let mut out = Vec::with_capacity(64 * 1024);
            while let Some(d) = rx.recv().await {
                out.clear();
                encode_record(&d, &mut out);
                // Everything already queued goes in the same write.
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
                    let d = Bytes::copy_from_slice(d);
                    buf.advance(used);
                    overlays.forward(id, d);
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
    }))
}
