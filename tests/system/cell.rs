//! A cell on one machine: a bridge in a network namespace, dnsmasq handing out addresses
//! and the master's iPXE URL, cellmaster serving iPXE, the image and gRPC, and two QEMU
//! machines that PXE-boot through their NIC's iPXE ROM into the image, register with the
//! master and are polled by it; a job's two replicas run one on each machine, and when one
//! machine is switched off its replica moves to the other. All of it over mutual TLS: the
//! image is built without `celld.insecure=1`, the nodes join with the PXE token and the
//! CA fingerprint the iPXE script hands them.

use celld_system_tests::pxe::PxeCell;
use celld_system_tests::{artifacts_named, vm_turn};

#[test]
fn two_machines_pxe_boot_from_the_master_register_and_run_a_jobs_replicas() {
    let a = artifacts_named("CELLD_ARTIFACTS_SECURE");
    assert!(
        !a.cmdline.contains("celld.insecure"),
        "CELLD_ARTIFACTS_SECURE is built with celld.insecure: {}",
        a.cmdline
    );
    let _turn = vm_turn();
    let mut cell = PxeCell::start_secure(2, &["--image-dir", a.dir.to_str().unwrap()]);
    for i in 0..2 {
        cell.boot_machine(i, false);
    }
    let nodes = cell.wait("two nodes READY", 300, || {
        let nodes = cell.json(&["nodes"]);
        let list = nodes.as_array()?.clone();
        (list.iter().filter(|n| n["liveness"] == "READY").count() == 2).then_some(list)
    });
    let mut ids: Vec<&str> = nodes.iter().map(|n| n["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["node-770001", "node-770002"], "{nodes:#?}");
    for n in &nodes {
        assert_eq!(n["image_version"], a.version.as_str(), "{n:#?}");
        assert!(
            n["address"].as_str().unwrap().starts_with("10.77.0.1"),
            "{n:#?}"
        );
    }

    // Both joined with the token; each got a certificate for its node id.
    let log = std::fs::read_to_string(cell.dir.path().join("master.log")).unwrap();
    let joined = log
        .lines()
        .filter(|l| l.contains("node registered") && l.contains("join token"))
        .count();
    assert!(joined >= 2, "registrations by join token: {joined}\n{log}");

    // A job of two replicas from the image's busybox rootfs: one on each machine.
    cell.submit_web(2, "");
    cell.wait("web's replicas running on both machines", 120, || {
        (cell.running_on() == ["node-770001", "node-770002"]).then_some(())
    });

    // The second machine is switched off: its replica moves to the first.
    cell.kill_machine(1);
    cell.wait("the switched-off machine's replica moved", 120, || {
        let t = cell.tasks();
        (t.len() == 2
            && t.iter()
                .all(|(_, state, node)| state == "running" && node == "node-770001"))
        .then_some(())
    });
    cell.keep_consoles("cell.log");
}
