//! `cellmaster`'s command line: `serve`, and the operators' commands that talk to a
//! running master over gRPC. Tables for people, `--json` for scripts, and exit codes
//! scripts can trust ([`Exit`]).

use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::master_client::MasterClient;
use tonic::transport::Channel;

mod bundle;
mod fleet;
mod serve;
mod show;

pub const USAGE: &str = "usage:
  cellmaster serve [--listen ADDR] [--poll-interval-ms N] [--state FILE] [--config FILE]
                   [--http ADDR [--advertise HOST]] [--image-dir DIR]
                   [--node-cert-ttl D] [--insecure]
      defaults: 0.0.0.0:7000, 2000 ms, /var/lib/cellmaster/state.db (SQLite),
      HTTP (iPXE and images, default 0.0.0.0:7080) with --http or --image-dir (a
      cellimg output added to the images at start); --advertise: the host nodes reach
      the master on, when it listens on every address;
      --config: TOML with poll_interval_ms, down_after, max_in_flight and [[node]]
      id/address/labels for nodes that do not register themselves;
      the cell CA is made beside --state at first start; node certificates last
      --node-cert-ttl (default 24h); --insecure: plain text, no certificates (development)
  cellmaster admin-cert --role reader|operator|admin --out FILE [--name N] [--ttl D]
                        [--state FILE] [--master ADDR]
      on the master's host: a client bundle (CA, certificate, key; mode 0600)
  cellmaster token create --ttl D [--uses N] [--pxe]
      a join token for nodes (celld.join=); --pxe: the iPXE script hands it out
  cellmaster nodes [--json]
  cellmaster jobs [--json]
  cellmaster tasks [--json]
  cellmaster describe node|job|task ID [--json]
  cellmaster submit JOB.toml
  cellmaster kill JOB|TASK [--grace-ms N]
  cellmaster cordon NODE
  cellmaster uncordon NODE
  cellmaster drain NODE [--grace-ms N] [--timeout-s N]
  cellmaster logs TASK [--follow] [--tail N]
  cellmaster image add DIR [--default] | image list [--json]
  cellmaster reimage --to VERSION [--nodes SELECTOR] [--max-unavailable N]
                     [--drain-timeout S] [--ready-timeout S] [--detach]
      SELECTOR: node ids (a,b) or labels (zone=a,rack=r7); default every node
  cellmaster rollout status [--json] [--watch] | rollout pause | resume | abort
every command but serve and admin-cert takes --master ADDR (default $CELLMASTER, the
bundle's master, or 127.0.0.1:7000) and --bundle FILE (default $CELLMASTER_BUNDLE), or
--insecure for a master without TLS; durations D: 90s, 30m, 24h, 7d
exit codes: 0 done, 1 the master refused or the operation failed, 2 bad command line,
            3 the master cannot be reached, 4 no such node, job or task";

/// How a command ended, as the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Unreachable = 3,
    NotFound = 4,
}

/// An error with the exit code it ends the process with.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

pub type CliResult = Result<(), CliError>;

fn usage(message: impl Into<String>) -> CliError {
    CliError {
        exit: Exit::Usage,
        message: format!("{}\n{USAGE}", message.into()),
    }
}

fn failed(message: impl Into<String>) -> CliError {
    CliError {
        exit: Exit::Failed,
        message: message.into(),
    }
}

/// A refusal from the master, with the exit code its status means.
fn from_status(s: tonic::Status) -> CliError {
    let exit = match s.code() {
        tonic::Code::NotFound => Exit::NotFound,
        tonic::Code::Unavailable => Exit::Unreachable,
        _ => Exit::Failed,
    };
    CliError {
        exit,
        message: s.message().to_string(),
    }
}

/// Parsed flags: values by name, switches (no value) present or not.
struct Flags {
    values: Vec<(String, String)>,
    positional: Vec<String>,
    /// `--bundle FILE`, taken by every command that calls the master.
    bundle: Option<String>,
    /// `--insecure`: plain text (serve: no TLS; clients: no certificate).
    insecure: bool,
}

impl Flags {
    /// `with_value` flags take the next argument; `switches` take none.
    fn parse(args: &[String], with_value: &[&str], switches: &[&str]) -> Result<Flags, CliError> {
        let mut values = Vec::new();
        let mut positional = Vec::new();
        let mut bundle = None;
        let mut insecure = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--insecure" {
                insecure = true;
            } else if a == "--bundle" {
                bundle = Some(
                    it.next()
                        .ok_or_else(|| usage("--bundle needs a value"))?
                        .clone(),
                );
            } else if switches.contains(&a.as_str()) {
                values.push((a.clone(), String::new()));
            } else if with_value.contains(&a.as_str()) {
                let v = it
                    .next()
                    .ok_or_else(|| usage(format!("{a} needs a value")))?;
                values.push((a.clone(), v.clone()));
            } else if a.starts_with("--") {
                return Err(usage(format!("unknown flag {a}")));
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Flags {
            values,
            positional,
            bundle,
            insecure,
        })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.values.iter().any(|(k, _)| k == name)
    }

    /// A number flag within `range`, or `default`.
    fn number(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, CliError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                usage(format!(
                    "{name}: {v:?} is not a number in {}..={}",
                    range.start(),
                    range.end()
                ))
            }),
        }
    }

    /// Exactly `n` positional arguments, named for the message.
    fn positional(&self, names: &[&str]) -> Result<&[String], CliError> {
        if self.positional.len() != names.len() {
            return Err(usage(format!(
                "expected {}, got {:?}",
                names.join(" "),
                self.positional
            )));
        }
        Ok(&self.positional)
    }

    async fn master(&self) -> Result<MasterClient<Channel>, CliError> {
        let env = std::env::var("CELLMASTER").ok();
        let (bundle, tls) = bundle::client_tls(self)?;
        let master = self
            .get("--master")
            .or(env.as_deref())
            .or(bundle
                .as_ref()
                .map(|b| b.master.as_str())
                .filter(|m| !m.is_empty()))
            .unwrap_or("127.0.0.1:7000")
            .to_string();
        let endpoint = celld_trust::client::endpoint(&master, Duration::from_secs(3))
            .map_err(|e| usage(format!("--master: {e}")))?;
        let channel = celld_trust::client::connect(endpoint, tls.as_ref())
            .await
            .map_err(|e| CliError {
                exit: Exit::Unreachable,
                message: format!(
                    "cannot reach the master at {master}: {}",
                    celld_trust::client::error_chain(&e)
                ),
            })?;
        Ok(MasterClient::new(channel))
    }
}

/// Runs one command line (without the program name).
pub async fn run(args: &[String]) -> CliResult {
    let Some((command, rest)) = args.split_first() else {
        return Err(usage("no command"));
    };
    let reads = ["--master"];
    let json = ["--json"];
    match command.as_str() {
        "serve" => serve::serve(rest).await,
        "admin-cert" => bundle::admin_cert(rest),
        "token" => bundle::token(rest).await,
        "nodes" => {
            let f = Flags::parse(rest, &reads, &json)?;
            f.positional(&[])?;
            let r = f.master().await?.list_nodes(pb::ListNodesRequest {}).await;
            show::nodes(&r.map_err(from_status)?.into_inner().nodes, f.has("--json"))
        }
        "jobs" => {
            let f = Flags::parse(rest, &reads, &json)?;
            f.positional(&[])?;
            let r = f.master().await?.list_jobs(pb::ListJobsRequest {}).await;
            show::jobs(&r.map_err(from_status)?.into_inner().jobs, f.has("--json"))
        }
        "tasks" => {
            let f = Flags::parse(rest, &reads, &json)?;
            f.positional(&[])?;
            let r = f
                .master()
                .await?
                .list_cell_tasks(pb::ListCellTasksRequest {})
                .await;
            show::tasks(&r.map_err(from_status)?.into_inner().tasks, f.has("--json"))
        }
        "describe" => describe(rest).await,
        "submit" => {
            let f = Flags::parse(rest, &reads, &[])?;
            let file = &f.positional(&["JOB.toml"])?[0];
            let text = std::fs::read_to_string(file)
                .map_err(|e| failed(format!("reading {file}: {e}")))?;
            let r = f
                .master()
                .await?
                .submit_job(pb::SubmitJobRequest {
                    job_toml: text,
                    file_name: file.clone(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            println!("job {} submitted: {}", r.job, r.tasks.join(" "));
            Ok(())
        }
        "kill" => {
            let f = Flags::parse(rest, &["--master", "--grace-ms"], &[])?;
            let target = f.positional(&["JOB|TASK"])?[0].clone();
            let grace_ms = f.number("--grace-ms", 1..=600_000, 0)? as u32;
            let r = f
                .master()
                .await?
                .kill(pb::KillRequest { target, grace_ms })
                .await
                .map_err(from_status)?
                .into_inner();
            show::killed(&r);
            Ok(())
        }
        "cordon" | "uncordon" => {
            let f = Flags::parse(rest, &reads, &[])?;
            let node = f.positional(&["NODE"])?[0].clone();
            let cordoned = command == "cordon";
            f.master()
                .await?
                .set_cordon(pb::SetCordonRequest {
                    node: node.clone(),
                    cordoned,
                })
                .await
                .map_err(from_status)?;
            println!(
                "{node} {}",
                if cordoned { "cordoned" } else { "uncordoned" }
            );
            Ok(())
        }
        "drain" => drain(rest).await,
        "image" => fleet::image(rest).await,
        "reimage" => fleet::reimage(rest).await,
        "rollout" => fleet::rollout(rest).await,
        "logs" => logs(rest).await,
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(usage(format!("unknown command {other:?}"))),
    }
}

async fn describe(rest: &[String]) -> CliResult {
    let f = Flags::parse(rest, &["--master"], &["--json"])?;
    let [kind, id] = f.positional(&["node|job|task", "ID"])? else {
        return Err(usage("describe node|job|task ID"));
    };
    if !["node", "job", "task"].contains(&kind.as_str()) {
        return Err(usage(format!(
            "describe {kind:?}: describe node, job or task"
        )));
    }
    let req = pb::DescribeRequest { id: id.clone() };
    let json = f.has("--json");
    let mut m = f.master().await?;
    match kind.as_str() {
        "node" => show::node(
            &m.describe_node(req)
                .await
                .map_err(from_status)?
                .into_inner(),
            json,
        ),
        "job" => show::job(
            &m.describe_job(req).await.map_err(from_status)?.into_inner(),
            json,
        ),
        "task" => show::task(
            &m.describe_task(req)
                .await
                .map_err(from_status)?
                .into_inner(),
            json,
        ),
        _ => show::task(
            &m.describe_task(req)
                .await
                .map_err(from_status)?
                .into_inner(),
            json,
        ),
    }
}

async fn drain(rest: &[String]) -> CliResult {
    let f = Flags::parse(rest, &["--master", "--grace-ms", "--timeout-s"], &[])?;
    let node = f.positional(&["NODE"])?[0].clone();
    let grace_ms = f.number("--grace-ms", 1..=600_000, 0)? as u32;
    let timeout_s = f.number("--timeout-s", 1..=86_400, 300)?;
    let mut stream = f
        .master()
        .await?
        .drain_node(pb::DrainNodeRequest {
            node: node.clone(),
            grace_ms,
            timeout_ms: (timeout_s * 1000) as u32,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                println!(
                    "[{} on node, {} waiting] {}",
                    p.remaining, p.waiting, p.message
                );
                if p.done {
                    return Ok(());
                }
            }
            Ok(None) => {
                return Err(failed(format!(
                    "the master ended the drain of {node} early"
                )));
            }
            Err(s) => return Err(from_status(s)),
        }
    }
}

async fn logs(rest: &[String]) -> CliResult {
    use std::io::Write;
    let f = Flags::parse(rest, &["--master", "--tail"], &["--follow"])?;
    let id = f.positional(&["TASK"])?[0].clone();
    let tail = f.number("--tail", 1..=1_000_000, 0)? as u32;
    let mut stream = f
        .master()
        .await?
        .cell_task_logs(pb::CellTaskLogsRequest {
            id,
            follow: f.has("--follow"),
            tail,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(line) = stream.message().await.map_err(from_status)? {
        let _ = out.write_all(&line.line);
        if !line.line.ends_with(b"\n") {
            let _ = out.write_all(b"\n");
        }
    }
    Ok(())
}
