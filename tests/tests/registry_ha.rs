//! A set of three registries on a three-member etcd (Debian's `etcd-server`) under the
//! two-network mesh: the gateways and a VM agent (the real binary, in a VM namespace behind
//! network A) are given the whole set. The registry they follow is stopped: they move to
//! another, a call from the VM through B's gateway made every 50 ms never fails, and the
//! VM's entry never leaves the views.
//!
//! Needs root (network namespaces) and etcd; in CI both must be there, elsewhere the test
//! skips with a message.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::model::NodeKind;
use isthmus_proto::subscription::LocalView;
use isthmus_registry::app::StoreSettings;
use isthmus_registry::store::EtcdConfig;
use isthmus_tests::harness::agent::{sh_in, web_vm_catalog, Vm};
use isthmus_tests::harness::etcd::EtcdCluster;
use isthmus_tests::harness::mesh::{host, Mesh, APP_PORT};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::harness::vm::{always_for, endpoint, until};
use isthmus_tests::{eventually, node};

const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const WAIT: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(4);

fn has_vm(view: &LocalView) -> bool {
    endpoint(view, &host("web"), &VM_IP.to_string()).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_moves_off_a_stopped_registry_without_a_failed_call() {
    let Some(etcd) = EtcdCluster::start("registry_ha", 3).await else {
        return;
    };
    let endpoints = etcd.endpoints();
    let Some((mut m, mut others)) = Mesh::start_set("reg-ha", &web_vm_catalog(false), 3, |cfg| {
        cfg.store = StoreSettings::Etcd(EtcdConfig::new(endpoints.clone()));
        cfg.vm_grace = GRACE;
    })
    .await
    else {
        return;
    };
    let gateways = [m.gateway(Net::A).await, m.gateway(Net::B).await];
    let _reviews = m
        .workload(
            Net::B,
            "10.10.0.5",
            "reviews-b1",
            "reviews",
            Default::default(),
        )
        .await;
    let vm = Vm::create(&m, Net::A, "web", VM_IP, "web", "web");
    let _app = vm.start_app(&m, APP_PORT, None);
    let _agent = vm.start_agent(&m, &[], &[]);
    vm.wait_ready().await;
    let registered = eventually(WAIT, || async {
        let dump = vm.admin("/config_dump").await;
        (dump["registration"]["connected"] == true).then_some(dump)
    })
    .await
    .unwrap_or_else(|| panic!("never registered:\n{}", vm.log()));
    let followed = registered["registration"]["registry"]
        .as_str()
        .expect("the registration names its registry")
        .to_string();
    assert!(
        m.registry_set.split(',').any(|a| a == followed),
        "{followed}"
    );

    // A watcher on a registry that stays, seeing the VM from before the stop to after the
    // lost registry's lease would have expired.
    let stays = std::iter::once(&m.reg)
        .chain(others.iter())
        .find(|r| r.grpc_addr().to_string() != followed)
        .unwrap();
    let creds = stays.credentials("shop", "watcher").await.unwrap();
    let mut watcher = stays
        .subscribe(&creds, &node("watcher", NodeKind::Workload, "network-a"))
        .await
        .unwrap();
    until(&mut watcher, has_vm).await;

    // Calls from the VM, by mesh name through B's gateway, every 50 ms.
    let calls = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let (calls, failures, stop) = (calls.clone(), failures.clone(), stop.clone());
        let ns = vm.ns.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (ok, out, err) = sh_in(
                    &ns,
                    "exec bash -c 'exec 3<>/dev/tcp/reviews.shop.svc.cluster.local/9080; head -1 <&3'",
                );
                calls.fetch_add(1, Ordering::SeqCst);
                if !ok || out.trim() != "reviews-b1" {
                    failures.lock().unwrap().push(format!("{out} {err}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    while calls.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stop the registry the agent follows.
    if m.reg.grpc_addr().to_string() == followed {
        m.reg.stop().await;
    } else {
        let i = others
            .iter()
            .position(|r| r.grpc_addr().to_string() == followed)
            .unwrap();
        others[i].stop().await;
    }
    let moved = eventually(WAIT, || async {
        let dump = vm.admin("/config_dump").await;
        let reg = &dump["registration"];
        (reg["connected"] == true
            && reg["registry"].as_str().is_some_and(|r| r != followed)
            && dump["catalog"]["connected"] == true
            && dump["catalog"]["registry"] != followed.as_str())
        .then_some(dump)
    })
    .await
    .unwrap_or_else(|| panic!("the agent did not move off {followed}:\n{}", vm.log()));
    println!(
        "agent moved from {followed} to {} (catalog {})",
        moved["registration"]["registry"], moved["catalog"]["registry"]
    );
    for gw in &gateways {
        let moved = eventually(WAIT, || async {
            let s = gw.sync.borrow().clone();
            (s.connected && s.registry.as_deref() != Some(followed.as_str())).then_some(())
        })
        .await;
        assert!(moved.is_some(), "a gateway did not move off {followed}");
    }
    // The VM's entry stays, well past the stopped registry's lease.
    always_for(&mut watcher, GRACE * 2, has_vm).await;

    stop.store(true, Ordering::SeqCst);
    caller.join().unwrap();
    let failures = failures.lock().unwrap();
    let calls = calls.load(Ordering::SeqCst);
    println!("{calls} calls across the move, {} failed", failures.len());
    assert!(calls >= 20, "only {calls} calls");
    assert!(failures.is_empty(), "failed calls: {failures:?}");
}
