//! Images and rollouts against a real master and real celld daemons on loopback. A
//! daemon refuses to kexec its host, so here a rollout stops at its first node: that
//! node is uncordoned with its tasks moved safely, and the other nodes are untouched. The
//! whole way through (kexec, new boot, version) runs in the QEMU system test. A rollout
//! survives `kill -9` of the master.

mod common;

use std::path::{Path, PathBuf};

use common::Cell;
use sha2::Digest;

/// A `cellimg build`-shaped directory with a matching manifest.
fn fake_image(root: &Path, version: &str) -> PathBuf {
    let dir = root.join(format!("image-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, initramfs) = (format!("kernel {version}"), format!("initramfs {version}"));
    let sum = |b: &str| {
        sha2::Sha256::digest(b.as_bytes())
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let manifest = serde_json::json!({
        "version": version, "kernel_cmdline": "console=ttyS0",
        "artifacts": {
            "vmlinuz": {"sha256": sum(&kernel), "size": kernel.len()},
            "initramfs.cpio.gz": {"sha256": sum(&initramfs), "size": initramfs.len()},
        }
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(dir.join("vmlinuz"), kernel).unwrap();
    std::fs::write(dir.join("initramfs.cpio.gz"), initramfs).unwrap();
    dir
}

fn cell_with_http() -> Cell {
    let port = common::free_port();
    Cell::with(300, |cell| {
        cell.serve_args = vec!["--http".into(), format!("127.0.0.1:{port}")];
    })
}

#[test]
fn images_are_checked_signed_and_listed() {
    let cell = cell_with_http();
    let v1 = fake_image(cell.dir.path(), "v1");
    let out = cell.cli(&["image", "add", v1.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("image v1 added") && out.stdout.contains("the default"));
    let again = cell.cli(&["image", "add", v1.to_str().unwrap()]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("exists"), "{again:?}");
    // An artifact that does not match its manifest is refused, and nothing is kept.
    let bad = fake_image(cell.dir.path(), "v2");
    std::fs::write(bad.join("vmlinuz"), "kernel v3").unwrap();
    let out = cell.cli(&["image", "add", bad.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("vmlinuz: sha256"), "{out:?}");
    let list = cell.json(&["image", "list"]);
    assert_eq!(list["images"].as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list["images"][0]["default"], true);
    assert_eq!(list["master_key"].as_str().unwrap().len(), 64);
    // The key lives with the master's state, readable by it alone.
    let key = cell.dir.path().join("master-signing.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bad_rollouts_start_nothing_and_a_refusing_node_stops_the_rollout() {
    let mut cell = cell_with_http();
    cell.add_node("alpha");
    cell.add_node("beta");
    cell.wait_ready(&["alpha", "beta"]);
    let v2 = fake_image(cell.dir.path(), "v2");
    assert_eq!(cell.cli(&["image", "add", v2.to_str().unwrap()]).code, 0);
    let out = cell.submit(
        "web",
        "replicas = 2\n[resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    cell.wait("web running", 30, || {
        let t = cell.tasks();
        (t.len() == 2 && t.values().all(|(s, _)| s == "running")).then_some(())
    });

    // Bad requests: clear errors, and no rollout.
    let cases: [(&[&str], i32, &str); 4] = [
        (&["reimage", "--to", "v9"], 4, "not stored"),
        (
            &["reimage", "--to", "v2", "--nodes", "zone=mars"],
            1,
            "matches no node",
        ),
        (
            &["reimage", "--to", "v2", "--nodes", "gamma"],
            1,
            "not in the cell",
        ),
        (
            &["reimage", "--to", "v2", "--max-unavailable", "0"],
            2,
            "at least 1",
        ),
    ];
    for (args, code, says) in cases {
        let out = cell.cli(args);
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {out:?}");
    }
    assert_eq!(cell.cli(&["rollout", "status"]).code, 4);

    // A daemon refuses to kexec its host: the rollout drains alpha, is refused there,
    // stops, and gives alpha back; beta is never touched.
    let out = cell.cli(&["reimage", "--to", "v2", "--nodes", "alpha"]);
    assert_eq!(out.code, 1, "{out:?}\n{}", cell.log());
    assert!(out.stderr.contains("stopped at alpha: refused"), "{out:?}");
    let status = cell.json(&["rollout", "status"]);
    assert_eq!(status["state"], "failed", "{status:#}");
    assert_eq!(status["nodes"][0]["phase"], "failed", "{status:#}");
    let nodes = cell.json(&["nodes"]);
    for n in nodes.as_array().unwrap() {
        assert_eq!(n["cordoned"], false, "{n:#}");
    }
    let t = cell.tasks();
    assert!(t.values().all(|(s, _)| s == "running"), "{t:#?}");
    cell.assert_no_duplicates();

    // One rollout at a time: a rollout held up by a drain that cannot finish (nothing
    // else has room for its task) refuses a second, and can be aborted.
    let out = cell.submit(
        "big",
        "replicas = 2\n[resources]\nmemory = \"8MiB\"\ncpu_millis = 1700\n[budget]\nmax_unavailable = 2\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    cell.wait("big running", 30, || {
        (cell
            .tasks()
            .iter()
            .filter(|(id, (s, _))| id.starts_with("big-") && s == "running")
            .count()
            == 2)
            .then_some(())
    });
    let out = cell.cli(&["reimage", "--to", "v2", "--nodes", "beta", "--detach"]);
    assert_eq!(out.code, 0, "{out:?}");
    let second = cell.cli(&["reimage", "--to", "v2", "--nodes", "alpha"]);
    assert_eq!(second.code, 1, "{second:?}");
    assert!(second.stderr.contains("is running"), "{second:?}");
    let paused = cell.json(&["rollout", "pause"]);
    assert_eq!(paused["state"], "paused", "{paused:#}");
    let resumed = cell.json(&["rollout", "resume"]);
    assert_eq!(resumed["state"], "running", "{resumed:#}");
    // The rollout lives in the store: a master killed with -9 finds it where it was.
    cell.kill_master();
    cell.start_master();
    let kept = cell.json(&["rollout", "status"]);
    assert_eq!(kept["state"], "running", "{kept:#}");
    assert_eq!(kept["nodes"][0]["node"], "beta", "{kept:#}");
    assert_eq!(kept["nodes"][0]["phase"], "draining", "{kept:#}");
    let again = cell.cli(&["reimage", "--to", "v2", "--nodes", "alpha"]);
    assert!(again.stderr.contains("is running"), "{again:?}");
    let aborted = cell.json(&["rollout", "abort"]);
    assert_eq!(aborted["state"], "aborted", "{aborted:#}");
    assert_eq!(cell.cli(&["rollout", "abort"]).code, 1);
}
