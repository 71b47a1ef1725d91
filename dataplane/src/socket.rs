//! tortie's own rtnetlink socket: many requests per `sendmsg`, ACKs read in bulk with
//! `recvmmsg` and matched to their request by sequence number, and dumps.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use netlink_packet_core::ParseableParametrized;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Requests per `sendmsg`: bounded so that the ACKs for one send fit the receive buffer.
const MAX_BATCH_MESSAGES: usize = 2048;
/// Bytes per `sendmsg`: the kernel refuses a send larger than the socket's send buffer.
const MAX_BATCH_BYTES: usize = 160 * 1024;
/// Bytes kept per ACK slot: header, errno, the capped original header and an extended-ACK text.
const ACK_SLOT: usize = 512;
const DUMP_BUFFER: usize = 256 * 1024;
/// A dump interrupted by concurrent changes is restarted at most this often.
const DUMP_ATTEMPTS: usize = 5;
/// No kernel answer within this time is an error rather than a hang.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Socket-level failures (the request as a whole, not one object in it).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("netlink {what}: kernel answered errno {errno} ({})", io::Error::from_raw_os_error(*errno))]
    Kernel { what: &'static str, errno: i32 },
    #[error("netlink {what}: malformed kernel message: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("netlink {what}: dump kept being interrupted by concurrent changes")]
    DumpInterrupted { what: &'static str },
}

/// One failed request of a batch: the kernel's errno and its extended-ACK text, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub errno: i32,
    pub message: Option<String>,
}

impl std::fmt::Display for Nack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "errno {} ({})",
            self.errno,
            io::Error::from_raw_os_error(self.errno)
        )?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

/// A request for [`BatchSocket::batch`]: the message and its `NLM_F_*` flags (REQUEST and ACK
/// are added).
#[derive(Debug, Clone)]
pub struct Request {
    pub message: RouteNetlinkMessage,
    pub flags: u16,
}

/// A blocking NETLINK_ROUTE socket for bulk work.
pub struct BatchSocket {
    socket: Socket,
    /// Requests per `sendmsg`, sized so their ACKs fit the receive buffer we actually got.
    max_batch: usize,
    seq: u32,
    send_buf: Vec<u8>,
    ack_buf: Vec<u8>,
    dump_buf: Vec<u8>,
}

impl std::fmt::Debug for BatchSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSocket")
            .field("fd", &self.socket.as_raw_fd())
            .finish()
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Io { op, source }
}

impl BatchSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<BatchSocket, SocketError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io_err("socket"))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(io_err("bind"))?;
        // Capped ACKs do not echo the request back; extended ACKs carry the kernel's reason.
        socket
            .set_cap_ack(true)
            .map_err(io_err("NETLINK_CAP_ACK"))?;
        socket
            .set_ext_ack(true)
            .map_err(io_err("NETLINK_EXT_ACK"))?;
        // Strict checking lets the kernel filter route dumps by protocol and table.
        socket
            .set_netlink_get_strict_chk(true)
            .map_err(io_err("NETLINK_GET_STRICT_CHK"))?;
        let fd = socket.as_raw_fd();
        set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 1 << 20);
        set_recv_timeout(fd, RECV_TIMEOUT).map_err(io_err("SO_RCVTIMEO"))?;
        // Each queued ACK costs about 1 KiB of receive buffer (skb overhead included).
        let rcvbuf = socket.get_rx_buf_sz().map_err(io_err("SO_RCVBUF"))?;
        let max_batch = (rcvbuf / 1024).clamp(32, MAX_BATCH_MESSAGES);
        Ok(BatchSocket {
            socket,
            max_batch,
            seq: 1,
            send_buf: Vec::with_capacity(MAX_BATCH_BYTES + 4096),
            ack_buf: vec![0; ACK_SLOT * MAX_BATCH_MESSAGES],
            dump_buf: vec![0; DUMP_BUFFER],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends every request with NLM_F_ACK, packing many into each `sendmsg`, and returns one
    /// result per request, in order: `None` for success, the kernel's NACK otherwise. A failed
    /// request does not stop the others (the kernel processes each message of a send).
    pub fn batch<I>(&mut self, requests: I) -> Result<Vec<Option<Nack>>, SocketError>
    where
        I: IntoIterator<Item = Request>,
    {
        let mut results: Vec<Option<Nack>> = Vec::new();
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            self.send_buf.clear();
            let first_index = results.len();
            let first_seq = self.seq.wrapping_add(1).max(1);
            let mut count = 0usize;
            while count < self.max_batch && self.send_buf.len() < MAX_BATCH_BYTES {
                let Some(request) = requests.next() else {
                    break;
                };
                let seq = self.next_seq();
                if seq != first_seq.wrapping_add(count as u32) {
                    // Sequence wrapped past zero mid-batch; keep the arithmetic below simple.
                    self.seq = 0;
                    return Err(SocketError::Decode {
                        what: "batch",
                        detail: "sequence number wrapped".into(),
                    });
                }
                append_message(
                    &mut self.send_buf,
                    request.message,
                    request.flags | NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                );
                results.push(None);
                count += 1;
            }
            self.socket
                .send(&self.send_buf, 0)
                .map_err(io_err("sendmsg"))?;
            self.collect_acks(first_seq, count, &mut results[first_index..])?;
        }
        Ok(results)
    }

    /// Reads exactly `count` ACKs for sequence numbers `first_seq..first_seq+count`.
    fn collect_acks(
        &mut self,
        first_seq: u32,
        count: usize,
        results: &mut [Option<Nack>],
    ) -> Result<(), SocketError> {
        let mut pending = count;
        // Each ACK arrives as its own datagram; recvmmsg takes many per system call.
        let mut iovecs: Vec<libc::iovec> = self
            .ack_buf
            .chunks_mut(ACK_SLOT)
            .take(count.min(MAX_BATCH_MESSAGES))
            .map(|slot| libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: slot.len(),
            })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; zeroed is a valid "no address, no control" header.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let fd = self.socket.as_raw_fd();
        let mut bounded = 0usize;
        while pending > 0 {
            bounded += 1;
            if bounded > count * 2 + 16 {
                return Err(SocketError::Decode {
                    what: "batch",
                    detail: format!("{pending} ACKs never arrived"),
                });
            }
            let want = pending.min(headers.len());
            // SAFETY: `headers[..want]` point into `self.ack_buf` slots that outlive the call.
            let got = unsafe {
                libc::recvmmsg(
                    fd,
                    headers.as_mut_ptr(),
                    want as libc::c_uint,
                    libc::MSG_WAITFORONE,
                    std::ptr::null_mut(),
                )
            };
            if got < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SocketError::Io {
                    op: "recvmmsg (ACKs)",
                    source: err,
                });
            }
            for h in &headers[..got as usize] {
                let len = (h.msg_len as usize).min(ACK_SLOT);
                // SAFETY: iov_base points at an ACK_SLOT-sized slot of self.ack_buf.
                let data = unsafe {
                    std::slice::from_raw_parts((*h.msg_hdr.msg_iov).iov_base as *const u8, len)
                };
                for msg in Messages::new(data) {
                    let msg = msg?;
                    if msg.kind != NLMSG_ERROR {
                        continue;
                    }
                    let index = msg.seq.wrapping_sub(first_seq) as usize;
                    if index >= count {
                        continue; // a late answer to an earlier, abandoned batch
                    }
                    let (errno, text) = parse_error(msg.payload)?;
                    results[index] = (errno != 0).then_some(Nack {
                        errno,
                        message: text,
                    });
                    pending -= 1;
                }
            }
        }
        Ok(())
    }

    /// Runs a dump and hands each answer's type and payload to `on_message`. Restarts (a
    /// bounded number of times) when the kernel flags the dump as interrupted.
    pub fn dump_raw(
        &mut self,
        what: &'static str,
        request: &RouteNetlinkMessage,
        mut on_message: impl FnMut(u16, &[u8]) -> Result<(), SocketError>,
        mut on_restart: impl FnMut(),
    ) -> Result<(), SocketError> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.next_seq();
            self.send_buf.clear();
            append_message(
                &mut self.send_buf,
                request.clone(),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            );
            self.socket
                .send(&self.send_buf, 0)
                .map_err(io_err("sendmsg (dump)"))?;
            let mut interrupted = false;
            'recv: loop {
                let mut slice = &mut self.dump_buf[..];
                let n = self
                    .socket
                    .recv(&mut slice, 0)
                    .map_err(io_err("recv (dump)"))?;
                if n > self.dump_buf.len() {
                    return Err(SocketError::Decode {
                        what,
                        detail: format!("datagram of {n} bytes truncated"),
                    });
                }
                for msg in Messages::new(&self.dump_buf[..n]) {
                    let msg = msg?;
                    if msg.seq != seq {
                        continue;
                    }
                    if msg.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match msg.kind {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            let (errno, _) = parse_error(msg.payload)?;
                            if errno != 0 {
                                return Err(SocketError::Kernel { what, errno });
                            }
                            break 'recv;
                        }
                        kind => on_message(kind, msg.payload)?,
                    }
                }
            }
            if !interrupted {
                return Ok(());
            }
            on_restart();
        }
        Err(SocketError::DumpInterrupted { what })
    }

    /// A dump whose answers are parsed into typed messages.
    pub fn dump(
        &mut self,
        what: &'static str,
        request: &RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, SocketError> {
        let mut out = Vec::new();
        self.dump_raw(
            what,
            request,
            |kind, payload| {
                out.push(parse_message(what, kind, payload)?);
                Ok(())
            },
            || {},
        )?;
        Ok(out)
    }

    /// Sends one request and waits for its ACK.
    pub fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), Nack> {
        match self.batch([Request { message, flags }]) {
            Ok(mut r) => match r.pop().flatten() {
                None => Ok(()),
                Some(nack) => Err(nack),
            },
            Err(e) => Err(Nack {
                errno: libc::EIO,
                message: Some(e.to_string()),
            }),
        }
    }
}

/// Parses one rtnetlink payload of the given type into its typed message.
pub fn parse_message(
    what: &'static str,
    kind: u16,
    payload: &[u8],
) -> Result<RouteNetlinkMessage, SocketError> {
    RouteNetlinkMessage::parse_with_param(payload, kind).map_err(|e| SocketError::Decode {
        what,
        detail: e.to_string(),
    })
}

fn append_message(buf: &mut Vec<u8>, message: RouteNetlinkMessage, flags: u16, seq: u32) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    msg.finalize();
    let len = msg.buffer_len();
    let start = buf.len();
    // Netlink messages are 4-byte aligned within a datagram.
    buf.resize(start + ((len + 3) & !3), 0);
    msg.serialize(&mut buf[start..start + len]);
}

/// One netlink message inside a datagram: header fields and payload.
#[derive(Debug)]
pub struct RawMessage<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Iterates the messages of a datagram, checking every length before reading.
pub struct Messages<'a> {
    data: &'a [u8],
}

impl<'a> Messages<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Messages { data }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<RawMessage<'a>, SocketError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.len() < NLMSG_HDRLEN {
            return None;
        }
        let d = self.data;
        let len = u32::from_ne_bytes([d[0], d[1], d[2], d[3]]) as usize;
        if len < NLMSG_HDRLEN || len > d.len() {
            self.data = &[];
            return Some(Err(SocketError::Decode {
                what: "netlink header",
                detail: format!("length {len} with {} bytes left", d.len()),
            }));
        }
        let msg = RawMessage {
            kind: u16::from_ne_bytes([d[4], d[5]]),
            flags: u16::from_ne_bytes([d[6], d[7]]),
            seq: u32::from_ne_bytes([d[8], d[9], d[10], d[11]]),
            payload: &d[NLMSG_HDRLEN..len],
        };
        let advance = ((len + 3) & !3).min(d.len());
        self.data = &d[advance..];
        Some(Ok(msg))
    }
}

/// Decodes an NLMSG_ERROR payload: errno (positive) and the extended-ACK message text.
/// Layout: `int error; struct nlmsghdr msg;` then (with NLM_F_ACK_TLVS) attributes.
fn parse_error(payload: &[u8]) -> Result<(i32, Option<String>), SocketError> {
    if payload.len() < 4 {
        return Err(SocketError::Decode {
            what: "error message",
            detail: format!("{} bytes", payload.len()),
        });
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let mut text = None;
    // With NETLINK_CAP_ACK the original request is reduced to its header.
    let mut attrs = payload.get(4 + NLMSG_HDRLEN..).unwrap_or(&[]);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let raw = &attrs[4..len];
            let raw = raw.split(|b| *b == 0).next().unwrap_or(raw);
            text = Some(String::from_utf8_lossy(raw).into_owned());
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    Ok((code.saturating_neg(), text))
}

fn set_buffer(fd: RawFd, force: libc::c_int, plain: libc::c_int, size: usize) {
    let value = size.min(i32::MAX as usize) as libc::c_int;
    // Root may exceed rmem_max with the *FORCE variant; otherwise settle for the capped size.
    if setsockopt_int(fd, force, value).is_err() {
        let _ = setsockopt_int(fd, plain, value);
    }
}

pub(crate) fn setsockopt_int(fd: RawFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value is a live c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_recv_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv is a live timeval and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_iterator_rejects_a_length_past_the_datagram() {
        let mut d = vec![0u8; 20];
        d[0..4].copy_from_slice(&64u32.to_ne_bytes());
        let first = Messages::new(&d).next().unwrap();
        assert!(first.is_err(), "length 64 in 20 bytes must be refused");
    }

    #[test]
    fn error_payload_yields_positive_errno_and_extack_text() {
        let mut p = Vec::new();
        p.extend_from_slice(&(-17i32).to_ne_bytes());
        p.extend_from_slice(&[0u8; 16]);
        let text = b"File exists\0";
        let len = 4 + text.len();
        p.extend_from_slice(&(len as u16).to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        let (errno, msg) = parse_error(&p).unwrap();
        assert_eq!(errno, 17);
        assert_eq!(msg.as_deref(), Some("File exists"));
    }
}
