//! Hostile clients against the master: many idle connections, stalled half-requests,
//! garbage instead of HTTP/2 and an oversized job; the CLI keeps working throughout.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::Cell;

fn nodes_answer(cell: &Cell) {
    let out = cell.cli(&["nodes"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", cell.log());
}

#[test]
fn the_master_answers_through_idle_stalled_garbage_and_oversized_clients() {
    let cell = Cell::new(300);
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
