//! Hostile clients against the master: many idle connections, stalled half-requests,
//! garbage instead of HTTP/2, an oversized job, HTTP/2 frame floods and gRPC requests with
//! broken framing; the CLI and a gRPC caller keep working throughout.

mod common;
// The same hostile HTTP/2 client as celld's tests.
#[path = "../../agent/tests/hostile_h2/mod.rs"]
mod hostile_h2;

use std::io::Write;
use std::net::TcpStream;

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
    let cell = Cell::with(300, |c| c.secure = false);
    let mut held = Vec::new();
    for _ in 0..1000 {
        held.push(TcpStream::connect(&cell.master).expect("idle connect"));
    }
    nodes_answer(&cell);
    for _ in 0..200 {
        let mut s = TcpStream::connect(&cell.master).expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")
            .unwrap();
        held.push(s);
    }
    nodes_answer(&cell);
    for _ in 0..50 {
        let mut s = TcpStream::connect(&cell.master).expect("connect");
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
