//! tortie's own rtnetlink socket: many requests per `sendmsg` with one ACK per send, error
//! answers read in bulk with `recvmmsg` and matched to their request by sequence number, and
//! dumps.

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
/// Requests per `sendmsg`: bounded so that the answers to one send fit the receive buffer
/// even when every request fails.
const MAX_BATCH_MESSAGES: usize = 2048;
/// Sends never shrink below this many requests after overruns (except when repeating).
const MIN_BATCH_MESSAGES: usize = 32;
/// Halvings of the send size tried when repeating requests after an overrun (2048 → 1).
const REPEAT_ROUNDS: usize = 12;
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

/// Which requests of one send ask for an ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// Only the last: its answer marks the end of the send's answers.
    LastOnly,
    /// Every one: the fallback after an overrun, where silence proves nothing.
    Each,
}

/// Whether every answer the kernel sent for one send reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Complete,
    /// Some answers were dropped (receive buffer full): unanswered requests are unknown.
    Overrun,
}

/// A blocking NETLINK_ROUTE socket for bulk work.
pub struct BatchSocket {
    socket: Socket,
    /// Requests per `sendmsg`, sized so that their answers fit the receive buffer we actually
    /// got even if all fail; halved after an overrun.
    max_batch: usize,
    seq: u32,
    overruns: u64,
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
        // Each queued answer costs about 1 KiB of receive buffer (skb overhead included).
        let rcvbuf = socket.get_rx_buf_sz().map_err(io_err("SO_RCVBUF"))?;
        let max_batch = (rcvbuf / 1024).clamp(32, MAX_BATCH_MESSAGES);
        Ok(BatchSocket {
            socket,
            max_batch,
            seq: 1,
            overruns: 0,
            send_buf: Vec::with_capacity(MAX_BATCH_BYTES + 4096),
            ack_buf: vec![0; ACK_SLOT * MAX_BATCH_MESSAGES],
            dump_buf: vec![0; DUMP_BUFFER],
        })
    }

    /// Shrinks the receive buffer without shrinking the sends, so that tests can make the
    /// kernel's answers overflow it.
    #[cfg(test)]
    pub(crate) fn shrink_receive_buffer(&mut self, bytes: usize) {
        let value = bytes.min(i32::MAX as usize) as libc::c_int;
        setsockopt_int(self.socket.as_raw_fd(), libc::SO_RCVBUF, value).unwrap();
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Receive-buffer overruns seen so far on this socket's request answers. Each one made
    /// [`BatchSocket::batch`] send again, each with its own ACK, the requests whose outcome it
    /// could not see (see there).
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// Sends the requests, packing many into each `sendmsg`, and returns one result per
    /// request, in order: `None` for success, the kernel's NACK otherwise. A failed request
    /// does not stop the others (the kernel processes each message of a send).
    ///
    /// Only the last request of each send carries `NLM_F_ACK`. The kernel answers every failed
    /// request with an error carrying its sequence number whether or not it asked for an ACK,
    /// handles the messages of one send in order within our `sendmsg`, and queues its answers
    /// in that order: once the last request's answer is read, every request of the send
    /// without an error answer succeeded. Not asking for the other ACKs spares the kernel
    /// building and queueing one message per success, and us reading it (together about a
    /// quarter of the kernel's time per route).
    ///
    /// If the error answers overflow the receive buffer (ENOBUFS), the kernel drops the rest
    /// of them and we cannot tell success from a dropped error. We chose to send the requests
    /// without an answer again, each with its own ACK, in smaller sends (and to halve later
    /// sends too) rather than fail the whole batch: repeating is harmless for replaces and
    /// deletes (a repeated delete answers ESRCH/ENOENT, which callers already accept), but a
    /// repeated `NLM_F_EXCL` create answers EEXIST when its first copy took effect. Callers
    /// that create exclusively compare [`BatchSocket::overruns`] before and after the call
    /// and verify such EEXISTs with a dump (the reconciler does).
    pub fn batch<I>(&mut self, requests: I) -> Result<Vec<Option<Nack>>, SocketError>
    where
        I: IntoIterator<Item = Request>,
    {
        let mut buf = std::mem::take(&mut self.send_buf);
        let mut results = Vec::new();
        let outcome = self.batch_with(&mut buf, requests.into_iter(), &mut results);
        self.send_buf = buf;
        outcome.map(|()| results)
    }

    fn batch_with(
        &mut self,
        buf: &mut Vec<u8>,
        requests: impl Iterator<Item = Request>,
        results: &mut Vec<Option<Nack>>,
    ) -> Result<(), SocketError> {
        let mut requests = requests.peekable();
        let mut offsets = Vec::with_capacity(self.max_batch);
        let mut answered = Vec::with_capacity(self.max_batch);
        while requests.peek().is_some() {
            buf.clear();
            offsets.clear();
            let first_index = results.len();
            while offsets.len() < self.max_batch && buf.len() < MAX_BATCH_BYTES {
                let Some(request) = requests.next() else {
                    break;
                };
                offsets.push(buf.len());
                // `exchange` numbers the messages and decides which ask for an ACK.
                append_message(buf, request.message, request.flags | NLM_F_REQUEST, 0);
                results.push(None);
            }
            let chunk = &mut results[first_index..];
            answered.clear();
            answered.resize(offsets.len(), false);
            let delivery = self.exchange(buf, &offsets, AckMode::LastOnly, chunk, &mut answered)?;
            if delivery == Delivery::Overrun {
                self.overruns += 1;
                self.max_batch = (self.max_batch / 2).max(MIN_BATCH_MESSAGES);
                let unknown = answered.iter().filter(|a| !**a).count();
                tracing::warn!(
                    requests = offsets.len(),
                    unknown,
                    "netlink answers overflowed the receive buffer; repeating the unanswered requests with one ACK each"
                );
                self.repeat_unanswered(buf, &offsets, chunk, &answered)?;
            }
        }
        Ok(())
    }

    /// After an overrun: sends every request of `buf` that got no answer again, each with its
    /// own ACK, halving the send size while the answers still overflow.
    fn repeat_unanswered(
        &mut self,
        buf: &[u8],
        offsets: &[usize],
        results: &mut [Option<Nack>],
        answered: &[bool],
    ) -> Result<(), SocketError> {
        let mut pending: Vec<usize> = (0..offsets.len()).filter(|i| !answered[*i]).collect();
        let mut size = self.max_batch;
        let mut group_buf = Vec::new();
        let mut group_offsets = Vec::new();
        for _ in 0..REPEAT_ROUNDS {
            if pending.is_empty() {
                return Ok(());
            }
            let mut still_pending = Vec::new();
            for group in pending.chunks(size) {
                group_buf.clear();
                group_offsets.clear();
                for &i in group {
                    let end = offsets.get(i + 1).copied().unwrap_or(buf.len());
                    group_offsets.push(group_buf.len());
                    group_buf.extend_from_slice(&buf[offsets[i]..end]);
                }
                let mut group_results = vec![None; group.len()];
                let mut group_answered = vec![false; group.len()];
                let delivery = self.exchange(
                    &mut group_buf,
                    &group_offsets,
                    AckMode::Each,
                    &mut group_results,
                    &mut group_answered,
                )?;
                if delivery == Delivery::Overrun {
                    self.overruns += 1;
                }
                for ((&i, result), got) in group.iter().zip(group_results).zip(group_answered) {
                    if got {
                        results[i] = result;
                    } else {
                        still_pending.push(i);
                    }
                }
            }
            pending = still_pending;
            size = (size / 2).max(1);
        }
        if pending.is_empty() {
            return Ok(());
        }
        Err(SocketError::Kernel {
            what: "batch (answers kept overflowing the receive buffer)",
            errno: libc::ENOBUFS,
        })
    }

    /// Numbers the messages of `buf` (one starting at each of `offsets`) consecutively, asks
    /// for the ACKs `mode` says, sends them in one `sendmsg` and reads the answers.
    fn exchange(
        &mut self,
        buf: &mut [u8],
        offsets: &[usize],
        mode: AckMode,
        results: &mut [Option<Nack>],
        answered: &mut [bool],
    ) -> Result<Delivery, SocketError> {
        let count = offsets.len();
        if count == 0 {
            return Ok(Delivery::Complete);
        }
        // Consecutive numbers let an answer find its request by subtraction: start over
        // rather than wrap inside one send.
        if self.seq.checked_add(count as u32 + 1).is_none() {
            self.seq = 0;
        }
        let first_seq = self.seq + 1;
        self.seq += count as u32;
        for (i, &at) in offsets.iter().enumerate() {
            let header = &mut buf[at..at + NLMSG_HDRLEN];
            let mut flags = u16::from_ne_bytes([header[6], header[7]]) & !NLM_F_ACK;
            if mode == AckMode::Each || i + 1 == count {
                flags |= NLM_F_ACK;
            }
            header[6..8].copy_from_slice(&flags.to_ne_bytes());
            header[8..12].copy_from_slice(&(first_seq + i as u32).to_ne_bytes());
        }
        self.socket.send(buf, 0).map_err(io_err("sendmsg"))?;
        self.collect_answers(first_seq, mode, results, answered)
    }

    /// Reads the answers to the send numbered from `first_seq`: until the last request's
    /// answer (`LastOnly`) or every request's (`Each`), or, after an overrun, until nothing is
    /// left to read.
    fn collect_answers(
        &mut self,
        first_seq: u32,
        mode: AckMode,
        results: &mut [Option<Nack>],
        answered: &mut [bool],
    ) -> Result<Delivery, SocketError> {
        let count = results.len();
        let mut unanswered = count;
        let finished = |answered: &[bool], unanswered: usize| match mode {
            AckMode::LastOnly => answered[count - 1],
            AckMode::Each => unanswered == 0,
        };
        // Each answer arrives as its own datagram; recvmmsg takes many per system call.
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
        let mut overrun = false;
        let mut calls = 0usize;
        while !finished(answered, unanswered) {
            calls += 1;
            if calls > count * 2 + 16 {
                return Err(SocketError::Decode {
                    what: "batch",
                    detail: format!("{unanswered} answers never arrived"),
                });
            }
            // The kernel answers within our sendmsg, so after an overrun everything that will
            // ever arrive is queued already: read it without waiting, until nothing is left.
            let flags = if overrun {
                libc::MSG_DONTWAIT
            } else {
                libc::MSG_WAITFORONE
            };
            // SAFETY: every header points into a slot of `self.ack_buf` that outlives the call.
            let got = unsafe {
                libc::recvmmsg(
                    fd,
                    headers.as_mut_ptr(),
                    headers.len() as libc::c_uint,
                    // glibc declares the flags c_int, musl c_uint.
                    flags as _,
                    std::ptr::null_mut(),
                )
            };
            if got < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Reported (once) before the answers still queued: keep reading them.
                    Some(libc::ENOBUFS) => {
                        overrun = true;
                        continue;
                    }
                    Some(libc::EAGAIN) if overrun => break,
                    _ => {
                        return Err(SocketError::Io {
                            op: "recvmmsg (answers)",
                            source: err,
                        });
                    }
                }
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
                        continue; // a late answer to an earlier, abandoned send
                    }
                    let (errno, text) = parse_error(msg.payload)?;
                    results[index] = (errno != 0).then_some(Nack {
                        errno,
                        message: text,
                    });
                    if !answered[index] {
                        answered[index] = true;
                        unanswered -= 1;
                    }
                }
            }
        }
        if overrun {
            return Ok(Delivery::Overrun);
        }
        // An error answer the kernel failed to allocate is dropped alone (the later ones still
        // arrive) and leaves ENOBUFS pending on the socket: treat it as an overrun.
        match take_socket_error(fd).map_err(io_err("SO_ERROR"))? {
            0 => Ok(Delivery::Complete),
            libc::ENOBUFS => Ok(Delivery::Overrun),
            errno => Err(SocketError::Kernel {
                what: "batch",
                errno,
            }),
        }
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

/// Reads and clears the socket's pending error (`SO_ERROR`); 0 when there is none.
fn take_socket_error(fd: RawFd) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live and len holds value's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_recv_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        // `as _`: the field types differ between glibc and musl.
        tv_sec: timeout.as_secs() as _,
        tv_usec: timeout.subsec_micros() as _,
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

/// Runs `f` on a new thread inside a new, empty network namespace (gone when the thread
/// ends); `None`, with a loud message, when this process may not create one (not root).
#[cfg(test)]
pub(crate) fn in_fresh_netns<R: Send>(f: impl FnOnce() -> R + Send) -> Option<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare affects only the calling (new) thread's network namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    eprintln!(
                        "SKIP: cannot create a network namespace ({}): kernel part of this test needs root",
                        io::Error::last_os_error()
                    );
                    return None;
                }
                Some(f())
            })
            .join()
            .unwrap()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{route_delete_message, route_dump_request, route_message};
    use crate::model::RouteTarget;
    use ipnet::IpNet;
    use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
    use std::sync::Arc;

    const PROTO: u8 = 84;

    /// The `/24` number `k` inside 10.128.0.0/9.
    fn dst(k: usize) -> IpNet {
        let base = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
        IpNet::new(
            std::net::Ipv4Addr::from(base + ((k as u32) << 8)).into(),
            24,
        )
        .unwrap()
    }

    /// A blackhole create (succeeds in an empty namespace) or, if `fail`, a route through an
    /// interface that does not exist (ENODEV).
    fn add(k: usize, fail: bool, flags: u16) -> Request {
        let (target, oif) = if fail {
            let target = RouteTarget::Gateway {
                via: "10.0.0.2".parse().unwrap(),
                ifname: Arc::from("missing0"),
                onlink: true,
            };
            (target, Some(9999))
        } else {
            (RouteTarget::Blackhole, None)
        };
        Request {
            message: RouteNetlinkMessage::NewRoute(route_message(&dst(k), &target, oif, PROTO)),
            flags,
        }
    }

    fn installed(socket: &mut BatchSocket) -> usize {
        socket
            .dump("route dump", &route_dump_request(false, Some(PROTO)))
            .unwrap()
            .len()
    }

    #[test]
    fn failures_amid_unacked_sends_are_attributed_by_position_and_the_rest_installed() {
        // 5000 requests span three sends; failures at the start, inside, at a send boundary
        // and last (the one request that asks for an ACK).
        let failing = [0usize, 17, 2047, 2048, 3333, 4999];
        let results = in_fresh_netns(|| {
            let mut socket = BatchSocket::open().unwrap();
            let requests =
                (0..5000).map(|k| add(k, failing.contains(&k), NLM_F_CREATE | NLM_F_EXCL));
            let results = socket.batch(requests).unwrap();
            assert_eq!(socket.overruns(), 0);
            (results, installed(&mut socket))
        });
        let Some((results, installed)) = results else {
            return;
        };
        assert_eq!(results.len(), 5000);
        for (k, result) in results.iter().enumerate() {
            if failing.contains(&k) {
                assert_eq!(result.as_ref().map(|n| n.errno), Some(libc::ENODEV), "#{k}");
            } else {
                assert_eq!(result, &None, "#{k}");
            }
        }
        assert_eq!(installed, 5000 - failing.len());
    }

    #[test]
    fn answers_overflowing_the_receive_buffer_are_recovered_with_one_ack_each() {
        let outcome = in_fresh_netns(|| {
            let mut socket = BatchSocket::open().unwrap();
            // A few answers fit; the sends stay 2048 requests long.
            socket.shrink_receive_buffer(4096);
            // Deletes of routes that do not exist (ESRCH) alternate with replaces that succeed
            // however often they are repeated.
            let requests = (0..1500).map(|k| {
                if k % 2 == 0 {
                    Request {
                        message: RouteNetlinkMessage::DelRoute(route_delete_message(
                            &dst(k),
                            PROTO,
                        )),
                        flags: 0,
                    }
                } else {
                    add(k, false, NLM_F_CREATE | NLM_F_REPLACE)
                }
            });
            let results = socket.batch(requests).unwrap();
            (results, socket.overruns(), installed(&mut socket))
        });
        let Some((results, overruns, installed)) = outcome else {
            return;
        };
        assert!(
            overruns > 0,
            "the answers were meant to overflow the buffer"
        );
        for (k, result) in results.iter().enumerate() {
            let errno = result.as_ref().map(|n| n.errno);
            let want = (k % 2 == 0).then_some(libc::ESRCH);
            assert_eq!(errno, want, "#{k}");
        }
        assert_eq!(installed, 750);
    }

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
