//! Output of the read commands: aligned tables for people, JSON for scripts.

use celld_proto::v1 as pb;
use serde_json::{Value, json};

use super::{CliResult, failed};

/// Columns as wide as their widest cell; the last one is not padded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

pub fn print_json(v: &Value) -> CliResult {
    let text = serde_json::to_string_pretty(v).map_err(|e| failed(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn resources_json(r: &Option<pb::Resources>) -> Value {
    let r = r.unwrap_or_default();
    json!({"memory_bytes": r.memory_bytes, "cpu_millis": r.cpu_millis, "pids_max": r.pids_max})
}

fn mib(bytes: u64) -> String {
    format!("{}Mi", bytes >> 20)
}

fn node_json(n: &pb::NodeSummary) -> Value {
    json!({
        "id": n.id, "address": n.address, "liveness": n.liveness,
        "machine_id": n.machine_id, "boot_id": n.boot_id,
        "image_version": n.image_version, "celld_version": n.celld_version,
        "labels": n.labels, "allocatable": resources_json(&n.allocatable),
        "tasks": n.tasks, "cordoned": n.cordoned,
        "missed_polls": n.missed_polls, "last_reply_ms_ago": n.last_reply_ms_ago,
    })
}

fn task_json(t: &pb::CellTask) -> Value {
    json!({"id": t.id, "job": t.job, "node": t.node, "state": t.state,
           "reason": t.reason, "priority": t.priority, "attempt": t.attempt})
}

fn job_json(j: &pb::JobSummary) -> Value {
    json!({"name": j.name, "replicas": j.replicas, "priority": j.priority,
           "resources": resources_json(&j.resources), "max_unavailable": j.max_unavailable,
           "running": j.running, "states": j.states})
}

pub fn nodes(nodes: &[pb::NodeSummary], json: bool) -> CliResult {
    if json {
        return print_json(&Value::Array(nodes.iter().map(node_json).collect()));
    }
    let mut t = Table::new(&[
        "NODE", "ADDRESS", "STATE", "IMAGE", "TASKS", "MEMORY", "CPU", "MISSED",
    ]);
    for n in nodes {
        let a = n.allocatable.unwrap_or_default();
        let state = if n.cordoned {
            format!("{},CORDONED", n.liveness)
        } else {
            n.liveness.clone()
        };
        t.row(vec![
            n.id.clone(),
            n.address.clone(),
            state,
            dash(&n.image_version),
            n.tasks.to_string(),
            mib(a.memory_bytes),
            format!("{}m", a.cpu_millis),
            n.missed_polls.to_string(),
        ]);
    }
    t.print();
    Ok(())
}

pub fn jobs(jobs: &[pb::JobSummary], json: bool) -> CliResult {
    if json {
        return print_json(&Value::Array(jobs.iter().map(job_json).collect()));
    }
    let mut t = Table::new(&["JOB", "PRIORITY", "RUNNING", "BUDGET", "STATES"]);
    for j in jobs {
        let states: Vec<String> = j.states.iter().map(|(s, n)| format!("{n} {s}")).collect();
        t.row(vec![
            j.name.clone(),
            j.priority.to_string(),
            format!("{}/{}", j.running, j.replicas),
            j.max_unavailable.to_string(),
            states.join(", "),
        ]);
    }
    t.print();
    Ok(())
}

fn task_table(tasks: &[pb::CellTask]) -> Table {
    let mut t = Table::new(&["TASK", "JOB", "NODE", "STATE", "ATTEMPT", "REASON"]);
    for x in tasks {
        t.row(vec![
            x.id.clone(),
            x.job.clone(),
            dash(&x.node),
            x.state.clone(),
            x.attempt.to_string(),
            x.reason.clone(),
        ]);
    }
    t
}

pub fn tasks(tasks: &[pb::CellTask], json: bool) -> CliResult {
    if json {
        return print_json(&Value::Array(tasks.iter().map(task_json).collect()));
    }
    task_table(tasks).print();
    Ok(())
}

pub fn node(r: &pb::DescribeNodeResponse, json: bool) -> CliResult {
    let n = r.node.clone().unwrap_or_default();
    if json {
        let mut v = node_json(&n);
        v["task_list"] = Value::Array(r.tasks.iter().map(task_json).collect());
        v["conditions"] = Value::Array(
            r.conditions
                .iter()
                .map(|c| json!({"type": c.r#type, "status": c.status, "reason": c.reason}))
                .collect(),
        );
        return print_json(&v);
    }
    let a = n.allocatable.unwrap_or_default();
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("Node:        {}", n.id);
    println!("Address:     {}", n.address);
    println!(
        "Liveness:    {} (missed polls: {})",
        n.liveness, n.missed_polls
    );
    println!("Cordoned:    {}", n.cordoned);
    println!("Machine:     {}", dash(&n.machine_id));
    println!("Boot:        {}", dash(&n.boot_id));
    println!("Image:       {}", dash(&n.image_version));
    println!("celld:       {}", dash(&n.celld_version));
    println!("Labels:      {}", dash(&labels.join(", ")));
    println!(
        "Allocatable: {} memory, {}m CPU, {} pids",
        mib(a.memory_bytes),
        a.cpu_millis,
        a.pids_max
    );
    for c in &r.conditions {
        println!("Condition:   {}={} {}", c.r#type, c.status, c.reason);
    }
    println!();
    task_table(&r.tasks).print();
    Ok(())
}

pub fn job(r: &pb::DescribeJobResponse, json: bool) -> CliResult {
    let j = r.job.clone().unwrap_or_default();
    if json {
        let mut v = job_json(&j);
        v["task_list"] = Value::Array(r.tasks.iter().map(task_json).collect());
        v["spec"] = serde_json::from_str(&r.spec_json).unwrap_or(Value::Null);
        return print_json(&v);
    }
    let res = j.resources.unwrap_or_default();
    println!("Job:         {}", j.name);
    println!("Priority:    {}", j.priority);
    println!("Replicas:    {} running of {}", j.running, j.replicas);
    println!("Budget:      {} unavailable at most", j.max_unavailable);
    println!(
        "Resources:   {} memory, {}m CPU per replica",
        mib(res.memory_bytes),
        res.cpu_millis
    );
    println!();
    task_table(&r.tasks).print();
    Ok(())
}

pub fn task(r: &pb::DescribeTaskResponse, json: bool) -> CliResult {
    let t = r.task.clone().unwrap_or_default();
    if json {
        let mut v = task_json(&t);
        if let Some(s) = &r.on_node {
            v["on_node"] = json!({"id": s.id, "state": pb::TaskState::try_from(s.state)
                .map(|s| s.as_str_name()).unwrap_or("?"), "pid": s.pid, "restarts": s.restarts,
                "exit_code": s.exit_code, "message": s.message});
        }
        v["on_node_error"] = json!(r.on_node_error);
        return print_json(&v);
    }
    println!("Task:        {}", t.id);
    println!("Job:         {}", t.job);
    println!("State:       {}", t.state);
    println!("Reason:      {}", dash(&t.reason));
    println!("Node:        {}", dash(&t.node));
    println!(
        "Attempt:     {} (on its node: {}-{})",
        t.attempt, t.id, t.attempt
    );
    println!("Priority:    {}", t.priority);
    if let Some(s) = &r.on_node {
        let state = pb::TaskState::try_from(s.state)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        let reason = pb::TaskReason::try_from(s.reason)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        println!(
            "On node:     {state} ({reason}), pid {}, {} restarts, exit code {}",
            s.pid, s.restarts, s.exit_code
        );
        if let Some(u) = &s.usage {
            println!(
                "Usage:       {} memory (peak {}), {} ms CPU",
                mib(u.memory_bytes),
                mib(u.memory_peak_bytes),
                u.cpu_usec / 1000
            );
        }
        if !s.message.is_empty() {
            println!("Message:     {}", s.message);
        }
    } else if !r.on_node_error.is_empty() {
        println!("On node:     unknown ({})", r.on_node_error);
    }
    Ok(())
}

pub fn killed(r: &pb::KillResponse) {
    if !r.job.is_empty() {
        println!("job {} killed", r.job);
    }
    for t in &r.killed {
        let note = if r.deferred.contains(t) {
            " (its node did not answer: stopped when it does)"
        } else {
            ""
        };
        println!("task {t} killed{note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_leave_the_last_ragged() {
        let mut t = Table::new(&["A", "LONGER", "LAST"]);
        t.row(vec!["wide-cell".into(), "x".into(), "free text".into()]);
        assert_eq!(
            t.render(),
            "A          LONGER  LAST\nwide-cell  x       free text\n"
        );
    }
}
