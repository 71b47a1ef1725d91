//! Fuzz the message decoder: any input must decode or fail cleanly, and whatever decodes
//! must re-encode to something that decodes to the same message (4-octet sessions).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tortie_bgp::wire::{DecodeContext, Message, frame_length};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let ctx = DecodeContext {
        four_octet_as: flags & 1 != 0,
        ipv4_unicast: flags & 2 != 0,
        ipv6_unicast: flags & 4 != 0,
    };
    let Ok(Some(len)) = frame_length(body) else {
        return;
    };
    let mut frame = Bytes::copy_from_slice(&body[..len]);
    let Ok(message) = Message::decode(&mut frame, &ctx) else {
        return;
    };
    let mut out = BytesMut::new();
    message.encode(&mut out, &ctx);
    // Between 2-octet speakers RFC 6793 deliberately loses information (AS4_PATH ignored
    // next to a 2-octet AGGREGATOR, confederation ASNs squashed to AS_TRANS): compare only
    // 4-octet round trips.
    if ctx.four_octet_as && out.len() <= tortie_bgp::wire::MAX_MESSAGE_LEN {
        let mut again = out.freeze();
        let second = Message::decode(&mut again, &ctx).expect("re-encoded message decodes");
        if let (Message::Update(a), Message::Update(b)) = (&message, &second) {
            // The RFC 7606 outcome is about the input bytes, not the message.
            assert_eq!((&a.withdrawn, &a.nlri, &a.mp_reach, &a.mp_unreach), (&b.withdrawn, &b.nlri, &b.mp_reach, &b.mp_unreach));
        } else {
            assert_eq!(message, second);
        }
    }
});
