//! BGP-4 wire format: message framing, the five message types and their path attributes.
//!
//! Every message starts with the RFC 4271 §4.1 header:
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                                                               +
//! |                           Marker (16 octets of 0xff)          |
//! +                                                               +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Length               |      Type     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

mod attributes;
mod error;
mod open;
mod update;

pub use attributes::{
    Aggregator, AsPath, AsPathSegment, LargeCommunity, Origin, PathAttributes, RawAttribute,
    SegmentType, attr_type,
};
pub use error::{DecodeError, UpdateOutcome, code};
pub use open::{Capability, GracefulRestart, GracefulRestartFamily, Open};
pub use update::{MpReach, MpUnreach, NextHop, Update};

use bytes::{Buf, BufMut, Bytes};

/// Length of the fixed message header.
pub const HEADER_LEN: usize = 19;
/// Largest message without RFC 8654 extended messages.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// AS number used in 2-octet fields for a 4-octet AS (RFC 6793).
pub const AS_TRANS: u16 = 23456;

/// Message type codes (RFC 4271 §4.1, RFC 2918).
pub mod msg_type {
    /// OPEN.
    pub const OPEN: u8 = 1;
    /// UPDATE.
    pub const UPDATE: u8 = 2;
    /// NOTIFICATION.
    pub const NOTIFICATION: u8 = 3;
    /// KEEPALIVE.
    pub const KEEPALIVE: u8 = 4;
    /// ROUTE-REFRESH.
    pub const ROUTE_REFRESH: u8 = 5;
}

/// Address family identifier (only the two unicast families tortie carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Afi {
    /// AFI 1.
    Ipv4,
    /// AFI 2.
    Ipv6,
}

impl Afi {
    /// IANA value.
    pub fn code(self) -> u16 {
        match self {
            Afi::Ipv4 => 1,
            Afi::Ipv6 => 2,
        }
    }
    /// From the IANA value; `None` for families tortie does not carry.
    pub fn from_code(code: u16) -> Option<Afi> {
        match code {
            1 => Some(Afi::Ipv4),
            2 => Some(Afi::Ipv6),
            _ => None,
        }
    }
}

/// SAFI for unicast, the only one tortie carries.
pub const SAFI_UNICAST: u8 = 1;

/// What the session negotiated that changes how bytes are read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeContext {
    /// Both sides sent the 4-octet AS capability (RFC 6793): AS_PATH carries 4-octet ASNs.
    pub four_octet_as: bool,
    /// IPv4 unicast negotiated.
    pub ipv4_unicast: bool,
    /// IPv6 unicast negotiated.
    pub ipv6_unicast: bool,
}

impl Default for DecodeContext {
    fn default() -> Self {
        DecodeContext {
            four_octet_as: true,
            ipv4_unicast: true,
            ipv6_unicast: true,
        }
    }
}

/// NOTIFICATION message (RFC 4271 §4.5).
///
/// ```text
/// 0                   1                   2                   3
/// 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// | Error code    | Error subcode |   Data (variable)             |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code.
    pub code: u8,
    /// Error subcode.
    pub subcode: u8,
    /// Diagnostic data.
    pub data: Bytes,
}

impl Notification {
    /// A NOTIFICATION with no data.
    pub fn new(code: u8, subcode: u8) -> Self {
        Notification {
            code,
            subcode,
            data: Bytes::new(),
        }
    }

    /// Decode the body (after the header).
    pub fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        if buf.remaining() < 2 {
            return Err(DecodeError::BadMessageLength(
                (HEADER_LEN + buf.remaining()) as u16,
            ));
        }
        let code = buf.get_u8();
        let subcode = buf.get_u8();
        let data = buf.copy_to_bytes(buf.remaining());
        Ok(Notification {
            code,
            subcode,
            data,
        })
    }

    /// Encode the body.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(self.code);
        buf.put_u8(self.subcode);
        buf.put_slice(&self.data);
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NOTIFICATION {}/{}", self.code, self.subcode)?;
        if !self.data.is_empty() {
            write!(f, " data {:02x?}", &self.data[..])?;
        }
        Ok(())
    }
}

/// ROUTE-REFRESH message (RFC 2918, subtype field per RFC 7313).
///
/// ```text
/// 0       7      15      23      31
/// +-------+-------+-------+-------+
/// |      AFI      | Res.  | SAFI  |
/// +-------+-------+-------+-------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    /// Raw AFI (kept raw: a refresh for an unknown family is ignored, not an error).
    pub afi: u16,
    /// Reserved / subtype octet.
    pub subtype: u8,
    /// Raw SAFI.
    pub safi: u8,
}

impl RouteRefresh {
    /// Decode the 4-octet body.
    pub fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        if buf.remaining() != 4 {
            return Err(DecodeError::InvalidRouteRefreshLength(
                (HEADER_LEN + buf.remaining()) as u16,
            ));
        }
        Ok(RouteRefresh {
            afi: buf.get_u16(),
            subtype: buf.get_u8(),
            safi: buf.get_u8(),
        })
    }
    /// Encode the body.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u16(self.afi);
        buf.put_u8(self.subtype);
        buf.put_u8(self.safi);
    }
}

/// One BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN.
    Open(Open),
    /// UPDATE (boxed: it is much larger than the others).
    Update(Box<Update>),
    /// NOTIFICATION.
    Notification(Notification),
    /// KEEPALIVE (header only).
    Keepalive,
    /// ROUTE-REFRESH.
    RouteRefresh(RouteRefresh),
}

/// Minimum and maximum total length allowed for each message type (RFC 4271 §6.1).
fn length_bounds(msg_type: u8) -> Option<(usize, usize)> {
    match msg_type {
        msg_type::OPEN => Some((29, MAX_MESSAGE_LEN)),
        msg_type::UPDATE => Some((23, MAX_MESSAGE_LEN)),
        msg_type::NOTIFICATION => Some((21, MAX_MESSAGE_LEN)),
        msg_type::KEEPALIVE => Some((19, 19)),
        // Length errors of ROUTE-REFRESH have their own code (RFC 7313); accept any here.
        msg_type::ROUTE_REFRESH => Some((19, MAX_MESSAGE_LEN)),
        _ => None,
    }
}

/// If `buf` starts with a complete message, its total length; `Ok(None)` if more bytes are needed.
///
/// Checks the marker, the length range and the type, so a stream reader can reject
/// garbage before waiting for a length that will never come.
pub fn frame_length(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(DecodeError::ConnectionNotSynchronized);
    }
    let length = u16::from_be_bytes([buf[16], buf[17]]);
    let msg_type = buf[18];
    let (min, max) = length_bounds(msg_type).ok_or(DecodeError::BadMessageType(msg_type))?;
    let len = length as usize;
    if len < min || len > max {
        return Err(DecodeError::BadMessageLength(length));
    }
    Ok((buf.len() >= len).then_some(len))
}

impl Message {
    /// Decode one whole message (header included). `buf` must hold exactly the message's
    /// bytes or more; exactly the message's length is consumed.
    pub fn decode(buf: &mut impl Buf, ctx: &DecodeContext) -> Result<Message, DecodeError> {
        if buf.remaining() < HEADER_LEN {
            return Err(DecodeError::BadMessageLength(buf.remaining() as u16));
        }
        let mut header = [0u8; HEADER_LEN];
        buf.copy_to_slice(&mut header);
        if header[..16].iter().any(|b| *b != 0xff) {
            return Err(DecodeError::ConnectionNotSynchronized);
        }
        let length = u16::from_be_bytes([header[16], header[17]]);
        let msg_type = header[18];
        let (min, max) = length_bounds(msg_type).ok_or(DecodeError::BadMessageType(msg_type))?;
        let len = length as usize;
        if len < min || len > max || buf.remaining() < len - HEADER_LEN {
            return Err(DecodeError::BadMessageLength(length));
        }
        let mut body = buf.take(len - HEADER_LEN);
        let message = match msg_type {
            msg_type::OPEN => Message::Open(Open::decode(&mut body)?),
            msg_type::UPDATE => Message::Update(Box::new(Update::decode(&mut body, ctx)?)),
            msg_type::NOTIFICATION => Message::Notification(Notification::decode(&mut body)?),
            msg_type::KEEPALIVE => Message::Keepalive,
            msg_type::ROUTE_REFRESH => Message::RouteRefresh(RouteRefresh::decode(&mut body)?),
            other => return Err(DecodeError::BadMessageType(other)),
        };
        // Sub-decoders consume their whole body; skip anything left so the caller's cursor is exact.
        let rest = body.remaining();
        body.advance(rest);
        Ok(message)
    }

    /// Message type code.
    pub fn msg_type(&self) -> u8 {
        match self {
            Message::Open(_) => msg_type::OPEN,
            Message::Update(_) => msg_type::UPDATE,
            Message::Notification(_) => msg_type::NOTIFICATION,
            Message::Keepalive => msg_type::KEEPALIVE,
            Message::RouteRefresh(_) => msg_type::ROUTE_REFRESH,
        }
    }

    /// Encode the whole message, header included. `ctx` decides 2- or 4-octet AS encoding.
    ///
    /// The caller keeps UPDATEs under [`MAX_MESSAGE_LEN`] (see [`Update::announcements`]);
    /// the length field is written from what was actually produced.
    pub fn encode(&self, buf: &mut bytes::BytesMut, ctx: &DecodeContext) {
        let start = buf.len();
        buf.put_slice(&[0xff; 16]);
        buf.put_u16(0);
        buf.put_u8(self.msg_type());
        match self {
            Message::Open(open) => open.encode(buf),
            Message::Update(update) => update.encode(buf, ctx),
            Message::Notification(n) => n.encode(buf),
            Message::Keepalive => {}
            Message::RouteRefresh(r) => r.encode(buf),
        }
        let len = (buf.len() - start) as u16;
        buf[start + 16..start + 18].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
