//! Copying bytes both ways between two streams, holding a buffer only while bytes are in flight.
//!
//! A forwarded connection that is idle holds no copy buffer at all: a direction borrows a buffer
//! from a small per-thread pool when it polls its reader, and gives it back as soon as the read
//! would block with nothing left to write. Bulk transfers keep their buffer, so there is no
//! allocation per chunk either way. This is what keeps thousands of idle tunnelled connections
//! cheap while letting one busy connection use large buffers.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tuning::SPLICE_BUF;

/// Buffers kept per thread for reuse; beyond that, returned buffers are freed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; SPLICE_BUF].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    });
}

/// One direction of a splice.
#[derive(Debug, Default)]
struct Half {
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    amt: u64,
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buf(b);
        }
    }
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                let buf = self.buf.get_or_insert_with(take_buf);
                let mut rb = ReadBuf::new(buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing in flight: the buffer goes back to the pool while idle.
                        if let Some(b) = self.buf.take() {
                            give_buf(b);
                        }
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                            self.amt += n as u64;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let Some(buf) = self.buf.as_deref() else { break };
                let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into the peer",
                    )));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.read_done {
                if let Some(b) = self.buf.take() {
                    give_buf(b);
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

/// Copies bytes both ways between `a` and `b` until both directions have ended, closing each
/// write side when its read side ends. Returns (bytes a→b, bytes b→a).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Half::default(), Half::default());
    let (mut ab_done, mut ba_done) = (None, None);
    poll_fn(|cx| {
        if ab_done.is_none()
            && let Poll::Ready(r) = ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))
        {
            ab_done = Some(r?);
        }
        if ba_done.is_none()
            && let Poll::Ready(r) = ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))
        {
            ba_done = Some(r?);
        }
        match (ab_done, ba_done) {
            (Some(x), Some(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(8);
        let (mut b_inner, mut b_outer) = tokio::io::duplex(8);
        let task = tokio::spawn(async move { splice(&mut a_inner, &mut b_inner).await });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            a_outer.write_all(&payload).await.unwrap();
            a_outer.shutdown().await.unwrap();
            let mut back = Vec::new();
            a_outer.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b_outer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        b_outer.write_all(b"reply").await.unwrap();
        b_outer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        assert_eq!(task.await.unwrap().unwrap(), (100_000, 5));
    }

    #[tokio::test]
    async fn idle_connections_hold_no_buffer() {
        let (_a_outer, mut a_inner) = tokio::io::duplex(64);
        let (mut b_inner, _b_outer) = tokio::io::duplex(64);
        let mut ab = Half::default();
        let polled = poll_fn(|cx| {
            Poll::Ready(ab.poll_copy(cx, Pin::new(&mut a_inner), Pin::new(&mut b_inner)))
        })
        .await;
        assert!(polled.is_pending());
        assert!(ab.buf.is_none(), "an idle direction must give its buffer back");
    }
}
