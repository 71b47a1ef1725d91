//! Path attributes (RFC 4271 §4.3, §5) with RFC 7606 error classification and RFC 6793 AS4 handling.
//!
//! Each attribute on the wire is:
//!
//! ```text
//!  0                   1
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+---------------------------+
//! |O|T|P|E| unused|  Attr. Type   | Length (1, or 2 if E)     | Value ...
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+---------------------------+
//! ```
//! O = optional, T = transitive, P = partial, E = extended length.

use super::update::{MpReach, MpUnreach, decode_mp_reach, decode_mp_unreach};
use super::{AS_TRANS, DecodeContext, DecodeError, UpdateOutcome};
use bytes::{Buf, BufMut, Bytes};
use std::net::Ipv4Addr;

/// Attribute flag bits.
pub(crate) mod flag {
    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const PARTIAL: u8 = 0x20;
    pub const EXTENDED_LENGTH: u8 = 0x10;
}

/// Attribute type codes (IANA).
pub mod attr_type {
    /// ORIGIN.
    pub const ORIGIN: u8 = 1;
    /// AS_PATH.
    pub const AS_PATH: u8 = 2;
    /// NEXT_HOP.
    pub const NEXT_HOP: u8 = 3;
    /// MULTI_EXIT_DISC.
    pub const MED: u8 = 4;
    /// LOCAL_PREF.
    pub const LOCAL_PREF: u8 = 5;
    /// ATOMIC_AGGREGATE.
    pub const ATOMIC_AGGREGATE: u8 = 6;
    /// AGGREGATOR.
    pub const AGGREGATOR: u8 = 7;
    /// COMMUNITIES (RFC 1997).
    pub const COMMUNITIES: u8 = 8;
    /// ORIGINATOR_ID (RFC 4456).
    pub const ORIGINATOR_ID: u8 = 9;
    /// CLUSTER_LIST (RFC 4456).
    pub const CLUSTER_LIST: u8 = 10;
    /// MP_REACH_NLRI (RFC 4760).
    pub const MP_REACH_NLRI: u8 = 14;
    /// MP_UNREACH_NLRI (RFC 4760).
    pub const MP_UNREACH_NLRI: u8 = 15;
    /// AS4_PATH (RFC 6793).
    pub const AS4_PATH: u8 = 17;
    /// AS4_AGGREGATOR (RFC 6793).
    pub const AS4_AGGREGATOR: u8 = 18;
    /// LARGE_COMMUNITY (RFC 8092).
    pub const LARGE_COMMUNITY: u8 = 32;
}

/// ORIGIN attribute value (type 1, one octet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// 0: learned from an IGP.
    Igp,
    /// 1: learned from EGP.
    Egp,
    /// 2: learned some other way.
    Incomplete,
}

/// AS_PATH segment type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentType {
    /// 1: unordered set.
    AsSet,
    /// 2: ordered sequence.
    AsSequence,
    /// 3: confederation sequence (RFC 5065).
    ConfedSequence,
    /// 4: confederation set (RFC 5065).
    ConfedSet,
}

impl SegmentType {
    fn code(self) -> u8 {
        match self {
            SegmentType::AsSet => 1,
            SegmentType::AsSequence => 2,
            SegmentType::ConfedSequence => 3,
            SegmentType::ConfedSet => 4,
        }
    }
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => SegmentType::AsSet,
            2 => SegmentType::AsSequence,
            3 => SegmentType::ConfedSequence,
            4 => SegmentType::ConfedSet,
            _ => return None,
        })
    }
    fn is_confed(self) -> bool {
        matches!(self, SegmentType::ConfedSequence | SegmentType::ConfedSet)
    }
}

/// One AS_PATH segment.
///
/// ```text
/// +--------------+--------------+----------------------------+
/// | segment type | segment len  | ASNs (len × 2 or 4 octets) |
/// +--------------+--------------+----------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AsPathSegment {
    /// Segment type.
    pub kind: SegmentType,
    /// ASNs (1..=255 of them on the wire).
    pub asns: Vec<u32>,
}

/// AS_PATH (type 2), always held with 4-octet ASNs; the 2-octet form exists only on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AsPath {
    /// Segments, first is nearest.
    pub segments: Vec<AsPathSegment>,
}

impl AsPath {
    /// Path length for best-path selection: a SET counts 1, confederation segments 0 (RFC 4271 §9.1.2.2, RFC 5065).
    pub fn length(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s.kind {
                SegmentType::AsSequence => s.asns.len(),
                SegmentType::AsSet => 1,
                _ => 0,
            })
            .sum()
    }

    /// The neighbouring AS (first ASN of the first AS_SEQUENCE), used for MED comparison.
    pub fn neighbour_as(&self) -> Option<u32> {
        match self.segments.first() {
            Some(s) if s.kind == SegmentType::AsSequence => s.asns.first().copied(),
            _ => None,
        }
    }

    /// True if `asn` appears anywhere in the path (loop detection).
    pub fn contains(&self, asn: u32) -> bool {
        self.segments.iter().any(|s| s.asns.contains(&asn))
    }

    /// Prepend `asn` to the first AS_SEQUENCE, creating one if needed (segments hold ≤ 255 ASNs).
    pub fn prepend(&mut self, asn: u32) {
        match self.segments.first_mut() {
            Some(s) if s.kind == SegmentType::AsSequence && s.asns.len() < 255 => {
                s.asns.insert(0, asn)
            }
            _ => self.segments.insert(
                0,
                AsPathSegment {
                    kind: SegmentType::AsSequence,
                    asns: vec![asn],
                },
            ),
        }
    }

    /// True if any confederation segment is present (never valid from an external peer).
    pub fn has_confed_segment(&self) -> bool {
        self.segments.iter().any(|s| s.kind.is_confed())
    }

    fn has_wide_asn(&self) -> bool {
        self.segments
            .iter()
            .filter(|s| !s.kind.is_confed())
            .any(|s| s.asns.iter().any(|a| *a > 0xffff))
    }

    fn wire_len(&self, as_len: usize, skip_confed: bool) -> usize {
        self.segments
            .iter()
            .filter(|s| !(skip_confed && s.kind.is_confed()))
            .map(|s| 2 + as_len * s.asns.len())
            .sum()
    }

    fn encode(&self, buf: &mut impl BufMut, four_octet: bool, skip_confed: bool) {
        for s in &self.segments {
            if skip_confed && s.kind.is_confed() {
                continue;
            }
            buf.put_u8(s.kind.code());
            buf.put_u8(s.asns.len() as u8);
            for asn in &s.asns {
                if four_octet {
                    buf.put_u32(*asn);
                } else {
                    buf.put_u16(u16::try_from(*asn).unwrap_or(AS_TRANS));
                }
            }
        }
    }

    fn decode(mut value: Bytes, four_octet: bool) -> Option<AsPath> {
        let as_len = if four_octet { 4 } else { 2 };
        let mut segments = Vec::new();
        while value.has_remaining() {
            if value.remaining() < 2 {
                return None;
            }
            let kind = SegmentType::from_code(value.get_u8())?;
            let count = value.get_u8() as usize;
            // RFC 7606 §7.2: a zero-length segment is malformed.
            if count == 0 || value.remaining() < count * as_len {
                return None;
            }
            let asns = (0..count)
                .map(|_| {
                    if four_octet {
                        value.get_u32()
                    } else {
                        u32::from(value.get_u16())
                    }
                })
                .collect();
            segments.push(AsPathSegment { kind, asns });
        }
        Some(AsPath { segments })
    }

    /// RFC 6793 §4.2.3: rebuild the real path from a 2-octet AS_PATH and an AS4_PATH.
    fn merge_as4(self, as4: AsPath) -> AsPath {
        let path_count = self.length();
        let as4_count = as4.length();
        if path_count < as4_count {
            return self;
        }
        let mut keep = path_count - as4_count;
        let mut segments = Vec::new();
        for s in self.segments {
            if keep == 0 {
                break;
            }
            match s.kind {
                SegmentType::AsSequence => {
                    let take = keep.min(s.asns.len());
                    keep -= take;
                    segments.push(AsPathSegment {
                        kind: s.kind,
                        asns: s.asns[..take].to_vec(),
                    });
                }
                SegmentType::AsSet => {
                    keep -= 1;
                    segments.push(s);
                }
                _ => segments.push(s),
            }
        }
        segments.extend(as4.segments);
        AsPath { segments }
    }
}

/// AGGREGATOR (type 7): the AS and router that formed an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Aggregator {
    /// Aggregating AS (4-octet value; AS_TRANS + AS4_AGGREGATOR towards 2-octet peers).
    pub asn: u32,
    /// Aggregating router's BGP identifier.
    pub address: Ipv4Addr,
}

/// One large community (RFC 8092): three 4-octet fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    /// Global administrator (an ASN).
    pub global: u32,
    /// Local data part 1.
    pub local1: u32,
    /// Local data part 2.
    pub local2: u32,
}

/// An unrecognised optional transitive attribute, passed on unchanged except for the Partial bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttribute {
    /// Flags as they will be sent: Partial set (RFC 4271 §5), extended-length cleared (chosen at encode).
    pub flags: u8,
    /// Type code.
    pub type_code: u8,
    /// Value.
    pub value: Bytes,
}

/// The path attributes of an UPDATE, except MP_REACH/MP_UNREACH (they carry NLRI and live in
/// [`super::Update`]) and AS4_PATH/AS4_AGGREGATOR (merged into `as_path`/`aggregator` on decode,
/// regenerated on encode towards 2-octet peers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PathAttributes {
    /// ORIGIN; `None` only for withdraw-only UPDATEs.
    pub origin: Option<Origin>,
    /// AS_PATH.
    pub as_path: AsPath,
    /// NEXT_HOP (IPv4 NLRI only).
    pub next_hop: Option<Ipv4Addr>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// LOCAL_PREF.
    pub local_pref: Option<u32>,
    /// ATOMIC_AGGREGATE present.
    pub atomic_aggregate: bool,
    /// AGGREGATOR.
    pub aggregator: Option<Aggregator>,
    /// COMMUNITIES, each 4 octets.
    pub communities: Vec<u32>,
    /// LARGE_COMMUNITY.
    pub large_communities: Vec<LargeCommunity>,
    /// ORIGINATOR_ID.
    pub originator_id: Option<Ipv4Addr>,
    /// CLUSTER_LIST.
    pub cluster_list: Vec<Ipv4Addr>,
    /// Unrecognised optional transitive attributes.
    pub unknown: Vec<RawAttribute>,
}

/// RFC 7606 approach for a malformed attribute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Approach {
    TreatAsWithdraw,
    AttributeDiscard,
    SessionReset,
}

/// Expected (optional, transitive) flags and the RFC 7606 approach for each known attribute.
fn known(type_code: u8) -> Option<(u8, Approach)> {
    use Approach::*;
    use attr_type::*;
    const WELL_KNOWN: u8 = flag::TRANSITIVE;
    const OPT_TRANS: u8 = flag::OPTIONAL | flag::TRANSITIVE;
    const OPT_NON_TRANS: u8 = flag::OPTIONAL;
    Some(match type_code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF => (WELL_KNOWN, TreatAsWithdraw),
        ATOMIC_AGGREGATE => (WELL_KNOWN, AttributeDiscard),
        MED | ORIGINATOR_ID | CLUSTER_LIST => (OPT_NON_TRANS, TreatAsWithdraw),
        MP_REACH_NLRI | MP_UNREACH_NLRI => (OPT_NON_TRANS, SessionReset),
        COMMUNITIES | LARGE_COMMUNITY => (OPT_TRANS, TreatAsWithdraw),
        AGGREGATOR | AS4_PATH | AS4_AGGREGATOR => (OPT_TRANS, AttributeDiscard),
        _ => return None,
    })
}

/// Everything decoded from the path attributes field.
pub(crate) struct DecodedAttributes {
    pub attrs: PathAttributes,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// Bit per type code < 64 that was present (for the missing-mandatory check).
    pub seen: u64,
}

fn get_ipv4(value: &mut Bytes) -> Ipv4Addr {
    Ipv4Addr::from(value.get_u32())
}

/// Decode the path attributes field (already sliced to Total Path Attribute Length).
pub(crate) fn decode_attributes(
    mut data: Bytes,
    ctx: &DecodeContext,
    outcome: &mut UpdateOutcome,
) -> Result<DecodedAttributes, DecodeError> {
    let mut attrs = PathAttributes::default();
    let mut mp_reach = None;
    let mut mp_unreach = None;
    let mut seen: u64 = 0;
    let mut seen_high: Vec<u8> = Vec::new();
    let mut as4_path: Option<AsPath> = None;
    let mut as4_aggregator: Option<Aggregator> = None;

    while data.has_remaining() {
        // RFC 7606 §4: too few octets for a header, or a value overrunning the field, is
        // treat-as-withdraw; the NLRI are still located from Total Path Attribute Length.
        if data.remaining() < 3 {
            outcome.treat_as_withdraw = Some(DecodeError::MalformedAttributeList(
                "trailing octets too short for an attribute header",
            ));
            break;
        }
        let flags = data[0];
        let type_code = data[1];
        let header_len = if flags & flag::EXTENDED_LENGTH != 0 {
            4
        } else {
            3
        };
        if data.remaining() < header_len {
            outcome.treat_as_withdraw = Some(DecodeError::MalformedAttributeList(
                "trailing octets too short for an attribute header",
            ));
            break;
        }
        let len = if header_len == 4 {
            u16::from_be_bytes([data[2], data[3]]) as usize
        } else {
            data[2] as usize
        };
        if data.remaining() < header_len + len {
            outcome.treat_as_withdraw = Some(DecodeError::AttributeLengthError {
                type_code,
                attribute: data.clone(),
            });
            break;
        }
        let whole = data.split_to(header_len + len);
        let mut value = whole.slice(header_len..);

        // Duplicates: MP attributes reset the session, others keep the first (RFC 7606 §3 g).
        let duplicate = if type_code < 64 {
            let bit = 1u64 << type_code;
            let dup = seen & bit != 0;
            seen |= bit;
            dup
        } else {
            let dup = seen_high.contains(&type_code);
            if !dup {
                seen_high.push(type_code);
            }
            dup
        };
        if duplicate {
            if type_code == attr_type::MP_REACH_NLRI || type_code == attr_type::MP_UNREACH_NLRI {
                return Err(DecodeError::MalformedAttributeList(
                    "MP_REACH_NLRI or MP_UNREACH_NLRI appears twice",
                ));
            }
            outcome
                .discarded
                .push(DecodeError::MalformedAttributeList("duplicate attribute"));
            continue;
        }

        let Some((expected_flags, approach)) = known(type_code) else {
            if flags & flag::OPTIONAL == 0 {
                outcome.treat_as_withdraw = Some(DecodeError::UnrecognizedWellKnownAttribute {
                    type_code,
                    attribute: whole,
                });
            } else if flags & flag::TRANSITIVE != 0 {
                attrs.unknown.push(RawAttribute {
                    flags: (flags | flag::PARTIAL) & !flag::EXTENDED_LENGTH,
                    type_code,
                    value,
                });
            }
            // Unrecognised optional non-transitive attributes are quietly ignored (RFC 4271 §5).
            continue;
        };

        let fail = |error: DecodeError, outcome: &mut UpdateOutcome| -> Result<(), DecodeError> {
            match approach {
                Approach::SessionReset => Err(error),
                Approach::TreatAsWithdraw => {
                    if outcome.treat_as_withdraw.is_none() {
                        outcome.treat_as_withdraw = Some(error);
                    }
                    Ok(())
                }
                Approach::AttributeDiscard => {
                    outcome.discarded.push(error);
                    Ok(())
                }
            }
        };

        if flags & (flag::OPTIONAL | flag::TRANSITIVE) != expected_flags {
            fail(
                DecodeError::AttributeFlagsError {
                    type_code,
                    attribute: whole,
                },
                outcome,
            )?;
            continue;
        }
        let length_error = || DecodeError::AttributeLengthError {
            type_code,
            attribute: whole.clone(),
        };

        match type_code {
            attr_type::ORIGIN => {
                if len != 1 {
                    fail(length_error(), outcome)?;
                    continue;
                }
                attrs.origin = match value.get_u8() {
                    0 => Some(Origin::Igp),
                    1 => Some(Origin::Egp),
                    2 => Some(Origin::Incomplete),
                    _ => {
                        fail(
                            DecodeError::InvalidOriginAttribute {
                                attribute: whole.clone(),
                            },
                            outcome,
                        )?;
                        continue;
                    }
                };
            }
            attr_type::AS_PATH => match AsPath::decode(value, ctx.four_octet_as) {
                Some(path) => attrs.as_path = path,
                None => fail(
                    DecodeError::MalformedAsPath {
                        attribute: whole.clone(),
                    },
                    outcome,
                )?,
            },
            attr_type::NEXT_HOP => {
                if len != 4 {
                    fail(length_error(), outcome)?;
                    continue;
                }
                let next_hop = get_ipv4(&mut value);
                if next_hop.is_unspecified() || next_hop.is_multicast() || next_hop.is_broadcast() {
                    fail(
                        DecodeError::InvalidNextHopAttribute {
                            attribute: whole.clone(),
                        },
                        outcome,
                    )?;
                    continue;
                }
                attrs.next_hop = Some(next_hop);
            }
            attr_type::MED | attr_type::LOCAL_PREF => {
                if len != 4 {
                    fail(length_error(), outcome)?;
                    continue;
                }
                let v = value.get_u32();
                if type_code == attr_type::MED {
                    attrs.med = Some(v);
                } else {
                    attrs.local_pref = Some(v);
                }
            }
            attr_type::ATOMIC_AGGREGATE => {
                if len != 0 {
                    fail(length_error(), outcome)?;
                    continue;
                }
                attrs.atomic_aggregate = true;
            }
            attr_type::AGGREGATOR => {
                let expected = if ctx.four_octet_as { 8 } else { 6 };
                if len != expected {
                    fail(length_error(), outcome)?;
                    continue;
                }
                let asn = if ctx.four_octet_as {
                    value.get_u32()
                } else {
                    u32::from(value.get_u16())
                };
                attrs.aggregator = Some(Aggregator {
                    asn,
                    address: get_ipv4(&mut value),
                });
            }
            attr_type::COMMUNITIES => {
                if !len.is_multiple_of(4) {
                    fail(length_error(), outcome)?;
                    continue;
                }
                attrs.communities = (0..len / 4).map(|_| value.get_u32()).collect();
            }
            attr_type::LARGE_COMMUNITY => {
                if !len.is_multiple_of(12) {
                    fail(length_error(), outcome)?;
                    continue;
                }
                attrs.large_communities = (0..len / 12)
                    .map(|_| LargeCommunity {
                        global: value.get_u32(),
                        local1: value.get_u32(),
                        local2: value.get_u32(),
                    })
                    .collect();
            }
            attr_type::ORIGINATOR_ID => {
                if len != 4 {
                    fail(length_error(), outcome)?;
                    continue;
                }
                attrs.originator_id = Some(get_ipv4(&mut value));
            }
            attr_type::CLUSTER_LIST => {
                if !len.is_multiple_of(4) {
                    fail(length_error(), outcome)?;
                    continue;
                }
                attrs.cluster_list = (0..len / 4).map(|_| get_ipv4(&mut value)).collect();
            }
            attr_type::MP_REACH_NLRI => {
                mp_reach = decode_mp_reach(value, ctx).map_err(|_| {
                    DecodeError::OptionalAttributeError {
                        type_code,
                        attribute: whole.clone(),
                    }
                })?;
            }
            attr_type::MP_UNREACH_NLRI => {
                mp_unreach = decode_mp_unreach(value, ctx).map_err(|_| {
                    DecodeError::OptionalAttributeError {
                        type_code,
                        attribute: whole.clone(),
                    }
                })?;
            }
            attr_type::AS4_PATH => {
                // RFC 6793 §6: between two 4-octet speakers AS4_PATH is ignored.
                if ctx.four_octet_as {
                    continue;
                }
                match AsPath::decode(value, true) {
                    Some(path) if !path.segments.iter().any(|s| s.kind.is_confed()) => {
                        as4_path = Some(path)
                    }
                    _ => fail(
                        DecodeError::MalformedAsPath {
                            attribute: whole.clone(),
                        },
                        outcome,
                    )?,
                }
            }
            attr_type::AS4_AGGREGATOR => {
                if ctx.four_octet_as {
                    continue;
                }
                if len != 8 {
                    fail(length_error(), outcome)?;
                    continue;
                }
                as4_aggregator = Some(Aggregator {
                    asn: value.get_u32(),
                    address: get_ipv4(&mut value),
                });
            }
            // `known()` returned Some, so the type is one of the arms above.
            _ => {}
        }
    }

    // RFC 6793 §4.2.3: an AGGREGATOR that is not AS_TRANS means the AS4 attributes are stale.
    let aggregator_is_trans = attrs
        .aggregator
        .is_none_or(|a| a.asn == u32::from(AS_TRANS));
    if aggregator_is_trans {
        if let (Some(real), Some(_)) = (as4_aggregator, attrs.aggregator) {
            attrs.aggregator = Some(real);
        }
        if let Some(as4) = as4_path {
            attrs.as_path = std::mem::take(&mut attrs.as_path).merge_as4(as4);
        }
    }

    Ok(DecodedAttributes {
        attrs,
        mp_reach,
        mp_unreach,
        seen,
    })
}

fn put_header(buf: &mut impl BufMut, flags: u8, type_code: u8, len: usize) {
    if len > 255 {
        buf.put_u8(flags | flag::EXTENDED_LENGTH);
        buf.put_u8(type_code);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(flags & !flag::EXTENDED_LENGTH);
        buf.put_u8(type_code);
        buf.put_u8(len as u8);
    }
}

const WELL_KNOWN: u8 = flag::TRANSITIVE;
const OPT_TRANS: u8 = flag::OPTIONAL | flag::TRANSITIVE;
const OPT_NON_TRANS: u8 = flag::OPTIONAL;

impl PathAttributes {
    /// True if no attribute is set (a withdraw-only UPDATE).
    pub fn is_empty(&self) -> bool {
        *self == PathAttributes::default()
    }

    /// Encode the attributes whose type code is below 14 (before MP_REACH_NLRI).
    pub(crate) fn encode_low(&self, buf: &mut impl BufMut, ctx: &DecodeContext) {
        if let Some(origin) = self.origin {
            put_header(buf, WELL_KNOWN, attr_type::ORIGIN, 1);
            buf.put_u8(match origin {
                Origin::Igp => 0,
                Origin::Egp => 1,
                Origin::Incomplete => 2,
            });
        }
        if self.origin.is_some() || !self.as_path.segments.is_empty() {
            let as_len = if ctx.four_octet_as { 4 } else { 2 };
            put_header(
                buf,
                WELL_KNOWN,
                attr_type::AS_PATH,
                self.as_path.wire_len(as_len, false),
            );
            self.as_path.encode(buf, ctx.four_octet_as, false);
        }
        if let Some(next_hop) = self.next_hop {
            put_header(buf, WELL_KNOWN, attr_type::NEXT_HOP, 4);
            buf.put_u32(next_hop.into());
        }
        if let Some(med) = self.med {
            put_header(buf, OPT_NON_TRANS, attr_type::MED, 4);
            buf.put_u32(med);
        }
        if let Some(local_pref) = self.local_pref {
            put_header(buf, WELL_KNOWN, attr_type::LOCAL_PREF, 4);
            buf.put_u32(local_pref);
        }
        if self.atomic_aggregate {
            put_header(buf, WELL_KNOWN, attr_type::ATOMIC_AGGREGATE, 0);
        }
        if let Some(aggregator) = self.aggregator {
            if ctx.four_octet_as {
                put_header(buf, OPT_TRANS, attr_type::AGGREGATOR, 8);
                buf.put_u32(aggregator.asn);
            } else {
                put_header(buf, OPT_TRANS, attr_type::AGGREGATOR, 6);
                buf.put_u16(u16::try_from(aggregator.asn).unwrap_or(AS_TRANS));
            }
            buf.put_u32(aggregator.address.into());
        }
        if !self.communities.is_empty() {
            put_header(
                buf,
                OPT_TRANS,
                attr_type::COMMUNITIES,
                4 * self.communities.len(),
            );
            for c in &self.communities {
                buf.put_u32(*c);
            }
        }
        if let Some(originator_id) = self.originator_id {
            put_header(buf, OPT_NON_TRANS, attr_type::ORIGINATOR_ID, 4);
            buf.put_u32(originator_id.into());
        }
        if !self.cluster_list.is_empty() {
            put_header(
                buf,
                OPT_NON_TRANS,
                attr_type::CLUSTER_LIST,
                4 * self.cluster_list.len(),
            );
            for id in &self.cluster_list {
                buf.put_u32((*id).into());
            }
        }
    }

    /// Encode the attributes whose type code is above 15 (after MP_UNREACH_NLRI).
    pub(crate) fn encode_high(&self, buf: &mut impl BufMut, ctx: &DecodeContext) {
        if !ctx.four_octet_as {
            // RFC 6793 §4.2.2: a 2-octet peer gets AS_TRANS in AS_PATH plus the real path in AS4_PATH.
            if self.as_path.has_wide_asn() {
                put_header(
                    buf,
                    OPT_TRANS,
                    attr_type::AS4_PATH,
                    self.as_path.wire_len(4, true),
                );
                self.as_path.encode(buf, true, true);
            }
            if let Some(aggregator) = self.aggregator.filter(|a| a.asn > 0xffff) {
                put_header(buf, OPT_TRANS, attr_type::AS4_AGGREGATOR, 8);
                buf.put_u32(aggregator.asn);
                buf.put_u32(aggregator.address.into());
            }
        }
        if !self.large_communities.is_empty() {
            put_header(
                buf,
                OPT_TRANS,
                attr_type::LARGE_COMMUNITY,
                12 * self.large_communities.len(),
            );
            for c in &self.large_communities {
                buf.put_u32(c.global);
                buf.put_u32(c.local1);
                buf.put_u32(c.local2);
            }
        }
        for raw in &self.unknown {
            put_header(
                buf,
                raw.flags | flag::PARTIAL,
                raw.type_code,
                raw.value.len(),
            );
            buf.put_slice(&raw.value);
        }
    }

    /// Encoded size in octets (for packing UPDATEs under 4096 octets).
    pub fn encoded_len(&self, ctx: &DecodeContext) -> usize {
        let mut scratch = Vec::with_capacity(128);
        self.encode_low(&mut scratch, ctx);
        self.encode_high(&mut scratch, ctx);
        scratch.len()
    }
}
