//! Rolling a new image over three PXE-booted machines: a 3-replica job with a disruption
//! budget of 1 keeps at least two replicas running throughout `cellmaster reimage --to v2
//! --max-unavailable 1`, and every machine ends on v2 with a new boot id (kexec). A second
//! rollout to a v3 whose kernel is corrupted on the master stops at its first machine,
//! which refuses and stays on v2, and leaves the others untouched. A third, to a v4 that
//! cannot boot (its initramfs is garbage, signed as such), times out on its machine,
//! which is rolled back: it boots v2 again by PXE.
//!
//! v1, v2 and v3 are the test image under three versions: the same kernel and initramfs,
//! with the version in the manifest and on the kernel command line (which is where a node
//! reads its version from), so every version is a real, separately signed image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest;

use celld_system_tests::pxe::PxeCell;
use celld_system_tests::{Artifacts, artifacts, vm_turn};

const MACHINES: usize = 3;

/// The test image as `version`: its files with a manifest saying `version`.
fn relabel(a: &Artifacts, root: &Path, version: &str) -> PathBuf {
    let dir = root.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::copy(a.dir.join(f), dir.join(f)).unwrap();
    }
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.dir.join("manifest.json")).unwrap()).unwrap();
    m["version"] = version.into();
    m["kernel_cmdline"] = a
        .cmdline
        .replace(
            &format!("celld.image_version={}", a.version),
            &format!("celld.image_version={version}"),
        )
        .into();
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    dir
}

/// Node id -> (liveness, image version, boot id, cordoned).
fn nodes(cell: &PxeCell) -> BTreeMap<String, (String, String, String, bool)> {
    let nodes = cell.json(&["nodes"]);
    nodes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                    (
                        s("id"),
                        (
                            s("liveness"),
                            s("image_version"),
                            s("boot_id"),
                            n["cordoned"] == true,
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn running(cell: &PxeCell) -> usize {
    cell.tasks()
        .iter()
        .filter(|(_, s, _)| s == "running")
        .count()
}

#[test]
fn a_rollout_reimages_three_machines_within_the_budget_and_bad_images_stop_or_roll_back() {
    let a = artifacts();
    let _turn = vm_turn();
    let images = tempfile::tempdir().unwrap();
    let v1 = relabel(&a, images.path(), "v1");
    let v2 = relabel(&a, images.path(), "v2");
    let v3 = relabel(&a, images.path(), "v3");
    let mut cell = PxeCell::start(MACHINES, &["--image-dir", v1.to_str().unwrap()]);
    for i in 0..MACHINES {
        // Firmware reboots stay in QEMU: a node that cannot kexec reboots into PXE.
        cell.boot_machine(i, true);
    }
    let before = cell.wait("three nodes READY on v1", 400, || {
        let n = nodes(&cell);
        (n.len() == MACHINES && n.values().all(|(l, v, _, _)| l == "READY" && v == "v1"))
            .then_some(n)
    });
    for dir in [&v2, &v3] {
        let out = cell.cellmaster(&["image", "add", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    cell.submit_web(3, "[budget]\nmax_unavailable = 1\n");
    cell.wait("web's three replicas running, one per machine", 120, || {
        (cell.running_on().len() == MACHINES).then_some(())
    });

    // The rollout, watched: never fewer than two replicas running.
    let started = Instant::now();
    let mut reimage = cell
        .cellmaster_command(&["reimage", "--to", "v2", "--max-unavailable", "1"])
        .args(["--ready-timeout", "400", "--drain-timeout", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut fewest = MACHINES;
    // Per node: when it was told to reimage (booting) and when it was back (done).
    let mut booting: BTreeMap<String, Instant> = BTreeMap::new();
    let mut back: BTreeMap<String, Duration> = BTreeMap::new();
    let status = loop {
        if let Some(status) = reimage.try_wait().unwrap() {
            break status;
        }
        fewest = fewest.min(running(&cell));
        let rollout = cell.json(&["rollout", "status"]);
        for n in rollout["nodes"].as_array().into_iter().flatten() {
            let id = n["node"].as_str().unwrap_or_default().to_string();
            match n["phase"].as_str() {
                Some("booting") => {
                    booting.entry(id).or_insert_with(Instant::now);
                }
                Some("done") => {
                    if let Some(at) = booting.get(&id) {
                        back.entry(id).or_insert_with(|| at.elapsed());
                    }
                }
                _ => {}
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1500),
            "the rollout did not end\n{}",
            cell.consoles()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = started.elapsed();
    // The last node can finish between two looks: it was done by the time the command was.
    for (id, at) in &booting {
        back.entry(id.clone()).or_insert_with(|| at.elapsed());
    }
    let out = reimage.wait_with_output().unwrap();
    let progress = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        status.success(),
        "reimage --to v2 failed: {}\n{progress}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cell.consoles()
    );
    assert!(
        fewest >= 2,
        "only {fewest} replica(s) ran at one point\n{progress}"
    );
    let after = nodes(&cell);
    for (id, (liveness, version, boot, cordoned)) in &after {
        assert_eq!(
            (liveness.as_str(), version.as_str()),
            ("READY", "v2"),
            "{id}: {after:?}"
        );
        assert_ne!(boot, &before[id].2, "{id} has the boot id it had on v1");
        assert!(!cordoned, "{id} is still cordoned");
    }
    cell.wait("web's replicas all running after the rollout", 120, || {
        (running(&cell) == MACHINES).then_some(())
    });
    let status = cell.json(&["rollout", "status"]);
    println!(
        "rollout of {MACHINES} machines to v2: {:.1} s (TCG)\n{progress}\n{status:#}",
        took.as_secs_f64()
    );
    for (id, t) in &back {
        println!(
            "kexec reimage of {id}: Reimage accepted -> registered on v2 and Ready: {:.1} s",
            t.as_secs_f64()
        );
    }

    // For comparison, a full reboot through the firmware and PXE of one machine (reset
    // button: firmware, iPXE, the master's script, kernel and initramfs over HTTP).
    let reset_at = Instant::now();
    cell.reset_machine(0);
    let first = "node-770001".to_string();
    cell.wait("node-770001 back after a firmware reboot", 400, || {
        let n = nodes(&cell);
        let (liveness, version, boot, _) = n.get(&first)?;
        (liveness == "READY" && version == "v2" && boot != &after[&first].2).then_some(())
    });
    println!(
        "firmware + PXE reboot of {first}: reset -> registered on v2 and Ready: {:.1} s",
        reset_at.elapsed().as_secs_f64()
    );
    let after = nodes(&cell);
    cell.wait("web's replicas all running after the reset", 120, || {
        (running(&cell) == MACHINES).then_some(())
    });

    // v3's kernel is corrupted on the master after it was checked and signed: the first
    // machine refuses it, the rollout stops, nothing else is touched.
    let stored = cell.dir.path().join("images/v3/vmlinuz");
    let mut kernel = std::fs::read(&stored).unwrap();
    let middle = kernel.len() / 2;
    kernel[middle] ^= 0xff;
    std::fs::write(&stored, kernel).unwrap();
    let out = cell.cellmaster(&["reimage", "--to", "v3", "--max-unavailable", "1"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stopped at") && err.contains("sha256"),
        "{err}"
    );
    let status = cell.json(&["rollout", "status"]);
    let phases: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["failed", "queued", "queued"], "{status:#}");
    let last = nodes(&cell);
    for (id, (liveness, version, boot, cordoned)) in &last {
        assert_eq!(
            (liveness.as_str(), version.as_str()),
            ("READY", "v2"),
            "{id}: {last:?}"
        );
        assert_eq!(boot, &after[id].2, "{id} rebooted");
        assert!(!cordoned, "{id} is still cordoned");
    }

    // v4 is signed and checks out, but its initramfs is garbage: the kernel finds no
    // /init, panics and reboots (panic=-1) into PXE, which serves v4 until the master
    // gives up on it and assigns v2 again.
    let v4 = relabel(&a, images.path(), "v4");
    let garbage = vec![0x5au8; 64 << 10];
    std::fs::write(v4.join("initramfs.cpio.gz"), &garbage).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(v4.join("manifest.json")).unwrap()).unwrap();
    let sum: String = sha2::Sha256::digest(&garbage)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    m["artifacts"]["initramfs.cpio.gz"] = serde_json::json!({"sha256": sum, "size": garbage.len()});
    std::fs::write(
        v4.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    let out = cell.cellmaster(&["image", "add", v4.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = "node-770002".to_string();
    let out = cell.cellmaster(&[
        "reimage",
        "--to",
        "v4",
        "--nodes",
        &second,
        "--ready-timeout",
        "60",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}\n{}", cell.consoles());
    assert!(err.contains("not back on v4 within 60 s"), "{err}");
    let status = cell.json(&["rollout", "status"]);
    assert_eq!(status["nodes"][0]["phase"], "rolled-back", "{status:#}");
    cell.wait("node-770002 back on v2 after the rollback", 400, || {
        let n = nodes(&cell);
        let (liveness, version, boot, cordoned) = n.get(&second)?;
        (liveness == "READY" && version == "v2" && boot != &last[&second].2 && *cordoned)
            .then_some(())
    });
    // It stays cordoned for a person to look at; the others were never touched.
    let out = cell.cellmaster(&["uncordon", &second]);
    assert!(out.status.success());
    let end = nodes(&cell);
    for id in ["node-770001", "node-770003"] {
        assert_eq!(end[id].2, last[id].2, "{id} rebooted");
    }
    cell.keep_consoles("rollout.log");
}
