//! RIB tests: decision process, split horizon, route reflection, loop checks, graceful restart.

use super::*;
use crate::wire::DecodeError;
use crate::wire::{AsPath, AsPathSegment, MpReach, SegmentType, UpdateOutcome};

const LOCAL_AS: u32 = 64512;

fn rib() -> Rib {
    Rib::new(RibConfig {
        local_as: LOCAL_AS,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        cluster_id: Ipv4Addr::new(10, 0, 0, 1),
    })
}

fn addr(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn prefix(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Add a peer at 10.0.0.`last` with router id 10.0.0.`last` and bring it up.
fn up(rib: &mut Rib, last: u8, remote_as: u32, client: bool) -> RibOutput {
    rib.add_peer(
        addr(last),
        PeerSettings {
            remote_as,
            route_reflector_client: client,
            export_local_only: false,
        },
    );
    rib.peer_up(
        addr(last),
        PeerSession {
            remote_id: Ipv4Addr::new(10, 0, 0, last),
            families: vec![Afi::Ipv4, Afi::Ipv6],
            next_hop_v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            next_hop_v6: None,
        },
    )
}

fn path(asns: &[u32]) -> AsPath {
    if asns.is_empty() {
        return AsPath::default();
    }
    AsPath {
        segments: vec![AsPathSegment {
            kind: SegmentType::AsSequence,
            asns: asns.to_vec(),
        }],
    }
}

fn announce(
    p: &str,
    next_hop: [u8; 4],
    asns: &[u32],
    tweak: impl FnOnce(&mut PathAttributes),
) -> Update {
    let mut attributes = PathAttributes {
        origin: Some(Origin::Igp),
        as_path: path(asns),
        next_hop: Some(Ipv4Addr::from(next_hop)),
        ..Default::default()
    };
    tweak(&mut attributes);
    Update {
        attributes,
        nlri: vec![p.parse().unwrap()],
        ..Default::default()
    }
}

fn withdraw(p: &str) -> Update {
    Update {
        withdrawn: vec![p.parse().unwrap()],
        ..Default::default()
    }
}

fn out_for(out: &RibOutput, peer: IpAddr) -> Vec<OutChange> {
    out.out
        .iter()
        .filter(|(a, _)| *a == peer)
        .flat_map(|(_, c)| c.clone())
        .collect()
}

fn best_from(rib: &Rib, p: &str) -> Option<IpAddr> {
    rib.best(&prefix(p)).and_then(|b| b.from)
}

#[test]
fn higher_local_pref_wins() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    up(&mut rib, 3, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |a| {
            a.local_pref = Some(100)
        }),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[], |a| {
            a.local_pref = Some(200)
        }),
    );
    assert_eq!(best_from(&rib, "10.9.0.0/16"), Some(addr(3)));
}

#[test]
fn shorter_as_path_wins() {
    let mut rib = rib();
    up(&mut rib, 2, 65002, false);
    up(&mut rib, 3, 65003, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65002, 1, 2], |_| {}),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[65003, 1], |_| {}),
    );
    assert_eq!(best_from(&rib, "10.9.0.0/16"), Some(addr(3)));
}

#[test]
fn lower_origin_wins() {
    let mut rib = rib();
    up(&mut rib, 2, 65002, false);
    up(&mut rib, 3, 65003, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65002], |a| {
            a.origin = Some(Origin::Incomplete)
        }),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[65003], |a| {
            a.origin = Some(Origin::Egp)
        }),
    );
    assert_eq!(best_from(&rib, "10.9.0.0/16"), Some(addr(3)));
}

#[test]
fn lower_med_wins_only_between_routes_from_the_same_neighbour_as() {
    let mut rib = rib();
    up(&mut rib, 2, 65002, false);
    up(&mut rib, 3, 65002, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65002], |a| a.med = Some(50)),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[65002], |a| a.med = Some(10)),
    );
    assert_eq!(
        best_from(&rib, "10.9.0.0/16"),
        Some(addr(3)),
        "same AS: MED 10 beats 50"
    );

    let mut rib = self::rib();
    up(&mut rib, 2, 65002, false);
    up(&mut rib, 3, 65003, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65002], |a| a.med = Some(50)),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[65003], |a| a.med = Some(10)),
    );
    assert_eq!(
        best_from(&rib, "10.9.0.0/16"),
        Some(addr(2)),
        "different AS: MED ignored, lower router id wins"
    );
}

#[test]
fn ebgp_route_beats_ibgp_route() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    up(&mut rib, 3, 65003, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65003], |_| {}),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[65003], |_| {}),
    );
    assert_eq!(best_from(&rib, "10.9.0.0/16"), Some(addr(3)));
}

#[test]
fn lowest_router_id_breaks_ties() {
    let mut rib = rib();
    up(&mut rib, 7, LOCAL_AS, false);
    up(&mut rib, 4, LOCAL_AS, false);
    rib.apply_update(
        addr(7),
        &announce("10.9.0.0/16", [10, 0, 0, 7], &[], |_| {}),
    );
    rib.apply_update(
        addr(4),
        &announce("10.9.0.0/16", [10, 0, 0, 4], &[], |_| {}),
    );
    assert_eq!(best_from(&rib, "10.9.0.0/16"), Some(addr(4)));
}

#[test]
fn withdrawing_the_best_falls_back_to_the_next_and_reports_it() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    up(&mut rib, 3, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[], |_| {}),
    );
    let (out, _) = rib.apply_update(addr(2), &withdraw("10.9.0.0/16"));
    assert_eq!(out.best.len(), 1);
    assert_eq!(out.best[0].best.as_ref().unwrap().from, Some(addr(3)));
    let (out, _) = rib.apply_update(addr(3), &withdraw("10.9.0.0/16"));
    assert_eq!(
        out.best,
        vec![BestChange {
            prefix: prefix("10.9.0.0/16"),
            best: None
        }]
    );
    assert_eq!(rib.loc_rib_len(), 0);
}

#[test]
fn ibgp_learned_route_is_not_sent_to_other_ibgp_peers() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    up(&mut rib, 3, LOCAL_AS, false);
    let (out, _) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    assert!(out_for(&out, addr(3)).is_empty(), "split horizon");
    assert!(
        out_for(&out, addr(2)).is_empty(),
        "never back to the source"
    );
}

#[test]
fn ebgp_learned_route_goes_to_ibgp_with_next_hop_kept_and_local_pref() {
    let mut rib = rib();
    up(&mut rib, 2, 65002, false);
    up(&mut rib, 3, LOCAL_AS, false);
    up(&mut rib, 4, 65004, false);
    let (out, _) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65002], |a| {
            a.local_pref = Some(999)
        }),
    );
    let [OutChange::Announce(_, ibgp)] = &out_for(&out, addr(3))[..] else {
        panic!("{out:?}")
    };
    assert_eq!(ibgp.next_hop, NextHop::V4(Ipv4Addr::new(10, 0, 0, 2)));
    assert_eq!(
        ibgp.path.local_pref,
        Some(DEFAULT_LOCAL_PREF),
        "eBGP LOCAL_PREF ignored"
    );
    let [OutChange::Announce(_, ebgp)] = &out_for(&out, addr(4))[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        ebgp.next_hop,
        NextHop::V4(Ipv4Addr::new(10, 0, 0, 1)),
        "next hop self"
    );
    assert_eq!(ebgp.path.as_path, path(&[LOCAL_AS, 65002]));
    assert_eq!(ebgp.path.local_pref, None);
}

#[test]
fn reflector_passes_client_route_to_other_clients_and_non_clients() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, true);
    up(&mut rib, 3, LOCAL_AS, true);
    up(&mut rib, 4, LOCAL_AS, false);
    let (out, _) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    for peer in [addr(3), addr(4)] {
        let [OutChange::Announce(_, a)] = &out_for(&out, peer)[..] else {
            panic!("{peer}: {out:?}")
        };
        assert_eq!(a.path.originator_id, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(a.path.cluster_list, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(
            a.next_hop,
            NextHop::V4(Ipv4Addr::new(10, 0, 0, 2)),
            "reflection keeps next hop"
        );
    }
}

#[test]
fn reflector_passes_non_client_route_only_to_clients() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, true);
    up(&mut rib, 3, LOCAL_AS, false);
    up(&mut rib, 4, LOCAL_AS, false);
    let (out, _) = rib.apply_update(
        addr(3),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[], |_| {}),
    );
    assert_eq!(out_for(&out, addr(2)).len(), 1);
    assert!(out_for(&out, addr(4)).is_empty());
}

#[test]
fn reflector_never_sends_route_back_to_its_originator() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, true);
    up(&mut rib, 3, LOCAL_AS, true);
    let (out, _) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 3], &[], |a| {
            a.originator_id = Some(Ipv4Addr::new(10, 0, 0, 3))
        }),
    );
    assert!(out_for(&out, addr(3)).is_empty());
}

#[test]
fn route_with_our_originator_id_or_cluster_id_is_rejected() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    let (_, s) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |a| {
            a.originator_id = Some(Ipv4Addr::new(10, 0, 0, 1))
        }),
    );
    assert_eq!(s.rejected, 1);
    let (_, s) = rib.apply_update(
        addr(2),
        &announce("10.8.0.0/16", [10, 0, 0, 2], &[], |a| {
            a.cluster_list = vec![Ipv4Addr::new(10, 0, 0, 1)]
        }),
    );
    assert_eq!(s.rejected, 1);
    assert_eq!(rib.loc_rib_len(), 0);
    assert_eq!(
        rib.peer_counts(addr(2)),
        Some(PeerCounts {
            received: 2,
            accepted: 0,
            advertised: 0
        })
    );
}

#[test]
fn ebgp_route_with_our_as_in_path_is_rejected() {
    let mut rib = rib();
    up(&mut rib, 2, 65002, false);
    let (_, s) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65002, LOCAL_AS], |_| {}),
    );
    assert_eq!(s.rejected, 1);
    assert_eq!(rib.loc_rib_len(), 0);
}

#[test]
fn treat_as_withdraw_update_removes_previous_route() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    let mut bad = announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {});
    bad.outcome = UpdateOutcome {
        treat_as_withdraw: Some(DecodeError::MissingWellKnownAttribute(1)),
        discarded: vec![],
    };
    let (out, s) = rib.apply_update(addr(2), &bad);
    assert_eq!(s.withdrawn, 1);
    assert_eq!(out.best[0].best, None);
}

#[test]
fn equal_attributes_from_two_peers_share_one_allocation() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    up(&mut rib, 3, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 9], &[], |_| {}),
    );
    rib.apply_update(
        addr(3),
        &announce("10.8.0.0/16", [10, 0, 0, 9], &[], |_| {}),
    );
    let a = rib.best(&prefix("10.9.0.0/16")).unwrap().attrs;
    let b = rib.best(&prefix("10.8.0.0/16")).unwrap().attrs;
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn originated_prefix_goes_to_up_peers_with_next_hop_self_then_withdraws() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    let out = rib.originate(prefix("10.65.1.0/26"));
    let [OutChange::Announce(p, a)] = &out_for(&out, addr(2))[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, prefix("10.65.1.0/26"));
    assert_eq!(a.next_hop, NextHop::V4(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(a.path.local_pref, Some(100));
    let out = rib.originate(prefix("fd00::/122"));
    assert!(
        out_for(&out, addr(2)).is_empty(),
        "no IPv6 next hop known for an IPv4 session: not exported"
    );
    let out = rib.withdraw_local(prefix("10.65.1.0/26"));
    assert_eq!(
        out_for(&out, addr(2)),
        vec![OutChange::Withdraw(prefix("10.65.1.0/26"))]
    );
}

#[test]
fn peer_up_dumps_loc_rib_then_end_of_rib_per_family() {
    let mut rib = rib();
    rib.originate(prefix("10.65.1.0/26"));
    let out = up(&mut rib, 2, LOCAL_AS, false);
    let changes = out_for(&out, addr(2));
    assert!(matches!(changes[0], OutChange::Announce(..)));
    assert_eq!(
        &changes[1..],
        &[
            OutChange::EndOfRib(Afi::Ipv4),
            OutChange::EndOfRib(Afi::Ipv6)
        ]
    );
}

#[test]
fn graceful_restart_keeps_stale_routes_until_end_of_rib_then_sweeps_unrefreshed() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    rib.apply_update(
        addr(2),
        &announce("10.8.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    let out = rib.peer_down(addr(2), &[Afi::Ipv4]);
    assert!(out.best.is_empty(), "stale routes stay in the Loc-RIB");
    assert_eq!(rib.stale_count(addr(2)), 2);
    up(&mut rib, 2, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    assert_eq!(rib.stale_count(addr(2)), 1, "re-announced route is fresh");
    let out = rib.sweep_stale(addr(2), Some(Afi::Ipv4));
    assert_eq!(
        out.best,
        vec![BestChange {
            prefix: prefix("10.8.0.0/16"),
            best: None
        }]
    );
    assert!(rib.best(&prefix("10.9.0.0/16")).is_some());
}

#[test]
fn non_graceful_peer_down_removes_routes() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[], |_| {}),
    );
    let out = rib.peer_down(addr(2), &[]);
    assert_eq!(out.best.len(), 1);
    assert_eq!(rib.loc_rib_len(), 0);
    assert_eq!(rib.peer_counts(addr(2)).unwrap(), PeerCounts::default());
}

#[test]
fn ipv6_routes_from_mp_reach_are_installed() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    let nh = NextHop::V6 {
        global: "fd00::2".parse().unwrap(),
        link_local: None,
    };
    let update = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            ..Default::default()
        },
        mp_reach: Some(MpReach {
            afi: Afi::Ipv6,
            next_hop: nh,
            nlri: vec![prefix("fd00:1::/64")],
        }),
        ..Default::default()
    };
    rib.apply_update(addr(2), &update);
    assert_eq!(rib.best(&prefix("fd00:1::/64")).unwrap().attrs.next_hop, nh);
}

#[test]
fn ipv6_prefix_is_exported_with_the_configured_ipv6_next_hop() {
    let mut rib = rib();
    rib.add_peer(
        addr(2),
        PeerSettings {
            remote_as: LOCAL_AS,
            route_reflector_client: false,
            export_local_only: false,
        },
    );
    let nh: Ipv6Addr = "fd00::1".parse().unwrap();
    rib.peer_up(
        addr(2),
        PeerSession {
            remote_id: Ipv4Addr::new(10, 0, 0, 2),
            families: vec![Afi::Ipv4, Afi::Ipv6],
            next_hop_v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            next_hop_v6: Some(nh),
        },
    );
    let out = rib.originate(prefix("fd00:65::/122"));
    let [OutChange::Announce(_, a)] = &out_for(&out, addr(2))[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        a.next_hop,
        NextHop::V6 {
            global: nh,
            link_local: None
        }
    );
}

#[test]
fn ebgp_route_not_starting_with_the_peer_as_is_rejected() {
    let mut rib = rib();
    up(&mut rib, 2, 65002, false);
    let (_, s) = rib.apply_update(
        addr(2),
        &announce("10.9.0.0/16", [10, 0, 0, 2], &[65099], |_| {}),
    );
    assert_eq!(s.rejected, 1);
    let (_, s) = rib.apply_update(
        addr(2),
        &announce("10.8.0.0/16", [10, 0, 0, 2], &[65002], |_| {}),
    );
    assert_eq!(s.accepted, 1);
}

#[test]
fn export_local_only_peer_gets_originated_routes_but_not_learned_ones() {
    let mut rib = rib();
    up(&mut rib, 2, LOCAL_AS, false);
    rib.add_peer(
        addr(3),
        PeerSettings {
            remote_as: 65000,
            route_reflector_client: false,
            export_local_only: true,
        },
    );
    rib.peer_up(
        addr(3),
        PeerSession {
            remote_id: Ipv4Addr::new(10, 0, 0, 3),
            families: vec![Afi::Ipv4],
            next_hop_v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            next_hop_v6: None,
        },
    );
    rib.originate(prefix("10.244.1.0/26"));
    rib.apply_update(
        addr(2),
        &announce("10.244.2.0/26", [10, 0, 0, 2], &[], |_| {}),
    );
    assert!(
        rib.best(&prefix("10.244.2.0/26")).is_some(),
        "the learned route is in the Loc-RIB"
    );
    let out: Vec<IpNet> = rib
        .adj_rib_out(addr(3))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        out,
        vec![prefix("10.244.1.0/26")],
        "only our own block goes to the external peer"
    );
}
