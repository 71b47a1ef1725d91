//! The rtnetlink multicast listener: route, link, address and neighbour changes made by anyone.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::socket::{Messages, SocketError, parse_message, setsockopt_int};

/// rtnetlink multicast groups (`RTNLGRP_*` in linux/rtnetlink.h).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RECV_BUFFER: usize = 64 * 1024;

/// What one drain of the socket found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub messages: usize,
    /// The kernel dropped notifications (ENOBUFS): the view must be rebuilt by a dump.
    pub overrun: bool,
    /// The datagram limit was reached with more queued.
    pub more: bool,
}

/// A non-blocking socket subscribed to route, link, address and neighbour notifications.
pub struct Monitor {
    socket: Socket,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("fd", &self.fd()).finish()
    }
}

impl Monitor {
    /// Opens the monitor in the calling thread's network namespace.
    pub fn open(rcvbuf: usize) -> Result<Monitor, SocketError> {
        let io = |op| move |source| SocketError::Io { op, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io("socket (monitor)"))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(io("bind (monitor)"))?;
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV6_ROUTE,
        ] {
            socket
                .add_membership(group)
                .map_err(io("NETLINK_ADD_MEMBERSHIP"))?;
        }
        socket
            .set_non_blocking(true)
            .map_err(io("O_NONBLOCK (monitor)"))?;
        let size = rcvbuf.min(i32::MAX as usize) as libc::c_int;
        let fd = socket.as_raw_fd();
        if setsockopt_int(fd, libc::SO_RCVBUFFORCE, size).is_err() {
            setsockopt_int(fd, libc::SO_RCVBUF, size).map_err(io("SO_RCVBUF (monitor)"))?;
        }
        Ok(Monitor {
            socket,
            buf: vec![0; RECV_BUFFER],
        })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Reads up to `max_datagrams` queued datagrams and hands each parsed message to `on_message`.
    /// Messages that do not parse are skipped (and logged): one odd notification must not
    /// stop route restoration.
    pub fn drain(
        &mut self,
        max_datagrams: usize,
        mut on_message: impl FnMut(&RouteNetlinkMessage),
    ) -> Result<Drain, SocketError> {
        let mut drain = Drain::default();
        for _ in 0..max_datagrams {
            let mut slice = &mut self.buf[..];
            let n = match self.socket.recv(&mut slice, 0) {
                Ok(n) => n.min(self.buf.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(drain),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    drain.overrun = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(SocketError::Io {
                        op: "recv (monitor)",
                        source,
                    });
                }
            };
            for raw in Messages::new(&self.buf[..n]) {
                let Ok(raw) = raw else {
                    break;
                };
                match parse_message("monitor", raw.kind, raw.payload) {
                    Ok(msg) => {
                        drain.messages += 1;
                        on_message(&msg);
                    }
                    Err(e) => tracing::debug!(error = %e, "skipping unparsable notification"),
                }
            }
        }
        drain.more = true;
        Ok(drain)
    }
}
