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

impl Approach {
    /// Record `error` in `outcome` as this approach says; only a session reset stops the decode.
    fn handle(self, error: DecodeError, outcome: &mut UpdateOutcome) -> Result<(), DecodeError> {
        match self {
            Approach::SessionReset => Err(error),
            Approach::TreatAsWithdraw => {
                // The first error is the one a NOTIFICATION or log would be about.
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
    }
}

/// Expected Optional/Transitive flags of the attribute kinds (RFC 4271 §5).
const WELL_KNOWN: u8 = flag::TRANSITIVE;
const OPT_TRANS: u8 = flag::OPTIONAL | flag::TRANSITIVE;
const OPT_NON_TRANS: u8 = flag::OPTIONAL;

/// Decodes one attribute's value into `Collected`; an `Err` is handled by the type's approach.
type DecodeFn = fn(&mut Collected, &Tlv, &DecodeContext) -> Result<(), DecodeError>;

/// How one known attribute type is checked and decoded.
struct AttrSpec {
    type_code: u8,
    /// The Optional and Transitive bits this type must carry.
    flags: u8,
    /// What RFC 7606 says to do when the attribute is malformed.
    approach: Approach,
    decode: DecodeFn,
}

const fn spec(type_code: u8, flags: u8, approach: Approach, decode: DecodeFn) -> AttrSpec {
    AttrSpec {
        type_code,
        flags,
        approach,
        decode,
    }
}

/// Every attribute type tortie understands; a type not here is "unrecognised" (RFC 4271 §5).
/// The approaches are RFC 7606 §7's, per attribute.
#[rustfmt::skip]
const KNOWN: &[AttrSpec] = {
    use Approach::*;
    use attr_type::*;
    &[
        spec(ORIGIN,           WELL_KNOWN,    TreatAsWithdraw,  decode_origin),
        spec(AS_PATH,          WELL_KNOWN,    TreatAsWithdraw,  decode_as_path),
        spec(NEXT_HOP,         WELL_KNOWN,    TreatAsWithdraw,  decode_next_hop),
        spec(MED,              OPT_NON_TRANS, TreatAsWithdraw,  decode_med),
        spec(LOCAL_PREF,       WELL_KNOWN,    TreatAsWithdraw,  decode_local_pref),
        spec(ATOMIC_AGGREGATE, WELL_KNOWN,    AttributeDiscard, decode_atomic_aggregate),
        spec(AGGREGATOR,       OPT_TRANS,     AttributeDiscard, decode_aggregator),
        spec(COMMUNITIES,      OPT_TRANS,     TreatAsWithdraw,  decode_communities),
        spec(ORIGINATOR_ID,    OPT_NON_TRANS, TreatAsWithdraw,  decode_originator_id),
        spec(CLUSTER_LIST,     OPT_NON_TRANS, TreatAsWithdraw,  decode_cluster_list),
        spec(MP_REACH_NLRI,    OPT_NON_TRANS, SessionReset,     decode_mp_reach_attr),
        spec(MP_UNREACH_NLRI,  OPT_NON_TRANS, SessionReset,     decode_mp_unreach_attr),
        spec(AS4_PATH,         OPT_TRANS,     AttributeDiscard, decode_as4_path),
        spec(AS4_AGGREGATOR,   OPT_TRANS,     AttributeDiscard, decode_as4_aggregator),
        spec(LARGE_COMMUNITY,  OPT_TRANS,     TreatAsWithdraw,  decode_large_communities),
    ]
};

fn known(type_code: u8) -> Option<&'static AttrSpec> {
    KNOWN.iter().find(|spec| spec.type_code == type_code)
}

/// Everything decoded from the path attributes field.
pub(crate) struct DecodedAttributes {
    pub attrs: PathAttributes,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    /// Bit per type code < 64 that was present (for the missing-mandatory check).
    pub seen: u64,
}

/// What the per-attribute decoders fill in; the AS4 attributes wait here for the RFC 6793 merge.
#[derive(Default)]
struct Collected {
    attrs: PathAttributes,
    mp_reach: Option<MpReach>,
    mp_unreach: Option<MpUnreach>,
    as4_path: Option<AsPath>,
    as4_aggregator: Option<Aggregator>,
}

/// One attribute located in the field.
struct Tlv {
    flags: u8,
    type_code: u8,
    /// Flags, type, length and value: the data of the NOTIFICATION about it.
    whole: Bytes,
    value: Bytes,
}

impl Tlv {
    fn length_error(&self) -> DecodeError {
        DecodeError::AttributeLengthError {
            type_code: self.type_code,
            attribute: self.whole.clone(),
        }
    }

    /// The value, if it is exactly `len` octets; the decoders read it without further checks.
    fn value_of_len(&self, len: usize) -> Result<Bytes, DecodeError> {
        if self.value.len() == len {
            Ok(self.value.clone())
        } else {
            Err(self.length_error())
        }
    }

    /// The value as `unit`-octet items, if it is a whole number of them.
    fn items_of(&self, unit: usize) -> Result<(Bytes, usize), DecodeError> {
        if self.value.len().is_multiple_of(unit) {
            Ok((self.value.clone(), self.value.len() / unit))
        } else {
            Err(self.length_error())
        }
    }

    fn malformed_as_path(&self) -> DecodeError {
        DecodeError::MalformedAsPath {
            attribute: self.whole.clone(),
        }
    }

    fn optional_attribute_error(&self) -> DecodeError {
        DecodeError::OptionalAttributeError {
            type_code: self.type_code,
            attribute: self.whole.clone(),
        }
    }
}

/// Split the next attribute off `data`. An `Err` means the field cannot be walked further:
/// RFC 7606 §4 makes that treat-as-withdraw, as the NLRI are still located from Total Path
/// Attribute Length.
fn split_attribute(data: &mut Bytes) -> Result<Tlv, DecodeError> {
    const SHORT: DecodeError =
        DecodeError::MalformedAttributeList("trailing octets too short for an attribute header");
    if data.remaining() < 3 {
        return Err(SHORT);
    }
    let flags = data[0];
    let type_code = data[1];
    let header_len = if flags & flag::EXTENDED_LENGTH != 0 {
        4
    } else {
        3
    };
    if data.remaining() < header_len {
        return Err(SHORT);
    }
    let len = if header_len == 4 {
        u16::from_be_bytes([data[2], data[3]]) as usize
    } else {
        data[2] as usize
    };
    if data.remaining() < header_len + len {
        return Err(DecodeError::AttributeLengthError {
            type_code,
            attribute: data.clone(),
        });
    }
    let whole = data.split_to(header_len + len);
    let value = whole.slice(header_len..);
    Ok(Tlv {
        flags,
        type_code,
        whole,
        value,
    })
}

/// The attribute types met so far, for RFC 7606 §3 (g) duplicate handling.
#[derive(Default)]
struct SeenTypes {
    /// Bit per type code < 64: the mandatory ones are all there, and the UPDATE checks them.
    low: u64,
    high: Vec<u8>,
}

impl SeenTypes {
    /// Note `type_code`; false if it had been seen already.
    fn insert(&mut self, type_code: u8) -> bool {
        if type_code < 64 {
            let bit = 1u64 << type_code;
            let first = self.low & bit == 0;
            self.low |= bit;
            first
        } else if self.high.contains(&type_code) {
            false
        } else {
            self.high.push(type_code);
            true
        }
    }
}

/// Decode the path attributes field (already sliced to Total Path Attribute Length).
pub(crate) fn decode_attributes(
    mut data: Bytes,
    ctx: &DecodeContext,
    outcome: &mut UpdateOutcome,
) -> Result<DecodedAttributes, DecodeError> {
    let mut collected = Collected::default();
    let mut seen = SeenTypes::default();

    while data.has_remaining() {
        let tlv = match split_attribute(&mut data) {
            Ok(tlv) => tlv,
            Err(error) => {
                outcome.treat_as_withdraw = Some(error);
                break;
            }
        };

        // Duplicates: MP attributes reset the session, others keep the first (RFC 7606 §3 g).
        if !seen.insert(tlv.type_code) {
            if tlv.type_code == attr_type::MP_REACH_NLRI
                || tlv.type_code == attr_type::MP_UNREACH_NLRI
            {
                return Err(DecodeError::MalformedAttributeList(
                    "MP_REACH_NLRI or MP_UNREACH_NLRI appears twice",
                ));
            }
            outcome
                .discarded
                .push(DecodeError::MalformedAttributeList("duplicate attribute"));
            continue;
        }

        let Some(spec) = known(tlv.type_code) else {
            keep_unrecognised(tlv, &mut collected.attrs, outcome);
            continue;
        };
        let decoded = if tlv.flags & (flag::OPTIONAL | flag::TRANSITIVE) != spec.flags {
            Err(DecodeError::AttributeFlagsError {
                type_code: tlv.type_code,
                attribute: tlv.whole,
            })
        } else {
            (spec.decode)(&mut collected, &tlv, ctx)
        };
        if let Err(error) = decoded {
            spec.approach.handle(error, outcome)?;
        }
    }

    Ok(collected.finish(seen.low))
}

/// RFC 4271 §5: an unrecognised well-known attribute is an error, an optional transitive one is
/// passed on with Partial set, an optional non-transitive one is quietly ignored.
fn keep_unrecognised(tlv: Tlv, attrs: &mut PathAttributes, outcome: &mut UpdateOutcome) {
    if tlv.flags & flag::OPTIONAL == 0 {
        outcome.treat_as_withdraw = Some(DecodeError::UnrecognizedWellKnownAttribute {
            type_code: tlv.type_code,
            attribute: tlv.whole,
        });
    } else if tlv.flags & flag::TRANSITIVE != 0 {
        attrs.unknown.push(RawAttribute {
            flags: (tlv.flags | flag::PARTIAL) & !flag::EXTENDED_LENGTH,
            type_code: tlv.type_code,
            value: tlv.value,
        });
    }
}

impl Collected {
    fn finish(mut self, seen: u64) -> DecodedAttributes {
        // RFC 6793 §4.2.3: an AGGREGATOR that is not AS_TRANS means the AS4 attributes are stale.
        let attrs = &mut self.attrs;
        let aggregator_is_trans = attrs
            .aggregator
            .is_none_or(|a| a.asn == u32::from(AS_TRANS));
        if aggregator_is_trans {
            if let (Some(real), Some(_)) = (self.as4_aggregator, attrs.aggregator) {
                attrs.aggregator = Some(real);
            }
            if let Some(as4) = self.as4_path {
                attrs.as_path = std::mem::take(&mut attrs.as_path).merge_as4(as4);
            }
        }
        DecodedAttributes {
            attrs: self.attrs,
            mp_reach: self.mp_reach,
            mp_unreach: self.mp_unreach,
            seen,
        }
    }
}

fn get_ipv4(value: &mut Bytes) -> Ipv4Addr {
    Ipv4Addr::from(value.get_u32())
}

/// ORIGIN: one octet, 0 IGP, 1 EGP, 2 INCOMPLETE.
fn decode_origin(c: &mut Collected, tlv: &Tlv, _: &DecodeContext) -> Result<(), DecodeError> {
    let origin = match tlv.value_of_len(1)?.get_u8() {
        0 => Origin::Igp,
        1 => Origin::Egp,
        2 => Origin::Incomplete,
        _ => {
            return Err(DecodeError::InvalidOriginAttribute {
                attribute: tlv.whole.clone(),
            });
        }
    };
    c.attrs.origin = Some(origin);
    Ok(())
}

/// AS_PATH: segments of 2- or 4-octet ASNs, as the session negotiated (RFC 6793).
fn decode_as_path(c: &mut Collected, tlv: &Tlv, ctx: &DecodeContext) -> Result<(), DecodeError> {
    let path = AsPath::decode(tlv.value.clone(), ctx.four_octet_as)
        .ok_or_else(|| tlv.malformed_as_path())?;
    c.attrs.as_path = path;
    Ok(())
}

/// NEXT_HOP: a 4-octet IPv4 address that could be a unicast next hop.
fn decode_next_hop(c: &mut Collected, tlv: &Tlv, _: &DecodeContext) -> Result<(), DecodeError> {
    let next_hop = get_ipv4(&mut tlv.value_of_len(4)?);
    if next_hop.is_unspecified() || next_hop.is_multicast() || next_hop.is_broadcast() {
        return Err(DecodeError::InvalidNextHopAttribute {
            attribute: tlv.whole.clone(),
        });
    }
    c.attrs.next_hop = Some(next_hop);
    Ok(())
}

/// MULTI_EXIT_DISC: a 4-octet metric.
fn decode_med(c: &mut Collected, tlv: &Tlv, _: &DecodeContext) -> Result<(), DecodeError> {
    c.attrs.med = Some(tlv.value_of_len(4)?.get_u32());
    Ok(())
}

/// LOCAL_PREF: a 4-octet preference.
fn decode_local_pref(c: &mut Collected, tlv: &Tlv, _: &DecodeContext) -> Result<(), DecodeError> {
    c.attrs.local_pref = Some(tlv.value_of_len(4)?.get_u32());
    Ok(())
}

/// ATOMIC_AGGREGATE: present or not, no value.
fn decode_atomic_aggregate(
    c: &mut Collected,
    tlv: &Tlv,
    _: &DecodeContext,
) -> Result<(), DecodeError> {
    tlv.value_of_len(0)?;
    c.attrs.atomic_aggregate = true;
    Ok(())
}

/// AGGREGATOR:
///
/// ```text
/// +-------------------------------+------------------------+
/// | AS (2 octets, 4 if RFC 6793)  | BGP identifier (4)     |
/// +-------------------------------+------------------------+
/// ```
fn decode_aggregator(c: &mut Collected, tlv: &Tlv, ctx: &DecodeContext) -> Result<(), DecodeError> {
    let mut value = tlv.value_of_len(if ctx.four_octet_as { 8 } else { 6 })?;
    let asn = if ctx.four_octet_as {
        value.get_u32()
    } else {
        u32::from(value.get_u16())
    };
    c.attrs.aggregator = Some(Aggregator {
        asn,
        address: get_ipv4(&mut value),
    });
    Ok(())
}

/// COMMUNITIES (RFC 1997): 4-octet values.
fn decode_communities(c: &mut Collected, tlv: &Tlv, _: &DecodeContext) -> Result<(), DecodeError> {
    let (mut value, count) = tlv.items_of(4)?;
    c.attrs.communities = (0..count).map(|_| value.get_u32()).collect();
    Ok(())
}

/// LARGE_COMMUNITY (RFC 8092):
///
/// ```text
/// +------------------------+------------------+------------------+
/// | Global Administrator 4 | Local Data 1 (4) | Local Data 2 (4) |  ... repeated
/// +------------------------+------------------+------------------+
/// ```
fn decode_large_communities(
    c: &mut Collected,
    tlv: &Tlv,
    _: &DecodeContext,
) -> Result<(), DecodeError> {
    let (mut value, count) = tlv.items_of(12)?;
    c.attrs.large_communities = (0..count)
        .map(|_| LargeCommunity {
            global: value.get_u32(),
            local1: value.get_u32(),
            local2: value.get_u32(),
        })
        .collect();
    Ok(())
}

/// ORIGINATOR_ID (RFC 4456): the originating router's 4-octet BGP identifier.
fn decode_originator_id(
    c: &mut Collected,
    tlv: &Tlv,
    _: &DecodeContext,
) -> Result<(), DecodeError> {
    c.attrs.originator_id = Some(get_ipv4(&mut tlv.value_of_len(4)?));
    Ok(())
}

/// CLUSTER_LIST (RFC 4456): 4-octet cluster IDs.
fn decode_cluster_list(c: &mut Collected, tlv: &Tlv, _: &DecodeContext) -> Result<(), DecodeError> {
    let (mut value, count) = tlv.items_of(4)?;
    c.attrs.cluster_list = (0..count).map(|_| get_ipv4(&mut value)).collect();
    Ok(())
}

/// MP_REACH_NLRI (RFC 4760); its layout is in `update.rs`, next to the NLRI it carries.
fn decode_mp_reach_attr(
    c: &mut Collected,
    tlv: &Tlv,
    ctx: &DecodeContext,
) -> Result<(), DecodeError> {
    c.mp_reach =
        decode_mp_reach(tlv.value.clone(), ctx).map_err(|_| tlv.optional_attribute_error())?;
    Ok(())
}

/// MP_UNREACH_NLRI (RFC 4760); its layout is in `update.rs`.
fn decode_mp_unreach_attr(
    c: &mut Collected,
    tlv: &Tlv,
    ctx: &DecodeContext,
) -> Result<(), DecodeError> {
    c.mp_unreach =
        decode_mp_unreach(tlv.value.clone(), ctx).map_err(|_| tlv.optional_attribute_error())?;
    Ok(())
}

/// AS4_PATH (RFC 6793): the 4-octet path behind a 2-octet speaker's AS_TRANS entries.
fn decode_as4_path(c: &mut Collected, tlv: &Tlv, ctx: &DecodeContext) -> Result<(), DecodeError> {
    // RFC 6793 §6: between two 4-octet speakers AS4_PATH is ignored.
    if ctx.four_octet_as {
        return Ok(());
    }
    match AsPath::decode(tlv.value.clone(), true) {
        // RFC 6793 forbids confederation segments in AS4_PATH, so one carrying them is malformed.
        Some(path) if !path.has_confed_segment() => {
            c.as4_path = Some(path);
            Ok(())
        }
        _ => Err(tlv.malformed_as_path()),
    }
}

/// AS4_AGGREGATOR (RFC 6793): 4-octet AS, then the 4-octet BGP identifier.
fn decode_as4_aggregator(
    c: &mut Collected,
    tlv: &Tlv,
    ctx: &DecodeContext,
) -> Result<(), DecodeError> {
    // Ignored between two 4-octet speakers, like AS4_PATH.
    if ctx.four_octet_as {
        return Ok(());
    }
    let mut value = tlv.value_of_len(8)?;
    c.as4_aggregator = Some(Aggregator {
        asn: value.get_u32(),
        address: get_ipv4(&mut value),
    });
    Ok(())
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
