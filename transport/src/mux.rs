//! The yamux driver: one task owns the yamux connection and hands streams out over channels.
//!
//! yamux moves no bytes unless its connection is polled, outbound streams included, so the
//! driver polls inbound streams, outbound requests and the connection itself in one place.
//!
//! On the relay's side ([`Side::Server`]) the driver hands out only the first stream the agent
//! opens, its control stream; every later one is reset the moment it arrives, never queued, and
//! after [`tuning::MAX_REFUSED_STREAMS`] of them the connection is closed. So an agent, even one
//! without a token, can make the relay hold at most one stream's receive window (256 KiB, the
//! yamux default, until the relay reads) plus the few it resets. The agent's side takes every
//! stream the relay opens (data streams, UDP flows, the overlay relay path).

use std::collections::VecDeque;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::poll_fn;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use crate::tuning;

type OpenReply = oneshot::Sender<io::Result<yamux::Stream>>;

/// The handle to a driven yamux connection.
#[derive(Debug)]
pub struct MuxHandle {
    open_tx: mpsc::Sender<OpenReply>,
    inbound: Mutex<mpsc::UnboundedReceiver<yamux::Stream>>,
    close_req: CancellationToken,
    closed: CancellationToken,
    _driver: AbortOnDropHandle<()>,
}

/// Which side of the yamux connection this is (stream ids differ by side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The agent.
    Client,
    /// The relay.
    Server,
}

fn config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // Windows start at 256 KiB per stream and are auto-tuned towards the bandwidth-delay
    // product; the connection-wide cap must allow every stream its initial window.
    let streams = tuning::MAX_STREAMS as usize;
    cfg.set_max_connection_receive_window(Some(streams * 256 * 1024));
    cfg.set_max_num_streams(streams);
    cfg
}

impl MuxHandle {
    /// Starts driving a yamux connection over `io` on the current tokio runtime.
    pub fn start<T>(io: T, side: Side) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mode = match side {
            Side::Client => yamux::Mode::Client,
            Side::Server => yamux::Mode::Server,
        };
        let conn = yamux::Connection::new(io.compat(), config(), mode);
        let (open_tx, open_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let close_req = CancellationToken::new();
        let closed = CancellationToken::new();
        let driver = tokio::spawn(
            drive(conn, side, open_rx, in_tx, close_req.clone(), closed.clone()).in_current_span(),
        );
        Self {
            open_tx,
            inbound: Mutex::new(in_rx),
            close_req,
            closed,
            _driver: AbortOnDropHandle::new(driver),
        }
    }

    pub(crate) async fn open(&self) -> io::Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| closed_error())?;
        let stream = rx.await.map_err(|_| closed_error())??;
        Ok(self.wrap(stream))
    }

    pub(crate) async fn accept(&self) -> io::Result<MuxStream> {
        let mut rx = self.inbound.lock().await;
        rx.recv().await.map(|s| self.wrap(s)).ok_or_else(closed_error)
    }

    fn wrap(&self, stream: yamux::Stream) -> MuxStream {
        MuxStream { inner: stream.compat(), ended: Box::pin(self.closed.clone().cancelled_owned()) }
    }

    pub(crate) fn close(&self) {
        self.close_req.cancel();
    }

    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }
}

/// A yamux stream that fails once its connection has ended.
///
/// yamux wakes a stream's pending read or write only when its connection fails or is dropped
/// while active. After a close the driver asked for (`poll_close`, as when a session ends on its
/// heartbeat timeout) they stay pending for ever: every splice through that session would hang,
/// holding its visitor's socket. So each pending operation also watches the driver's end.
#[derive(Debug)]
pub struct MuxStream {
    inner: Compat<yamux::Stream>,
    ended: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl MuxStream {
    /// `poll`'s result, or an error when it is pending and the connection has ended.
    fn or_ended<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending if self.ended.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(closed_error()))
            }
            other => other,
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.or_ended(cx, poll)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.or_ended(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.or_ended(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.or_ended(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.or_ended(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Why the driver stopped polling the connection.
enum Ended {
    Yamux(yamux::ConnectionError),
    /// The relay's side reset this many streams opened by the agent.
    TooManyStreams(usize),
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "session closed")
}

async fn drive<T>(
    mut conn: yamux::Connection<T>,
    side: Side,
    mut open_rx: mpsc::Receiver<OpenReply>,
    in_tx: mpsc::UnboundedSender<yamux::Stream>,
    close_req: CancellationToken,
    closed: CancellationToken,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    // Streams watch this token (see `MuxStream`); cancelled however the driver ends, aborted
    // with its handle included.
    let _ended = closed.clone().drop_guard();
    let mut pending: VecDeque<OpenReply> = VecDeque::new();
    let (mut taken, mut refused) = (0usize, 0usize);
    let run = poll_fn(|cx| {
        while let Poll::Ready(Some(tx)) = open_rx.poll_recv(cx) {
            pending.push_back(tx);
        }
        while !pending.is_empty() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(res) => {
                    if let Some(tx) = pending.pop_front() {
                        let _ = tx.send(res.map_err(io::Error::other));
                    }
                }
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    if side == Side::Server && taken >= tuning::AGENT_STREAMS as usize {
                        // Dropped, so yamux resets it and forgets its bytes.
                        drop(stream);
                        refused += 1;
                        if refused > tuning::MAX_REFUSED_STREAMS {
                            return Poll::Ready(Err(Ended::TooManyStreams(refused)));
                        }
                        continue;
                    }
                    taken += 1;
                    // The receiver only goes away with the handle, and then the driver is
                    // aborted too; a stream refused here is simply dropped (reset).
                    let _ = in_tx.send(stream);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Ended::Yamux(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    let asked_to_close = tokio::select! {
        res = run => {
            match res {
                Ok(()) => {}
                Err(Ended::Yamux(e)) => tracing::debug!(error = %e, "yamux connection ended"),
                Err(Ended::TooManyStreams(n)) => tracing::info!(
                    refused = n,
                    "closing the connection: the agent opened streams other than its control \
                     stream, which the relay does not accept"
                ),
            }
            false
        }
        () = close_req.cancelled() => true,
    };
    if asked_to_close {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            poll_fn(|cx| conn.poll_close(cx)),
        )
        .await;
    }
    for tx in pending {
        let _ = tx.send(Err(closed_error()));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The relay closes a session (as on a heartbeat timeout) while one of its streams waits
    /// for the agent's bytes: the read fails instead of waiting for ever, so the splice ends and
    /// lets go of its visitor.
    #[tokio::test]
    async fn a_pending_read_fails_once_the_connection_is_closed() {
        let (relay_io, agent_io) = tokio::io::duplex(64 * 1024);
        let relay = MuxHandle::start(relay_io, Side::Server);
        let agent = MuxHandle::start(agent_io, Side::Client);
        let mut ours = relay.open().await.unwrap();
        ours.write_all(b"header").await.unwrap();
        ours.flush().await.unwrap();
        let mut theirs = agent.accept().await.unwrap();
        let mut got = [0u8; 6];
        theirs.read_exact(&mut got).await.unwrap();

        let read = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            ours.read(&mut buf).await
        });
        // Let the read start and wait, as a splice's read of the agent's side does.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        assert!(!read.is_finished(), "nothing was sent: the read must wait");
        relay.close();
        // A hang guard only: the read ends as soon as the driver has.
        let res = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the read still waits after its connection was closed")
            .unwrap();
        assert!(res.is_err(), "a read on a closed connection must fail: {res:?}");
        drop(theirs);
    }
}
