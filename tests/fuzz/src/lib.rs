//! Fuzzing the requests celld and cellmaster accept: arbitrary bytes are decoded as each
//! request message and then handed to the checks the server runs on that request. A
//! refusal is fine; a panic (or a message that does not survive re-encoding) is a bug.
//!
//! # Layout
//!
//! - [`node`]: every request of `celld.v1.Node`, picked by the input's first byte.
//! - [`master`]: every request of `celld.v1.Master`, the same way.
//! - [`jobfile`] and [`image_manifest`]: the text formats inside requests (job TOML of
//!   SubmitJob, the `manifest.json` of AddImage and Reimage), fuzzed on their own so
//!   the mutations stay text.
//! - [`seeds`]: the inputs checked in under `corpus/<target>/`, and the check that the
//!   server accepts each.
//!
//! Each function returns what the server would do (Ok: accepted, Err: why refused), so
//! the seeds can be checked to be accepted; the fuzz targets ignore it.

pub mod master;
pub mod node;
pub mod seeds;

pub use master::master_requests;
pub use node::node_requests;

use std::fmt::Debug;

use prost::Message;

/// The fuzz targets, as `cargo fuzz` names them (one file each in `fuzz_targets/`).
pub const TARGETS: [&str; 4] = [
    "node_requests",
    "master_requests",
    "jobfile",
    "image_manifest",
];

/// Runs `data` through `target`.
pub fn run(target: &str, data: &[u8]) -> Outcome {
    match target {
        "node_requests" => node_requests(data),
        "master_requests" => master_requests(data),
        "jobfile" => jobfile(data),
        "image_manifest" => image_manifest(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Accepted, or refused with the server's reason.
pub type Outcome = Result<(), String>;

/// The input's first byte picks one of `count` message kinds; the rest is the message.
fn split_kind(data: &[u8], count: usize) -> Option<(usize, &[u8])> {
    let (&first, body) = data.split_first()?;
    Some((usize::from(first) % count, body))
}

/// Decodes `bytes` as the request `M`, and checks that what was decoded encodes to the
/// same message (prost drops unknown fields, so compare messages, not bytes).
fn decode<M: Message + Default + PartialEq + Debug>(bytes: &[u8]) -> Result<M, String> {
    let m = M::decode(bytes).map_err(|e| format!("decode: {e}"))?;
    let again = M::decode(m.encode_to_vec().as_slice());
    assert_eq!(again.as_ref(), Ok(&m), "re-encoding changed the message");
    Ok(m)
}

/// SubmitJob's `job_toml` as cellmaster checks it, under the file name errors give it.
pub fn check_job_text(file: &str, text: &str) -> Outcome {
    use cellmaster::jobfile::{Resources, check_fits_somewhere, parse_job_named};
    let job = parse_job_named(file, text).map_err(|e| e.to_string())?;
    // A cell whose largest node has 8 GiB, 4 CPUs and 4096 pids.
    let largest = Resources {
        pids_max: 4096,
        ..Resources::new(8 << 30, 4000)
    };
    check_fits_somewhere(&job, largest).map_err(|e| e.to_string())
}

/// A job file, as `cellmaster submit` and SubmitJob read it.
pub fn jobfile(data: &[u8]) -> Outcome {
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    check_job_text("job.toml", text)
}

/// An image's `manifest.json`: as the master reads it when an image is added (before it
/// signs it), and as a node reads it when told to reimage. The master must never sign a
/// manifest its nodes refuse.
pub fn image_manifest(data: &[u8]) -> Outcome {
    let on_master = master::check_manifest(data);
    let on_node = celld::reimage::manifest::Manifest::parse(data)
        .map(drop)
        .map_err(|e| e.to_string());
    if on_master.is_ok() {
        assert!(
            on_node.is_ok(),
            "the master accepts, a node refuses: {on_node:?}"
        );
    }
    on_master.and(on_node)
}
