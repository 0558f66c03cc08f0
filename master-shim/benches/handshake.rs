//! `cargo bench -p cellmaster --bench handshake`: what mutual TLS costs a caller per new
//! connection. A server behind the real accept loop (`celld_trust::incoming`: the cap,
//! the handshake deadline, the caller's identity read from its certificate) echoes one
//! byte; the client connects, sends a byte and waits for it, once per connection.
//!
//! Rows: plain TCP (`--insecure`), mutual TLS 1.3 with a full handshake (ECDSA P-256,
//! the certificates `cellmaster` issues), and mutual TLS resumed from a ticket of an
//! earlier connection. Client and server share one thread of one process, so the CPU
//! column is both sides of one handshake. It prints a markdown table and asserts
//! nothing about time. Arguments (after `--`): `--count N` (2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use celld_trust::{CellCa, ClientTls, Credentials, Limits, Role, ServerTls, Subject, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

type Result<T> = std::result::Result<T, String>;

fn credentials(ca: &CellCa, role: Role, name: &str) -> Result<Credentials> {
    let (cert_pem, key_pem) = ca
        .issue_with_key(&Subject {
            role,
            name,
            dns_names: vec![name.to_string()],
            ttl: Duration::from_secs(3600),
        })
        .map_err(|e| e.to_string())?;
    Ok(Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    })
}

/// Serves `transport` on a loopback port: every connection gets its byte echoed.
async fn echo_server(transport: Transport) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let address = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    let limits = Limits {
        max_connections: 256,
        per_address: 256,
        handshake_timeout: Duration::from_secs(10),
    };
    let mut incoming = celld_trust::incoming(listener, transport, limits);
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = incoming.next().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if conn.read_exact(&mut b).await.is_ok() {
                    let _ = conn.write_all(&b).await;
                }
            });
        }
    });
    Ok(address)
}

/// Process CPU time (user + system), both sides of the connection.
fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

struct Row {
    name: &'static str,
    times: Vec<Duration>,
    cpu: Duration,
}

async fn measure(
    name: &'static str,
    address: &str,
    tls: Option<&ClientTls>,
    count: usize,
) -> Result<Row> {
    let once = || async {
        let start = Instant::now();
        let mut b = [7u8; 1];
        match tls {
            None => {
                let mut s = tokio::net::TcpStream::connect(address)
                    .await
                    .map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.write_all(&b).await.map_err(|e| e.to_string())?;
                s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            }
            Some(tls) => {
                let mut s = tls.connect(address).await.map_err(|e| e.to_string())?;
                s.write_all(&b).await.map_err(|e| e.to_string())?;
                s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            }
        }
        Ok::<Duration, String>(start.elapsed())
    };
    for _ in 0..count / 10 {
        once().await?;
    }
    let cpu0 = cpu_time();
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        times.push(once().await?);
    }
    let cpu = (cpu_time() - cpu0) / count as u32;
    times.sort();
    Ok(Row { name, times, cpu })
}

async fn run(count: usize) -> Result<Vec<Row>> {
    let (ca, _key) = CellCa::create("handshake-bench").map_err(|e| e.to_string())?;
    let node = credentials(&ca, Role::Node, "node-a")?;
    let master = credentials(&ca, Role::Master, celld_trust::MASTER_NAME)?;

    let plain = echo_server(Transport::Plain).await?;
    let secure = echo_server(Transport::Tls(ServerTls::new(Some(node.server_config()?)))).await?;
    let mut fresh = master.client_config()?;
    fresh.resumption = rustls::client::Resumption::disabled();
    let fresh = ClientTls::new(Arc::new(fresh), "node-a")?;
    let resumed = ClientTls::new(Arc::new(master.client_config()?), "node-a")?;

    Ok(vec![
        measure("plain TCP (--insecure)", &plain, None, count).await?,
        measure(
            "mutual TLS 1.3, full handshake",
            &secure,
            Some(&fresh),
            count,
        )
        .await?,
        measure("mutual TLS 1.3, resumed", &secure, Some(&resumed), count).await?,
    ])
}

fn main() -> std::process::ExitCode {
    let mut count = 2000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--count" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => count = n,
                _ => {
                    eprintln!("handshake bench: --count needs a positive whole number");
                    return std::process::ExitCode::FAILURE;
                }
            },
            other => {
                eprintln!("handshake bench: unknown argument {other:?} (--count N)");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("handshake bench: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let rows = match rt.block_on(run(count)) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("handshake bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "### New connection to a node: connect, handshake, one byte each way ({count} connections, one thread)\n"
    );
    println!("| transport | median | p99 | CPU per connection (client + server) |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        let pick = |q: f64| r.times[((r.times.len() - 1) as f64 * q) as usize];
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0} µs |",
            r.name,
            pick(0.5).as_secs_f64() * 1e6,
            pick(0.99).as_secs_f64() * 1e6,
            r.cpu.as_secs_f64() * 1e6
        );
    }
    std::process::ExitCode::SUCCESS
}
