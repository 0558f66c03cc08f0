//! The operators' calls: jobs in and out, describing nodes, jobs and tasks, kills and
//! cordons. Each returns a gRPC status whose message names what was wrong.

use std::collections::BTreeMap;
use std::sync::Arc;

use celld_proto::v1 as pb;
use tonic::Status;

use crate::control::{pb_resources, resources, unix_ms};
use crate::jobfile::{JobFileError, check_fits_somewhere, parse_job_named};
use crate::server::MasterState;
use crate::store::{JobRow, StoreError, TaskRow, TaskState};

pub fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

/// A task as the CLI shows it: the reason of a pending task is the scheduler's latest.
pub fn cell_task(t: TaskRow, pending: &BTreeMap<String, String>) -> pb::CellTask {
    let reason = if t.state.wants_node() {
        pending.get(&t.id).cloned().unwrap_or(t.reason)
    } else {
        t.reason
    };
    pb::CellTask {
        reason,
        id: t.id,
        job: t.job,
        node: t.node.unwrap_or_default(),
        state: t.state.as_str().into(),
        priority: t.priority,
        attempt: t.attempt,
    }
}

fn cell_tasks(state: &MasterState, tasks: Vec<TaskRow>) -> Vec<pb::CellTask> {
    let pending = state.pending_reasons();
    tasks.into_iter().map(|t| cell_task(t, &pending)).collect()
}

pub fn submit(
    state: &MasterState,
    r: pb::SubmitJobRequest,
) -> Result<pb::SubmitJobResponse, Status> {
    let file = if r.file_name.is_empty() {
        "job.toml"
    } else {
        &r.file_name
    };
    let bad = |e: JobFileError| Status::invalid_argument(e.to_string());
    let job = parse_job_named(file, &r.job_toml).map_err(bad)?;
    let largest = state
        .registry()
        .records
        .values()
        .filter(|n| n.allocatable.is_some())
        .map(|n| resources(n.allocatable))
        .max_by_key(|a| (a.memory_bytes, a.cpu_millis));
    if let Some(largest) = largest {
        check_fits_somewhere(&job, largest).map_err(bad)?;
    }
    let tasks: Vec<TaskRow> = (0..job.replicas)
        .map(|i| TaskRow::pending_replica(&job, i))
        .collect();
    let row = JobRow {
        name: job.name.clone(),
        spec: job.clone(),
        created_ms: unix_ms(),
    };
    state.store.submit_job(&row, &tasks).map_err(|e| match e {
        StoreError::AlreadyExists { .. } => Status::already_exists(format!(
            "job {} exists already (cellmaster kill {} first to replace it)",
            job.name, job.name
        )),
        e => internal(e),
    })?;
    tracing::info!(job = %job.name, replicas = job.replicas, "job submitted");
    Ok(pb::SubmitJobResponse {
        job: job.name,
        tasks: tasks.into_iter().map(|t| t.id).collect(),
    })
}

pub fn list_tasks(state: &MasterState) -> Result<Vec<pb::CellTask>, Status> {
    let tasks = state.store.list_tasks().map_err(internal)?;
    Ok(cell_tasks(state, tasks))
}

fn job_summary(job: &JobRow, tasks: &[TaskRow]) -> pb::JobSummary {
    let mut states = BTreeMap::new();
    for t in tasks {
        *states.entry(t.state.as_str().to_string()).or_insert(0u32) += 1;
    }
    pb::JobSummary {
        name: job.name.clone(),
        replicas: job.spec.replicas,
        priority: job.spec.priority,
        resources: Some(pb_resources(job.spec.resources)),
        max_unavailable: job.spec.budget.max_unavailable,
        running: states.get("running").copied().unwrap_or(0),
        states: states.into_iter().collect(),
    }
}

pub fn list_jobs(state: &MasterState) -> Result<Vec<pb::JobSummary>, Status> {
    let tasks = state.store.list_tasks().map_err(internal)?;
    let jobs = state.store.list_jobs().map_err(internal)?;
    Ok(jobs
        .iter()
        .map(|j| {
            let mine: Vec<TaskRow> = tasks.iter().filter(|t| t.job == j.name).cloned().collect();
            job_summary(j, &mine)
        })
        .collect())
}

pub fn describe_node(state: &MasterState, id: &str) -> Result<pb::DescribeNodeResponse, Status> {
    let node = state
        .registry()
        .summaries(&state.fleet)
        .into_iter()
        .find(|n| n.id == id)
        .ok_or_else(|| Status::not_found(format!("node {id:?} is not in the cell")))?;
    let conditions = state
        .registry()
        .records
        .get(id)
        .map(|r| r.conditions.clone())
        .unwrap_or_default();
    let tasks = state.store.tasks_on_node(id).map_err(internal)?;
    Ok(pb::DescribeNodeResponse {
        node: Some(node),
        tasks: cell_tasks(state, tasks),
        conditions,
    })
}

pub fn describe_job(state: &MasterState, name: &str) -> Result<pb::DescribeJobResponse, Status> {
    let job = state
        .store
        .get_job(name)
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("job {name:?} does not exist")))?;
    let tasks = state.store.tasks_of_job(name).map_err(internal)?;
    Ok(pb::DescribeJobResponse {
        job: Some(job_summary(&job, &tasks)),
        spec_json: serde_json::to_string_pretty(&job.spec).unwrap_or_default(),
        tasks: cell_tasks(state, tasks),
    })
}

pub async fn describe_task(
    state: &MasterState,
    id: &str,
) -> Result<pb::DescribeTaskResponse, Status> {
    let task = state
        .store
        .get_task(id)
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("task {id:?} does not exist")))?;
    let mut reply = pb::DescribeTaskResponse::default();
    if let Some(node) = task.node.clone() {
        let found = match state.address(&node) {
            Some(address) => {
                state
                    .calls
                    .task_status(&node, &address, &task.node_task_id())
                    .await
            }
            None => Err(format!("node {node} is unknown")),
        };
        match found {
            Ok(s) => reply.on_node = Some(s),
            Err(e) => reply.on_node_error = format!("{node}: {e}"),
        }
    }
    reply.task = Some(cell_task(task, &state.pending_reasons()));
    Ok(reply)
}

/// Kills a job (its tasks stop and the job is forgotten, so the name can be submitted
/// again) or one task (KILLED, not placed again). The store changes first, so a master
/// that dies halfway leaves tasks that reconciliation stops.
pub async fn kill(
    state: &Arc<MasterState>,
    r: pb::KillRequest,
) -> Result<pb::KillResponse, Status> {
    if r.target.is_empty() {
        return Err(Status::invalid_argument("target: name a job or a task"));
    }
    let _control = state.control.lock().await;
    let store = &state.store;
    let mut reply = pb::KillResponse::default();
    let (victims, grace) = if let Some(job) = store.get_job(&r.target).map_err(internal)? {
        let tasks = store.tasks_of_job(&job.name).map_err(internal)?;
        store.delete_job(&job.name).map_err(internal)?;
        tracing::info!(job = %job.name, "job killed");
        reply.job = job.name;
        (tasks, job.spec.kill_grace_ms)
    } else if let Some(task) = store.get_task(&r.target).map_err(internal)? {
        if matches!(task.state, TaskState::Killed) {
            return Err(Status::failed_precondition(format!(
                "task {} is killed already",
                task.id
            )));
        }
        store
            .set_task_state(&task.id, TaskState::Killed, "killed by an operator")
            .map_err(internal)?;
        let grace = store
            .get_job(&task.job)
            .map_err(internal)?
            .map(|j| j.spec.kill_grace_ms)
            .unwrap_or(0);
        (vec![task], grace)
    } else {
        return Err(Status::not_found(format!(
            "{:?} is neither a job nor a task",
            r.target
        )));
    };
    let grace = if r.grace_ms > 0 { r.grace_ms } else { grace };
    for t in victims {
        if let Some(node) = t.node.as_deref().filter(|_| t.state.is_on_node())
            && !state.kill_on_node(node, &t.node_task_id(), grace).await
        {
            reply.deferred.push(t.id.clone());
        }
        reply.killed.push(t.id);
    }
    Ok(reply)
}

pub async fn set_cordon(
    state: &Arc<MasterState>,
    node: &str,
    cordoned: bool,
) -> Result<pb::SetCordonResponse, Status> {
    let _control = state.control.lock().await;
    state
        .store
        .update_node(node, &mut |n| n.cordoned = cordoned)
        .map_err(|e| match e {
            StoreError::NotFound { .. } => {
                Status::not_found(format!("node {node:?} is not in the cell"))
            }
            e => internal(e),
        })?;
    if let Some(r) = state.registry().records.get_mut(node) {
        r.cordoned = cordoned;
    }
    tracing::info!(%node, cordoned, "cordon changed");
    Ok(pb::SetCordonResponse { cordoned })
}

fn image_summary(state: &MasterState, image: &crate::images::Image) -> pb::ImageSummary {
    let nodes = state
        .registry()
        .records
        .values()
        .filter(|r| r.image_version == image.version)
        .count() as u32;
    pb::ImageSummary {
        version: image.version.clone(),
        boot_bytes: image.boot_bytes,
        is_default: state.images.default_version().as_deref() == Some(image.version.as_str()),
        kernel_cmdline: image.kernel_cmdline.clone(),
        nodes,
    }
}

/// An image upload: files in chunks, checked and stored whole or not at all.
pub async fn add_image(
    state: &Arc<MasterState>,
    mut chunks: tonic::Streaming<pb::ImageChunk>,
) -> Result<pb::AddImageResponse, Status> {
    use crate::images::{ImageError, MAX_ARTIFACT_BYTES};
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut make_default = false;
    while let Some(c) = chunks.message().await? {
        make_default |= c.make_default;
        if !["manifest.json", "vmlinuz", "initramfs.cpio.gz"].contains(&c.file.as_str()) {
            return Err(Status::invalid_argument(format!(
                "file: {:?} is not part of an image (manifest.json, vmlinuz, initramfs.cpio.gz)",
                c.file
            )));
        }
        let continues = files.last().is_some_and(|(n, _)| *n == c.file);
        let seen = files.iter().any(|(n, _)| *n == c.file);
        match files.last_mut() {
            Some((_, body)) if continues => body.extend_from_slice(&c.data),
            _ if seen => {
                return Err(Status::invalid_argument(format!(
                    "file: {} sent twice (send each file's chunks together)",
                    c.file
                )));
            }
            _ => files.push((c.file.clone(), c.data)),
        }
        if files
            .iter()
            .any(|(_, b)| b.len() as u64 > MAX_ARTIFACT_BYTES)
        {
            return Err(Status::resource_exhausted(format!(
                "file {}: over the {} MiB an artifact may have",
                c.file,
                MAX_ARTIFACT_BYTES >> 20
            )));
        }
    }
    let images = state.images.clone();
    let added = tokio::task::spawn_blocking(move || {
        let image = images.add(&files)?;
        if make_default {
            images.set_default(&image.version)?;
        }
        Ok::<_, ImageError>(image)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| match e {
        ImageError::Invalid(m) => Status::invalid_argument(m),
        ImageError::Exists(v) => Status::already_exists(format!("image {v} exists already")),
        e => Status::internal(e.to_string()),
    })?;
    Ok(pb::AddImageResponse {
        image: Some(image_summary(state, &added)),
    })
}

pub fn list_images(state: &MasterState) -> Result<pb::ListImagesResponse, Status> {
    let images = state
        .images
        .list()
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(pb::ListImagesResponse {
        images: images.iter().map(|i| image_summary(state, i)).collect(),
        master_key: state.images.public_key_hex(),
    })
}
