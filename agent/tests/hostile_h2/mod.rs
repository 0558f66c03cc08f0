//! HTTP/2 spoken badly on purpose, for the hostile-client tests of celld and cellmaster
//! (both crates' `tests/hostile.rs` include this file): frame floods written byte by byte
//! (rapid reset, PING, SETTINGS, CONTINUATION, oversized and malformed headers), gRPC calls
//! whose framing or body is broken, sent through the `h2` client, a legitimate caller timed
//! while a flood runs, and a look at the server process in /proc.
//!
//! Plaintext for now: `connect` is the one place a TLS stream would go.
#![allow(dead_code)]

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// A byte stream to a server.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// Opens a connection to `addr`. Plaintext TCP today; swap in the TLS handshake here when
/// the servers require it, and every flood and raw call follows.
pub async fn connect(addr: &str) -> std::io::Result<impl Conn + use<>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
/// The GOAWAY code h2 sends a peer it takes for an attacker.
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// h2's answer to a header block too large to even skip.
const COMPRESSION_ERROR: u32 = 0x9;
/// The largest frame payload every HTTP/2 peer must take.
const FRAME_PAYLOAD: usize = 16_384;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK integer with a 7-bit prefix (RFC 7541, 5.1).
fn hpack_length(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A header as an HPACK literal without indexing, name and value spelled out: no table
/// and no Huffman, so the block needs no encoder state.
fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_length(out, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_length(out, value.len());
    out.extend_from_slice(value);
}

/// The header block of a gRPC call to `path`.
fn request_block(authority: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal(&mut block, name, value.as_bytes());
    }
    block
}

/// A header that fills most of one frame.
fn padding_header() -> Vec<u8> {
    let mut block = Vec::new();
    literal(&mut block, "x-pad", &[b'a'; FRAME_PAYLOAD - 32]);
    block
}

/// What a flooding connection sends, over and over.
#[derive(Clone, Copy, Debug)]
pub enum Flood {
    /// CVE-2023-44487: a whole request on a new stream, reset at once, a hundred at a time.
    RapidReset,
    /// PING after PING; each one asks for a PONG.
    Ping,
    /// SETTINGS after SETTINGS; each one asks for an ACK.
    Settings,
    /// One request whose headers never end: CONTINUATION after CONTINUATION.
    Continuation,
    /// Complete requests with 64 KiB of headers, past any sane header list limit.
    OversizedHeaders,
    /// Requests without a `:path`, which the server must reset itself (RUSTSEC-2024-0003).
    MalformedHeaders,
}

impl Flood {
    pub const ALL: [Flood; 6] = [
        Flood::RapidReset,
        Flood::Ping,
        Flood::Settings,
        Flood::Continuation,
        Flood::OversizedHeaders,
        Flood::MalformedHeaders,
    ];

    /// The GOAWAY code a server with the limits of both servers' builders cuts this flood
    /// off with; PING and SETTINGS floods have no limit to hit.
    fn cut_off_with(self) -> Option<u32> {
        match self {
            Flood::RapidReset | Flood::Continuation | Flood::MalformedHeaders => {
                Some(ENHANCE_YOUR_CALM)
            }
            Flood::OversizedHeaders => Some(COMPRESSION_ERROR),
            Flood::Ping | Flood::Settings => None,
        }
    }

    /// The next burst of frames; `stream` is the next client stream id.
    fn burst(self, authority: &str, path: &str, stream: &mut u32) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Flood::RapidReset => {
                let block = request_block(authority, path);
                for _ in 0..100 {
                    frame(&mut out, HEADERS, END_HEADERS, *stream, &block);
                    // An empty message: the call is complete and the server may start it.
                    frame(&mut out, DATA, END_STREAM, *stream, &[0; 5]);
                    frame(&mut out, RST_STREAM, 0, *stream, &CANCEL.to_be_bytes());
                    *stream += 2;
                }
            }
            Flood::Ping => {
                for i in 0..100u64 {
                    frame(&mut out, PING, 0, 0, &i.to_be_bytes());
                }
            }
            Flood::Settings => {
                for i in 0..100u32 {
                    let mut setting = SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
                    setting.extend_from_slice(&(65_535 + i % 2).to_be_bytes());
                    frame(&mut out, SETTINGS, 0, 0, &setting);
                }
            }
            Flood::Continuation => {
                if *stream == 1 {
                    let block = request_block(authority, path);
                    frame(&mut out, HEADERS, 0, *stream, &block);
                    *stream += 2;
                }
                let pad = padding_header();
                for _ in 0..8 {
                    frame(&mut out, CONTINUATION, 0, 1, &pad);
                }
            }
            Flood::OversizedHeaders => {
                let mut block = request_block(authority, path);
                for _ in 0..4 {
                    block.extend_from_slice(&padding_header());
                }
                let mut chunks = block.chunks(FRAME_PAYLOAD).peekable();
                let mut kind = HEADERS;
                while let Some(chunk) = chunks.next() {
                    let flags = if chunks.peek().is_none() {
                        END_HEADERS
                    } else {
                        0
                    };
                    frame(&mut out, kind, flags, *stream, chunk);
                    kind = CONTINUATION;
                }
                frame(&mut out, DATA, END_STREAM, *stream, &[0; 5]);
                *stream += 2;
            }
            Flood::MalformedHeaders => {
                let mut block = Vec::new();
                for (name, value) in [(":method", "POST"), (":scheme", "http")] {
                    literal(&mut block, name, value.as_bytes());
                }
                for _ in 0..100 {
                    frame(&mut out, HEADERS, END_HEADERS | END_STREAM, *stream, &block);
                    *stream += 2;
                }
            }
        }
        out
    }
}

/// What a flood sent and what the server answered.
#[derive(Debug, Default)]
pub struct FloodReport {
    pub connections: u32,
    pub bytes_written: u64,
    /// The error code of each GOAWAY the server sent.
    pub goaways: Vec<u32>,
    pub connects_failed: u32,
}

impl fmt::Display for FloodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut codes = std::collections::BTreeMap::new();
        for code in &self.goaways {
            *codes.entry(*code).or_insert(0) += 1;
        }
        write!(
            f,
            "{} connections, {} MiB written, GOAWAYs {codes:?} (code: count), {} connects failed",
            self.connections,
            self.bytes_written >> 20,
            self.connects_failed
        )
    }
}

/// `workers` connections send `kind` to `addr` until `length` has passed; a connection the
/// server closes is opened again, as an attacker would.
pub async fn flood(
    addr: &str,
    path: &str,
    kind: Flood,
    workers: usize,
    length: Duration,
) -> FloodReport {
    let deadline = Instant::now() + length;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (addr, path) = (addr.to_string(), path.to_string());
            tokio::spawn(async move { flood_worker(&addr, &path, kind, deadline).await })
        })
        .collect();
    let mut total = FloodReport::default();
    for t in tasks {
        let r = t.await.expect("flood worker panicked");
        total.connections += r.connections;
        total.bytes_written += r.bytes_written;
        total.goaways.extend(r.goaways);
        total.connects_failed += r.connects_failed;
    }
    total
}

const NO_GOAWAY: u32 = u32::MAX;

async fn flood_worker(addr: &str, path: &str, kind: Flood, deadline: Instant) -> FloodReport {
    let mut report = FloodReport::default();
    while Instant::now() < deadline {
        let Ok(conn) = connect(addr).await else {
            report.connects_failed += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        report.connections += 1;
        let (read, mut write) = tokio::io::split(conn);
        let goaway = Arc::new(AtomicU32::new(NO_GOAWAY));
        let mut reader = tokio::spawn(read_until_closed(read, goaway.clone()));
        let mut out = PREFACE.to_vec();
        frame(&mut out, SETTINGS, 0, 0, &[]);
        frame(&mut out, SETTINGS, ACK, 0, &[]);
        let mut stream = 1;
        while Instant::now() < deadline && !reader.is_finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, write.write_all(&out)).await {
                Ok(Ok(())) => report.bytes_written += out.len() as u64,
                // Closed by the server, or it stopped reading until the deadline.
                Ok(Err(_)) | Err(_) => break,
            }
            out = kind.burst(addr, path, &mut stream);
        }
        // A last look for the GOAWAY of a connection the server is closing.
        let _ = tokio::time::timeout(Duration::from_millis(100), &mut reader).await;
        // The reader holds the read half: the connection closes only when it ends.
        reader.abort();
        let code = goaway.load(Ordering::Relaxed);
        if code != NO_GOAWAY {
            report.goaways.push(code);
        }
    }
    report
}

/// Reads and drops frames (PONGs, ACKs, resets) so the server is never held up by a full
/// socket, noting a GOAWAY's error code.
async fn read_until_closed(mut read: impl AsyncRead + Unpin, goaway: Arc<AtomicU32>) {
    let mut head = [0u8; 9];
    let mut payload = Vec::new();
    loop {
        if read.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        payload.resize(len, 0);
        if read.read_exact(&mut payload).await.is_err() {
            return;
        }
        if head[3] == GOAWAY && len >= 8 {
            let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            goaway.store(code, Ordering::Relaxed);
        }
    }
}

/// How long a legitimate caller's calls took, and those that failed or timed out.
#[derive(Debug, Default)]
pub struct Latencies {
    pub took: Vec<Duration>,
    pub failures: Vec<String>,
}

impl Latencies {
    pub fn median(&self) -> Duration {
        let mut t = self.took.clone();
        t.sort();
        t.get(t.len() / 2).copied().unwrap_or_default()
    }

    pub fn max(&self) -> Duration {
        self.took.iter().max().copied().unwrap_or_default()
    }

    /// Every call answered, each within `limit`, and at least `min_calls` of them.
    pub fn assert_answered(&self, min_calls: usize, limit: Duration, what: &str) {
        assert!(
            self.failures.is_empty(),
            "{what}: calls failed: {:?}",
            self.failures
        );
        assert!(
            self.took.len() >= min_calls,
            "{what}: only {} calls were made, so the check says little",
            self.took.len()
        );
        assert!(self.max() <= limit, "{what}: a call took {:?}", self.max());
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls, median {:.1?}, max {:.1?}, {} failed",
            self.took.len(),
            self.median(),
            self.max(),
            self.failures.len()
        )
    }
}

/// Calls `call` every 20 ms for `length`, each call bounded by `limit`.
pub async fn time_calls<F, Fut>(mut call: F, length: Duration, limit: Duration) -> Latencies
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + length;
    let mut out = Latencies::default();
    while Instant::now() < deadline {
        let start = Instant::now();
        match tokio::time::timeout(limit, call()).await {
            Ok(Ok(())) => out.took.push(start.elapsed()),
            Ok(Err(e)) => out.failures.push(e),
            Err(_) => out.failures.push(format!("no answer within {limit:?}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// Runs `kind` against `addr` for `length` on `workers` connections while a legitimate
/// caller's `call` is timed on a connection of its own.
pub async fn flood_while_calling<F, Fut>(
    addr: &str,
    path: &str,
    kind: Flood,
    workers: usize,
    length: Duration,
    limit: Duration,
    call: F,
) -> (FloodReport, Latencies)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    // The attackers get a thread and a runtime of their own, so the caller is timed against
    // the server's answers, not against the attackers' share of the test's runtime.
    let (addr, path) = (addr.to_string(), path.to_string());
    let attackers = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("attackers' runtime")
            .block_on(flood(&addr, &path, kind, workers, length))
    });
    let latencies = time_calls(call, length, limit).await;
    let report = tokio::task::spawn_blocking(move || attackers.join())
        .await
        .expect("join")
        .expect("the attackers panicked");
    (report, latencies)
}

/// Runs every flood in turn against the server at `addr` while `call`, a legitimate caller
/// on a connection of its own, is timed. After each flood a call to `path` (which takes an
/// empty request) on a new connection must answer too, and the server process must run on.
pub async fn survive_every_flood<F, Fut>(
    addr: &str,
    path: &str,
    mut call: F,
    log: impl Fn() -> String,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    // Long enough to be felt, short enough for a test; eight attackers on two cores.
    const LENGTH: Duration = Duration::from_secs(2);
    const WORKERS: usize = 8;
    // A debug build on a shared machine: generous, but far below "stopped answering".
    const LIMIT: Duration = Duration::from_secs(2);
    let pid = server_pid(addr);
    let rss_before = rss_kib(pid);
    let quiet = time_calls(&mut call, LENGTH / 2, LIMIT).await;
    println!("no flood: {path}: {quiet}");
    for kind in Flood::ALL {
        let (report, during) =
            flood_while_calling(addr, path, kind, WORKERS, LENGTH, LIMIT, &mut call).await;
        let start = Instant::now();
        let after =
            tokio::time::timeout(LIMIT, raw_call(addr, path, &[], grpc_frame(false, 0, &[])))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{path} on a new connection after {kind:?}: no answer within {LIMIT:?}\n{}",
                        log()
                    )
                });
        let after_took = start.elapsed();
        println!(
            "{kind:?}: {report}\n    {path} during: {during}; on a new connection after: {after_took:.1?}"
        );
        assert_eq!(after.code(), Code::Ok, "{path} after {kind:?}: {after:?}");
        assert!(is_running(pid), "the server died under {kind:?}\n{}", log());
        assert_eq!(report.connects_failed, 0, "{kind:?}: {report}\n{}", log());
        during.assert_answered(3, LIMIT, &format!("{path} during {kind:?}"));
        if let Some(code) = kind.cut_off_with() {
            assert!(
                report.goaways.contains(&code),
                "{kind:?}: the server never sent GOAWAY {code:#x}: {report}"
            );
        }
    }
    println!(
        "RSS {rss_before} KiB before the floods, {} KiB after",
        rss_kib(pid)
    );
}

/// A gRPC message frame: the compressed flag, the length the prefix claims, the bytes.
pub fn grpc_frame(compressed: bool, claimed_len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&claimed_len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `message` framed as gRPC sends it: uncompressed, its true length.
pub fn well_framed(message: &[u8]) -> Vec<u8> {
    grpc_frame(false, message.len() as u32, message)
}

/// Every broken version of `valid` sent to `path`, and `valid` itself sent to a method
/// the service lacks, get the status codes `malformed_requests` names.
pub async fn assert_malformed_refused(addr: &str, path: &str, valid: &[u8]) {
    for m in malformed_requests(valid) {
        let status = raw_call(addr, path, m.headers, m.body).await;
        println!(
            "{path}, {}: {:?} {:?}",
            m.what,
            status.code(),
            status.message()
        );
        assert_eq!(status.code(), m.expect, "{path}, {}: {status:?}", m.what);
    }
    let service = path.rsplit_once('/').map_or(path, |(s, _)| s);
    let unknown = format!("{service}/NoSuchCall");
    let status = raw_call(addr, &unknown, &[], well_framed(valid)).await;
    assert_eq!(status.code(), Code::Unimplemented, "{unknown}: {status:?}");
}

/// The same raw call, well formed, is accepted: proof that refusals were about the framing
/// and the bytes, not the way they were sent.
pub async fn assert_well_formed_accepted(
    addr: &str,
    path: &str,
    message: &[u8],
    log: impl Fn() -> String,
) {
    let status = raw_call(addr, path, &[], well_framed(message)).await;
    assert_eq!(status.code(), Code::Ok, "{path}: {status:?}\n{}", log());
}

/// One broken request and the gRPC status code the server must answer it with.
pub struct Malformed {
    pub what: &'static str,
    pub headers: &'static [(&'static str, &'static str)],
    pub body: Vec<u8>,
    pub expect: Code,
}

/// Broken versions of `valid`, the encoding of a request that would store or start
/// something.
pub fn malformed_requests(valid: &[u8]) -> Vec<Malformed> {
    let len = valid.len() as u32;
    let case = |what, headers, body, expect| Malformed {
        what,
        headers,
        body,
        expect,
    };
    vec![
        // A tag whose varint never ends: prost refuses it.
        case(
            "garbage protobuf",
            &[],
            grpc_frame(false, 64, &[0xff; 64]),
            Code::Internal,
        ),
        case(
            "protobuf cut in half",
            &[],
            grpc_frame(false, len / 2, &valid[..valid.len() / 2]),
            Code::Internal,
        ),
        case(
            "length prefix longer than the body",
            &[],
            grpc_frame(false, len + 100, valid),
            Code::Internal,
        ),
        case(
            "length prefix shorter than the body",
            &[],
            grpc_frame(false, len - 10, valid),
            Code::Internal,
        ),
        case(
            "compressed flag without grpc-encoding",
            &[],
            grpc_frame(true, len, valid),
            Code::Internal,
        ),
        case(
            "gzip, which the server does not take",
            &[("grpc-encoding", "gzip")],
            grpc_frame(true, len, valid),
            Code::Unimplemented,
        ),
        // tonic checks the prefix against the 1 MiB limit before it reads on.
        case(
            "length prefix claiming 4 GiB",
            &[],
            grpc_frame(false, u32::MAX, &[0; 1024]),
            Code::OutOfRange,
        ),
        case("no message at all", &[], Vec::new(), Code::Internal),
    ]
}

/// Sends `body` as the whole request body of a call to `path` through the `h2` client and
/// returns the gRPC status the server answered with (from the trailers, or the headers of a
/// trailers-only answer).
pub async fn raw_call(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> tonic::Status {
    let conn = connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(conn).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut send) = client
        .send_request(request.body(()).expect("request"), false)
        .expect("send request");
    send.send_data(Bytes::from(body), true).expect("send body");
    let response = response.await.expect("response headers");
    let status = match tonic::Status::from_header_map(response.headers()) {
        Some(s) => s,
        None => {
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("response body");
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let trailers = body.trailers().await.expect("trailers");
            tonic::Status::from_header_map(&trailers.unwrap_or_default())
                .expect("the answer carries no grpc-status")
        }
    };
    driver.abort();
    status
}

/// The pid of the server started with `--listen <addr>` (celld, or `cellmaster serve`).
pub fn server_pid(addr: &str) -> u32 {
    let procs = std::fs::read_dir("/proc").expect("/proc");
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == addr.as_bytes())
        {
            return pid;
        }
    }
    panic!("no process listens on {addr}");
}

/// The process exists and has not exited (a zombie has).
pub fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    !matches!(state, Some(Some('Z' | 'X')) | None)
}

/// Resident memory of the process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
