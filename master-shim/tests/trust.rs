//! Mutual TLS in a real cell (cellmaster and celld processes): who may call what, tokens,
//! and certificate renewal.

mod common;

use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use celld_trust::{CellCa, Credentials, Role, Subject};
use common::Cell;

/// A bundle for `role` from the cell's CA, made with `admin-cert`.
fn person(cell: &Cell, role: &str) -> Credentials {
    let out = cell.dir.path().join(format!("{role}.bundle"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(["admin-cert", "--role", role, "--out"])
        .arg(&out)
        .arg("--state")
        .arg(cell.state_file())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    common::bundle_credentials(&out)
}

/// Credentials signed by `ca` (PEM pair) for `role`, lasting `ttl`.
fn signed_by(ca: &CellCa, role: Role, name: &str, ttl: Duration) -> Credentials {
    let (cert_pem, key_pem) = ca
        .issue_with_key(&Subject {
            role,
            name,
            dns_names: vec![],
            ttl,
        })
        .unwrap();
    Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    }
}

fn cell_ca(cell: &Cell) -> CellCa {
    let dir = cell.dir.path();
    CellCa::load(
        &std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
        &std::fs::read_to_string(dir.join("ca.key")).unwrap(),
    )
    .unwrap()
}

/// GetStatus (or RunTask) on `node` as `creds`; Err is the status code or the transport.
fn call(cell: &Cell, node: &str, creds: Option<&Credentials>, run: bool) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = cell.node_client_as(node, creds).await?;
        let r = if run {
            c.run_task(pb::RunTaskRequest { spec: None })
                .await
                .map(drop)
        } else {
            c.get_status(pb::GetStatusRequest::default())
                .await
                .map(drop)
        };
        match r {
            Ok(()) => Ok(()),
            // The spec-less RunTask passed the role check when it is refused for its spec.
            Err(s) if run && s.code() == tonic::Code::InvalidArgument => Ok(()),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        }
    })
}

/// A plain-text gRPC call to a TLS port, and a TLS call without a client certificate.
fn without_certificate(cell: &Cell, node: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let address = cell.nodes[node].address.clone();
    rt.block_on(async {
        let config =
            celld_trust::tls::anonymous_client_config(&cell.admin_credentials().ca_pem).unwrap();
        let tls = celld_trust::ClientTls::new(std::sync::Arc::new(config), node).unwrap();
        let endpoint = celld_trust::client::endpoint(&address, Duration::from_secs(3)).unwrap();
        let channel = celld_trust::client::connect(endpoint, Some(&tls))
            .await
            .unwrap();
        let mut c = pb::node_client::NodeClient::new(channel);
        let e = c
            .get_status(pb::GetStatusRequest::default())
            .await
            .expect_err("a call without a certificate must be refused");
        format!("{:?}: {}", e.code(), e.message())
    })
}

#[test]
fn callers_are_checked_by_certificate_and_role_and_the_node_serves_on() {
    let mut cell = Cell::new(300);
    cell.add_node("n1");
    cell.wait_ready(&["n1"]);
    let ca = cell_ca(&cell);

    // No certificate: UNAUTHENTICATED (the TLS handshake itself is allowed for health).
    let e = without_certificate(&cell, "n1");
    assert!(e.starts_with("Unauthenticated"), "{e}");

    // Roles: a reader may read, not run; an operator may run; an admin bundle too.
    let reader = person(&cell, "reader");
    assert_eq!(call(&cell, "n1", Some(&reader), false), Ok(()));
    let e = call(&cell, "n1", Some(&reader), true).unwrap_err();
    assert!(
        e.starts_with("PermissionDenied") && e.contains("operator"),
        "{e}"
    );
    let operator = person(&cell, "operator");
    assert_eq!(call(&cell, "n1", Some(&operator), true), Ok(()));

    // A node's certificate is no caller's.
    let node_cert = signed_by(&ca, Role::Node, "n2", Duration::from_secs(3600));
    let e = call(&cell, "n1", Some(&node_cert), false).unwrap_err();
    assert!(e.starts_with("PermissionDenied"), "{e}");

    // Another CA's admin: the handshake fails.
    let (other, _) = CellCa::create("elsewhere").unwrap();
    let foreign = signed_by(&other, Role::Admin, "mallory", Duration::from_secs(3600));
    let mut foreign_here = foreign.clone();
    foreign_here.ca_pem = reader.ca_pem.clone();
    let e = call(&cell, "n1", Some(&foreign_here), false).unwrap_err();
    assert!(!e.is_empty(), "a foreign certificate must not be served");

    // An expired admin certificate (issued with a 1 s life, then waited out): refused.
    let short = signed_by(&ca, Role::Admin, "late", Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(3));
    let e = call(&cell, "n1", Some(&short), false).unwrap_err();
    assert!(!e.is_empty(), "an expired certificate must not be served");

    // Through all of it the node answered its admin and its master.
    assert_eq!(call(&cell, "n1", None, false), Ok(()));
    cell.wait_ready(&["n1"]);

    // The master's API checks roles as well.
    let out = cell.cli(&["nodes"]);
    assert_eq!(out.code, 0, "{out:?}");
    let as_reader = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cellmaster"))
            .args(args)
            .args(["--master", &cell.master, "--bundle"])
            .arg(cell.dir.path().join("reader.bundle"))
            .output()
            .unwrap()
    };
    let out = as_reader(&["submit", "/nonexistent.toml"]);
    assert_ne!(out.status.code(), Some(0));
    let out = as_reader(&["token", "create", "--ttl", "1h"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("PermissionDenied") || stderr.contains("admin"),
        "{stderr}"
    );
    // Without a bundle the CLI says what it needs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(["nodes", "--master", &cell.master])
        .env_remove("CELLMASTER_BUNDLE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bundle"));
}

#[test]
fn a_token_admits_as_many_nodes_as_it_has_uses_and_no_more() {
    let mut cell = Cell::new(300);
    let out = cell.cli(&["token", "create", "--ttl", "1h", "--uses", "1"]);
    assert_eq!(out.code, 0, "{out:?}");
    cell.token = out.stdout.trim().to_string();
    cell.add_node("first");
    cell.wait_ready(&["first"]);
    // The same token again, for another node: refused, and the node says why.
    cell.add_node("second");
    let log = cell.dir.path().join("second.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("used up") {
            break;
        }
        assert!(Instant::now() < deadline, "second node's log:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let nodes = cell.json(&["nodes"]);
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "second"),
        "{nodes:#}"
    );
    assert!(cell.log().contains("registration refused") || cell.log().contains("used up"));
    // An unknown token too.
    cell.token = "0123abcd.0123456789abcdef0123456789abcdef".into();
    cell.add_node("third");
    cell.wait("third refused", 20, || {
        std::fs::read_to_string(cell.dir.path().join("third.log"))
            .unwrap_or_default()
            .contains("unknown")
            .then_some(())
    });
}

#[test]
fn node_certificates_are_renewed_without_dropping_tasks_or_polls() {
    let mut cell = Cell::with(300, |c| {
        c.serve_args = vec!["--node-cert-ttl".into(), "15s".into()];
    });
    cell.add_node("n1");
    cell.wait_ready(&["n1"]);
    let out = cell.submit(
        "steady",
        "[resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let running = cell.wait("task running", 30, || {
        let r = cell.running_on("n1");
        (!r.is_empty()).then_some(r)
    });
    // Three renewals (every ~10 s of a 15 s certificate), watched each second.
    let until = Instant::now() + Duration::from_secs(35);
    while Instant::now() < until {
        let nodes = cell.json(&["nodes"]);
        let n1 = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == "n1")
            .cloned()
            .unwrap();
        assert_eq!(n1["liveness"], "READY", "{n1:#}\n{}", cell.log());
        assert_eq!(cell.running_on("n1"), running);
        std::thread::sleep(Duration::from_secs(1));
    }
    let log = std::fs::read_to_string(cell.dir.path().join("n1.log")).unwrap();
    let renewals = log.matches("renewal=true").count();
    assert!(renewals >= 2, "renewals: {renewals}\n{log}");
    // New connections after the first certificate ended still work.
    assert_eq!(call(&cell, "n1", None, false), Ok(()));
}
