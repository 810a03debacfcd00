//! The port pool: one address, a range of public ports, each bound to at most one TCP tunnel and
//! at most one UDP tunnel (TCP and UDP ports are separate spaces).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;

use rand::Rng;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::PortRange;

/// Why a port could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The port lies outside the pool.
    #[error("port {port} is outside this relay's pool ({range})")]
    OutOfRange {
        /// The port asked for.
        port: u16,
        /// The pool.
        range: PortRange,
    },
    /// Another program on the relay host holds the port.
    #[error("port {0} is in use on the relay host")]
    InUse(u16),
    /// No port is free.
    #[error("the port pool {0} is exhausted: every port is leased or in use")]
    Exhausted(PortRange),
    /// Binding failed for another reason.
    #[error("cannot bind port {port}: {source}")]
    Bind {
        /// The port.
        port: u16,
        /// The system error.
        source: io::Error,
    },
}

/// A bound public socket of the pool.
#[derive(Debug)]
pub enum PoolSocket {
    /// A TCP tunnel's listener.
    Tcp(TcpListener),
    /// A UDP tunnel's socket.
    Udp(UdpSocket),
}

/// Hands out listeners on the pool's ports.
#[derive(Debug, Clone, Copy)]
pub struct PortPool {
    range: PortRange,
}

impl PortPool {
    /// A pool over `range`.
    pub fn new(range: PortRange) -> Self {
        Self { range }
    }

    /// The pool's range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Binds exactly `port`, for TCP or (`udp`) UDP.
    pub fn bind(&self, port: u16, udp: bool) -> Result<PoolSocket, PoolError> {
        if !self.range.contains(port) {
            return Err(PoolError::OutOfRange { port, range: self.range });
        }
        let addr = SocketAddr::new(self.range.ip, port);
        let err = |source: io::Error| {
            if source.kind() == io::ErrorKind::AddrInUse {
                PoolError::InUse(port)
            } else {
                PoolError::Bind { port, source }
            }
        };
        if udp {
            let std = std::net::UdpSocket::bind(addr).map_err(err)?;
            std.set_nonblocking(true).map_err(err)?;
            UdpSocket::from_std(std).map(PoolSocket::Udp).map_err(err)
        } else {
            warren_transport::listen::tcp_listener(addr).map(PoolSocket::Tcp).map_err(err)
        }
    }

    /// Binds some free port not in `leased`, starting from a random point of the range so that
    /// ports are not reused at once after they are released.
    pub fn bind_any(
        &self,
        leased: &HashSet<u16>,
        udp: bool,
    ) -> Result<(u16, PoolSocket), PoolError> {
        let len = self.range.len();
        let start = rand::rng().random_range(0..len);
        for i in 0..len {
            let port = (u32::from(self.range.low) + (start + i) % len) as u16;
            if leased.contains(&port) {
                continue;
            }
            match self.bind(port, udp) {
                Ok(l) => return Ok((port, l)),
                Err(PoolError::InUse(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(PoolError::Exhausted(self.range))
    }
}
