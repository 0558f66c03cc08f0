//! Hostile clients against the master: many idle connections, stalled half-requests,
//! garbage instead of HTTP/2, an oversized job, HTTP/2 frame floods and gRPC requests with
//! broken framing; the CLI and a gRPC caller keep working throughout. Behind TLS: one
//! flooding address gets only its share of connections, and callers that never start
//! TLS are dropped at the handshake deadline.

mod common;
// The same hostile HTTP/2 client as celld's tests.
#[path = "../../agent/tests/hostile_h2/mod.rs"]
mod hostile_h2;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use common::Cell;
use hostile_h2::{assert_malformed_refused, assert_well_formed_accepted, survive_every_flood};
use prost::Message;

const LIST_NODES: &str = "/celld.v1.Master/ListNodes";
const SUBMIT_JOB: &str = "/celld.v1.Master/SubmitJob";
const REGISTER: &str = "/celld.v1.Master/Register";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn nodes_answer(cell: &Cell) {
    let out = cell.cli(&["nodes"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", cell.log());
}

#[test]
fn the_master_answers_through_idle_stalled_garbage_and_oversized_clients() {
    // Plain text: these floods are at the HTTP/2 layer, the same behind TLS.
    // Each flood from its own address, not the CLI's (127.0.0.1): one address may hold an
    // eighth of the master's connections (512), the rest are closed at once.
    let cell = Cell::with(300, |c| c.secure = false);
    let rt = runtime();
    let mut held = rt.block_on(connect_from("127.0.0.3", &cell.master, 1000));
    nodes_answer(&cell);
    for mut s in rt.block_on(connect_from("127.0.0.4", &cell.master, 200)) {
        s.set_nonblocking(false).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")
            .unwrap();
        held.push(s);
    }
    nodes_answer(&cell);
    for mut s in rt.block_on(connect_from("127.0.0.5", &cell.master, 50)) {
        s.set_nonblocking(false).unwrap();
        let _ = s.write_all(&[0xff; 4096]);
    }
    nodes_answer(&cell);
    // A 2 MiB job file: over the master's 1 MiB request limit, refused, nothing stored.
    let big = format!("name = \"big\"\n# {}\n", "x".repeat(2 << 20));
    let out = cell.submit_text("big", &big);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(cell.json(&["jobs"]), serde_json::json!([]));
    nodes_answer(&cell);
    drop(held);
}

#[test]
fn http2_floods_do_not_stop_the_master_answering() {
    // Plain text: these floods are at the HTTP/2 layer, the same behind TLS.
    let cell = Cell::with(300, |c| c.secure = false);
    runtime().block_on(async {
        let client = pb::master_client::MasterClient::connect(format!("http://{}", cell.master))
            .await
            .expect("connect");
        let list_nodes = || {
            let mut c = client.clone();
            async move {
                c.list_nodes(pb::ListNodesRequest::default())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        };
        survive_every_flood(&cell.master, LIST_NODES, list_nodes, || cell.log()).await;
    });
    nodes_answer(&cell);
}

#[test]
fn malformed_grpc_requests_get_clean_errors_and_store_nothing() {
    // Plain text: these floods are at the HTTP/2 layer, the same behind TLS.
    let cell = Cell::with(300, |c| c.secure = false);
    let job = |name: &str| pb::SubmitJobRequest {
        job_toml: format!(
            "name = \"{name}\"\nargv = [\"sleep\", \"600\"]\nrootfs = {:?}\n\
             [resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n",
            cell.rootfs().display().to_string()
        ),
        file_name: format!("{name}.toml"),
    };
    let register = pb::RegisterRequest {
        identity: Some(pb::NodeIdentity {
            machine_id: "malformed".into(),
            hostname: "malformed".into(),
            ..Default::default()
        }),
        grpc_port: 1,
        ..Default::default()
    };
    let submit = job("malformed").encode_to_vec();
    let register = register.encode_to_vec();
    runtime().block_on(async {
        assert_malformed_refused(&cell.master, SUBMIT_JOB, &submit).await;
        assert_malformed_refused(&cell.master, REGISTER, &register).await;
        let control = job("control").encode_to_vec();
        assert_well_formed_accepted(&cell.master, SUBMIT_JOB, &control, || cell.log()).await;
    });
    let jobs = cell.json(&["jobs"]);
    let names: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["name"].as_str())
        .collect();
    assert_eq!(names, ["control"], "{jobs:#}");
    assert_eq!(cell.json(&["nodes"]), serde_json::json!([]));
}

/// `n` connections to `target` from the loopback address `from` that never start TLS;
/// left non-blocking, to look at without waiting.
async fn connect_from(from: &str, target: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let s = s.connect(target.parse().unwrap()).await.expect("connect");
        held.push(s.into_std().unwrap());
    }
    held
}

/// How many of `held` the server has closed (EOF or reset) by now.
fn closed_by_server(held: &mut [TcpStream]) -> usize {
    use std::io::Read;
    let mut closed = 0;
    for s in held.iter_mut() {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(n) => panic!("a server sent {n} bytes to a caller that said nothing"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => closed += 1,
        }
    }
    closed
}

/// `per_address=N` from the first "too many connections" line of a log.
fn per_address_in(log: &str) -> Option<usize> {
    log.lines()
        .find(|l| l.contains("too many connections from one address"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("per_address="))?
        .parse()
        .ok()
}

#[test]
fn one_flooding_address_gets_its_share_and_silent_callers_meet_the_handshake_deadline() {
    // Mutual TLS, as deployed: the master, one node, the flood from 127.0.0.3 while the
    // master, the CLI and the admin call from 127.0.0.1.
    let mut cell = Cell::new(300);
    cell.add_node("alpha");
    cell.wait_ready(&["alpha"]);
    let node_log = cell.dir.path().join("alpha.log");
    let targets = [
        ("alpha", cell.nodes["alpha"].address.clone(), node_log),
        (
            "master",
            cell.master.clone(),
            cell.dir.path().join("master.log"),
        ),
    ];
    let rt = runtime();
    for (who, address, log) in &targets {
        let started = Instant::now();
        let mut held = rt.block_on(connect_from("127.0.0.3", address, 700));
        std::thread::sleep(Duration::from_millis(500));
        let closed = closed_by_server(&mut held);
        let text = std::fs::read_to_string(log).unwrap();
        let share = per_address_in(&text)
            .unwrap_or_else(|| panic!("{who}: no per-address refusal logged\n{text}"));
        assert_eq!(
            held.len() - closed,
            share,
            "{who}: the connections left open from one address are its share"
        );
        // Others are answered meanwhile: the master polls the node, the CLI and a direct
        // admin call get through.
        nodes_answer(&cell);
        let status = rt.block_on(async {
            let mut c = cell.node_client_as("alpha", None).await?;
            tokio::time::timeout(
                Duration::from_secs(5),
                c.get_status(pb::GetStatusRequest::default()),
            )
            .await
            .map_err(|_| "GetStatus took over 5 s".to_string())?
            .map_err(|s| s.to_string())
        });
        assert!(status.is_ok(), "{who}: {status:?}\n{}", cell.log());
        // Not one of them started TLS: each is dropped at the 10 s handshake deadline.
        let wait = Duration::from_secs(12).saturating_sub(started.elapsed());
        std::thread::sleep(wait);
        let closed = closed_by_server(&mut held);
        assert_eq!(
            closed,
            held.len(),
            "{who}: silent callers left open after the handshake deadline"
        );
        println!(
            "{who}: {share} of 700 silent connections from one address held, all closed by 12 s"
        );
    }
    cell.wait_ready(&["alpha"]);
}
