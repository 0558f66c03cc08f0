//! Kernel tuning: the sysctl profile (and, in PID 1 mode, the hostname).

pub mod sysctl;
