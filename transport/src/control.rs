//! Framed control messages over any byte stream.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use warren_proto::frame::HEADER_LEN;
use warren_proto::preface::PREFACE_LEN;
use warren_proto::{DecodeError, Message, Preface, StreamHeader};

/// Why a control stream could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The stream failed.
    #[error("control stream: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid frame.
    #[error("peer sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// The peer closed the stream.
    #[error("peer closed the control stream")]
    Closed,
}

/// Reads frames from the receiving half of a control stream.
#[derive(Debug)]
pub struct ControlReader<R> {
    io: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> ControlReader<R> {
    /// Wraps the receiving half.
    pub fn new(io: R) -> Self {
        Self { io, buf: Vec::with_capacity(512) }
    }

    /// The underlying reader, for reading what precedes the frames (the preface). Only valid
    /// before the first [`ControlReader::recv`], which may buffer ahead.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// Reads the next message. Oversized frames are refused from their header alone.
    pub async fn recv(&mut self) -> Result<Message, ControlError> {
        loop {
            match Message::decode(&self.buf) {
                Ok((msg, used)) => {
                    self.buf.drain(..used);
                    return Ok(msg);
                }
                Err(DecodeError::Incomplete) => {}
                Err(e) => return Err(e.into()),
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return Err(if self.buf.is_empty() {
                    ControlError::Closed
                } else {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a frame")
                        .into()
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Writes frames to the sending half of a control stream.
#[derive(Debug)]
pub struct ControlWriter<W> {
    io: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> ControlWriter<W> {
    /// Wraps the sending half.
    pub fn new(io: W) -> Self {
        Self { io, buf: Vec::with_capacity(512) }
    }

    /// Writes one message and flushes it.
    pub async fn send(&mut self, msg: &Message) -> io::Result<()> {
        self.buf.clear();
        msg.encode(&mut self.buf);
        self.io.write_all(&self.buf).await?;
        self.io.flush().await
    }

    /// Writes the session preface followed by one message, in one write.
    pub async fn send_with_preface(&mut self, preface: Preface, msg: &Message) -> io::Result<()> {
        self.buf.clear();
        preface.encode(&mut self.buf);
        msg.encode(&mut self.buf);
        self.io.write_all(&self.buf).await?;
        self.io.flush().await
    }

    /// Closes the sending direction.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

/// Reads exactly the session preface.
pub async fn read_preface<R: AsyncRead + Unpin>(io: &mut R) -> Result<Preface, ControlError> {
    let mut buf = [0u8; PREFACE_LEN];
    io.read_exact(&mut buf).await?;
    Ok(Preface::decode(&buf)?)
}

/// Reads exactly the header frame at the start of a data stream, and not one byte more.
pub async fn read_stream_header<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<StreamHeader, ControlError> {
    let mut buf = [0u8; 64];
    io.read_exact(&mut buf[..HEADER_LEN]).await?;
    let header = warren_proto::frame::FrameHeader::peek(&buf)?;
    let total = HEADER_LEN + header.len;
    if total > buf.len() {
        return Err(DecodeError::Malformed("stream header length").into());
    }
    io.read_exact(&mut buf[HEADER_LEN..total]).await?;
    Ok(StreamHeader::decode(&buf[..total])?.0)
}

/// Sleeps until `deadline` (a sans-IO machine's next timeout), or forever without one.
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
