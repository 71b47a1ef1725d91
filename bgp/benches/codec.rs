//! UPDATE decode/encode throughput on UPDATEs packed with /26 IPv4 NLRI, against netgauze-bgp-pkt on the same bytes.

use bytes::{Bytes, BytesMut};
use ipnet::{IpNet, Ipv4Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_parse_utils::WritablePdu;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use tortie_bgp::wire::{
    AsPath, AsPathSegment, DecodeContext, Message, NextHop, Origin, PathAttributes, SegmentType,
    Update,
};

const MESSAGES: usize = 300;
const ROUND: Duration = Duration::from_millis(400);
const ROUNDS: usize = 5;

fn build_updates() -> (Vec<Update>, Vec<Bytes>, usize) {
    let ctx = DecodeContext::default();
    let attributes = PathAttributes {
        origin: Some(Origin::Igp),
        as_path: AsPath {
            segments: vec![AsPathSegment {
                kind: SegmentType::AsSequence,
                asns: vec![65001, 65002],
            }],
        },
        med: Some(10),
        local_pref: Some(100),
        communities: vec![0xfde8_0001],
        ..Default::default()
    };
    // Distinct /26s walking 10.0.0.0/8.
    let prefixes: Vec<IpNet> = (0u32..)
        .map(|i| {
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 6)), 26).expect("/26 is valid"),
            )
        })
        .take(MESSAGES * 810)
        .collect();
    let mut updates = Update::announcements(
        &attributes,
        NextHop::V4(Ipv4Addr::new(192, 0, 2, 1)),
        &prefixes,
        &ctx,
    );
    updates.truncate(MESSAGES);
    let mut prefix_count = 0;
    let wire = updates
        .iter()
        .map(|u| {
            prefix_count += u.nlri.len();
            let mut buf = BytesMut::new();
            Message::Update(Box::new(u.clone())).encode(&mut buf, &ctx);
            buf.freeze()
        })
        .collect();
    (updates, wire, prefix_count)
}

/// Passes per second of `tortie` and `reference`, measured in alternating rounds so that
/// load from other processes hits both alike; the best round of each counts.
fn rates(mut tortie: impl FnMut(), mut reference: impl FnMut()) -> (f64, f64) {
    let round = |pass: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut passes = 0u64;
        while start.elapsed() < ROUND {
            pass();
            passes += 1;
        }
        passes as f64 / start.elapsed().as_secs_f64()
    };
    tortie();
    reference();
    let (mut best_tortie, mut best_reference) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        best_tortie = best_tortie.max(round(&mut tortie));
        best_reference = best_reference.max(round(&mut reference));
    }
    (best_tortie, best_reference)
}

fn main() {
    let (updates, wire, prefixes) = build_updates();
    let ctx = DecodeContext::default();
    println!(
        "codec bench: {} UPDATEs, {prefixes} /26 prefixes, {} octets",
        wire.len(),
        wire.iter().map(Bytes::len).sum::<usize>()
    );

    let mut ng_ctx = BgpParsingContext::default();
    let (tortie_decode, ref_decode) = rates(
        || {
            for msg in &wire {
                let mut b = msg.clone();
                black_box(Message::decode(&mut b, &ctx).expect("own encoding decodes"));
            }
        },
        || {
            for msg in &wire {
                let mut reader = SliceReader::new(msg.as_ref());
                black_box(BgpMessage::parse(&mut reader, &mut ng_ctx).expect("netgauze decodes"));
            }
        },
    );

    let messages: Vec<Message> = updates
        .into_iter()
        .map(|u| Message::Update(Box::new(u)))
        .collect();
    let mut ng_ctx = BgpParsingContext::default();
    let ng_messages: Vec<BgpMessage> = wire
        .iter()
        .map(|msg| {
            let mut reader = SliceReader::new(msg.as_ref());
            BgpMessage::parse(&mut reader, &mut ng_ctx).expect("netgauze decodes")
        })
        .collect();
    let mut out = BytesMut::with_capacity(4096 * MESSAGES);
    let mut ng_out: Vec<u8> = Vec::with_capacity(4096 * MESSAGES);
    let (tortie_encode, ref_encode) = rates(
        || {
            out.clear();
            for m in &messages {
                m.encode(&mut out, &ctx);
            }
            black_box(&out);
        },
        || {
            ng_out.clear();
            for m in &ng_messages {
                m.write(&mut ng_out).expect("netgauze encodes");
            }
            black_box(&ng_out);
        },
    );
    assert_eq!(
        &ng_out[..],
        &out[..],
        "both encoders produce the same bytes"
    );

    let per_s = |passes: f64| (passes * prefixes as f64).round() as u64;
    println!(
        "BENCH name=update_decode_ipv4_26 unit=prefixes/s tortie={} ref=netgauze-bgp-pkt:{} better=higher",
        per_s(tortie_decode),
        per_s(ref_decode)
    );
    println!(
        "BENCH name=update_encode_ipv4_26 unit=prefixes/s tortie={} ref=netgauze-bgp-pkt:{} better=higher",
        per_s(tortie_encode),
        per_s(ref_encode)
    );
}
