//! Node address autodetection: Calico's `IP` / `IP_AUTODETECTION_METHOD` semantics over the
//! host's interfaces.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use regex::Regex;

/// Interfaces Calico never picks with `first-found`: container, tunnel and virtual links.
pub const DEFAULT_SKIP_INTERFACES: &[&str] = &[
    "^docker.*",
    "^cbr.*",
    "^dummy.*",
    "^virbr.*",
    "^lxcbr.*",
    "^veth.*",
    "^lo$",
    "^cali.*",
    "^tunl.*",
    "^flannel.*",
    "^kube-ipvs.*",
    "^cni.*",
    "^vxlan.calico.*",
    "^vxlan-v6.calico.*",
    "^wireguard.cali.*",
    "^wg-v6.cali.*",
    "^nodelocaldns.*",
    "^tortie.*",
];

/// One address on one interface, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: IpNet,
}

/// How to find the node's address (Calico's `IP_AUTODETECTION_METHOD` values).
#[derive(Debug, Clone)]
pub enum Method {
    FirstFound,
    Interface(Vec<Regex>),
    SkipInterface(Vec<Regex>),
    CanReach(IpAddr),
    Cidrs(Vec<IpNet>),
    KubernetesInternalIp,
}

impl Method {
    /// Parses `first-found`, `interface=eth.*,ens.*`, `skip-interface=…`, `can-reach=10.0.0.1`,
    /// `cidr=10.0.0.0/8,…`, `kubernetes-internal-ip`; empty means `first-found`.
    pub fn parse(spec: &str) -> Result<Method> {
        let spec = spec.trim();
        let regexes = |list: &str| -> Result<Vec<Regex>> {
            list.split(',')
                .filter(|s| !s.is_empty())
                .map(|r| {
                    Regex::new(r)
                        .with_context(|| format!("IP_AUTODETECTION_METHOD: bad regex {r:?}"))
                })
                .collect()
        };
        Ok(match spec.split_once('=') {
            None if spec.is_empty() || spec == "first-found" => Method::FirstFound,
            None if spec == "kubernetes-internal-ip" => Method::KubernetesInternalIp,
            Some(("interface", list)) => Method::Interface(regexes(list)?),
            Some(("skip-interface", list)) => Method::SkipInterface(regexes(list)?),
            Some(("can-reach", dest)) => Method::CanReach(resolve(dest)?),
            Some(("cidr", list)) => Method::Cidrs(
                list.split(',')
                    .map(|c| {
                        c.trim()
                            .parse()
                            .with_context(|| format!("IP_AUTODETECTION_METHOD: bad CIDR {c:?}"))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => bail!(
                "IP_AUTODETECTION_METHOD {spec:?} is not one of first-found, interface=, skip-interface=, \
                 can-reach=, cidr=, kubernetes-internal-ip"
            ),
        })
    }
}

fn resolve(dest: &str) -> Result<IpAddr> {
    if let Ok(ip) = dest.parse() {
        return Ok(ip);
    }
    use std::net::ToSocketAddrs;
    (dest, 0)
        .to_socket_addrs()
        .with_context(|| format!("can-reach: cannot resolve {dest:?}"))?
        .next()
        .map(|s| s.ip())
        .ok_or_else(|| anyhow!("can-reach: {dest:?} resolved to nothing"))
}

fn usable(addr: &IpNet, v6: bool) -> bool {
    match addr.addr() {
        IpAddr::V4(a) if !v6 => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        IpAddr::V6(a) if v6 => {
            !a.is_loopback() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
        _ => false,
    }
}

/// Picks the node's address of one family from `ifaces` (in interface-index order) by `method`.
/// `internal_ips` are the Node's InternalIP addresses, used by `kubernetes-internal-ip`.
pub fn select(
    method: &Method,
    ifaces: &[InterfaceAddr],
    v6: bool,
    internal_ips: &[IpAddr],
) -> Result<IpNet> {
    let mut candidates: Vec<&InterfaceAddr> =
        ifaces.iter().filter(|i| usable(&i.addr, v6)).collect();
    candidates.sort_by_key(|i| i.ifindex);
    let family = if v6 { "IPv6" } else { "IPv4" };
    let skip_default: Vec<Regex> = DEFAULT_SKIP_INTERFACES
        .iter()
        .filter_map(|r| Regex::new(r).ok())
        .collect();
    let found = match method {
        Method::FirstFound => candidates
            .into_iter()
            .find(|i| !skip_default.iter().any(|r| r.is_match(&i.ifname))),
        Method::Interface(res) => candidates
            .into_iter()
            .find(|i| res.iter().any(|r| r.is_match(&i.ifname))),
        Method::SkipInterface(res) => candidates.into_iter().find(|i| {
            !res.iter().any(|r| r.is_match(&i.ifname))
                && !skip_default.iter().any(|r| r.is_match(&i.ifname))
        }),
        Method::Cidrs(cidrs) => candidates
            .into_iter()
            .find(|i| cidrs.iter().any(|c| c.contains(&i.addr.addr()))),
        Method::CanReach(dest) => {
            let local = local_address_towards(*dest)?;
            candidates.into_iter().find(|i| i.addr.addr() == local)
        }
        Method::KubernetesInternalIp => candidates
            .into_iter()
            .find(|i| internal_ips.contains(&i.addr.addr())),
    };
    found.map(|i| i.addr).ok_or_else(|| {
        anyhow!(
            "no {family} address found by {method:?} among {} interfaces",
            ifaces.len()
        )
    })
}

/// The source address the kernel would use to reach `dest`: a UDP connect sends nothing.
pub fn local_address_towards(dest: IpAddr) -> Result<IpAddr> {
    let bind: SocketAddr = match dest {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect((dest, 80))
        .with_context(|| format!("can-reach: no route to {dest}"))?;
    Ok(sock.local_addr()?.ip())
}

/// Every address on every interface of the current network namespace (getifaddrs).
pub fn interface_addrs() -> Result<Vec<InterfaceAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated C string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_name is valid as above.
        let ifindex = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        // SAFETY: the address family tells which sockaddr type the pointers hold.
        let addr = unsafe { sockaddr_to_ipnet(ifa.ifa_addr, ifa.ifa_netmask) };
        if let Some(addr) = addr {
            out.push(InterfaceAddr {
                ifname: name,
                ifindex,
                addr,
            });
        }
    }
    // SAFETY: frees the list getifaddrs allocated; no references into it survive.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// # Safety
/// `addr` and `mask` must point at sockaddrs of the family `addr` declares.
unsafe fn sockaddr_to_ipnet(
    addr: *const libc::sockaddr,
    mask: *const libc::sockaddr,
) -> Option<IpNet> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let a = &*(addr as *const libc::sockaddr_in);
                let m = &*(mask as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                let plen = u32::from_be(m.sin_addr.s_addr).count_ones() as u8;
                IpNet::new(IpAddr::V4(ip), plen).ok()
            }
            libc::AF_INET6 => {
                let a = &*(addr as *const libc::sockaddr_in6);
                let m = &*(mask as *const libc::sockaddr_in6);
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let plen = m
                    .sin6_addr
                    .s6_addr
                    .iter()
                    .map(|b| b.count_ones())
                    .sum::<u32>() as u8;
                IpNet::new(IpAddr::V6(ip), plen).ok()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, idx: u32, addr: &str) -> InterfaceAddr {
        InterfaceAddr {
            ifname: name.into(),
            ifindex: idx,
            addr: addr.parse().unwrap(),
        }
    }

    fn host() -> Vec<InterfaceAddr> {
        vec![
            iface("lo", 1, "127.0.0.1/8"),
            iface("docker0", 2, "172.17.0.1/16"),
            iface("eth0", 3, "192.168.1.20/24"),
            iface("eth1", 4, "10.0.0.5/8"),
            iface("cali12345678901", 5, "169.254.1.1/32"),
            iface("eth0", 3, "fe80::1/64"),
            iface("eth0", 3, "fd00::20/64"),
        ]
    }

    #[test]
    fn first_found_skips_docker_and_loopback_and_keeps_prefix_length() {
        let got = select(&Method::parse("first-found").unwrap(), &host(), false, &[]).unwrap();
        assert_eq!(got, "192.168.1.20/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn interface_regex_picks_the_named_interface() {
        let got = select(
            &Method::parse("interface=eth1").unwrap(),
            &host(),
            false,
            &[],
        )
        .unwrap();
        assert_eq!(got.to_string(), "10.0.0.5/8");
    }

    #[test]
    fn skip_interface_passes_over_matches() {
        let got = select(
            &Method::parse("skip-interface=eth0").unwrap(),
            &host(),
            false,
            &[],
        )
        .unwrap();
        assert_eq!(got.to_string(), "10.0.0.5/8");
    }

    #[test]
    fn cidr_method_picks_an_address_inside_the_list() {
        let got = select(
            &Method::parse("cidr=10.0.0.0/8,172.30.0.0/16").unwrap(),
            &host(),
            false,
            &[],
        )
        .unwrap();
        assert_eq!(got.to_string(), "10.0.0.5/8");
    }

    #[test]
    fn ipv6_skips_link_local() {
        let got = select(&Method::FirstFound, &host(), true, &[]).unwrap();
        assert_eq!(got.to_string(), "fd00::20/64");
    }

    #[test]
    fn kubernetes_internal_ip_matches_node_status() {
        let ips = ["10.0.0.5".parse().unwrap()];
        let got = select(&Method::KubernetesInternalIp, &host(), false, &ips).unwrap();
        assert_eq!(got.to_string(), "10.0.0.5/8");
    }

    #[test]
    fn unknown_method_is_an_error_naming_the_variable() {
        let err = Method::parse("nearest-star").unwrap_err().to_string();
        assert!(err.contains("IP_AUTODETECTION_METHOD"), "{err}");
    }

    #[test]
    fn no_match_is_an_error() {
        let err = select(
            &Method::parse("interface=wlan.*").unwrap(),
            &host(),
            false,
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no IPv4 address"), "{err}");
    }

    #[test]
    fn can_reach_loopback_finds_loopback_source() {
        assert_eq!(
            local_address_towards("127.0.0.1".parse().unwrap()).unwrap(),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn getifaddrs_lists_loopback() {
        let all = interface_addrs().unwrap();
        assert!(
            all.iter()
                .any(|i| i.ifname == "lo" && i.addr.addr() == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{all:?}"
        );
    }
}
