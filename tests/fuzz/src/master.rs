//! `celld.v1.Master` requests through the checks cellmaster runs before it acts: ids
//! (`cellmaster::api::check_id`), job files, manifests, rollout selectors, and for
//! Register the registry, the join token's form and the signing of the node's CSR.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use celld_proto::v1 as pb;
use cellmaster::api::check_id;
use cellmaster::control::normal_mac;
use cellmaster::images::{check_version, read_manifest};
use cellmaster::poll::Fleet;
use cellmaster::registry::Registry;
use cellmaster::trust::{MasterTrust, check_token_request, parse_token};

use crate::{Outcome, check_job_text, decode, split_kind};

/// The request messages of the service, in the order of `master.proto` (DescribeNode,
/// DescribeJob and DescribeTask share DescribeRequest); an input's first byte picks one.
pub const KINDS: [&str; 16] = [
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
    "CreateJoinToken",
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
        "Describe" => id("id", &decode::<pb::DescribeRequest>(body)?.id),
        "Kill" => id("target", &decode::<pb::KillRequest>(body)?.target),
        "SetCordon" => id("node", &decode::<pb::SetCordonRequest>(body)?.node),
        "DrainNode" => id("node", &decode::<pb::DrainNodeRequest>(body)?.node),
        "CellTaskLogs" => id("id", &decode::<pb::CellTaskLogsRequest>(body)?.id),
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
        "CreateJoinToken" => {
            let r: pb::CreateJoinTokenRequest = decode(body)?;
            check_token_request(&r).map_err(|s| s.message().to_string())
        }
        other => unreachable!("no Master request {other}"),
    }
}

fn id(field: &str, value: &str) -> Outcome {
    check_id(field, value).map_err(|s| s.message().to_string())
}

/// One master's trust for every input: making a CA and a key per input would be most of
/// the work.
fn trust() -> &'static MasterTrust {
    static TRUST: OnceLock<MasterTrust> = OnceLock::new();
    TRUST.get_or_init(|| {
        let (ca, _key) = celld_trust::CellCa::create("fuzz").expect("a CA");
        MasterTrust::new(ca, Duration::from_secs(3600)).expect("the master's certificate")
    })
}

/// Register: the registry's checks (identity, hostname as node id, boot id, port) on an
/// empty cell, the MACs as the store keeps them, the join token's form, and the CSR as
/// a master with TLS signs it (a node cannot tell a signature from a refusal apart here:
/// both are fine, a panic is not).
fn register(r: pb::RegisterRequest) -> Outcome {
    if !r.join_token.is_empty() && parse_token(&r.join_token).is_none() {
        return Err(format!(
            "join_token: {:?} is not <8 hex>.<32 hex>",
            r.join_token
        ));
    }
    let node = r
        .identity
        .as_ref()
        .map(|i| i.hostname.as_str())
        .unwrap_or_default();
    if !r.csr.is_empty() {
        let (pem, _until) = trust()
            .sign_node(&r.csr, node)
            .map_err(|e| format!("csr: {e}"))?;
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }
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
    let m = read_manifest(data).map_err(|e| e.to_string())?;
    check_version(&m.version).map_err(|e| e.to_string())
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
