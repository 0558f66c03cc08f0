//! The master's HTTP side (default port 7080): the iPXE script a PXE-booting machine
//! chains to, and the image artifacts it then fetches. GET only, small, and strict about
//! what it serves: names of the image directory's artifacts, nothing else.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The files of a `cellimg build` output that may be fetched.
const ARTIFACTS: &[&str] = &["vmlinuz", "initramfs.cpio.gz", "manifest.json"];
const MAX_REQUEST: usize = 8 * 1024;

pub struct BootServer {
    /// A `cellimg build` output directory.
    pub image_dir: PathBuf,
    /// gRPC port of the master, put on the booted node's command line.
    pub grpc_port: u16,
}

/// The iPXE script for a machine; `host` is the address it reached us on.
pub fn ipxe_script(host: &str, http_port: u16, grpc_port: u16, cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         kernel http://{host}:{http_port}/images/vmlinuz initrd=initrd {cmdline} celld.master={host}:{grpc_port}\n\
         initrd --name initrd http://{host}:{http_port}/images/initramfs.cpio.gz\n\
         boot\n"
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
    fn cmdline(&self) -> String {
        std::fs::read(self.image_dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|m| m["kernel_cmdline"].as_str().map(str::to_string))
            .unwrap_or_else(|| "console=ttyS0".into())
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
        let route = path.split('?').next().unwrap_or("");
        if route == "/ipxe" {
            let host = stream.local_addr()?.ip().to_string();
            let port = stream.local_addr()?.port();
            let script = ipxe_script(&host, port, self.grpc_port, &self.cmdline());
            return respond(stream, 200, "text/plain", script.as_bytes()).await;
        }
        if let Some(name) = route.strip_prefix("/images/")
            && ARTIFACTS.contains(&name)
        {
            return match tokio::fs::read(self.image_dir.join(name)).await {
                Ok(body) => respond(stream, 200, "application/octet-stream", &body).await,
                Err(_) => respond(stream, 404, "text/plain", b"no such artifact\n").await,
            };
        }
        respond(stream, 404, "text/plain", b"not found\n").await
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
        let s = ipxe_script(
            "10.0.0.1",
            7080,
            7000,
            "console=ttyS0 celld.image_version=v1",
        );
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.0.0.1:7080/images/vmlinuz initrd=initrd console=ttyS0 celld.image_version=v1 celld.master=10.0.0.1:7000"));
        assert!(s.contains("initrd --name initrd http://10.0.0.1:7080/images/initramfs.cpio.gz"));
    }

    #[tokio::test]
    async fn artifacts_are_served_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"KERNEL").unwrap();
        std::fs::write(dir.path().join("secret"), b"no").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(BootServer {
            image_dir: dir.path().into(),
            grpc_port: 7000,
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
        let k = get("/images/vmlinuz").await;
        assert!(
            k.starts_with("HTTP/1.1 200") && k.ends_with("KERNEL"),
            "{k}"
        );
        assert!(get("/images/secret").await.starts_with("HTTP/1.1 404"));
        assert!(
            get("/images/../Cargo.toml")
                .await
                .starts_with("HTTP/1.1 404")
        );
        let script = get("/ipxe?mac=52:54:00:00:00:01").await;
        assert!(script.contains("celld.master=127.0.0.1:7000"), "{script}");
    }
}
