//! Downloads one artifact over plain HTTP/1.1 into an anonymous memory file, hashing as
//! it goes. Small on purpose: one GET, no redirects, no keep-alive, no chunked bodies.
//! Every read is bounded by the stall timeout and every byte by the manifest's size, so
//! a slow, endless or oversized answer costs the node at most `size` bytes of memory.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ReimageError;

/// Largest response head (status line and headers) read before giving up.
const MAX_HEAD_BYTES: usize = 16 << 10;

/// An `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Starts with '/'; may carry a query.
    pub path: String,
}

/// Parses `url` as given in the request's `field`.
pub fn parse_url(field: &'static str, url: &str) -> Result<HttpUrl, ReimageError> {
    let bad = |problem: &str| ReimageError::Url {
        field,
        url: url.to_string(),
        problem: problem.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only plain http:// URLs are supported"))?;
    // Anything a request line or a header could be bent with is refused outright.
    if rest.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("has spaces or control characters"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => return Err(bad("has no /path after the host")),
    };
    if authority.contains('@') {
        return Err(bad("user information in the URL is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("has an unclosed [ in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("has a port that is not 1 to 65535"))?,
    };
    Ok(HttpUrl {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// What a finished download holds.
pub struct Downloaded {
    pub file: OwnedFd,
    pub sha256: String,
    pub bytes: u64,
}

/// Limits of one download.
pub struct Limits {
    /// The manifest's size: more is refused as soon as it arrives, less at the end.
    pub size: u64,
    /// No byte for this long: the download stalled.
    pub stall: Duration,
}

/// GETs `url` into a new memory file named `name`.
pub async fn download(
    url_text: &str,
    url: &HttpUrl,
    name: &str,
    limits: &Limits,
) -> Result<Downloaded, ReimageError> {
    let http = |problem: String| ReimageError::Http {
        url: url_text.to_string(),
        problem,
    };
    let stalled = || ReimageError::Stalled {
        url: url_text.to_string(),
        ms: limits.stall.as_millis() as u64,
    };
    let within = |fut| async {
        match tokio::time::timeout(limits.stall, fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        }
    };
    let connect = TcpStream::connect((url.host.as_str(), url.port));
    let mut stream = match tokio::time::timeout(limits.stall, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(http(format!("connect: {e}"))),
        Err(_) => return Err(stalled()),
    };
    let host_header = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: celld/{}\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        url.path,
        env!("CARGO_PKG_VERSION")
    );
    match within(Box::pin(stream.write_all(request.as_bytes()))).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(stalled()),
        Err(e) => return Err(http(format!("sending the request: {e}"))),
    }

    // The head, read in pieces until the blank line; what follows it is body.
    let mut head = Vec::with_capacity(1024);
    let mut buf = vec![0u8; 64 << 10];
    let body_start = loop {
        let n = match tokio::time::timeout(limits.stall, stream.read(&mut buf)).await {
            Err(_) => return Err(stalled()),
            Ok(Err(e)) => return Err(http(format!("reading the response: {e}"))),
            Ok(Ok(0)) => return Err(http("connection closed before the response head".into())),
            Ok(Ok(n)) => n,
        };
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(http(format!(
                "response head longer than {MAX_HEAD_BYTES} bytes"
            )));
        }
    };
    let content_length = check_head(&head[..body_start]).map_err(http)?;
    if let Some(len) = content_length.filter(|len| *len != limits.size) {
        return Err(ReimageError::WrongSize {
            url: url_text.to_string(),
            got: len,
            want: limits.size,
            when: "the server's Content-Length",
        });
    }

    let memfd = nix::sys::memfd::memfd_create(
        &std::ffi::CString::new(format!("celld-reimage-{name}")).unwrap_or_default(),
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| ReimageError::Memory {
        problem: format!("memfd_create: {}", e.desc()),
    })?;
    let mut sink = Sink {
        file: std::fs::File::from(memfd),
        hasher: Sha256::new(),
        total: 0,
        name,
        url: url_text,
        size: limits.size,
    };
    sink.take(&head[body_start..])?;
    // With a Content-Length (equal to the manifest's size, checked above) the body ends
    // there even if the server keeps the connection; without one, at its close.
    while !(content_length.is_some() && sink.total == limits.size) {
        let n = match tokio::time::timeout(limits.stall, stream.read(&mut buf)).await {
            Err(_) => return Err(stalled()),
            Ok(Err(e)) => return Err(http(format!("reading the body: {e}"))),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            break;
        }
        sink.take(&buf[..n])?;
    }
    if sink.total != limits.size {
        return Err(ReimageError::WrongSize {
            url: url_text.to_string(),
            got: sink.total,
            want: limits.size,
            when: "the end of the download",
        });
    }
    Ok(Downloaded {
        sha256: celld_trust::ca::hex(&sink.hasher.finalize()),
        bytes: sink.total,
        file: sink.file.into(),
    })
}

/// Where the body goes: counted against the size, hashed, written to memory.
struct Sink<'a> {
    file: std::fs::File,
    hasher: Sha256,
    total: u64,
    name: &'a str,
    url: &'a str,
    size: u64,
}

impl Sink<'_> {
    fn take(&mut self, chunk: &[u8]) -> Result<(), ReimageError> {
        self.total += chunk.len() as u64;
        if self.total > self.size {
            return Err(ReimageError::WrongSize {
                url: self.url.to_string(),
                got: self.total,
                want: self.size,
                when: "the download (aborted there)",
            });
        }
        self.hasher.update(chunk);
        // A memory file: the write only fails when memory runs out.
        self.file
            .write_all(chunk)
            .map_err(|e| ReimageError::Memory {
                problem: format!("writing {} to memory: {e}", self.name),
            })
    }
}

/// Checks the status line and headers; the Content-Length when the server sent one.
fn check_head(head: &[u8]) -> Result<Option<u64>, String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not text".to_string())?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    let (proto, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !proto.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {status:?}"));
    }
    if code != "200" {
        return Err(format!(
            "HTTP {}",
            status.get(proto.len() + 1..).unwrap_or(code)
        ));
    }
    let mut length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| format!("Content-Length {value:?} is not a number"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!(
                "Transfer-Encoding {value:?} is not supported: serve artifacts with a Content-Length"
            ));
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_with_host_port_and_path() {
        let u = parse_url("kernel_url", "http://10.0.2.2:8080/v2/vmlinuz").unwrap();
        assert_eq!(
            u,
            HttpUrl {
                host: "10.0.2.2".into(),
                port: 8080,
                path: "/v2/vmlinuz".into()
            }
        );
        let u = parse_url("kernel_url", "http://master/images/vmlinuz?v=2").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("master", 80));
        let u = parse_url("kernel_url", "http://[::1]:81/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 81));
        for bad in [
            "https://master/vmlinuz",
            "ftp://master/vmlinuz",
            "file:///boot/vmlinuz",
            "http://master",
            "http:///vmlinuz",
            "http://master:0/x",
            "http://master:99999/x",
            "http://master/a b",
            "http://master/a\r\nX-Evil: 1",
            "http://user@master/x",
        ] {
            let e = parse_url("initramfs_url", bad).unwrap_err();
            assert!(e.to_string().starts_with("initramfs_url: "), "{bad}: {e}");
        }
    }

    #[test]
    fn the_head_must_be_200_and_without_chunks() {
        assert_eq!(
            check_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            Ok(Some(12))
        );
        assert_eq!(check_head(b"HTTP/1.0 200 OK\r\n\r\n"), Ok(None));
        let e = check_head(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err();
        assert_eq!(e, "HTTP 404 Not Found");
        let e = check_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert!(e.contains("chunked"), "{e}");
        assert!(check_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
