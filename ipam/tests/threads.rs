//! Real OS threads hammering one store: the allocator's futures are `Send`, and parallel hosts with injected conflicts never share an address.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use common::*;
use tortie_ipam::{AutoAssignRequest, Faults, IpamError, workload_attributes};

fn assert_send<T: Send>(_: &T) {}

#[test]
fn allocator_futures_are_send_for_tokio_spawn() {
    let (_store, ipam) = new_ipam(&[pool("p", "10.0.0.0/24", 26)], None);
    let req = AutoAssignRequest::default();
    assert_send(&ipam.auto_assign(&req));
    assert_send(&ipam.assign_once(&req));
    assert_send(&ipam.release_by_handle("h"));
    assert_send(&ipam.release_by_handle("h"));
    assert_send(&ipam.release_node("n"));
    let mut gc = tortie_ipam::LeakCollector::default();
    let live = tortie_ipam::LiveState::default();
    assert_send(&gc.collect(&ipam, &live, std::time::SystemTime::UNIX_EPOCH));
}

#[test]
fn parallel_hosts_on_threads_never_share_an_address() {
    let (store, ipam) = new_ipam(&[pool("p", "10.0.0.0/25", 29)], Some(config(false, 3)));
    store.set_faults(Faults {
        conflict_one_in: 5,
        seed: 42,
        yield_before_each_op: false,
        ambiguous_one_in: 0,
    });
    let ipam = Arc::new(ipam);
    let held: Arc<Mutex<HashMap<IpAddr, String>>> = Arc::default();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (ipam, held) = (ipam.clone(), held.clone());
            std::thread::spawn(move || {
                let node = format!("node-{t}");
                let mut mine: Vec<String> = Vec::new();
                for i in 0..150 {
                    let handle = format!("k8s-pod-network.{node}-{i}");
                    let req = AutoAssignRequest {
                        handle_id: handle.clone(),
                        attributes: workload_attributes("ns", &handle, &node, "t"),
                        node: node.clone(),
                        num_v4: 1,
                        ..AutoAssignRequest::default()
                    };
                    let result = if i % 2 == 0 {
                        block_on(ipam.assign_once(&req))
                    } else {
                        block_on(ipam.auto_assign(&req))
                    };
                    match result {
                        Ok(got) => {
                            let mut h = held.lock().unwrap();
                            for ip in got.ipv4 {
                                if let Some(prev) = h.insert(ip, handle.clone()) {
                                    panic!("{ip} given to {handle} while {prev} holds it");
                                }
                            }
                            mine.push(handle.clone());
                        }
                        Err(IpamError::Exhausted { .. } | IpamError::TooManyConflicts { .. }) => {
                            mine.push(handle.clone());
                        }
                        Err(e) => panic!("{handle}: {e}"),
                    }
                    if i % 2 == 1 {
                        let victim = mine.remove(0);
                        held.lock().unwrap().retain(|_, h| *h != victim);
                        block_on(ipam.release_by_handle(&victim)).unwrap();
                    }
                }
                for h in mine {
                    held.lock().unwrap().retain(|_, x| *x != h);
                    block_on(ipam.release_by_handle(&h)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    check_quiescent(&store);
    assert!(
        allocations(&store).is_empty(),
        "leaked: {:?}",
        allocations(&store)
    );
    assert!(store.stats().conflicts > 0);
}
