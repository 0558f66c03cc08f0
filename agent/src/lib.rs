//! celld, the node agent of a celld cell (Borg's Borglet).
//!
//! One binary, two modes: PID 1 of a celld node image, or a daemon on an ordinary Linux
//! host (development, tests, benchmarks). Tasks take the same code path in both.
//!
//! # Layout
//!
//! - [`config`]: node configuration from defaults, file and kernel command line (pure).
//! - [`task`]: the Borglet core: specs, lifecycle, spawn path, isolation, logs, restarts.
//! - [`cgroup`]: the only code that touches `/sys/fs/cgroup`.
//! - [`kernel`]: the sysctl profile.
//! - [`node`]: identity, capacity, usage, conditions.
//! - [`api`]: the gRPC handlers (thin) and proto conversion.
//! - [`reimage`]: checking, downloading and staging a new image (kexec).
//! - [`register`]: announcing the node to the master at boot, with backoff.
//! - [`init`]: PID-1 duties: mounts, hostname, loopback, power.
//! - [`serve`]: wiring it all together for either mode.
//! - [`sys`]: the only module with `unsafe`.

pub mod api;
pub mod cgroup;
pub mod config;
pub mod init;
pub mod kernel;
pub mod net;
pub mod node;
pub mod register;
pub mod reimage;
pub mod serve;
pub mod sys;
pub mod task;
