//! Calico-shaped JSON fixtures read into tortie's types and written back without losing or changing a field.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tortie_ipam::{
    AffinityState, BlockAffinity, EncapMode, IpPool, IpamBlock, IpamConfig, IpamHandle,
    IpamSettings, Pool, affinity_name, block_name,
};

fn fixture(name: &str) -> Value {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Parses a fixture as `T`, asserts that writing it back gives exactly the same JSON, and returns it.
fn round_trip<T: Serialize + DeserializeOwned>(name: &str) -> T {
    let original = fixture(name);
    let typed: T = serde_json::from_value(original.clone())
        .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        back,
        original,
        "{name} changed on round trip:\nwrote {}",
        serde_json::to_string_pretty(&back).unwrap()
    );
    typed
}

#[test]
fn ippools_round_trip_including_legacy_and_unknown_fields() {
    let p: IpPool = round_trip("ippool-default-ipv4.json");
    assert_eq!(p.spec.block_size, Some(26));
    assert_eq!(p.spec.ipip_mode.as_deref(), Some("Always"));
    round_trip::<IpPool>("ippool-ipv6-rack.json");
    round_trip::<IpPool>("ippool-bare-kubectl.json");
    let legacy: IpPool = round_trip("ippool-legacy-and-future-fields.json");
    assert_eq!(legacy.spec.nat_outgoing_legacy, Some(true));
    assert!(legacy.spec.extra.contains_key("assignmentMode"));
    assert!(legacy.extra.contains_key("status"));
    assert!(legacy.metadata.extra.contains_key("managedFields"));
}

#[test]
fn fixture_pools_validate_with_calico_defaults() {
    let bare = Pool::from_resource(&round_trip::<IpPool>("ippool-bare-kubectl.json")).unwrap();
    assert_eq!(bare.block_size, 26);
    assert_eq!(bare.ipip_mode, EncapMode::Never);
    assert_eq!(bare.node_selector.source(), "all()");
    let v6 = Pool::from_resource(&round_trip::<IpPool>("ippool-ipv6-rack.json")).unwrap();
    assert_eq!(v6.vxlan_mode, EncapMode::CrossSubnet);
    assert!(v6.disable_bgp_export);
    let rack_a = [("rack".to_string(), "a".to_string())].into();
    assert!(v6.node_selector.matches(&rack_a));
    let legacy = Pool::from_resource(&round_trip::<IpPool>(
        "ippool-legacy-and-future-fields.json",
    ))
    .unwrap();
    assert_eq!(legacy.ipip_mode, EncapMode::CrossSubnet);
    assert!(legacy.nat_outgoing && legacy.disabled);
}

#[test]
fn ipam_blocks_round_trip_and_pass_the_invariant_checker() {
    let b: IpamBlock = round_trip("ipamblock-ipv4.json");
    b.spec.check_invariants().unwrap();
    assert_eq!(b.metadata.name, block_name(&b.spec.cidr.parse().unwrap()));
    assert_eq!(b.spec.affine_node(), Some("node-1"));
    assert_eq!(b.spec.allocations[2], None);
    assert_eq!(b.spec.handle_at(4), Some("k8s-pod-network.3f2a9c1d7e"));
    assert_eq!(b.spec.sequence_at(3), Some(4));

    let v6: IpamBlock = round_trip("ipamblock-ipv6-borrowed.json");
    v6.spec.check_invariants().unwrap();
    assert_eq!(v6.metadata.name, block_name(&v6.spec.cidr.parse().unwrap()));
    assert_eq!(v6.spec.affinity, None);
}

#[test]
fn block_written_after_an_assignment_keeps_every_calico_field() {
    let original = fixture("ipamblock-ipv4.json");
    let mut b: IpamBlock = serde_json::from_value(original.clone()).unwrap();
    b.spec.assign(1, "k8s-pod-network.new", &Default::default());
    let written = serde_json::to_value(&b).unwrap();
    assert_eq!(written["metadata"], original["metadata"]);
    for key in original["spec"].as_object().unwrap().keys() {
        assert!(written["spec"].get(key).is_some(), "spec.{key} lost");
    }
    assert_eq!(
        written["spec"]["attributes"][3]["handle_id"],
        "k8s-pod-network.new"
    );
    assert_eq!(written["spec"]["allocations"][5], 3);
    assert_eq!(written["spec"]["sequenceNumber"], 7);
}

#[test]
fn block_affinities_round_trip_with_string_deleted() {
    let a: BlockAffinity = round_trip("blockaffinity-confirmed.json");
    assert_eq!(a.spec.state, AffinityState::Confirmed);
    assert_eq!(a.spec.deleted, "false");
    assert_eq!(
        a.metadata.name,
        affinity_name(&a.spec.node, &a.spec.cidr.parse().unwrap())
    );
    let p: BlockAffinity = round_trip("blockaffinity-pending-deletion.json");
    assert_eq!(p.spec.state, AffinityState::PendingDeletion);
    assert_eq!(
        p.metadata.name,
        affinity_name(&p.spec.node, &p.spec.cidr.parse().unwrap())
    );
}

#[test]
fn handles_and_config_round_trip() {
    let h: IpamHandle = round_trip("ipamhandle-pod.json");
    assert_eq!(h.spec.block.get("10.244.1.0/26"), Some(&2));
    assert_eq!(h.spec.deleted, Some(false));
    round_trip::<IpamHandle>("ipamhandle-tunnel.json");
    let c: IpamConfig = round_trip("ipamconfig-default.json");
    let s = IpamSettings::from_config(&c);
    assert_eq!(s.max_blocks_per_host, 20, "maxBlocksPerHost 0 means 20");
    assert!(s.auto_allocate_blocks && !s.strict_affinity);
}

#[test]
fn list_items_without_api_version_and_kind_get_them() {
    let mut v = fixture("ipamhandle-tunnel.json");
    let obj = v.as_object_mut().unwrap();
    obj.remove("apiVersion");
    obj.remove("kind");
    let h: IpamHandle = serde_json::from_value(v).unwrap();
    assert_eq!(h.api_version, "crd.projectcalico.org/v1");
    assert_eq!(h.kind, "IPAMHandle");
}

#[test]
fn go_nil_slices_written_as_null_are_accepted() {
    let mut v = fixture("ipamblock-ipv6-borrowed.json");
    v["spec"]["attributes"] = Value::Null;
    v["spec"]["allocations"] = serde_json::json!(vec![Value::Null; 64]);
    v["spec"]["unallocated"] = serde_json::json!((0..64).collect::<Vec<u32>>());
    v["spec"]["sequenceNumberForAllocation"] = serde_json::json!({});
    let b: IpamBlock = serde_json::from_value(v).unwrap();
    assert!(b.spec.attributes.is_empty());
    b.spec.check_invariants().unwrap();
}
