//! Decode errors mapped 1:1 to RFC 4271 §6 NOTIFICATION (code, subcode, data), and the RFC 7606 UPDATE outcome.

use bytes::Bytes;
use std::net::Ipv4Addr;

/// NOTIFICATION error codes (RFC 4271 §4.5, RFC 7313).
pub mod code {
    /// Message Header Error.
    pub const MESSAGE_HEADER: u8 = 1;
    /// OPEN Message Error.
    pub const OPEN_MESSAGE: u8 = 2;
    /// UPDATE Message Error.
    pub const UPDATE_MESSAGE: u8 = 3;
    /// Hold Timer Expired.
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    /// Finite State Machine Error.
    pub const FSM: u8 = 5;
    /// Cease.
    pub const CEASE: u8 = 6;
    /// ROUTE-REFRESH Message Error (RFC 7313).
    pub const ROUTE_REFRESH: u8 = 7;
}

/// A malformed message, carrying exactly what the NOTIFICATION it causes needs.
///
/// Every variant maps to one (code, subcode) pair; [`DecodeError::notification_code`]
/// and [`DecodeError::data`] give the NOTIFICATION fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// 1/1: the 16-octet marker is not all ones.
    #[error("message header: marker is not all ones")]
    ConnectionNotSynchronized,
    /// 1/2: the header length field is out of range for the message type.
    #[error("message header: bad message length {0}")]
    BadMessageLength(u16),
    /// 1/3: unknown message type.
    #[error("message header: bad message type {0}")]
    BadMessageType(u8),
    /// 2/0: OPEN structurally broken in a way with no dedicated subcode (e.g. a capability overruns).
    #[error("OPEN: malformed {0}")]
    MalformedOpen(&'static str),
    /// 2/1: version is not 4; data carries the version we support.
    #[error("OPEN: unsupported version {0}")]
    UnsupportedVersionNumber(u8),
    /// 2/2: the peer's AS is not the configured one (raised by the FSM, not the decoder).
    #[error("OPEN: bad peer AS {0}")]
    BadPeerAs(u32),
    /// 2/3: BGP identifier is zero (or equals ours on iBGP).
    #[error("OPEN: bad BGP identifier {0}")]
    BadBgpIdentifier(Ipv4Addr),
    /// 2/4: an optional parameter type other than Capabilities.
    #[error("OPEN: unsupported optional parameter type {0}")]
    UnsupportedOptionalParameter(u8),
    /// 2/6: hold time 1 or 2 seconds.
    #[error("OPEN: unacceptable hold time {0}")]
    UnacceptableHoldTime(u16),
    /// 3/1: attribute or withdrawn-routes lengths do not add up.
    #[error("UPDATE: malformed attribute list: {0}")]
    MalformedAttributeList(&'static str),
    /// 3/2: a well-known attribute type we do not know.
    #[error("UPDATE: unrecognized well-known attribute type {type_code}")]
    UnrecognizedWellKnownAttribute {
        /// Attribute type code.
        type_code: u8,
        /// The whole attribute (flags, type, length, value).
        attribute: Bytes,
    },
    /// 3/3: ORIGIN, AS_PATH or NEXT_HOP missing while NLRI are present.
    #[error("UPDATE: missing well-known attribute type {0}")]
    MissingWellKnownAttribute(u8),
    /// 3/4: Optional/Transitive flags conflict with the attribute type.
    #[error("UPDATE: attribute flags error on type {type_code}")]
    AttributeFlagsError {
        /// Attribute type code.
        type_code: u8,
        /// The whole attribute.
        attribute: Bytes,
    },
    /// 3/5: attribute length wrong for its type.
    #[error("UPDATE: attribute length error on type {type_code}")]
    AttributeLengthError {
        /// Attribute type code.
        type_code: u8,
        /// The whole attribute.
        attribute: Bytes,
    },
    /// 3/6: ORIGIN value not 0, 1 or 2.
    #[error("UPDATE: invalid ORIGIN attribute")]
    InvalidOriginAttribute {
        /// The whole attribute.
        attribute: Bytes,
    },
    /// 3/8: NEXT_HOP is not a usable unicast address.
    #[error("UPDATE: invalid NEXT_HOP attribute")]
    InvalidNextHopAttribute {
        /// The whole attribute.
        attribute: Bytes,
    },
    /// 3/9: an optional attribute (MP_REACH/MP_UNREACH, AGGREGATOR, …) has a malformed value.
    #[error("UPDATE: optional attribute error on type {type_code}")]
    OptionalAttributeError {
        /// Attribute type code.
        type_code: u8,
        /// The whole attribute.
        attribute: Bytes,
    },
    /// 3/10: a prefix in the withdrawn routes or NLRI fields is syntactically wrong.
    #[error("UPDATE: invalid network field: {0}")]
    InvalidNetworkField(&'static str),
    /// 3/11: AS_PATH segments do not parse.
    #[error("UPDATE: malformed AS_PATH")]
    MalformedAsPath {
        /// The whole attribute.
        attribute: Bytes,
    },
    /// 7/1: ROUTE-REFRESH of the wrong length (RFC 7313).
    #[error("ROUTE-REFRESH: invalid message length {0}")]
    InvalidRouteRefreshLength(u16),
}

impl DecodeError {
    /// NOTIFICATION (error code, error subcode) for this error.
    pub fn notification_code(&self) -> (u8, u8) {
        use DecodeError::*;
        match self {
            ConnectionNotSynchronized => (code::MESSAGE_HEADER, 1),
            BadMessageLength(_) => (code::MESSAGE_HEADER, 2),
            BadMessageType(_) => (code::MESSAGE_HEADER, 3),
            MalformedOpen(_) => (code::OPEN_MESSAGE, 0),
            UnsupportedVersionNumber(_) => (code::OPEN_MESSAGE, 1),
            BadPeerAs(_) => (code::OPEN_MESSAGE, 2),
            BadBgpIdentifier(_) => (code::OPEN_MESSAGE, 3),
            UnsupportedOptionalParameter(_) => (code::OPEN_MESSAGE, 4),
            UnacceptableHoldTime(_) => (code::OPEN_MESSAGE, 6),
            MalformedAttributeList(_) => (code::UPDATE_MESSAGE, 1),
            UnrecognizedWellKnownAttribute { .. } => (code::UPDATE_MESSAGE, 2),
            MissingWellKnownAttribute(_) => (code::UPDATE_MESSAGE, 3),
            AttributeFlagsError { .. } => (code::UPDATE_MESSAGE, 4),
            AttributeLengthError { .. } => (code::UPDATE_MESSAGE, 5),
            InvalidOriginAttribute { .. } => (code::UPDATE_MESSAGE, 6),
            InvalidNextHopAttribute { .. } => (code::UPDATE_MESSAGE, 8),
            OptionalAttributeError { .. } => (code::UPDATE_MESSAGE, 9),
            InvalidNetworkField(_) => (code::UPDATE_MESSAGE, 10),
            MalformedAsPath { .. } => (code::UPDATE_MESSAGE, 11),
            InvalidRouteRefreshLength(_) => (code::ROUTE_REFRESH, 1),
        }
    }

    /// NOTIFICATION data field for this error (RFC 4271 §6).
    pub fn data(&self) -> Bytes {
        use DecodeError::*;
        match self {
            BadMessageLength(len) | InvalidRouteRefreshLength(len) => {
                Bytes::copy_from_slice(&len.to_be_bytes())
            }
            BadMessageType(t) => Bytes::copy_from_slice(&[*t]),
            // We only speak version 4: the data is the largest supported version, 2 octets.
            UnsupportedVersionNumber(_) => Bytes::from_static(&[0, 4]),
            UnsupportedOptionalParameter(_) => Bytes::new(),
            BadPeerAs(_) | BadBgpIdentifier(_) | UnacceptableHoldTime(_) => Bytes::new(),
            MissingWellKnownAttribute(t) => Bytes::copy_from_slice(&[*t]),
            UnrecognizedWellKnownAttribute { attribute, .. }
            | AttributeFlagsError { attribute, .. }
            | AttributeLengthError { attribute, .. }
            | InvalidOriginAttribute { attribute }
            | InvalidNextHopAttribute { attribute }
            | OptionalAttributeError { attribute, .. }
            | MalformedAsPath { attribute } => attribute.clone(),
            ConnectionNotSynchronized
            | MalformedOpen(_)
            | MalformedAttributeList(_)
            | InvalidNetworkField(_) => Bytes::new(),
        }
    }

    /// The NOTIFICATION to send for this error.
    pub fn to_notification(&self) -> super::Notification {
        let (code, subcode) = self.notification_code();
        super::Notification {
            code,
            subcode,
            data: self.data(),
        }
    }
}

/// What RFC 7606 says to do with a syntactically locatable but semantically broken UPDATE.
///
/// Errors that make the NLRI impossible to locate are not here: they come back as
/// `Err(DecodeError)` and reset the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// Set when the UPDATE must be handled as if every NLRI in it was withdrawn (RFC 7606 §2).
    pub treat_as_withdraw: Option<DecodeError>,
    /// Attributes dropped by "attribute discard"; the routes are still accepted.
    pub discarded: Vec<DecodeError>,
}

impl UpdateOutcome {
    /// True when the UPDATE had no error at all.
    pub fn is_clean(&self) -> bool {
        self.treat_as_withdraw.is_none() && self.discarded.is_empty()
    }
}
