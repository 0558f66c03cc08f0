//! The only room with `unsafe`: raw syscalls that neither `nix` nor the standard library
//! wrap the way celld needs. Every block names the invariant it relies on.
//!
//! Nothing here knows about tasks; callers pass plain values.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// Arguments of `execve` prepared before `clone`, so the child allocates nothing.
pub struct ExecArgs<'a> {
    pub path: &'a CStr,
    /// NULL-terminated.
    pub argv: &'a [*const libc::c_char],
    /// NULL-terminated.
    pub envp: &'a [*const libc::c_char],
}

/// `clone(flags)` without a new stack (fork semantics) and, in the child, nothing but
/// `dup2` of `fd_map` (source, target) pairs and `execve`.
///
/// The parent is multi-threaded (tokio): after clone the child may only call
/// async-signal-safe functions, so it does no allocation, locking or logging. If `execve`
/// fails the child writes `execfail:<errno>` to `report_fd` (a target fd of `fd_map`)
/// and exits with 127.
pub fn clone_and_exec(
    flags: libc::c_int,
    exec: &ExecArgs<'_>,
    fd_map: &[(RawFd, RawFd)],
    report_fd: RawFd,
) -> Result<Pid, Errno> {
    if exec.argv.last() != Some(&std::ptr::null()) || exec.envp.last() != Some(&std::ptr::null()) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: with a NULL stack, clone behaves like fork: the child continues on a
    // copy-on-write copy of this thread's stack. SIGCHLD makes the child reapable by
    // waitpid like any forked child. The child branch below only calls async-signal-safe
    // syscalls on memory prepared before the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if ret < 0 {
        return Err(Errno::last());
    }
    if ret > 0 {
        return Ok(Pid::from_raw(ret as libc::pid_t));
    }
    // Child. Sources are first moved above every target so that mapping one pair cannot
    // clobber the source of a later one.
    let mut high = [0 as RawFd; 8];
    let n = fd_map.len().min(high.len());
    for (i, (src, _)) in fd_map.iter().take(n).enumerate() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor.
        high[i] = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 100) };
    }
    for (i, (_, dst)) in fd_map.iter().take(n).enumerate() {
        // SAFETY: dup2 onto a small fixed number; the new fd is not close-on-exec.
        unsafe { libc::dup2(high[i], *dst) };
    }
    // SAFETY: path, argv and envp are NUL-terminated C strings and NULL-terminated
    // pointer arrays that live in the parent's (copied) memory.
    unsafe { libc::execve(exec.path.as_ptr(), exec.argv.as_ptr(), exec.envp.as_ptr()) };
    let errno = Errno::last() as i32;
    let mut buf = *b"execfail:0000000000\n";
    let mut v = errno.unsigned_abs();
    let mut i = buf.len() - 2;
    loop {
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 9 {
            break;
        }
        i -= 1;
    }
    // SAFETY: write(2) of a stack buffer; _exit skips atexit handlers that could take
    // locks held by other threads of the parent.
    unsafe {
        libc::write(report_fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// Parses what `clone_and_exec`'s child writes when `execve` fails.
pub fn parse_execfail(line: &str) -> Option<i32> {
    let digits = line
        .strip_prefix("execfail:")?
        .trim()
        .trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    digits.parse().ok()
}

/// Marks every descriptor from `first` upwards close-on-exec.
pub fn cloexec_from(first: RawFd) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        )
    };
    Errno::result(r).map(drop)
}

/// Sets IFF_UP on the loopback interface of the current network namespace.
pub fn loopback_up() -> Result<(), Errno> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own, on a socket we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) })?;
    // SAFETY: ifr_ifru is a union; SIOCGIFFLAGS filled its flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) })?;
    Ok(())
}

/// setrlimit(2) by raw resource number, as task specs name them.
pub fn set_rlimit(resource: i64, soft: u64, hard: u64) -> Result<(), Errno> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own; an unknown resource is EINVAL.
    Errno::result(unsafe { libc::setrlimit(resource as _, &lim) }).map(drop)
}

/// The Landlock ABI version the running kernel offers; 0 when it has none.
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attribute pointer, size 0 and the VERSION flag the call only
    // returns a number (or -1 with ENOSYS/EOPNOTSUPP).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).unwrap_or(0)
}

/// Takes ownership of a descriptor a `nix` call returned as a raw number.
pub fn owned(fd: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: callers pass a descriptor that was just opened and is owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Claims descriptor `fd` inherited from the parent, if it is open.
pub fn take_inherited_fd(fd: RawFd) -> Option<std::os::fd::OwnedFd> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).ok()?;
    Some(owned(fd))
}

/// kexec_load with no segments: only tells whether the caller may load a kernel (used by
/// the hostile-task probe; with zero segments a permitted call unloads nothing harmful).
pub fn kexec_load_nothing() -> Result<(), Errno> {
    // SAFETY: zero segments and a NULL segment array; the kernel reads no user memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_load,
            0usize,
            0usize,
            std::ptr::null::<libc::c_void>(),
            0usize,
        )
    };
    Errno::result(r).map(drop)
}

/// kexec_file_load(2): stages `kernel` and `initramfs` (open descriptors, read by the
/// kernel itself) with `cmdline` as the kernel that reboot(LINUX_REBOOT_CMD_KEXEC) starts.
pub fn kexec_file_load(
    kernel: std::os::fd::BorrowedFd<'_>,
    initramfs: std::os::fd::BorrowedFd<'_>,
    cmdline: &CStr,
) -> Result<(), Errno> {
    let cmdline = cmdline.to_bytes_with_nul();
    // SAFETY: both descriptors are open for the duration of the call (borrowed); the
    // command line pointer and its length (NUL included, as the kernel requires) come
    // from one live CStr; flags 0 loads a normal (not crash) kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initramfs.as_raw_fd(),
            cmdline.len() as libc::c_ulong,
            cmdline.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    Errno::result(r).map(drop)
}
