//! TCP sockets for BGP: listener and outgoing connections with TCP-MD5 (RFC 2385) and TTL.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Largest TCP-MD5 key Linux accepts (TCP_MD5SIG_MAXKEYLEN).
pub const MD5_MAX_KEY_LEN: usize = 80;

/// `struct tcp_md5sig` from linux/tcp.h.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefix_len: u8,
    key_len: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_MAX_KEY_LEN],
}

fn socket_is_ipv6(fd: RawFd) -> io::Result<bool> {
    // SAFETY: getsockname writes at most `len` bytes into a zeroed sockaddr_storage.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, (&raw mut storage).cast(), &mut len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(i32::from(storage.ss_family) == libc::AF_INET6)
    }
}

/// Install (or with `key = None`, remove) the TCP-MD5 key for `peer` on a socket.
///
/// On a listening socket the key applies to connections accepted from `peer`; on a socket
/// about to connect, to that connection.
pub fn set_md5(fd: RawFd, peer: IpAddr, key: Option<&[u8]>) -> io::Result<()> {
    let key = key.unwrap_or_default();
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TCP-MD5 key is {} octets, at most {MD5_MAX_KEY_LEN}",
                key.len()
            ),
        ));
    }
    let v6_socket = socket_is_ipv6(fd)?;
    // SAFETY: TcpMd5Sig is plain old data; all-zero is a valid value.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in/sockaddr_in6.
    unsafe {
        match (peer, v6_socket) {
            (IpAddr::V4(v4), false) => {
                let sin = (&raw mut sig.addr).cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from(v4).to_be();
            }
            (peer, true) => {
                let v6 = match peer {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let sin6 = (&raw mut sig.addr).cast::<libc::sockaddr_in6>();
                (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sin6).sin6_addr.s6_addr = v6.octets();
            }
            (IpAddr::V6(_), false) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "IPv6 peer on an IPv4 socket",
                ));
            }
        }
    }
    sig.key_len = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: passes a valid pointer and the exact struct size the kernel expects.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // Deleting a key that was never set is not an error for us.
        if key.is_empty() && err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Set the outgoing TTL / hop limit.
pub fn set_ttl(fd: RawFd, ipv6: bool, ttl: u8) -> io::Result<()> {
    let value: libc::c_int = ttl.into();
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
    } else {
        (libc::IPPROTO_IP, libc::IP_TTL)
    };
    // SAFETY: valid pointer to a c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bind and listen.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What an outgoing connection needs.
pub struct ConnectParams {
    pub remote: SocketAddr,
    pub source: Option<IpAddr>,
    pub md5_key: Option<Vec<u8>>,
    pub ttl: Option<u8>,
    pub timeout: Duration,
}

/// Open a TCP connection with MD5 and TTL set before the SYN goes out.
pub async fn connect(params: ConnectParams) -> io::Result<TcpStream> {
    let ipv6 = params.remote.is_ipv6();
    let socket = if ipv6 {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    if let Some(key) = &params.md5_key {
        set_md5(socket.as_raw_fd(), params.remote.ip(), Some(key))?;
    }
    if let Some(ttl) = params.ttl {
        set_ttl(socket.as_raw_fd(), ipv6, ttl)?;
    }
    if let Some(source) = params.source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = tokio::time::timeout(params.timeout, socket.connect(params.remote))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
