//! `celld-probe`: a deliberately hostile task for celld's tests and benchmarks. Each
//! subcommand tries something a task must not be able to do and prints what happened, one
//! `name=result` per line, so a test can assert on the output.

use std::ffi::CString;

use nix::errno::Errno;

fn show(name: &str, r: Result<(), Errno>) {
    match r {
        Ok(()) => println!("{name}=ok"),
        Err(e) => println!("{name}={e}"),
    }
}

fn syscalls() {
    show(
        "mount",
        nix::mount::mount(
            Some("none"),
            "/tmp",
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ),
    );
    show(
        "ptrace",
        nix::sys::ptrace::attach(nix::unistd::Pid::from_raw(1)),
    );
    show("reboot", nix::sys::reboot::set_cad_enabled(false));
    let name = CString::new("").unwrap_or_default();
    show("init_module", nix::kmod::init_module(&[], &name));
    show("kexec_load", celld::sys::kexec_load_nothing());
    show(
        "unshare_user",
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER),
    );
    show(
        "sethostname_after_drop",
        nix::unistd::sethostname("x").map(drop),
    );
}

fn hog() {
    // Touch every page so the memory is really charged to the cgroup.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut v = vec![0u8; 8 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        chunks.push(v);
        println!("hog={} MiB", chunks.len() * 8);
    }
}

/// Starts processes until told to stop, counting refusals instead of giving up.
fn forkbomb() {
    let (mut ok, mut refused) = (0u64, 0u64);
    let mut children = Vec::new();
    loop {
        match std::process::Command::new("/bin/sleep").arg("600").spawn() {
            Ok(c) => {
                ok += 1;
                children.push(c);
            }
            Err(_) => refused += 1,
        }
        if (ok + refused) % 100 == 0 {
            println!("forks_ok={ok} refused={refused}");
        }
    }
}

fn read(path: &str) {
    match std::fs::read(path) {
        Ok(b) => println!("{} bytes", b.len()),
        Err(e) => println!("{}", Errno::from_raw(e.raw_os_error().unwrap_or(0))),
    }
}

/// Restricts itself to ROOT with celld's own Landlock code, then reads a file inside
/// and one outside.
fn landlock(root: &str, inside: &str, outside: &str) {
    match celld::task::landlock::restrict_to(std::path::Path::new(root)) {
        Ok(abi) => println!("landlock_abi={abi}"),
        Err(e) => println!("landlock_error={e}"),
    }
    print!("inside=");
    read(inside);
    print!("outside=");
    read(outside);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("syscalls") => syscalls(),
        Some("hog") => hog(),
        Some("forkbomb") => forkbomb(),
        Some("read") => read(args.get(2).map(String::as_str).unwrap_or("/")),
        Some("landlock") if args.len() == 5 => landlock(&args[2], &args[3], &args[4]),
        _ => {
            eprintln!(
                "usage: celld-probe syscalls | hog | forkbomb | read PATH | landlock ROOT INSIDE OUTSIDE"
            );
            std::process::exit(2);
        }
    }
}
