//! cellmaster, the thin master of a celld cell (Borg's Borgmaster, thinned).
//!
//! # Layout
//!
//! - [`config`]: `serve --config`: polling settings and nodes listed by hand.
//! - `jobfile`: job files (TOML) to validated job specs, errors with line and field.
//! - `scheduler`: pure placement: feasibility, scoring, preemption, why-pending.
//! - `store`: the master's state behind one trait; SQLite by default.
//! - [`poll`]: polling every node's status, liveness (Ready, Unknown, Down).
//! - [`registry`]: the nodes the master knows and what they said.
//! - [`server`]: the master's shared state and its loops (poller, changes, placement).
//! - [`api`]: the Master gRPC service, thin; [`admin`] and [`drain`] do operators' calls.
//! - [`control`]: registrations, liveness changes and statuses applied to the store.
//! - [`reconcile`]: pure rules matching a node's tasks against the store's.
//! - [`placement`]: the loop that schedules pending tasks and starts them on nodes.
//! - [`nodes`]: calls from the master to nodes.
//! - [`images`]: node images by version, signed; [`rollout`]: reimaging the fleet.
//! - [`trust`]: the cell CA, the master's certificate, join tokens, node admission.
//! - [`http`]: iPXE scripts and image artifacts for machines that PXE-boot.

pub mod admin;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod drain;
pub mod http;
pub mod images;
pub mod jobfile;
pub mod nodes;
pub mod placement;
pub mod poll;
pub mod reconcile;
pub mod registry;
pub mod rollout;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod trust;
