//! `celld.v1.Master` requests through the checks cellmaster runs before it acts.
//!
//! The ids of Describe*, Kill, SetCordon, DrainNode and CellTaskLogs are checked by a
//! private function of `cellmaster::api` (`check_id`); until it is public those requests
//! are fuzzed through decoding only.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use celld_proto::v1 as pb;
use cellmaster::control::normal_mac;
use cellmaster::images::{check_version, read_manifest};
use cellmaster::poll::Fleet;
use cellmaster::registry::Registry;

use crate::{Outcome, check_job_text, decode, split_kind};

/// The request messages of the service, in the order of `master.proto` (DescribeNode,
/// DescribeJob and DescribeTask share DescribeRequest); an input's first byte picks one.
pub const KINDS: [&str; 15] = [
    "Register",
    "ListNodes",
    "SubmitJob",
    "ListCellTasks",
    "ListJobs",
    "Describe",
    "Kill",
    "SetCordon",
    "DrainNode",
    "CellTaskLogs",
    "ImageChunk",
    "ListImages",
    "StartRollout",
    "GetRollout",
    "ControlRollout",
];

/// The nodes a rollout's selector is matched against: (id, labels).
fn cell() -> Vec<(String, BTreeMap<String, String>)> {
    let labels = |zone: &str| BTreeMap::from([("zone".to_string(), zone.to_string())]);
    vec![
        ("node-a".into(), labels("a")),
        ("node-b".into(), labels("b")),
    ]
}

/// One Master request: `data[0]` picks the message, the rest is its encoding.
pub fn master_requests(data: &[u8]) -> Outcome {
    let Some((kind, body)) = split_kind(data, KINDS.len()) else {
        return Ok(());
    };
    match KINDS[kind] {
        "Register" => register(decode(body)?),
        "ListNodes" => decode::<pb::ListNodesRequest>(body).map(drop),
        "SubmitJob" => {
            let r: pb::SubmitJobRequest = decode(body)?;
            let file = if r.file_name.is_empty() {
                "job.toml"
            } else {
                &r.file_name
            };
            check_job_text(file, &r.job_toml)
        }
        "ListCellTasks" => decode::<pb::ListCellTasksRequest>(body).map(drop),
        "ListJobs" => decode::<pb::ListJobsRequest>(body).map(drop),
        "Describe" => decode::<pb::DescribeRequest>(body).map(drop),
        "Kill" => decode::<pb::KillRequest>(body).map(drop),
        "SetCordon" => decode::<pb::SetCordonRequest>(body).map(drop),
        "DrainNode" => decode::<pb::DrainNodeRequest>(body).map(drop),
        "CellTaskLogs" => decode::<pb::CellTaskLogsRequest>(body).map(drop),
        "ImageChunk" => image_chunk(decode(body)?),
        "ListImages" => decode::<pb::ListImagesRequest>(body).map(drop),
        "StartRollout" => start_rollout(decode(body)?),
        "GetRollout" => decode::<pb::GetRolloutRequest>(body).map(drop),
        "ControlRollout" => {
            let r: pb::ControlRolloutRequest = decode(body)?;
            // As the handler reads it: an unknown action is Unspecified, which is refused.
            let action = pb::control_rollout_request::Action::try_from(r.action)
                .unwrap_or(pb::control_rollout_request::Action::Unspecified);
            match action {
                pb::control_rollout_request::Action::Unspecified => {
                    Err("action: unspecified".into())
                }
                _ => Ok(()),
            }
        }
        other => unreachable!("no Master request {other}"),
    }
}

/// Register: the registry's checks (identity, hostname as node id, boot id, port) on an
/// empty cell, and the MACs as the store keeps them.
fn register(r: pb::RegisterRequest) -> Outcome {
    let fleet = Fleet::default();
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    let reg = Registry::default()
        .register(&fleet, &r, peer)
        .map_err(|e| e.to_string())?;
    let identity = r.identity.unwrap_or_default();
    assert_eq!(reg.id, identity.hostname);
    for mac in &identity.macs {
        if let Some(normal) = normal_mac(mac) {
            assert_eq!(normal.len(), 17, "{mac:?} became {normal:?}");
        }
    }
    Ok(())
}

/// AddImage: a chunk of `manifest.json` is checked as the image store checks a whole one.
fn image_chunk(c: pb::ImageChunk) -> Outcome {
    if c.file == "manifest.json" {
        check_manifest(&c.data)?;
    }
    Ok(())
}

/// A manifest as the master reads it before it stores and signs an image.
pub fn check_manifest(data: &[u8]) -> Outcome {
    let (version, _cmdline, sums) = read_manifest(data).map_err(|e| e.to_string())?;
    assert_eq!(sums.len(), 2, "a sum for each boot artifact");
    check_version(&version).map_err(|e| e.to_string())
}

/// StartRollout: the target version, the batch size and the selector over a two-node cell.
fn start_rollout(r: pb::StartRolloutRequest) -> Outcome {
    check_version(&r.to_version).map_err(|e| format!("to_version: {e}"))?;
    if r.max_unavailable == 0 {
        return Err("max_unavailable: at least 1".into());
    }
    let cell = cell();
    let picked = cellmaster::rollout::select(&r.selector, &cell)?;
    if picked.is_empty() {
        return Err(format!("selector {:?} matches no node", r.selector));
    }
    Ok(())
}
