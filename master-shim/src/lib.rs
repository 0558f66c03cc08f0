//! cellmaster, the thin master of a celld cell (Borg's Borgmaster, thinned).
//!
//! # Layout
//!
//! - `jobfile`: job files (TOML) to validated job specs, errors with line and field.
//! - `scheduler`: pure placement: feasibility, scoring, preemption, why-pending.
//! - `store`: the master's state behind one trait; SQLite by default.
//! - [`poll`]: polling every node's status, liveness (Ready, Unknown, Down).
//! - [`registry`]: the nodes the master knows and what they said.
//! - [`server`]: the Master gRPC service with the poller beside it.
//! - [`placement`]: the loop that schedules pending tasks and starts them on nodes.
//! - [`http`]: iPXE scripts and image artifacts for machines that PXE-boot.

pub mod http;
pub mod jobfile;
pub mod placement;
pub mod poll;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod store;
