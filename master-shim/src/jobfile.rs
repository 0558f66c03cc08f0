//! Job files: TOML text to a checked [`JobSpec`], or an error a person can act on (the
//! file, the line, the field, what is wrong).
//!
//! Two passes: serde (with `deny_unknown_fields`, so a misspelt key is refused rather than
//! ignored) turns the text into a raw form whose checked fields keep their spans, then the
//! semantic checks run with those spans at hand so they can name the line too. Whether a job
//! fits the cell's machines is a separate question ([`check_fits_somewhere`]), because the
//! answer depends on the nodes of the moment, not on the file.
//!
//! Memory is given either as `memory_bytes = 67108864` or as `memory = "64MiB"` (units B,
//! KiB, MiB, GiB, TiB, and KB, MB, GB, TB as powers of ten), not both.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The name a job file has in messages when the caller does not say.
pub const DEFAULT_FILE_NAME: &str = "job.toml";

const MAX_NAME_LEN: usize = 40;
const MAX_REPLICAS: u32 = 1000;
/// celld's own default and limit for a task's grace period.
const DEFAULT_KILL_GRACE_MS: u32 = 10_000;
const MAX_KILL_GRACE_MS: u32 = 600_000;
const MAX_PRIORITY: u32 = 1000;
const MIN_MEMORY_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobFileError {
    /// Not TOML, a misspelt key, a wrong type or a missing field.
    #[error("{file}{}: {}{message}", at(*.line, *.column), field_prefix(.field))]
    Syntax {
        file: String,
        line: Option<usize>,
        column: Option<usize>,
        /// Dotted path of the key involved, when it can be told from the text.
        field: Option<String>,
        message: String,
    },
    /// Well-formed, but a value is out of range.
    #[error("{file}{}: {field}: {problem}", at(*.line, None))]
    Invalid {
        file: String,
        line: Option<usize>,
        field: &'static str,
        problem: String,
    },
    /// Valid on its own, but larger than any node of the cell can hold.
    #[error("{field}: {problem}")]
    DoesNotFit {
        field: &'static str,
        problem: String,
    },
}

impl JobFileError {
    /// The dotted field the error is about, when known (for tests and for the CLI).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Syntax { field, .. } => field.as_deref(),
            Self::Invalid { field, .. } | Self::DoesNotFit { field, .. } => Some(field),
        }
    }

    /// The 1-based line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => *line,
            Self::DoesNotFit { .. } => None,
        }
    }
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" line {l}, column {c}"),
        (Some(l), None) => format!(" line {l}"),
        _ => String::new(),
    }
}

fn field_prefix(field: &Option<String>) -> String {
    field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default()
}

/// Memory and CPU are shared out of a node's allocatable; `pids_max` is a per-task cap
/// (0: the node's default), compared with the node's limit rather than summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    #[serde(default)]
    pub pids_max: u64,
}

impl Resources {
    pub fn new(memory_bytes: u64, cpu_millis: u64) -> Self {
        Self {
            memory_bytes,
            cpu_millis,
            pids_max: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    Never,
    #[default]
    OnFailure,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default)]
    pub mode: RestartMode,
    /// 0: unlimited (as in celld's `RestartPolicy`).
    #[serde(default)]
    pub max_restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Every label here must be on the node with the same value.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Replicas that a drain or a reimage may take down at once.
    pub max_unavailable: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Self { max_unavailable: 1 }
    }
}

/// A checked job: every value is in range. Stored as JSON by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub replicas: u32,
    pub priority: u32,
    pub argv: Vec<String>,
    pub rootfs: String,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub restart: RestartPolicy,
    pub constraints: Constraints,
    pub budget: Budget,
    /// SIGTERM to SIGKILL when a task is stopped (kill, drain, preemption).
    #[serde(default = "default_kill_grace_ms")]
    pub kill_grace_ms: u32,
}

fn default_kill_grace_ms() -> u32 {
    DEFAULT_KILL_GRACE_MS
}

// The raw forms: what serde reads, with spans on the fields the checks look at.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    #[serde(default = "one_replica")]
    replicas: Spanned<u32>,
    #[serde(default)]
    priority: Option<Spanned<u32>>,
    argv: Spanned<Vec<String>>,
    rootfs: Spanned<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    resources: Spanned<RawResources>,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default)]
    constraints: Constraints,
    #[serde(default)]
    budget: Option<Spanned<RawBudget>>,
    #[serde(default)]
    kill_grace_ms: Option<Spanned<u32>>,
}

fn one_replica() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory_bytes: Option<Spanned<u64>>,
    memory: Option<Spanned<String>>,
    cpu_millis: Spanned<u64>,
    #[serde(default)]
    pids_max: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_unavailable: Spanned<u32>,
}

/// Parses and checks a job file; errors call it [`DEFAULT_FILE_NAME`].
pub fn parse_job(text: &str) -> Result<JobSpec, JobFileError> {
    parse_job_named(DEFAULT_FILE_NAME, text)
}

/// Parses and checks a job file; `file` is the name errors give it (the path the user
/// typed).
pub fn parse_job_named(file: &str, text: &str) -> Result<JobSpec, JobFileError> {
    let raw: RawJob = toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
    Checker { file, text }.check(raw)
}

/// Refuses a job whose replica could not run on even the largest node (`largest`: the
/// greatest allocatable of the cell's nodes, per resource). Without this such a job would
/// sit pending forever.
pub fn check_fits_somewhere(job: &JobSpec, largest: Resources) -> Result<(), JobFileError> {
    let (r, l) = (&job.resources, &largest);
    let too_big = |field, want: String, have: String| JobFileError::DoesNotFit {
        field,
        problem: format!("{want} is more than any node can give (the largest has {have})"),
    };
    if r.memory_bytes > l.memory_bytes {
        let (want, have) = (human_bytes(r.memory_bytes), human_bytes(l.memory_bytes));
        return Err(too_big("resources.memory_bytes", want, have));
    }
    if r.cpu_millis > l.cpu_millis {
        let (want, have) = (r.cpu_millis.to_string(), l.cpu_millis.to_string());
        return Err(too_big("resources.cpu_millis", want, have));
    }
    // A node reporting 0 has not said; it is not a limit.
    if l.pids_max > 0 && r.pids_max > l.pids_max {
        let (want, have) = (r.pids_max.to_string(), l.pids_max.to_string());
        return Err(too_big("resources.pids_max", want, have));
    }
    Ok(())
}

/// Bytes for people: "64 MiB", "1.5 GiB", "1000 bytes".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                // Display only; the precision lost does not matter.
                #[allow(clippy::cast_precision_loss)]
                let v = n as f64 / size as f64;
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{n} bytes")
}

/// "64MiB", "64 MiB", "1.5GiB", "100MB", "4096" (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ));
        }
    };
    let bad = || format!("{s:?} is not a size: write e.g. \"64MiB\" or \"1.5GiB\"");
    if let Ok(whole) = num.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| format!("{s:?} is too large"));
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    // Multiplying in f64 is exact enough for sizes people write ("1.5GiB").
    #[allow(clippy::cast_precision_loss)]
    let bytes = v * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
}

impl Checker<'_> {
    fn invalid(
        &self,
        field: &'static str,
        span: Range<usize>,
        problem: impl Into<String>,
    ) -> JobFileError {
        JobFileError::Invalid {
            file: self.file.to_string(),
            // A defaulted field has an empty span at 0: no line to point at.
            line: (!span.is_empty()).then(|| line_col(self.text, span.start).0),
            field,
            problem: problem.into(),
        }
    }

    fn check(&self, raw: RawJob) -> Result<JobSpec, JobFileError> {
        let name = raw.name.get_ref();
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(self.invalid(
                "name",
                raw.name.span(),
                format!(
                    "{name:?} is not a valid job name: use [a-z0-9-], 1 to {MAX_NAME_LEN} characters"
                ),
            ));
        }

        let replicas = *raw.replicas.get_ref();
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(self.invalid(
                "replicas",
                raw.replicas.span(),
                format!("{replicas} is outside 1..={MAX_REPLICAS}"),
            ));
        }

        let priority = match &raw.priority {
            Some(p) if *p.get_ref() > MAX_PRIORITY => {
                return Err(self.invalid(
                    "priority",
                    p.span(),
                    format!("{} is outside 0..={MAX_PRIORITY}", p.get_ref()),
                ));
            }
            Some(p) => *p.get_ref(),
            None => 0,
        };

        let argv_span = raw.argv.span();
        let argv = raw.argv.into_inner();
        if argv.is_empty() || argv[0].is_empty() {
            return Err(self.invalid(
                "argv",
                argv_span,
                "is empty: give the program and its arguments, e.g. [\"/bin/sh\", \"-c\", \"...\"]",
            ));
        }

        if !raw.rootfs.get_ref().starts_with('/') {
            return Err(self.invalid(
                "rootfs",
                raw.rootfs.span(),
                format!(
                    "{:?} is not an absolute path: the node resolves it from /",
                    raw.rootfs.get_ref()
                ),
            ));
        }

        let resources = self.check_resources(raw.resources)?;

        let budget = match raw.budget {
            None => Budget::default(),
            Some(b) => {
                let m = &b.get_ref().max_unavailable;
                let n = *m.get_ref();
                if n < 1 || n > replicas {
                    return Err(self.invalid(
                        "budget.max_unavailable",
                        m.span(),
                        format!(
                            "{n} is outside 1..={replicas} (at least one replica must be allowed \
                             down for drains, and at most the {replicas} replicas there are)"
                        ),
                    ));
                }
                Budget { max_unavailable: n }
            }
        };

        let kill_grace_ms = match &raw.kill_grace_ms {
            None => DEFAULT_KILL_GRACE_MS,
            Some(g) if *g.get_ref() > MAX_KILL_GRACE_MS => {
                return Err(self.invalid(
                    "kill_grace_ms",
                    g.span(),
                    format!("{} is outside 0..={MAX_KILL_GRACE_MS}", g.get_ref()),
                ));
            }
            Some(g) => *g.get_ref(),
        };

        Ok(JobSpec {
            kill_grace_ms,
            name: raw.name.into_inner(),
            replicas,
            priority,
            argv,
            rootfs: raw.rootfs.into_inner(),
            env: raw.env,
            resources,
            restart: raw.restart,
            constraints: raw.constraints,
            budget,
        })
    }

    fn check_resources(&self, raw: Spanned<RawResources>) -> Result<Resources, JobFileError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let (memory_bytes, memory_span, memory_field) = match (raw.memory_bytes, raw.memory) {
            (Some(_), Some(m)) => {
                return Err(self.invalid(
                    "resources.memory",
                    m.span(),
                    "is given twice (memory and memory_bytes): keep one",
                ));
            }
            (None, None) => {
                return Err(self.invalid(
                    "resources.memory_bytes",
                    span,
                    "is missing: give memory_bytes = 67108864 or memory = \"64MiB\"",
                ));
            }
            (Some(b), None) => (*b.get_ref(), b.span(), "resources.memory_bytes"),
            (None, Some(m)) => {
                let bytes = parse_size(m.get_ref())
                    .map_err(|p| self.invalid("resources.memory", m.span(), p))?;
                (bytes, m.span(), "resources.memory")
            }
        };
        if memory_bytes < MIN_MEMORY_BYTES {
            return Err(self.invalid(
                memory_field,
                memory_span,
                format!(
                    "{} is below the minimum of 1 MiB",
                    human_bytes(memory_bytes)
                ),
            ));
        }
        let cpu_millis = *raw.cpu_millis.get_ref();
        if cpu_millis < 1 {
            return Err(self.invalid(
                "resources.cpu_millis",
                raw.cpu_millis.span(),
                "is 0: give at least 1 (thousandths of a CPU)",
            ));
        }
        Ok(Resources {
            memory_bytes,
            cpu_millis,
            pids_max: raw.pids_max,
        })
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

fn syntax_error(file: &str, text: &str, e: &toml::de::Error) -> JobFileError {
    let message = e.message().trim().to_string();
    let (line, column, field) = match e.span() {
        // A field missing at the top level: the span is the whole document, and "line 1"
        // would send the reader to the wrong place.
        Some(span) if span.start == 0 && message.starts_with("missing field") => (None, None, None),
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            // "unknown field `x`" and "missing field `x`" name it already.
            let field = if message.contains("field `") {
                None
            } else {
                key_at(text, span.start)
            };
            (Some(line), Some(column), field)
        }
        None => (None, None, None),
    };
    JobFileError::Syntax {
        file: file.to_string(),
        line,
        column,
        field,
        message,
    }
}

/// The dotted key whose value sits at `offset`: the `key =` at the start of that line,
/// under the nearest `[table]` header above it. A best effort for messages (serde's type
/// errors do not say which field they are about); `None` when the line is not `key = ...`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !key_ok {
        return None;
    }
    let table = before
        .get(..line_start)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

#[cfg(test)]
mod tests;
