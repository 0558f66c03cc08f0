//! The default seccomp profile, compiled once per celld process with seccompiler and
//! handed to each task's setup helper as plain BPF instructions.
//!
//! Everything is allowed except calls that reach past the task into the node: mounts,
//! module and kexec loading, reboot, tracing other processes, eBPF and perf, the keyring,
//! swap, clocks, and creating user namespaces.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A BPF instruction as it travels to the helper process.
pub type Instruction = (u16, u8, u8, u32);

#[derive(Debug, thiserror::Error)]
#[error("compiling the default seccomp profile: {0}")]
pub struct SeccompError(String);

/// Calls that fail with EPERM whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_adjtimex,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_init_module,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pivot_root,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_ptrace,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_settimeofday,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_syslog,
    libc::SYS_umount2,
    libc::SYS_userfaultfd,
    libc::SYS_uselib,
    libc::SYS_vhangup,
];

/// The compiled default profile: two filters, both installed.
#[derive(Debug, Clone)]
pub struct Profile {
    /// EPERM for `DENIED` and for new user namespaces.
    pub deny: Vec<Instruction>,
    /// ENOSYS for clone3, whose flags live in memory a filter cannot read: libc then
    /// falls back to clone, whose flags the first filter checks.
    pub clone3: Vec<Instruction>,
}

fn to_instructions(p: BpfProgram) -> Vec<Instruction> {
    p.into_iter().map(|f| (f.code, f.jt, f.jf, f.k)).collect()
}

/// Back to the form the kernel takes.
pub fn to_program(ins: &[Instruction]) -> BpfProgram {
    ins.iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect()
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: i32,
) -> Result<Vec<Instruction>, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))?;
    Ok(to_instructions(prog))
}

fn flag_rule(arg: u8, flag: u64) -> Result<SeccompRule, SeccompError> {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(flag),
        flag,
    )
    .map_err(|e| SeccompError(e.to_string()))?;
    SeccompRule::new(vec![cond]).map_err(|e| SeccompError(e.to_string()))
}

impl Profile {
    pub fn compile_default() -> Result<Self, SeccompError> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            DENIED.iter().map(|&s| (s, Vec::new())).collect();
        let newuser = libc::CLONE_NEWUSER as u64;
        rules.insert(libc::SYS_unshare, vec![flag_rule(0, newuser)?]);
        rules.insert(libc::SYS_clone, vec![flag_rule(0, newuser)?]);
        rules.insert(libc::SYS_setns, vec![flag_rule(1, newuser)?]);
        let deny = compile(rules, libc::EPERM)?;
        let clone3 = compile(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            libc::ENOSYS,
        )?;
        Ok(Self { deny, clone3 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_profile_compiles_and_round_trips() {
        let p = Profile::compile_default().unwrap();
        assert!(p.deny.len() > DENIED.len());
        let back = to_program(&p.deny);
        assert_eq!(to_instructions(back), p.deny);
        assert!(!p.clone3.is_empty());
    }
}
