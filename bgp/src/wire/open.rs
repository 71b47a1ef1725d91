//! OPEN message and the capabilities tortie understands (RFC 4271 §4.2, RFC 5492).

use super::{AS_TRANS, DecodeError};
use bytes::{Buf, BufMut, Bytes};
use std::net::Ipv4Addr;

/// Capability codes (IANA).
mod cap_code {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
}

/// Optional parameter type carrying capabilities (RFC 5492).
const PARAM_CAPABILITIES: u8 = 2;

/// Per-family part of the graceful restart capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracefulRestartFamily {
    /// Raw AFI.
    pub afi: u16,
    /// Raw SAFI.
    pub safi: u8,
    /// F bit: the sender kept its forwarding state for this family across the restart.
    pub forwarding_preserved: bool,
}

/// Graceful restart capability value (RFC 4724 §3).
///
/// ```text
/// +--------------------------------------------------+
/// | Restart Flags (4 bits)                           |
/// +--------------------------------------------------+
/// | Restart Time in seconds (12 bits)                |
/// +--------------------------------------------------+
/// | Address Family Identifier (16 bits)              |
/// +--------------------------------------------------+
/// | Subsequent Address Family Identifier (8 bits)    |
/// +--------------------------------------------------+
/// | Flags for Address Family (8 bits)                |
/// +--------------------------------------------------+
/// | ...  (AFI, SAFI, flags repeated)                 |
/// +--------------------------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restart_state: bool,
    /// N bit (RFC 8538): graceful restart also applies to NOTIFICATION.
    pub notification: bool,
    /// Restart time, seconds (0..=4095).
    pub restart_time: u16,
    /// Families the sender preserves.
    pub families: Vec<GracefulRestartFamily>,
}

/// One capability from the Capabilities optional parameter.
///
/// ```text
/// +------------------------------+
/// | Capability Code (1 octet)    |
/// +------------------------------+
/// | Capability Length (1 octet)  |
/// +------------------------------+
/// | Capability Value (variable)  |
/// +------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Code 1 (RFC 4760): AFI(2) reserved(1) SAFI(1).
    MultiProtocol {
        /// Raw AFI.
        afi: u16,
        /// Raw SAFI.
        safi: u8,
    },
    /// Code 2 (RFC 2918), empty value.
    RouteRefresh,
    /// Code 64 (RFC 4724).
    GracefulRestart(GracefulRestart),
    /// Code 65 (RFC 6793): the sender's 4-octet AS number.
    FourOctetAs(u32),
    /// Any other capability: kept so it can be logged, otherwise ignored.
    Unknown {
        /// Capability code.
        code: u8,
        /// Raw value.
        value: Bytes,
    },
}

impl Capability {
    fn decode(code: u8, mut value: Bytes) -> Result<Capability, DecodeError> {
        let len = value.len();
        Ok(match code {
            cap_code::MULTIPROTOCOL => {
                if len != 4 {
                    return Err(DecodeError::MalformedOpen(
                        "multiprotocol capability length",
                    ));
                }
                let afi = value.get_u16();
                value.advance(1);
                Capability::MultiProtocol {
                    afi,
                    safi: value.get_u8(),
                }
            }
            cap_code::ROUTE_REFRESH => {
                if len != 0 {
                    return Err(DecodeError::MalformedOpen(
                        "route refresh capability length",
                    ));
                }
                Capability::RouteRefresh
            }
            cap_code::FOUR_OCTET_AS => {
                if len != 4 {
                    return Err(DecodeError::MalformedOpen("4-octet AS capability length"));
                }
                Capability::FourOctetAs(value.get_u32())
            }
            cap_code::GRACEFUL_RESTART => {
                if len < 2 || !(len - 2).is_multiple_of(4) {
                    return Err(DecodeError::MalformedOpen(
                        "graceful restart capability length",
                    ));
                }
                let flags_time = value.get_u16();
                let mut families = Vec::with_capacity((len - 2) / 4);
                while value.remaining() >= 4 {
                    let afi = value.get_u16();
                    let safi = value.get_u8();
                    let flags = value.get_u8();
                    families.push(GracefulRestartFamily {
                        afi,
                        safi,
                        forwarding_preserved: flags & 0x80 != 0,
                    });
                }
                Capability::GracefulRestart(GracefulRestart {
                    restart_state: flags_time & 0x8000 != 0,
                    notification: flags_time & 0x4000 != 0,
                    restart_time: flags_time & 0x0fff,
                    families,
                })
            }
            code => Capability::Unknown { code, value },
        })
    }

    fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Capability::MultiProtocol { afi, safi } => {
                buf.put_slice(&[cap_code::MULTIPROTOCOL, 4]);
                buf.put_u16(*afi);
                buf.put_u8(0);
                buf.put_u8(*safi);
            }
            Capability::RouteRefresh => buf.put_slice(&[cap_code::ROUTE_REFRESH, 0]),
            Capability::FourOctetAs(asn) => {
                buf.put_slice(&[cap_code::FOUR_OCTET_AS, 4]);
                buf.put_u32(*asn);
            }
            Capability::GracefulRestart(gr) => {
                buf.put_u8(cap_code::GRACEFUL_RESTART);
                buf.put_u8((2 + 4 * gr.families.len()) as u8);
                let mut flags_time = gr.restart_time & 0x0fff;
                if gr.restart_state {
                    flags_time |= 0x8000;
                }
                if gr.notification {
                    flags_time |= 0x4000;
                }
                buf.put_u16(flags_time);
                for family in &gr.families {
                    buf.put_u16(family.afi);
                    buf.put_u8(family.safi);
                    buf.put_u8(if family.forwarding_preserved { 0x80 } else { 0 });
                }
            }
            Capability::Unknown { code, value } => {
                buf.put_u8(*code);
                buf.put_u8(value.len() as u8);
                buf.put_slice(value);
            }
        }
    }
}

/// OPEN message body (RFC 4271 §4.2).
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+
/// |    Version    |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |     My Autonomous System      |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |           Hold Time           |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                         BGP Identifier                        |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// | Opt Parm Len  |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |             Optional Parameters (variable)                    |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
///
/// `asn` is the sender's real AS: the 4-octet AS capability's value when present,
/// otherwise the 2-octet field. Encoding writes AS_TRANS in the 2-octet field for ASNs
/// above 65535.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Sender's AS number.
    pub asn: u32,
    /// Proposed hold time, seconds (0 or ≥ 3).
    pub hold_time: u16,
    /// Sender's BGP identifier.
    pub bgp_id: Ipv4Addr,
    /// Capabilities, in the order received.
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// Decode the body (after the header).
    pub fn decode(buf: &mut impl Buf) -> Result<Open, DecodeError> {
        if buf.remaining() < 10 {
            return Err(DecodeError::BadMessageLength((19 + buf.remaining()) as u16));
        }
        let version = buf.get_u8();
        if version != 4 {
            return Err(DecodeError::UnsupportedVersionNumber(version));
        }
        let as2 = buf.get_u16();
        let hold_time = buf.get_u16();
        let bgp_id = Ipv4Addr::from(buf.get_u32());
        let params_len = buf.get_u8() as usize;
        if params_len != buf.remaining() {
            return Err(DecodeError::MalformedOpen("optional parameters length"));
        }
        // RFC 4271 §6.2: hold time 1 and 2 are unacceptable; 0 means "no keepalives".
        if hold_time == 1 || hold_time == 2 {
            return Err(DecodeError::UnacceptableHoldTime(hold_time));
        }
        if bgp_id.is_unspecified() {
            return Err(DecodeError::BadBgpIdentifier(bgp_id));
        }
        let mut capabilities = Vec::new();
        while buf.has_remaining() {
            if buf.remaining() < 2 {
                return Err(DecodeError::MalformedOpen("optional parameter header"));
            }
            let param_type = buf.get_u8();
            let param_len = buf.get_u8() as usize;
            if param_len > buf.remaining() {
                return Err(DecodeError::MalformedOpen("optional parameter overruns"));
            }
            if param_type != PARAM_CAPABILITIES {
                return Err(DecodeError::UnsupportedOptionalParameter(param_type));
            }
            let mut param = buf.copy_to_bytes(param_len);
            while param.has_remaining() {
                if param.remaining() < 2 {
                    return Err(DecodeError::MalformedOpen("capability header"));
                }
                let code = param.get_u8();
                let len = param.get_u8() as usize;
                if len > param.remaining() {
                    return Err(DecodeError::MalformedOpen(
                        "capability overruns its parameter",
                    ));
                }
                capabilities.push(Capability::decode(code, param.split_to(len))?);
            }
        }
        let asn = capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(asn) => Some(*asn),
                _ => None,
            })
            .unwrap_or(u32::from(as2));
        Ok(Open {
            asn,
            hold_time,
            bgp_id,
            capabilities,
        })
    }

    /// Encode the body.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(4);
        buf.put_u16(u16::try_from(self.asn).unwrap_or(AS_TRANS));
        buf.put_u16(self.hold_time);
        buf.put_u32(u32::from(self.bgp_id));
        // Opt Parm Len is one octet (no RFC 9072 extended form), so at most 253 octets of
        // capabilities fit; any that would not are left out rather than corrupting the OPEN.
        let mut caps = Vec::with_capacity(64);
        for cap in &self.capabilities {
            let mut one = Vec::with_capacity(16);
            cap.encode(&mut one);
            if caps.len() + one.len() <= 253 {
                caps.extend_from_slice(&one);
            }
        }
        if caps.is_empty() {
            buf.put_u8(0);
        } else {
            buf.put_u8((caps.len() + 2) as u8);
            buf.put_u8(PARAM_CAPABILITIES);
            buf.put_u8(caps.len() as u8);
            buf.put_slice(&caps);
        }
    }

    /// True if the 4-octet AS capability is present.
    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// True if the route refresh capability is present.
    pub fn route_refresh(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::RouteRefresh))
    }

    /// The graceful restart capability, if present.
    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(gr) => Some(gr),
            _ => None,
        })
    }

    /// Multiprotocol (AFI, SAFI) pairs announced. RFC 4760 §8: none announced means IPv4 unicast only.
    pub fn families(&self) -> Vec<(u16, u8)> {
        let families: Vec<(u16, u8)> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::MultiProtocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        if families.is_empty() {
            vec![(1, 1)]
        } else {
            families
        }
    }
}
