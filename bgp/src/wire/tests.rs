//! Codec tests: round-trip properties, hand-computed byte vectors, one test per NOTIFICATION subcode.

use super::*;
use bytes::{Bytes, BytesMut};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const CTX4: DecodeContext = DecodeContext {
    four_octet_as: true,
    ipv4_unicast: true,
    ipv6_unicast: true,
};
const CTX2: DecodeContext = DecodeContext {
    four_octet_as: false,
    ipv4_unicast: true,
    ipv6_unicast: true,
};

fn encode(msg: &Message, ctx: &DecodeContext) -> BytesMut {
    let mut buf = BytesMut::new();
    msg.encode(&mut buf, ctx);
    buf
}

fn decode(bytes: &[u8], ctx: &DecodeContext) -> Result<Message, DecodeError> {
    let mut b = Bytes::copy_from_slice(bytes);
    Message::decode(&mut b, ctx)
}

fn with_header(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    v.push(msg_type);
    v.extend_from_slice(body);
    v
}

/// UPDATE body with no withdrawn routes, the given attribute bytes and IPv4 NLRI bytes.
fn update_body(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0];
    v.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    v.extend_from_slice(attrs);
    v.extend_from_slice(nlri);
    v
}

/// ORIGIN IGP, AS_PATH [65001] (4-octet), NEXT_HOP 10.0.0.1.
const BASE_ATTRS: &[u8] = &[
    0x40, 1, 1, 0, // ORIGIN IGP
    0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9, // AS_PATH SEQUENCE [65001]
    0x40, 3, 4, 10, 0, 0, 1, // NEXT_HOP
];
const NLRI_10_1_0_0_16: &[u8] = &[16, 10, 1];

fn decode_update(attrs: &[u8], nlri: &[u8], ctx: &DecodeContext) -> Result<Update, DecodeError> {
    match decode(&with_header(2, &update_body(attrs, nlri)), ctx)? {
        Message::Update(u) => Ok(*u),
        other => panic!("expected UPDATE, got {other:?}"),
    }
}

fn withdraw_reason(attrs: &[u8]) -> (u8, u8) {
    let update = decode_update(attrs, NLRI_10_1_0_0_16, &CTX4).unwrap();
    update
        .outcome
        .treat_as_withdraw
        .expect("expected treat-as-withdraw")
        .notification_code()
}

// ---------- hand-computed byte vectors ----------

#[test]
fn keepalive_encodes_to_19_octets_of_header() {
    let bytes = encode(&Message::Keepalive, &CTX4);
    assert_eq!(&bytes[..], &with_header(4, &[])[..]);
    assert_eq!(decode(&bytes, &CTX4).unwrap(), Message::Keepalive);
}

#[test]
fn open_with_capabilities_matches_hand_computed_bytes() {
    let open = Open {
        asn: 4_200_000_000,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(192, 0, 2, 1),
        capabilities: vec![
            Capability::MultiProtocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
            Capability::FourOctetAs(4_200_000_000),
            Capability::GracefulRestart(GracefulRestart {
                restart_state: true,
                notification: false,
                restart_time: 120,
                families: vec![GracefulRestartFamily {
                    afi: 2,
                    safi: 1,
                    forwarding_preserved: true,
                }],
            }),
        ],
    };
    let body: &[u8] = &[
        4, 0x5b, 0xa0, // version, AS_TRANS 23456
        0, 90, 192, 0, 2, 1, // hold time, id
        24, 2, 22, // opt param len, type capabilities, len
        1, 4, 0, 1, 0, 1, // MP IPv4 unicast
        2, 0, // route refresh
        65, 4, 0xfa, 0x56, 0xea, 0x00, // 4-octet AS 4200000000
        64, 6, 0x80, 120, 0, 2, 1, 0x80, // GR: R bit, 120 s, IPv6 unicast F bit
    ];
    let bytes = encode(&Message::Open(open.clone()), &CTX4);
    assert_eq!(&bytes[..], &with_header(1, body)[..]);
    assert_eq!(decode(&bytes, &CTX4).unwrap(), Message::Open(open));
}

#[test]
fn open_without_four_octet_capability_uses_two_octet_as() {
    let body: &[u8] = &[4, 0xfd, 0xe8, 0, 180, 10, 0, 0, 1, 0];
    let Message::Open(open) = decode(&with_header(1, body), &CTX4).unwrap() else {
        panic!("not an OPEN")
    };
    assert_eq!(open.asn, 65000);
    assert_eq!(
        open.families(),
        vec![(1, 1)],
        "no MP capability means IPv4 unicast"
    );
}

#[test]
fn open_keeps_unknown_capabilities() {
    let body: &[u8] = &[4, 0xfd, 0xe8, 0, 180, 10, 0, 0, 1, 6, 2, 4, 70, 0, 73, 0];
    let Message::Open(open) = decode(&with_header(1, body), &CTX4).unwrap() else {
        panic!("not an OPEN")
    };
    assert_eq!(
        open.capabilities,
        vec![
            Capability::Unknown {
                code: 70,
                value: Bytes::new()
            },
            Capability::Unknown {
                code: 73,
                value: Bytes::new()
            }
        ]
    );
}

#[test]
fn open_with_too_many_capabilities_keeps_those_that_fit() {
    let capabilities: Vec<Capability> = (0..50)
        .map(|i| Capability::Unknown {
            code: 200,
            value: Bytes::from(vec![i; 4]),
        })
        .collect();
    let open = Open {
        asn: 65000,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities,
    };
    let bytes = encode(&Message::Open(open.clone()), &CTX4);
    let Message::Open(back) = decode(&bytes, &CTX4).unwrap() else {
        panic!("not an OPEN")
    };
    assert_eq!(back.capabilities.len(), 42, "42 × 6 octets fit in 253");
    assert_eq!(back.capabilities[..], open.capabilities[..42]);
}

#[test]
fn update_with_ipv4_nlri_matches_hand_computed_bytes() {
    let update = decode_update(BASE_ATTRS, &[16, 10, 1, 26, 10, 2, 3, 64], &CTX4).unwrap();
    assert!(update.outcome.is_clean());
    assert_eq!(update.attributes.origin, Some(Origin::Igp));
    assert_eq!(update.attributes.as_path.segments[0].asns, vec![65001]);
    assert_eq!(update.attributes.next_hop, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(
        update.nlri,
        vec![
            "10.1.0.0/16".parse::<Ipv4Net>().unwrap(),
            "10.2.3.64/26".parse().unwrap()
        ]
    );
    let mut out = BytesMut::new();
    update.encode(&mut out, &CTX4);
    assert_eq!(
        &out[..],
        &update_body(BASE_ATTRS, &[16, 10, 1, 26, 10, 2, 3, 64])[..]
    );
}

#[test]
fn mp_reach_ipv6_with_link_local_next_hop_decodes() {
    let mut attrs = vec![0x40, 1, 1, 0, 0x40, 2, 0];
    attrs.extend_from_slice(&[0x80, 14, 5 + 32 + 5, 0, 2, 1, 32]);
    attrs.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
    attrs.extend_from_slice(&"fe80::1".parse::<Ipv6Addr>().unwrap().octets());
    attrs.push(0);
    attrs.extend_from_slice(&[32, 0x20, 0x01, 0x0d, 0xb8]);
    let update = decode_update(&attrs, &[], &CTX4).unwrap();
    assert!(update.outcome.is_clean(), "{:?}", update.outcome);
    let reach = update.mp_reach.unwrap();
    assert_eq!(
        reach.next_hop,
        NextHop::V6 {
            global: "2001:db8::1".parse().unwrap(),
            link_local: Some("fe80::1".parse().unwrap())
        }
    );
    assert_eq!(reach.nlri, vec!["2001:db8::/32".parse::<IpNet>().unwrap()]);
}

#[test]
fn ipv6_end_of_rib_is_recognised() {
    let attrs = [0x80, 15, 3, 0, 2, 1];
    let update = decode_update(&attrs, &[], &CTX4).unwrap();
    assert_eq!(update.end_of_rib_family(), Some(Afi::Ipv6));
    let update = decode_update(&[], &[], &CTX4).unwrap();
    assert_eq!(update.end_of_rib_family(), Some(Afi::Ipv4));
}

#[test]
fn two_octet_peer_gets_as_trans_and_as4_path() {
    let attributes = PathAttributes {
        origin: Some(Origin::Igp),
        as_path: AsPath {
            segments: vec![AsPathSegment {
                kind: SegmentType::AsSequence,
                asns: vec![4_200_000_000, 65001],
            }],
        },
        next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ..Default::default()
    };
    let update = Update {
        attributes,
        nlri: vec!["10.1.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let mut out = BytesMut::new();
    update.encode(&mut out, &CTX2);
    let expected_attrs: &[u8] = &[
        0x40, 1, 1, 0, // ORIGIN
        0x40, 2, 6, 2, 2, 0x5b, 0xa0, 0xfd, 0xe9, // AS_PATH [AS_TRANS, 65001]
        0x40, 3, 4, 10, 0, 0, 1, // NEXT_HOP
        0xc0, 17, 10, 2, 2, 0xfa, 0x56, 0xea, 0x00, 0, 0, 0xfd, 0xe9, // AS4_PATH
    ];
    assert_eq!(&out[..], &update_body(expected_attrs, NLRI_10_1_0_0_16)[..]);
    let back = decode_update(expected_attrs, NLRI_10_1_0_0_16, &CTX2).unwrap();
    assert_eq!(back.attributes, update.attributes, "AS4_PATH merged back");
}

#[test]
fn as4_path_longer_than_as_path_is_ignored() {
    let attrs: &[u8] = &[
        0x40, 1, 1, 0, 0x40, 2, 4, 2, 1, 0xfd, 0xe9, 0x40, 3, 4, 10, 0, 0,
        1, // AS_PATH [65001]
        0xc0, 17, 10, 2, 2, 0, 0, 0, 1, 0, 0, 0, 2, // AS4_PATH with 2 ASNs
    ];
    let update = decode_update(attrs, NLRI_10_1_0_0_16, &CTX2).unwrap();
    assert_eq!(update.attributes.as_path.segments[0].asns, vec![65001]);
}

#[test]
fn unknown_optional_transitive_attribute_is_kept_with_partial_bit() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0xc0, 99, 2, 0xab, 0xcd]);
    let update = decode_update(&attrs, NLRI_10_1_0_0_16, &CTX4).unwrap();
    assert_eq!(
        update.attributes.unknown,
        vec![RawAttribute {
            flags: 0xe0,
            type_code: 99,
            value: Bytes::from_static(&[0xab, 0xcd])
        }]
    );
    let mut out = BytesMut::new();
    update.encode(&mut out, &CTX4);
    assert!(
        out.windows(5).any(|w| w == [0xe0, 99, 2, 0xab, 0xcd]),
        "Partial bit set on re-advertisement"
    );
}

#[test]
fn unknown_optional_non_transitive_attribute_is_dropped() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0x80, 99, 1, 0]);
    let update = decode_update(&attrs, NLRI_10_1_0_0_16, &CTX4).unwrap();
    assert!(update.attributes.unknown.is_empty());
    assert!(update.outcome.is_clean());
}

#[test]
fn duplicate_attribute_keeps_the_first() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0x80, 4, 4, 0, 0, 0, 1, 0x80, 4, 4, 0, 0, 0, 2]);
    let update = decode_update(&attrs, NLRI_10_1_0_0_16, &CTX4).unwrap();
    assert_eq!(update.attributes.med, Some(1));
    assert!(update.outcome.treat_as_withdraw.is_none());
    assert_eq!(update.outcome.discarded.len(), 1);
}

#[test]
fn malformed_aggregator_is_discarded_and_routes_kept() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0xc0, 7, 5, 0, 0, 0, 0, 0]);
    let update = decode_update(&attrs, NLRI_10_1_0_0_16, &CTX4).unwrap();
    assert!(update.outcome.treat_as_withdraw.is_none());
    assert_eq!(update.outcome.discarded[0].notification_code(), (3, 5));
    assert_eq!(update.nlri.len(), 1);
}

#[test]
fn attributes_too_large_for_any_prefix_produce_no_update() {
    let attributes = PathAttributes {
        origin: Some(Origin::Igp),
        communities: vec![1; 1100],
        ..Default::default()
    };
    let prefixes = vec!["10.1.0.0/16".parse().unwrap()];
    let updates = Update::announcements(
        &attributes,
        NextHop::V4(Ipv4Addr::new(10, 0, 0, 1)),
        &prefixes,
        &CTX4,
    );
    assert!(updates.is_empty());
}

#[test]
fn frame_length_waits_for_the_whole_message() {
    let msg = with_header(4, &[]);
    assert_eq!(frame_length(&msg[..10]).unwrap(), None);
    assert_eq!(frame_length(&msg).unwrap(), Some(19));
}

// ---------- one test per NOTIFICATION subcode the decoder raises ----------

#[test]
fn bad_marker_raises_1_1_connection_not_synchronized() {
    let mut msg = with_header(4, &[]);
    msg[3] = 0;
    assert_eq!(decode(&msg, &CTX4).unwrap_err().notification_code(), (1, 1));
    assert_eq!(frame_length(&msg).unwrap_err().notification_code(), (1, 1));
}

#[test]
fn keepalive_with_body_raises_1_2_bad_message_length() {
    let msg = with_header(4, &[0]);
    let err = decode(&msg, &CTX4).unwrap_err();
    assert_eq!(err.notification_code(), (1, 2));
    assert_eq!(&err.data()[..], &[0, 20], "data is the bad length");
}

#[test]
fn unknown_message_type_raises_1_3_bad_message_type() {
    let err = decode(&with_header(9, &[]), &CTX4).unwrap_err();
    assert_eq!(err.notification_code(), (1, 3));
    assert_eq!(&err.data()[..], &[9]);
}

#[test]
fn open_with_overrunning_capability_raises_2_0() {
    let body: &[u8] = &[4, 0xfd, 0xe8, 0, 180, 10, 0, 0, 1, 4, 2, 2, 65, 4];
    assert_eq!(
        decode(&with_header(1, body), &CTX4)
            .unwrap_err()
            .notification_code(),
        (2, 0)
    );
}

#[test]
fn open_version_3_raises_2_1_with_supported_version() {
    let body: &[u8] = &[3, 0xfd, 0xe8, 0, 180, 10, 0, 0, 1, 0];
    let err = decode(&with_header(1, body), &CTX4).unwrap_err();
    assert_eq!(err.notification_code(), (2, 1));
    assert_eq!(&err.data()[..], &[0, 4]);
}

#[test]
fn open_with_zero_identifier_raises_2_3() {
    let body: &[u8] = &[4, 0xfd, 0xe8, 0, 180, 0, 0, 0, 0, 0];
    assert_eq!(
        decode(&with_header(1, body), &CTX4)
            .unwrap_err()
            .notification_code(),
        (2, 3)
    );
}

#[test]
fn open_with_authentication_parameter_raises_2_4() {
    let body: &[u8] = &[4, 0xfd, 0xe8, 0, 180, 10, 0, 0, 1, 3, 1, 1, 0];
    assert_eq!(
        decode(&with_header(1, body), &CTX4)
            .unwrap_err()
            .notification_code(),
        (2, 4)
    );
}

#[test]
fn open_with_hold_time_2_raises_2_6() {
    let body: &[u8] = &[4, 0xfd, 0xe8, 0, 2, 10, 0, 0, 1, 0];
    assert_eq!(
        decode(&with_header(1, body), &CTX4)
            .unwrap_err()
            .notification_code(),
        (2, 6)
    );
}

#[test]
fn withdrawn_length_past_message_raises_3_1_session_reset() {
    let body: &[u8] = &[0, 50, 0, 0];
    assert_eq!(
        decode(&with_header(2, body), &CTX4)
            .unwrap_err()
            .notification_code(),
        (3, 1)
    );
}

#[test]
fn duplicate_mp_reach_raises_3_1_session_reset() {
    let mut attrs = vec![0x40, 1, 1, 0, 0x40, 2, 0];
    for _ in 0..2 {
        attrs.extend_from_slice(&[0x80, 14, 21, 0, 2, 1, 16]);
        attrs.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        attrs.push(0);
    }
    assert_eq!(
        decode_update(&attrs, &[], &CTX4)
            .unwrap_err()
            .notification_code(),
        (3, 1)
    );
}

#[test]
fn attribute_overrunning_the_field_is_3_1_or_3_5_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0x80, 4, 9, 0]);
    assert_eq!(withdraw_reason(&attrs), (3, 5));
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0x80, 4]);
    assert_eq!(withdraw_reason(&attrs), (3, 1));
}

#[test]
fn unrecognized_well_known_attribute_raises_3_2_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs.extend_from_slice(&[0x40, 99, 0]);
    assert_eq!(withdraw_reason(&attrs), (3, 2));
}

#[test]
fn missing_next_hop_raises_3_3_treat_as_withdraw() {
    let update = decode_update(&BASE_ATTRS[..13], NLRI_10_1_0_0_16, &CTX4).unwrap();
    let err = update.outcome.treat_as_withdraw.unwrap();
    assert_eq!(err.notification_code(), (3, 3));
    assert_eq!(&err.data()[..], &[3]);
    assert_eq!(
        update.nlri.len(),
        1,
        "NLRI kept so the session can withdraw them"
    );
}

#[test]
fn origin_marked_optional_raises_3_4_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs[0] = 0xc0;
    assert_eq!(withdraw_reason(&attrs), (3, 4));
}

#[test]
fn next_hop_of_length_5_raises_3_5_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS[..13].to_vec();
    attrs.extend_from_slice(&[0x40, 3, 5, 10, 0, 0, 1, 0]);
    assert_eq!(withdraw_reason(&attrs), (3, 5));
}

#[test]
fn origin_value_3_raises_3_6_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs[3] = 3;
    assert_eq!(withdraw_reason(&attrs), (3, 6));
}

#[test]
fn multicast_next_hop_raises_3_8_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs[16] = 224;
    assert_eq!(withdraw_reason(&attrs), (3, 8));
}

#[test]
fn mp_reach_with_bad_next_hop_length_raises_3_9_session_reset() {
    let mut attrs = vec![0x40, 1, 1, 0, 0x40, 2, 0];
    attrs.extend_from_slice(&[0x80, 14, 10, 0, 2, 1, 5, 1, 2, 3, 4, 5, 0]);
    assert_eq!(
        decode_update(&attrs, &[], &CTX4)
            .unwrap_err()
            .notification_code(),
        (3, 9)
    );
}

#[test]
fn nlri_prefix_length_33_raises_3_10_session_reset() {
    let err = decode_update(BASE_ATTRS, &[33, 10, 0, 0, 0, 0], &CTX4).unwrap_err();
    assert_eq!(err.notification_code(), (3, 10));
}

#[test]
fn as_path_segment_type_7_raises_3_11_treat_as_withdraw() {
    let mut attrs = BASE_ATTRS.to_vec();
    attrs[7] = 7;
    assert_eq!(withdraw_reason(&attrs), (3, 11));
}

#[test]
fn route_refresh_of_wrong_length_raises_7_1() {
    let err = decode(&with_header(5, &[0, 1, 0]), &CTX4).unwrap_err();
    assert_eq!(err.notification_code(), (7, 1));
}

// ---------- round-trip properties ----------

fn arb_ipv4_prefix() -> impl Strategy<Value = Ipv4Net> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc())
}

fn arb_ipv6_prefix() -> impl Strategy<Value = IpNet> {
    (any::<u128>(), 0u8..=128)
        .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc()))
}

fn arb_segment(confed: bool) -> impl Strategy<Value = AsPathSegment> {
    let kinds = if confed {
        vec![
            SegmentType::AsSet,
            SegmentType::AsSequence,
            SegmentType::ConfedSequence,
            SegmentType::ConfedSet,
        ]
    } else {
        vec![SegmentType::AsSet, SegmentType::AsSequence]
    };
    (
        prop::sample::select(kinds),
        prop::collection::vec(any::<u32>(), 1..6),
    )
        .prop_map(|(kind, asns)| AsPathSegment { kind, asns })
}

fn arb_unicast_v4() -> impl Strategy<Value = Ipv4Addr> {
    (1u32..0xdfff_ffff).prop_map(Ipv4Addr::from)
}

fn arb_attributes(confed: bool) -> impl Strategy<Value = PathAttributes> {
    (
        prop::sample::select(vec![Origin::Igp, Origin::Egp, Origin::Incomplete]),
        prop::collection::vec(arb_segment(confed), 0..4),
        prop::option::of(arb_unicast_v4()),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
        any::<bool>(),
        prop::option::of((0x1_0000u32..u32::MAX, any::<u32>())),
        prop::collection::vec(any::<u32>(), 0..4),
        prop::collection::vec(any::<(u32, u32, u32)>(), 0..3),
        prop::option::of(any::<u32>()),
        prop::collection::vec(any::<u32>(), 0..3),
        prop::collection::btree_map(
            200u8..=254,
            prop::collection::vec(any::<u8>(), 0..300),
            0..3,
        ),
    )
        .prop_map(
            |(
                origin,
                segments,
                next_hop,
                med,
                local_pref,
                atomic,
                aggregator,
                communities,
                large,
                originator,
                clusters,
                unknown,
            )| {
                PathAttributes {
                    origin: Some(origin),
                    as_path: AsPath { segments },
                    next_hop,
                    med,
                    local_pref,
                    atomic_aggregate: atomic,
                    aggregator: aggregator.map(|(asn, a)| Aggregator {
                        asn,
                        address: Ipv4Addr::from(a),
                    }),
                    communities,
                    large_communities: large
                        .into_iter()
                        .map(|(global, local1, local2)| LargeCommunity {
                            global,
                            local1,
                            local2,
                        })
                        .collect(),
                    originator_id: originator.map(Ipv4Addr::from),
                    cluster_list: clusters.into_iter().map(Ipv4Addr::from).collect(),
                    unknown: unknown
                        .into_iter()
                        .map(|(type_code, value)| RawAttribute {
                            flags: 0xe0,
                            type_code,
                            value: Bytes::from(value),
                        })
                        .collect(),
                }
            },
        )
}

fn arb_update(confed: bool) -> impl Strategy<Value = Update> {
    (
        prop::collection::vec(arb_ipv4_prefix(), 0..20),
        arb_attributes(confed),
        prop::collection::vec(arb_ipv4_prefix(), 0..20),
        prop::option::of((
            any::<u128>(),
            prop::option::of(any::<u128>()),
            prop::collection::vec(arb_ipv6_prefix(), 0..10),
        )),
        prop::option::of(prop::collection::vec(arb_ipv6_prefix(), 0..10)),
    )
        .prop_map(|(withdrawn, mut attributes, nlri, reach, unreach)| {
            if !nlri.is_empty() && attributes.next_hop.is_none() {
                attributes.next_hop = Some(Ipv4Addr::new(192, 0, 2, 1));
            }
            Update {
                withdrawn,
                attributes,
                mp_reach: reach.map(|(g, ll, nlri)| MpReach {
                    afi: Afi::Ipv6,
                    next_hop: NextHop::V6 {
                        global: g.into(),
                        link_local: ll.map(Into::into),
                    },
                    nlri,
                }),
                mp_unreach: unreach.map(|withdrawn| MpUnreach {
                    afi: Afi::Ipv6,
                    withdrawn,
                }),
                nlri,
                outcome: UpdateOutcome::default(),
            }
        })
}

fn arb_capability() -> impl Strategy<Value = Capability> {
    prop_oneof![
        (any::<u16>(), any::<u8>()).prop_map(|(afi, safi)| Capability::MultiProtocol { afi, safi }),
        Just(Capability::RouteRefresh),
        (
            any::<bool>(),
            any::<bool>(),
            0u16..4096,
            prop::collection::vec((any::<u16>(), any::<u8>(), any::<bool>()), 0..3)
        )
            .prop_map(|(r, n, t, f)| Capability::GracefulRestart(GracefulRestart {
                restart_state: r,
                notification: n,
                restart_time: t,
                families: f
                    .into_iter()
                    .map(|(afi, safi, forwarding_preserved)| GracefulRestartFamily {
                        afi,
                        safi,
                        forwarding_preserved
                    })
                    .collect(),
            })),
        (
            prop::sample::select(vec![70u8, 69, 73, 128]),
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(code, v)| Capability::Unknown {
                code,
                value: Bytes::from(v)
            }),
    ]
}

fn arb_open() -> impl Strategy<Value = Open> {
    (
        any::<u32>(),
        prop_oneof![Just(0u16), 3u16..],
        1u32..,
        prop::collection::vec(arb_capability(), 0..5),
        any::<bool>(),
    )
        .prop_map(|(asn, hold_time, id, mut capabilities, four)| {
            let asn = if four {
                capabilities.push(Capability::FourOctetAs(asn));
                asn
            } else {
                asn & 0xffff
            };
            Open {
                asn,
                hold_time,
                bgp_id: Ipv4Addr::from(id),
                capabilities,
            }
        })
}

fn round_trip(msg: Message, ctx: &DecodeContext) -> Message {
    let bytes = encode(&msg, ctx);
    assert!(bytes.len() <= MAX_MESSAGE_LEN);
    assert_eq!(frame_length(&bytes).unwrap(), Some(bytes.len()));
    decode(&bytes, ctx).unwrap()
}

proptest! {
    #[test]
    fn update_round_trips_between_four_octet_speakers(update in arb_update(true)) {
        let msg = Message::Update(Box::new(update));
        prop_assert_eq!(round_trip(msg.clone(), &CTX4), msg);
    }

    #[test]
    fn update_round_trips_through_as4_path_to_two_octet_peer(mut update in arb_update(false)) {
        // RFC 6793 §4.2.3 ignores AS4_PATH when AGGREGATOR is a real 2-octet AS; the strategy only
        // produces 4-octet aggregators, which travel as AS_TRANS + AS4_AGGREGATOR.
        update.attributes.aggregator = update.attributes.aggregator.filter(|a| a.asn > 0xffff);
        let msg = Message::Update(Box::new(update));
        prop_assert_eq!(round_trip(msg.clone(), &CTX2), msg);
    }

    #[test]
    fn open_round_trips(open in arb_open()) {
        let msg = Message::Open(open);
        prop_assert_eq!(round_trip(msg.clone(), &CTX4), msg);
    }

    #[test]
    fn notification_round_trips(code in any::<u8>(), subcode in any::<u8>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let msg = Message::Notification(Notification { code, subcode, data: Bytes::from(data) });
        prop_assert_eq!(round_trip(msg.clone(), &CTX4), msg);
    }

    #[test]
    fn route_refresh_round_trips(afi in any::<u16>(), subtype in any::<u8>(), safi in any::<u8>()) {
        let msg = Message::RouteRefresh(RouteRefresh { afi, subtype, safi });
        prop_assert_eq!(round_trip(msg.clone(), &CTX4), msg);
    }

    #[test]
    fn packed_announcements_fit_and_carry_every_prefix(prefixes in prop::collection::vec(arb_ipv4_prefix(), 1..3000), attributes in arb_attributes(true)) {
        let prefixes: Vec<IpNet> = prefixes.into_iter().map(IpNet::V4).collect();
        let updates = Update::announcements(&attributes, NextHop::V4(Ipv4Addr::new(10, 0, 0, 1)), &prefixes, &CTX4);
        let mut seen = Vec::new();
        for u in updates {
            let msg = round_trip(Message::Update(Box::new(u)), &CTX4);
            let Message::Update(u) = msg else { unreachable!() };
            seen.extend(u.nlri.into_iter().map(IpNet::V4));
        }
        prop_assert_eq!(seen, prefixes);
    }

    #[test]
    fn decoder_never_panics_on_garbage(body in prop::collection::vec(any::<u8>(), 0..200), t in 1u8..=5) {
        let _ = decode(&with_header(t, &body), &CTX4);
        let _ = decode(&with_header(t, &body), &CTX2);
    }
}
