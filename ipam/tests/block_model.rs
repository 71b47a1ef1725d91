//! Model-based property tests of the pure block operations, and a never-panics check of the selector parser.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tortie_ipam::{Selector, new_block};

#[derive(Debug, Clone)]
enum BlockOp {
    Assign { handle: u8, num: usize },
    AssignOrdinal { handle: u8, ordinal: u32 },
    ReleaseHandle { handle: u8 },
    ReleaseOrdinals { ordinals: Vec<u32> },
}

fn block_op() -> impl Strategy<Value = BlockOp> {
    prop_oneof![
        (0u8..5, 1usize..6).prop_map(|(handle, num)| BlockOp::Assign { handle, num }),
        (0u8..5, 0u32..16).prop_map(|(handle, ordinal)| BlockOp::AssignOrdinal { handle, ordinal }),
        (0u8..5).prop_map(|handle| BlockOp::ReleaseHandle { handle }),
        prop::collection::vec(0u32..16, 0..4)
            .prop_map(|ordinals| BlockOp::ReleaseOrdinals { ordinals }),
    ]
}

fn attrs(handle: u8) -> BTreeMap<String, String> {
    // Two handles share a pod name so attribute sharing and compaction both get exercised.
    BTreeMap::from([("pod".to_string(), format!("p{}", handle % 3))])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// The block agrees with a plain ordinal → handle map after every operation, never hands out
    /// an ordinal twice, and always passes the invariant checker.
    #[test]
    fn block_matches_a_simple_model(ops in prop::collection::vec(block_op(), 1..60)) {
        let mut block = new_block("10.1.2.16/28".parse().unwrap(), Some("n")).spec;
        let mut model: BTreeMap<u32, String> = BTreeMap::new();
        for op in ops {
            let seq_before = block.sequence_number;
            let changed = match op {
                BlockOp::Assign { handle, num } => {
                    let h = format!("h{handle}");
                    let got = block.assign(num, &h, &attrs(handle));
                    prop_assert_eq!(got.len(), num.min(16 - model.len()));
                    for o in &got {
                        prop_assert!(model.insert(*o, h.clone()).is_none(), "ordinal {} handed out twice", o);
                    }
                    !got.is_empty()
                }
                BlockOp::AssignOrdinal { handle, ordinal } => {
                    let h = format!("h{handle}");
                    match block.assign_ordinal(ordinal, &h, &attrs(handle)) {
                        Ok(()) => {
                            prop_assert!(model.insert(ordinal, h).is_none());
                            true
                        }
                        Err(holder) => {
                            prop_assert_eq!(holder.as_ref(), model.get(&ordinal));
                            false
                        }
                    }
                }
                BlockOp::ReleaseHandle { handle } => {
                    let h = format!("h{handle}");
                    let released: BTreeSet<u32> = block.release_handle(&h).iter().map(|r| r.ordinal).collect();
                    let expected: BTreeSet<u32> = model.iter().filter(|(_, v)| **v == h).map(|(k, _)| *k).collect();
                    prop_assert_eq!(&released, &expected);
                    model.retain(|_, v| *v != h);
                    !released.is_empty()
                }
                BlockOp::ReleaseOrdinals { ordinals } => {
                    let released = block.release_ordinals(&ordinals);
                    for r in &released {
                        prop_assert_eq!(model.remove(&r.ordinal), r.handle_id.clone());
                    }
                    for o in &ordinals {
                        prop_assert!(!model.contains_key(o));
                    }
                    !released.is_empty()
                }
            };
            if let Err(e) = block.check_invariants() {
                return Err(TestCaseError::fail(e.to_string()));
            }
            prop_assert_eq!(block.sequence_number, seq_before + u64::from(changed), "sequence bumps once per change");
            prop_assert_eq!(block.free_count(), 16 - model.len());
            for (o, h) in &model {
                prop_assert_eq!(block.handle_at(*o), Some(h.as_str()));
            }
        }
    }

    /// Any input either parses or yields an error pointing inside the input; never a panic.
    #[test]
    fn selector_parser_never_panics(input in "[ -~]{0,40}") {
        if let Err(e) = Selector::parse(&input) {
            prop_assert!(e.position <= input.len());
        }
    }

    /// Well-formed selectors built from the grammar always parse.
    #[test]
    fn generated_selectors_parse(
        key in "[a-z][a-z0-9./_-]{0,10}",
        value in "[a-zA-Z0-9 ._-]{0,8}",
        ops in prop::collection::vec(0u8..6, 1..5),
    ) {
        let terms: Vec<String> = ops.iter().map(|op| match op {
            0 => format!("{key} == '{value}'"),
            1 => format!("{key} != \"{value}\""),
            2 => format!("has({key})"),
            3 => format!("{key} in {{'{value}', 'x'}}"),
            4 => format!("!({key} not in {{'{value}'}})"),
            _ => "all()".to_string(),
        }).collect();
        let text = terms.join(" && ");
        prop_assert!(Selector::parse(&text).is_ok(), "{}", text);
        let text = terms.join(" || ");
        prop_assert!(Selector::parse(&text).is_ok(), "{}", text);
    }
}
