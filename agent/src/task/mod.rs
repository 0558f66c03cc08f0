//! The Borglet core: tasks, their lifecycle, the spawn path and its isolation.
//!
//! Layout: `spec` (what a task is, validated), `state` (the lifecycle), `oci` (a task
//! from an OCI config.json), `spawn` + `child` (starting one), `seccomp`, `landlock`,
//! `logs`, and `supervisor` (the running set: admission, restarts, kills, eviction).

pub mod child;
pub mod landlock;
pub mod logs;
pub mod oci;
pub mod seccomp;
pub mod spawn;
pub mod spec;
pub mod state;
pub mod supervisor;

pub use supervisor::{ExitStatus, RunError, Supervisor, TaskView};
