//! The master's HTTP side (default port 7080): the iPXE scripts a PXE-booting machine
//! chains to, and the image artifacts it then fetches. GET only, small, and strict about
//! what it serves: the files of stored image versions, nothing else.
//!
//! - `/ipxe`: chains to `/ipxe?mac=${net0/mac:hexhyp}`, so iPXE says which machine it is;
//! - `/ipxe?mac=aa-bb-..`: boots the version assigned to that machine (its node's
//!   `boot_version`), or the default version for a machine the master does not know;
//! - `/images/<version>/<file>`: manifest.json, manifest.sig, vmlinuz, initramfs.cpio.gz;
//! - `/images/<file>`: the default version's file.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::normal_mac;
use crate::images::ImageStore;
use crate::store::Store;

const MAX_REQUEST: usize = 8 * 1024;

pub struct BootServer {
    pub images: Arc<ImageStore>,
    /// Nodes, to find a machine by MAC.
    pub store: Arc<dyn Store>,
    /// gRPC port of the master, put on the booted node's command line.
    pub grpc_port: u16,
    /// The cell CA's fingerprint, put there too (None: the master runs --insecure).
    pub ca_fingerprint: Option<String>,
}

/// Where a booted node finds its master and the key it trusts images from.
pub struct MasterRef<'a> {
    pub host: &'a str,
    pub http_port: u16,
    pub grpc_port: u16,
    pub key_hex: &'a str,
    /// The cell CA's fingerprint (`celld.ca=`); None with `--insecure`.
    pub ca_fingerprint: Option<&'a str>,
    /// A join token for the booted node (`celld.join=`).
    pub join: Option<&'a str>,
}

impl MasterRef<'_> {
    /// The kernel command line of `version`: the image's own plus the master's.
    pub fn cmdline(&self, image_cmdline: &str) -> String {
        let mut line = format!(
            "{image_cmdline} celld.master={}:{} celld.master_key={}",
            self.host, self.grpc_port, self.key_hex
        );
        if let Some(fp) = self.ca_fingerprint {
            line.push_str(&format!(" celld.ca={fp}"));
        }
        if let Some(token) = self.join {
            line.push_str(&format!(" celld.join={token}"));
        }
        line
    }

    pub fn artifact_url(&self, version: &str, name: &str) -> String {
        format!(
            "http://{}:{}/images/{version}/{name}",
            self.host, self.http_port
        )
    }
}

/// The iPXE script that boots `version` with `cmdline`.
pub fn ipxe_script(m: &MasterRef, version: &str, image_cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         kernel {} initrd=initrd {}\n\
         initrd --name initrd {}\n\
         boot\n",
        m.artifact_url(version, "vmlinuz"),
        m.cmdline(image_cmdline),
        m.artifact_url(version, "initramfs.cpio.gz"),
    )
}

/// Parses `GET <path> HTTP/1.x` and returns the path; None for anything else.
pub fn request_path(head: &str) -> Option<&str> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    (method == "GET" && version.starts_with("HTTP/1.") && path.starts_with('/')).then_some(path)
}

impl BootServer {
    /// The version a machine with `mac` boots.
    fn version_for(&self, mac: &str) -> Option<String> {
        let mac = normal_mac(mac)?;
        let assigned = self
            .store
            .list_nodes()
            .ok()?
            .into_iter()
            .find(|n| n.macs.contains(&mac))
            .map(|n| n.boot_version)
            .filter(|v| !v.is_empty() && self.images.artifact(v, "manifest.json").is_some());
        assigned.or_else(|| self.images.default_version())
    }

    async fn answer(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_REQUEST];
        let mut len = 0;
        while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            if len == buf.len() {
                return respond(stream, 431, "text/plain", b"request too large\n").await;
            }
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok(());
            }
            len += n;
        }
        let head = String::from_utf8_lossy(&buf[..len]).into_owned();
        let Some(path) = request_path(&head) else {
            return respond(stream, 400, "text/plain", b"GET only\n").await;
        };
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        let local = stream.local_addr()?;
        let host = local.ip().to_string();
        let key = self.images.public_key_hex();
        // Only a token made with `token create --pxe` is handed out, and only while it
        // lasts: anyone on the boot network can read this script.
        let join = match self.ca_fingerprint {
            Some(_) => self
                .store
                .pxe_token(celld_trust::ca::now_secs())
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "reading the PXE join token");
                    None
                }),
            None => None,
        };
        let master = MasterRef {
            host: &host,
            http_port: local.port(),
            grpc_port: self.grpc_port,
            key_hex: &key,
            ca_fingerprint: self.ca_fingerprint.as_deref(),
            join: join.as_deref(),
        };
        if route == "/ipxe" {
            let mac = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("mac="))
                .unwrap_or("");
            if mac.is_empty() {
                let script = format!(
                    "#!ipxe\nchain http://{host}:{}/ipxe?mac=${{net0/mac:hexhyp}}\n",
                    local.port()
                );
                return respond(stream, 200, "text/plain", script.as_bytes()).await;
            }
            let Some(image) = self.version_for(mac).and_then(|v| self.images.get(&v).ok()) else {
                return respond(stream, 404, "text/plain", b"no image to boot\n").await;
            };
            tracing::info!(%mac, version = %image.version, "PXE boot");
            let script = ipxe_script(&master, &image.version, &image.kernel_cmdline);
            return respond(stream, 200, "text/plain", script.as_bytes()).await;
        }
        let file = match route.strip_prefix("/images/").map(|r| r.split_once('/')) {
            Some(Some((version, name))) => self.images.artifact(version, name),
            Some(None) => self
                .images
                .default_version()
                .and_then(|v| self.images.artifact(&v, &route["/images/".len()..])),
            None => None,
        };
        match file {
            Some(path) => match tokio::fs::read(path).await {
                Ok(body) => respond(stream, 200, "application/octet-stream", &body).await,
                Err(_) => respond(stream, 404, "text/plain", b"no such artifact\n").await,
            },
            None => respond(stream, 404, "text/plain", b"not found\n").await,
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    kind: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// Serves forever (until the task is dropped).
pub async fn serve_http(listener: TcpListener, server: Arc<BootServer>) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                server.answer(&mut stream),
            )
            .await;
            if !matches!(answered, Ok(Ok(()))) {
                tracing::debug!(%peer, "http request failed or timed out");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_gets_are_understood() {
        assert_eq!(
            request_path("GET /ipxe?mac=aa HTTP/1.1\r\n"),
            Some("/ipxe?mac=aa")
        );
        assert_eq!(request_path("POST /ipxe HTTP/1.1\r\n"), None);
        assert_eq!(request_path("GET ipxe HTTP/1.1\r\n"), None);
        assert_eq!(request_path("garbage"), None);
    }

    #[test]
    fn the_script_points_back_at_the_master() {
        let m = MasterRef {
            host: "10.0.0.1",
            http_port: 7080,
            grpc_port: 7000,
            key_hex: "ab12",
            ca_fingerprint: None,
            join: None,
        };
        let s = ipxe_script(&m, "v1", "console=ttyS0 celld.image_version=v1");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.0.0.1:7080/images/v1/vmlinuz initrd=initrd console=ttyS0 celld.image_version=v1 celld.master=10.0.0.1:7000 celld.master_key=ab12"), "{s}");
        assert!(
            s.contains("initrd --name initrd http://10.0.0.1:7080/images/v1/initramfs.cpio.gz")
        );
    }

    #[tokio::test]
    async fn artifacts_are_served_and_machines_boot_their_version() {
        use crate::images::sha256_hex;
        use crate::store::{NodeRow, SqliteStore};
        let dir = tempfile::tempdir().unwrap();
        let images = Arc::new(ImageStore::open(dir.path()).unwrap());
        for v in ["v1", "v2"] {
            let (k, i) = (format!("KERNEL-{v}"), format!("INITRAMFS-{v}"));
            let manifest = serde_json::json!({"version": v, "kernel_cmdline": format!("c={v}"),
                "artifacts": {"vmlinuz": {"sha256": sha256_hex(k.as_bytes()), "size": k.len()},
                "initramfs.cpio.gz": {"sha256": sha256_hex(i.as_bytes()), "size": i.len()}}});
            images
                .add(&[
                    (
                        "manifest.json".into(),
                        serde_json::to_vec(&manifest).unwrap(),
                    ),
                    ("vmlinuz".into(), k.into_bytes()),
                    ("initramfs.cpio.gz".into(), i.into_bytes()),
                ])
                .unwrap();
        }
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        store
            .put_node(&NodeRow {
                id: "n2".into(),
                macs: vec!["52:54:00:00:00:02".into()],
                boot_version: "v2".into(),
                ..Default::default()
            })
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(BootServer {
            images,
            store,
            grpc_port: 7000,
            ca_fingerprint: None,
        });
        tokio::spawn(serve_http(listener, server));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let k = get("/images/v2/vmlinuz").await;
        assert!(
            k.starts_with("HTTP/1.1 200") && k.ends_with("KERNEL-v2"),
            "{k}"
        );
        // The default's files without a version.
        assert!(get("/images/vmlinuz").await.ends_with("KERNEL-v1"));
        assert!(get("/images/v1/secret").await.starts_with("HTTP/1.1 404"));
        assert!(get("/images/../state.db").await.starts_with("HTTP/1.1 404"));
        assert!(
            get("/images/v1/../../state.db")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(get("/images/v3/vmlinuz").await.starts_with("HTTP/1.1 404"));
        let chain = get("/ipxe").await;
        assert!(chain.contains("/ipxe?mac=${net0/mac:hexhyp}"), "{chain}");
        // A known machine boots its version, an unknown one the default.
        let script = get("/ipxe?mac=52-54-00-00-00-02").await;
        assert!(
            script.contains("/images/v2/vmlinuz") && script.contains("c=v2"),
            "{script}"
        );
        assert!(
            script.contains("celld.master=127.0.0.1:7000 celld.master_key="),
            "{script}"
        );
        let script = get("/ipxe?mac=52-54-00-00-00-09").await;
        assert!(script.contains("/images/v1/vmlinuz"), "{script}");
    }
}
