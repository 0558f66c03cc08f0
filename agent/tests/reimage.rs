//! Reimage on a celld daemon: every check a node makes before it would kexec, against a
//! small HTTP server in the test that serves good, corrupt, oversized and stalling
//! artifacts. A daemon never replaces its host's kernel, so the good path ends in a
//! refusal that starts with "verified"; every other case must name what failed, and the
//! node must keep serving its current image afterwards.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use common::Node;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const KERNEL_BYTES: usize = 96 << 10;
const INITRAMFS_BYTES: usize = 160 << 10;
/// The nodes' cap: both good artifacts fit, a 300 KiB one does not.
const CAP: u64 = 256 << 10;
const STALL_MS: u64 = 1500;

/// What the test server does for one path.
#[derive(Clone)]
enum Reply {
    /// 200 with a Content-Length.
    Body(Vec<u8>),
    /// 200 without a length, then these bytes and more of them, for ever.
    Endless(Vec<u8>),
    /// 200 with a Content-Length, the first half of the body, then nothing.
    Stall(Vec<u8>),
}

/// A tiny HTTP/1.1 server that records every path asked for.
struct Server {
    base: String,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(routes: BTreeMap<String, Reply>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(routes);
        let seen = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let routes = routes.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    seen.lock().unwrap().push(path.clone());
                    let _ = match routes.get(&path) {
                        None => {
                            conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                                .await
                        }
                        Some(Reply::Body(b)) => {
                            let h =
                                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len());
                            let _ = conn.write_all(h.as_bytes()).await;
                            conn.write_all(b).await
                        }
                        Some(Reply::Endless(b)) => {
                            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                            loop {
                                if conn.write_all(b).await.is_err() {
                                    break Ok(());
                                }
                            }
                        }
                        Some(Reply::Stall(b)) => {
                            let h =
                                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len());
                            let _ = conn.write_all(h.as_bytes()).await;
                            let _ = conn.write_all(&b[..b.len() / 2]).await;
                            tokio::time::sleep(Duration::from_secs(600)).await;
                            Ok(())
                        }
                    };
                });
            }
        });
        Server { base, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn asked_for(&self, path: &str) -> bool {
        self.hits.lock().unwrap().iter().any(|p| p == path)
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A manifest as `cellimg build` writes it, for a kernel and initramfs of these sizes
/// and digests.
fn manifest(version: &str, kernel: (&str, usize), initramfs: (&str, usize)) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "version": version,
        "celld_version": "0.1.0",
        "kernel_cmdline": format!("console=ttyS0 panic=-1 quiet celld.image_version={version}"),
        "artifacts": {
            "initramfs.cpio.gz": { "sha256": initramfs.0, "size": initramfs.1 },
            "vmlinuz": { "sha256": kernel.0, "size": kernel.1 },
        }
    }))
    .unwrap()
}

fn random_key() -> SigningKey {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .unwrap();
    SigningKey::from_bytes(&seed)
}

fn public_hex(key: &SigningKey) -> String {
    key.verifying_key()
        .as_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The test's world: a master key, the artifacts and the server serving them.
struct Cell {
    key: SigningKey,
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
    server: Server,
}

impl Cell {
    async fn new() -> Cell {
        let kernel = bytes(KERNEL_BYTES, 1);
        let initramfs = bytes(INITRAMFS_BYTES, 2);
        let mut corrupt = initramfs.clone();
        corrupt[1000] ^= 0xff;
        let routes = BTreeMap::from([
            ("/v2/vmlinuz".to_string(), Reply::Body(kernel.clone())),
            ("/v2/initramfs".to_string(), Reply::Body(initramfs.clone())),
            ("/corrupt/initramfs".to_string(), Reply::Body(corrupt)),
            (
                "/endless/vmlinuz".to_string(),
                Reply::Endless(kernel.clone()),
            ),
            ("/stall/vmlinuz".to_string(), Reply::Stall(kernel.clone())),
            (
                "/huge/vmlinuz".to_string(),
                Reply::Body(bytes(300 << 10, 3)),
            ),
        ]);
        Cell {
            key: random_key(),
            kernel,
            initramfs,
            server: Server::start(routes).await,
        }
    }

    fn good_manifest(&self, version: &str) -> Vec<u8> {
        manifest(
            version,
            (&sha256_hex(&self.kernel), self.kernel.len()),
            (&sha256_hex(&self.initramfs), self.initramfs.len()),
        )
    }

    /// A request for `v2` from the good paths, signed by the cell's key.
    fn request(&self) -> pb::ReimageRequest {
        let m = self.good_manifest("v2");
        pb::ReimageRequest {
            version: "v2".into(),
            kernel_url: self.server.url("/v2/vmlinuz"),
            initramfs_url: self.server.url("/v2/initramfs"),
            cmdline: "console=ttyS0 celld.image_version=v2".into(),
            manifest_signature: self.key.sign(&m).to_bytes().to_vec(),
            manifest: m,
        }
    }

    fn signed(&self, mut r: pb::ReimageRequest, manifest: Vec<u8>) -> pb::ReimageRequest {
        r.manifest_signature = self.key.sign(&manifest).to_bytes().to_vec();
        r.manifest = manifest;
        r
    }

    /// A daemon that trusts this cell's key (given in its config file), with a small
    /// cap and a short stall timeout.
    async fn node(&self) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                "master_key = \"{}\"\nreimage_max_bytes = {CAP}\nreimage_stall_ms = {STALL_MS}\n",
                public_hex(&self.key)
            ),
        )
        .unwrap();
        let node = Node::start_with(&["--config", config.to_str().unwrap()]).await;
        drop(dir);
        node
    }
}

/// Sends `req`, expects a refusal with `code` whose message contains `needle`, and
/// checks that the node still serves its own image and reports the refusal.
async fn refused(node: &mut Node, req: pb::ReimageRequest, code: Code, needle: &str) -> String {
    let e = node
        .client
        .reimage(req)
        .await
        .expect_err("the node accepted a reimage it had to refuse");
    assert_eq!(e.code(), code, "{e:?}\ncelld log:\n{}", node.log());
    assert!(
        e.message().contains(needle),
        "expected {needle:?} in {:?}",
        e.message()
    );
    let status = node.status().await;
    assert_eq!(status.mode, "daemon");
    assert_eq!(status.image_version, "", "the node's image must not change");
    assert!(!status.reimage_in_progress, "{status:#?}");
    assert_eq!(status.last_reimage_error, e.message());
    e.message().to_string()
}

/// The good request passes every check and the daemon refuses only at the kexec.
async fn verified(node: &mut Node, cell: &Cell) {
    let msg = refused(node, cell.request(), Code::FailedPrecondition, "not PID 1").await;
    assert!(msg.starts_with("verified v2"), "{msg}");
    assert!(
        msg.contains(&format!("{KERNEL_BYTES}-byte vmlinuz")),
        "{msg}"
    );
}

#[tokio::test]
async fn a_good_image_passes_every_check_and_a_daemon_still_refuses_to_kexec() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    verified(&mut node, &cell).await;
    assert!(cell.server.asked_for("/v2/vmlinuz") && cell.server.asked_for("/v2/initramfs"));
    // The same again: one refusal does not leave the node stuck "under way".
    verified(&mut node, &cell).await;
}

#[tokio::test]
async fn a_node_without_master_key_trusts_no_image() {
    let cell = Cell::new().await;
    let mut node = Node::start().await;
    refused(
        &mut node,
        cell.request(),
        Code::FailedPrecondition,
        "no master_key configured: this node trusts no image",
    )
    .await;
    assert!(!cell.server.asked_for("/v2/vmlinuz"));
}

#[tokio::test]
async fn a_manifest_not_signed_by_the_master_key_is_refused_before_any_download() {
    let cell = Cell::new().await;
    // This node trusts the key given by flag; the cell signs with another one.
    let other = random_key();
    let mut node = Node::start_with(&["--master-key", &public_hex(&other)]).await;
    let sig = "manifest signature does not verify with this node's master_key";
    refused(&mut node, cell.request(), Code::PermissionDenied, sig).await;
    // Signed by the right key, then changed: the signature covers the exact bytes.
    let mut r = cell.request();
    r.manifest_signature = other.sign(&r.manifest).to_bytes().to_vec();
    let text = String::from_utf8(r.manifest.clone()).unwrap();
    r.manifest = text
        .replace("\"size\": 98304", "\"size\": 98305")
        .into_bytes();
    assert_ne!(r.manifest, cell.request().manifest);
    refused(&mut node, r, Code::PermissionDenied, sig).await;
    let mut r = cell.request();
    r.manifest_signature.truncate(10);
    refused(&mut node, r, Code::InvalidArgument, "manifest_signature").await;
    assert!(!cell.server.asked_for("/v2/vmlinuz"));
}

#[tokio::test]
async fn the_version_must_be_the_manifests() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let mut r = cell.request();
    r.version = "v3".into();
    let msg = refused(&mut node, r, Code::InvalidArgument, "version: ").await;
    assert!(msg.contains("\"v3\"") && msg.contains("\"v2\""), "{msg}");
    let mut r = cell.request();
    r.version.clear();
    refused(&mut node, r, Code::InvalidArgument, "version: is required").await;
    let r = cell.signed(cell.request(), b"{\"version\": \"v2\"}".to_vec());
    refused(&mut node, r, Code::InvalidArgument, "manifest: ").await;
}

#[tokio::test]
async fn only_plain_http_urls_are_fetched() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let mut r = cell.request();
    r.kernel_url = "https://10.0.2.2/v2/vmlinuz".into();
    refused(&mut node, r, Code::InvalidArgument, "kernel_url: ").await;
    let mut r = cell.request();
    r.initramfs_url = "file:///boot/initrd.img".into();
    refused(&mut node, r, Code::InvalidArgument, "initramfs_url: ").await;
    let mut r = cell.request();
    r.kernel_url = cell.server.url("/missing");
    refused(&mut node, r, Code::FailedPrecondition, "HTTP 404").await;
}

#[tokio::test]
async fn a_corrupt_initramfs_fails_its_sha256() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let mut r = cell.request();
    r.initramfs_url = cell.server.url("/corrupt/initramfs");
    let msg = refused(
        &mut node,
        r,
        Code::DataLoss,
        "initramfs.cpio.gz: sha256 mismatch: got ",
    )
    .await;
    let want = format!("manifest says {}", sha256_hex(&cell.initramfs));
    assert!(msg.ends_with(&want), "{msg}");
}

#[tokio::test]
async fn an_artifact_over_the_cap_is_refused_before_downloading() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let huge = bytes(300 << 10, 3);
    let m = manifest(
        "v2",
        (&sha256_hex(&huge), huge.len()),
        (&sha256_hex(&cell.initramfs), cell.initramfs.len()),
    );
    let mut r = cell.signed(cell.request(), m);
    r.kernel_url = cell.server.url("/huge/vmlinuz");
    let msg = refused(&mut node, r, Code::FailedPrecondition, "kernel too big: ").await;
    assert_eq!(
        msg,
        format!("kernel too big: {} bytes over the cap of {CAP}", 300 << 10)
    );
    assert!(!cell.server.asked_for("/huge/vmlinuz"));
}

#[tokio::test]
async fn a_download_longer_than_the_manifest_says_is_cut_off() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let mut r = cell.request();
    r.kernel_url = cell.server.url("/endless/vmlinuz");
    let started = Instant::now();
    let msg = refused(&mut node, r, Code::DataLoss, "aborted there").await;
    assert!(
        msg.contains(&format!("the manifest says {KERNEL_BYTES}")),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stalled_download_is_abandoned_and_one_reimage_runs_at_a_time() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let mut r = cell.request();
    r.kernel_url = cell.server.url("/stall/vmlinuz");
    let url = r.kernel_url.clone();
    let mut first_client = node.client.clone();
    let started = Instant::now();
    let first = tokio::spawn(async move { first_client.reimage(r).await });
    while !cell.server.asked_for("/stall/vmlinuz") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no download began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(node.status().await.reimage_in_progress);
    let second = node.client.reimage(cell.request()).await.unwrap_err();
    assert_eq!(second.code(), Code::Aborted, "{second:?}");
    assert_eq!(second.message(), "a reimage is already under way");

    let e = first.await.unwrap().unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message()
            .starts_with(&format!("download of {url} stalled")),
        "{e:?}"
    );
    assert!(
        took >= Duration::from_millis(STALL_MS) && took < Duration::from_millis(STALL_MS + 3000),
        "the stall was noticed after {took:?}, configured {STALL_MS} ms"
    );
    println!("stall of {STALL_MS} ms noticed after {took:?}");
    // The turn is free again and the node still serves.
    verified(&mut node, &cell).await;
}

#[tokio::test]
async fn a_call_that_ends_early_leaves_the_node_free_and_says_so() {
    let cell = Cell::new().await;
    let mut node = cell.node().await;
    let mut r = cell.request();
    r.kernel_url = cell.server.url("/stall/vmlinuz");
    // The caller's deadline passes during the (stalling) download.
    let mut call = tonic::Request::new(r);
    call.set_timeout(Duration::from_millis(300));
    let e = node.client.reimage(call).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(cell.server.asked_for("/stall/vmlinuz"));
    // The server's own timer for the call ends a moment after the client's.
    let ended = Instant::now();
    let status = loop {
        let status = node.status().await;
        if !status.reimage_in_progress || ended.elapsed() > Duration::from_secs(5) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.reimage_in_progress, "{status:#?}");
    assert!(
        status
            .last_reimage_error
            .starts_with("the Reimage call ended before the node finished"),
        "{status:#?}"
    );
    verified(&mut node, &cell).await;
}

#[tokio::test]
async fn a_bad_master_key_stops_the_daemon_and_names_the_field() {
    common::require_root();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celld"))
        .args(["--listen", "127.0.0.1:0", "--master-key", "not-hex"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("master_key"), "{err}");
}
