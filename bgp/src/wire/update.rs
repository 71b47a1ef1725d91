//! UPDATE message, NLRI prefixes and the multiprotocol attributes (RFC 4271 §4.3, RFC 4760, RFC 2545).

use super::attributes::{DecodedAttributes, attr_type, decode_attributes, flag};
use super::{
    Afi, DecodeContext, DecodeError, HEADER_LEN, MAX_MESSAGE_LEN, PathAttributes, SAFI_UNICAST,
    UpdateOutcome,
};
use bytes::{Buf, BufMut, Bytes};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Next hop of a route: IPv4, or IPv6 global plus optional link-local (RFC 2545 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// IPv4 next hop.
    V4(Ipv4Addr),
    /// IPv6 next hop.
    V6 {
        /// Global address.
        global: Ipv6Addr,
        /// Link-local address, sent as the second 16 octets when present.
        link_local: Option<Ipv6Addr>,
    },
}

impl NextHop {
    /// The address forwarding should use (the global one for IPv6).
    pub fn addr(&self) -> IpAddr {
        match self {
            NextHop::V4(a) => IpAddr::V4(*a),
            NextHop::V6 { global, .. } => IpAddr::V6(*global),
        }
    }
    fn wire_len(&self) -> usize {
        match self {
            NextHop::V4(_) => 4,
            NextHop::V6 {
                link_local: None, ..
            } => 16,
            NextHop::V6 {
                link_local: Some(_),
                ..
            } => 32,
        }
    }
}

/// MP_REACH_NLRI (type 14, RFC 4760 §3) for IPv4 or IPv6 unicast.
///
/// ```text
/// +---------------------------------------------------------+
/// | Address Family Identifier (2 octets)                    |
/// +---------------------------------------------------------+
/// | Subsequent Address Family Identifier (1 octet)          |
/// +---------------------------------------------------------+
/// | Length of Next Hop Network Address (1 octet)            |
/// +---------------------------------------------------------+
/// | Network Address of Next Hop (variable)                  |
/// +---------------------------------------------------------+
/// | Reserved (1 octet)                                      |
/// +---------------------------------------------------------+
/// | Network Layer Reachability Information (variable)       |
/// +---------------------------------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpReach {
    /// Family of `nlri`.
    pub afi: Afi,
    /// Next hop for every prefix in `nlri`.
    pub next_hop: NextHop,
    /// Reachable prefixes.
    pub nlri: Vec<IpNet>,
}

/// MP_UNREACH_NLRI (type 15, RFC 4760 §4).
///
/// ```text
/// +---------------------------------------------------------+
/// | Address Family Identifier (2 octets)                    |
/// +---------------------------------------------------------+
/// | Subsequent Address Family Identifier (1 octet)          |
/// +---------------------------------------------------------+
/// | Withdrawn Routes (variable)                             |
/// +---------------------------------------------------------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpUnreach {
    /// Family of `withdrawn`.
    pub afi: Afi,
    /// Unreachable prefixes.
    pub withdrawn: Vec<IpNet>,
}

/// Octets one prefix takes in an NLRI field.
pub fn prefix_wire_len(prefix: &IpNet) -> usize {
    1 + (prefix.prefix_len() as usize).div_ceil(8)
}

/// Decode `<length, prefix>` tuples (RFC 4271 §4.3) until `data` is empty.
fn decode_prefixes(data: &mut Bytes, afi: Afi, out: &mut Vec<IpNet>) -> Result<(), &'static str> {
    let max_len = match afi {
        Afi::Ipv4 => 32,
        Afi::Ipv6 => 128,
    };
    while data.has_remaining() {
        let len = data.get_u8();
        if len > max_len {
            return Err("prefix length exceeds address size");
        }
        let octets = (len as usize).div_ceil(8);
        if data.remaining() < octets {
            return Err("prefix overruns the field");
        }
        let prefix = match afi {
            Afi::Ipv4 => {
                let mut addr = [0u8; 4];
                addr[..octets].copy_from_slice(&data[..octets]);
                data.advance(octets);
                Ipv4Net::new(Ipv4Addr::from(addr), len)
                    .map_err(|_| "prefix length exceeds address size")?
                    .trunc()
                    .into()
            }
            Afi::Ipv6 => {
                let mut addr = [0u8; 16];
                addr[..octets].copy_from_slice(&data[..octets]);
                data.advance(octets);
                Ipv6Net::new(Ipv6Addr::from(addr), len)
                    .map_err(|_| "prefix length exceeds address size")?
                    .trunc()
                    .into()
            }
        };
        out.push(prefix);
    }
    Ok(())
}

/// The hot loop of UPDATE decoding: IPv4 `<length, prefix>` tuples from a slice.
fn decode_ipv4_prefixes(data: &[u8], out: &mut Vec<Ipv4Net>) -> Result<(), &'static str> {
    // Every prefix takes at least one octet; most take more, so this rarely over-allocates much.
    out.reserve(data.len() / 4);
    let mut i = 0;
    while i < data.len() {
        let len = data[i];
        i += 1;
        if len > 32 {
            return Err("prefix length exceeds address size");
        }
        let octets = (len as usize).div_ceil(8);
        let Some(b) = data.get(i..i + octets) else {
            return Err("prefix overruns the field");
        };
        i += octets;
        let raw = match *b {
            [] => 0,
            [a] => u32::from(a) << 24,
            [a, b] => (u32::from(a) << 24) | (u32::from(b) << 16),
            [a, b, c] => (u32::from(a) << 24) | (u32::from(b) << 16) | (u32::from(c) << 8),
            [a, b, c, d] => u32::from_be_bytes([a, b, c, d]),
            _ => return Err("prefix overruns the field"),
        };
        // Trailing bits past the prefix length are irrelevant (RFC 4271 §4.3); clear them.
        let masked = raw & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        out.push(
            Ipv4Net::new(Ipv4Addr::from(masked), len)
                .map_err(|_| "prefix length exceeds address size")?,
        );
    }
    Ok(())
}

fn encode_prefix(buf: &mut impl BufMut, prefix: &IpNet) {
    let len = prefix.prefix_len();
    let octets = (len as usize).div_ceil(8);
    buf.put_u8(len);
    match prefix.addr() {
        IpAddr::V4(a) => buf.put_slice(&a.octets()[..octets]),
        IpAddr::V6(a) => buf.put_slice(&a.octets()[..octets]),
    }
}

fn encode_ipv4_prefix(buf: &mut impl BufMut, prefix: &Ipv4Net) {
    let len = prefix.prefix_len();
    let octets = (len as usize).div_ceil(8);
    buf.put_u8(len);
    buf.put_slice(&prefix.addr().octets()[..octets]);
}

/// Family of a raw (AFI, SAFI) if tortie carries it and the session negotiated it.
fn negotiated_family(afi: u16, safi: u8, ctx: &DecodeContext) -> Option<Afi> {
    if safi != SAFI_UNICAST {
        return None;
    }
    match Afi::from_code(afi)? {
        Afi::Ipv4 if ctx.ipv4_unicast => Some(Afi::Ipv4),
        Afi::Ipv6 if ctx.ipv6_unicast => Some(Afi::Ipv6),
        _ => None,
    }
}

/// `Ok(None)`: a family not negotiated, ignored (RFC 4760 §7). `Err`: malformed, session reset.
pub(crate) fn decode_mp_reach(
    mut value: Bytes,
    ctx: &DecodeContext,
) -> Result<Option<MpReach>, &'static str> {
    if value.remaining() < 5 {
        return Err("MP_REACH_NLRI too short");
    }
    let afi = value.get_u16();
    let safi = value.get_u8();
    let nh_len = value.get_u8() as usize;
    if value.remaining() < nh_len + 1 {
        return Err("MP_REACH_NLRI next hop overruns");
    }
    let Some(family) = negotiated_family(afi, safi, ctx) else {
        return Ok(None);
    };
    let next_hop = match (family, nh_len) {
        (Afi::Ipv4, 4) => NextHop::V4(Ipv4Addr::from(value.get_u32())),
        (Afi::Ipv6, 16) => NextHop::V6 {
            global: Ipv6Addr::from(value.get_u128()),
            link_local: None,
        },
        (Afi::Ipv6, 32) => NextHop::V6 {
            global: Ipv6Addr::from(value.get_u128()),
            link_local: Some(Ipv6Addr::from(value.get_u128())),
        },
        _ => return Err("MP_REACH_NLRI next hop length"),
    };
    value.advance(1); // reserved
    let mut nlri = Vec::new();
    decode_prefixes(&mut value, family, &mut nlri)?;
    Ok(Some(MpReach {
        afi: family,
        next_hop,
        nlri,
    }))
}

pub(crate) fn decode_mp_unreach(
    mut value: Bytes,
    ctx: &DecodeContext,
) -> Result<Option<MpUnreach>, &'static str> {
    if value.remaining() < 3 {
        return Err("MP_UNREACH_NLRI too short");
    }
    let afi = value.get_u16();
    let safi = value.get_u8();
    let Some(family) = negotiated_family(afi, safi, ctx) else {
        return Ok(None);
    };
    let mut withdrawn = Vec::new();
    decode_prefixes(&mut value, family, &mut withdrawn)?;
    Ok(Some(MpUnreach {
        afi: family,
        withdrawn,
    }))
}

/// UPDATE message body (RFC 4271 §4.3).
///
/// ```text
/// +-----------------------------------------------------+
/// |   Withdrawn Routes Length (2 octets)                |
/// +-----------------------------------------------------+
/// |   Withdrawn Routes (variable)                       |
/// +-----------------------------------------------------+
/// |   Total Path Attribute Length (2 octets)            |
/// +-----------------------------------------------------+
/// |   Path Attributes (variable)                        |
/// +-----------------------------------------------------+
/// |   Network Layer Reachability Information (variable) |
/// +-----------------------------------------------------+
/// ```
///
/// Decoding never drops NLRI because of a bad attribute: `outcome` says whether the
/// routes must be treated as withdrawn (RFC 7606), and errors that hide the NLRI come
/// back as `Err` (session reset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// IPv4 withdrawn routes.
    pub withdrawn: Vec<Ipv4Net>,
    /// Path attributes.
    pub attributes: PathAttributes,
    /// MP_REACH_NLRI.
    pub mp_reach: Option<MpReach>,
    /// MP_UNREACH_NLRI.
    pub mp_unreach: Option<MpUnreach>,
    /// IPv4 NLRI.
    pub nlri: Vec<Ipv4Net>,
    /// RFC 7606 result of decoding; ignored by encode.
    pub outcome: UpdateOutcome,
}

impl Update {
    /// The End-of-RIB marker for a family (RFC 4724 §2).
    pub fn end_of_rib(afi: Afi) -> Update {
        match afi {
            Afi::Ipv4 => Update::default(),
            Afi::Ipv6 => Update {
                mp_unreach: Some(MpUnreach {
                    afi,
                    withdrawn: Vec::new(),
                }),
                ..Update::default()
            },
        }
    }

    /// The family this UPDATE is an End-of-RIB marker for, if it is one.
    pub fn end_of_rib_family(&self) -> Option<Afi> {
        if !self.withdrawn.is_empty() || !self.nlri.is_empty() || self.mp_reach.is_some() {
            return None;
        }
        match &self.mp_unreach {
            None if self.attributes.is_empty() => Some(Afi::Ipv4),
            Some(u) if u.withdrawn.is_empty() && self.attributes.is_empty() => Some(u.afi),
            _ => None,
        }
    }

    /// Decode the body (after the header).
    pub fn decode(buf: &mut impl Buf, ctx: &DecodeContext) -> Result<Update, DecodeError> {
        let mut body = buf.copy_to_bytes(buf.remaining());
        if body.remaining() < 2 {
            return Err(DecodeError::MalformedAttributeList(
                "withdrawn routes length missing",
            ));
        }
        let withdrawn_len = body.get_u16() as usize;
        if body.remaining() < withdrawn_len + 2 {
            return Err(DecodeError::MalformedAttributeList(
                "withdrawn routes length exceeds the message",
            ));
        }
        let withdrawn_bytes = body.split_to(withdrawn_len);
        let attrs_len = body.get_u16() as usize;
        if body.remaining() < attrs_len {
            return Err(DecodeError::MalformedAttributeList(
                "total path attribute length exceeds the message",
            ));
        }
        let attrs_bytes = body.split_to(attrs_len);
        let mut update = Update::default();
        decode_ipv4_prefixes(&withdrawn_bytes, &mut update.withdrawn)
            .map_err(DecodeError::InvalidNetworkField)?;
        decode_ipv4_prefixes(&body, &mut update.nlri).map_err(DecodeError::InvalidNetworkField)?;

        let mut outcome = UpdateOutcome::default();
        let DecodedAttributes {
            attrs,
            mp_reach,
            mp_unreach,
            seen,
        } = decode_attributes(attrs_bytes, ctx, &mut outcome)?;
        update.attributes = attrs;
        update.mp_reach = mp_reach;
        update.mp_unreach = mp_unreach;

        // RFC 7606 §3 d: a missing well-known mandatory attribute is treat-as-withdraw.
        let has_reach =
            !update.nlri.is_empty() || update.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty());
        if has_reach && outcome.treat_as_withdraw.is_none() {
            let missing = |t: u8| seen & (1u64 << t) == 0;
            let missing_type = if missing(attr_type::ORIGIN) {
                Some(attr_type::ORIGIN)
            } else if missing(attr_type::AS_PATH) {
                Some(attr_type::AS_PATH)
            } else if !update.nlri.is_empty() && missing(attr_type::NEXT_HOP) {
                Some(attr_type::NEXT_HOP)
            } else {
                None
            };
            if let Some(t) = missing_type {
                outcome.treat_as_withdraw = Some(DecodeError::MissingWellKnownAttribute(t));
            }
        }
        update.outcome = outcome;
        Ok(update)
    }

    /// Encode the body. `ctx.four_octet_as` selects the AS_PATH encoding (AS4_PATH added towards 2-octet peers).
    pub fn encode(&self, buf: &mut impl BufMut, ctx: &DecodeContext) {
        let withdrawn_len: usize = self
            .withdrawn
            .iter()
            .map(|p| 1 + (p.prefix_len() as usize).div_ceil(8))
            .sum();
        buf.put_u16(withdrawn_len as u16);
        for p in &self.withdrawn {
            encode_ipv4_prefix(buf, p);
        }
        let mut attrs = Vec::with_capacity(128);
        self.attributes.encode_low(&mut attrs, ctx);
        if let Some(reach) = &self.mp_reach {
            let len = 5
                + reach.next_hop.wire_len()
                + reach.nlri.iter().map(prefix_wire_len).sum::<usize>();
            put_mp_header(&mut attrs, attr_type::MP_REACH_NLRI, len);
            attrs.put_u16(reach.afi.code());
            attrs.put_u8(SAFI_UNICAST);
            attrs.put_u8(reach.next_hop.wire_len() as u8);
            match reach.next_hop {
                NextHop::V4(a) => attrs.put_u32(a.into()),
                NextHop::V6 { global, link_local } => {
                    attrs.put_u128(global.into());
                    if let Some(ll) = link_local {
                        attrs.put_u128(ll.into());
                    }
                }
            }
            attrs.put_u8(0);
            for p in &reach.nlri {
                encode_prefix(&mut attrs, p);
            }
        }
        if let Some(unreach) = &self.mp_unreach {
            let len = 3 + unreach.withdrawn.iter().map(prefix_wire_len).sum::<usize>();
            put_mp_header(&mut attrs, attr_type::MP_UNREACH_NLRI, len);
            attrs.put_u16(unreach.afi.code());
            attrs.put_u8(SAFI_UNICAST);
            for p in &unreach.withdrawn {
                encode_prefix(&mut attrs, p);
            }
        }
        self.attributes.encode_high(&mut attrs, ctx);
        buf.put_u16(attrs.len() as u16);
        buf.put_slice(&attrs);
        for p in &self.nlri {
            encode_ipv4_prefix(buf, p);
        }
    }

    /// Build UPDATEs announcing `prefixes` (one family) with `attributes` and `next_hop`,
    /// each message at most 4096 octets. Attributes so large that not even one prefix fits
    /// yield no UPDATE at all (the route cannot be advertised).
    pub fn announcements(
        attributes: &PathAttributes,
        next_hop: NextHop,
        prefixes: &[IpNet],
        ctx: &DecodeContext,
    ) -> Vec<Update> {
        let attrs_len = attributes.encoded_len(ctx);
        let mut updates = Vec::new();
        match next_hop {
            NextHop::V4(nh) if prefixes.iter().all(|p| matches!(p, IpNet::V4(_))) => {
                let mut attrs = attributes.clone();
                attrs.next_hop = Some(nh);
                // header + two length fields + attributes (+ NEXT_HOP if it was not already set)
                let fixed = HEADER_LEN + 4 + attrs.encoded_len(ctx);
                let Some(budget) = room_for_prefixes(fixed) else {
                    return updates;
                };
                for chunk in chunk_by_size(prefixes, budget) {
                    updates.push(Update {
                        attributes: attrs.clone(),
                        nlri: chunk
                            .iter()
                            .filter_map(|p| match p {
                                IpNet::V4(p) => Some(*p),
                                IpNet::V6(_) => None,
                            })
                            .collect(),
                        ..Update::default()
                    });
                }
            }
            _ => {
                let afi = match prefixes.first() {
                    Some(IpNet::V4(_)) => Afi::Ipv4,
                    _ => Afi::Ipv6,
                };
                let mut attrs = attributes.clone();
                attrs.next_hop = None;
                let fixed = HEADER_LEN + 4 + attrs_len + 4 + 5 + next_hop.wire_len();
                let Some(budget) = room_for_prefixes(fixed) else {
                    return updates;
                };
                for chunk in chunk_by_size(prefixes, budget) {
                    updates.push(Update {
                        attributes: attrs.clone(),
                        mp_reach: Some(MpReach {
                            afi,
                            next_hop,
                            nlri: chunk.to_vec(),
                        }),
                        ..Update::default()
                    });
                }
            }
        }
        updates
    }

    /// Build UPDATEs withdrawing `prefixes` (IPv4 in the classic field, IPv6 in MP_UNREACH_NLRI).
    pub fn withdrawals(prefixes: &[IpNet]) -> Vec<Update> {
        let v4: Vec<IpNet> = prefixes
            .iter()
            .filter(|p| p.addr().is_ipv4())
            .copied()
            .collect();
        let v6: Vec<IpNet> = prefixes
            .iter()
            .filter(|p| p.addr().is_ipv6())
            .copied()
            .collect();
        let mut updates = Vec::new();
        for chunk in chunk_by_size(&v4, MAX_MESSAGE_LEN - HEADER_LEN - 4) {
            updates.push(Update {
                withdrawn: chunk
                    .iter()
                    .filter_map(|p| match p {
                        IpNet::V4(p) => Some(*p),
                        IpNet::V6(_) => None,
                    })
                    .collect(),
                ..Update::default()
            });
        }
        for chunk in chunk_by_size(&v6, MAX_MESSAGE_LEN - HEADER_LEN - 4 - 7) {
            updates.push(Update {
                mp_unreach: Some(MpUnreach {
                    afi: Afi::Ipv6,
                    withdrawn: chunk.to_vec(),
                }),
                ..Update::default()
            });
        }
        updates
    }
}

/// Octets left for NLRI once `fixed` octets are used, if at least the largest prefix fits.
fn room_for_prefixes(fixed: usize) -> Option<usize> {
    MAX_MESSAGE_LEN
        .checked_sub(fixed)
        .filter(|room| *room >= 17)
}

fn put_mp_header(buf: &mut Vec<u8>, type_code: u8, len: usize) {
    if len > 255 {
        buf.put_u8(flag::OPTIONAL | flag::EXTENDED_LENGTH);
        buf.put_u8(type_code);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(flag::OPTIONAL);
        buf.put_u8(type_code);
        buf.put_u8(len as u8);
    }
}

/// Split `prefixes` into runs whose encoded size fits `budget` octets.
fn chunk_by_size(prefixes: &[IpNet], budget: usize) -> Vec<&[IpNet]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, p) in prefixes.iter().enumerate() {
        let len = prefix_wire_len(p);
        if size + len > budget && i > start {
            chunks.push(&prefixes[start..i]);
            start = i;
            size = 0;
        }
        size += len;
    }
    if start < prefixes.len() {
        chunks.push(&prefixes[start..]);
    }
    chunks
}
