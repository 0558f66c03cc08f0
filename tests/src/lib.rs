//! System-test harness: boots a node image built by `cellimg` under QEMU (TCG: these
//! machines have no usable KVM), forwards a loopback port to celld's gRPC port, and keeps
//! the serial console for the failure message.
//!
//! The artifacts come from `CELLD_ARTIFACTS` (tests/run-all.sh builds them); a missing or
//! incomplete directory fails the test with what to do.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod pxe;

use celld_proto::v1 as pb;
use celld_proto::v1::node_client::NodeClient;
use tonic::transport::Channel;

/// How a machine finds its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPath {
    /// `-kernel vmlinuz -initrd initramfs.cpio.gz`
    KernelInitrd,
    /// `-cdrom node.iso` with SeaBIOS.
    IsoBios,
    /// `-cdrom node.iso` with OVMF.
    IsoUefi,
    /// The NIC's iPXE ROM: DHCP and TFTP from QEMU's user network, then boot.ipxe.
    Pxe,
}

/// The artifacts of one image and what its manifest says.
pub struct Artifacts {
    pub dir: PathBuf,
    pub version: String,
    pub cmdline: String,
}

pub fn artifacts() -> Artifacts {
    artifacts_named("CELLD_ARTIFACTS")
}

/// The artifacts in the directory the environment variable `var` names.
pub fn artifacts_named(var: &str) -> Artifacts {
    let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: build an image with tests/run-all.sh (or cellimg build) \
             and point {var} at its output directory"
        )
    });
    for f in [
        "vmlinuz",
        "initramfs.cpio.gz",
        "node.iso",
        "pxe/boot.ipxe",
        "manifest.json",
    ] {
        assert!(
            dir.join(f).exists(),
            "{} lacks {f}: rebuild the image with cellimg build",
            dir.display()
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    Artifacts {
        version: manifest["version"].as_str().unwrap().to_string(),
        cmdline: manifest["kernel_cmdline"].as_str().unwrap().to_string(),
        dir,
    }
}

/// One VM at a time: two cores cannot emulate two machines at a useful speed.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Holds the one-VM-at-a-time turn (tests that boot several machines take it once).
pub fn vm_turn() -> MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Vm {
    child: Child,
    pub port: u16,
    pub serial: PathBuf,
    monitor: PathBuf,
    _dir: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Vm {
    pub fn boot(path: BootPath, a: &Artifacts) -> Vm {
        Self::boot_with(path, a, "")
    }

    /// `extra_cmdline` is appended to the manifest's command line (kernel+initrd only:
    /// the ISO and PXE paths carry theirs inside the artifacts).
    pub fn boot_with(path: BootPath, a: &Artifacts, extra_cmdline: &str) -> Vm {
        let turn = vm_turn();
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let monitor = dir.path().join("monitor.sock");
        let port = free_port();
        let fwd = format!("hostfwd=tcp:127.0.0.1:{port}-:7100");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "512", "-smp", "2"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()));
        let d = &a.dir;
        // Disks boot with the NIC's own boot ROM off, so firmware does not try PXE first.
        let nic_no_rom = "virtio-net-pci,netdev=n0,romfile=";
        match path {
            BootPath::KernelInitrd => {
                cmd.arg("-kernel")
                    .arg(d.join("vmlinuz"))
                    .arg("-initrd")
                    .arg(d.join("initramfs.cpio.gz"))
                    .args(["-append", &format!("{} {extra_cmdline}", a.cmdline)])
                    .args(["-netdev", &format!("user,id=n0,{fwd}")])
                    .args(["-device", nic_no_rom]);
            }
            BootPath::IsoBios | BootPath::IsoUefi => {
                if path == BootPath::IsoUefi {
                    cmd.args(["-bios", "/usr/share/ovmf/OVMF.fd"]);
                }
                cmd.arg("-cdrom")
                    .arg(d.join("node.iso"))
                    .args(["-boot", "order=d"])
                    .args(["-netdev", &format!("user,id=n0,{fwd}")])
                    .args(["-device", nic_no_rom]);
            }
            BootPath::Pxe => {
                cmd.args([
                    "-netdev",
                    &format!(
                        "user,id=n0,tftp={},bootfile=pxe/boot.ipxe,{fwd}",
                        d.display()
                    ),
                ])
                .args(["-device", "virtio-net-pci,netdev=n0"])
                .args(["-boot", "n"]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86");
        Vm {
            child,
            port,
            serial,
            monitor,
            _dir: dir,
            _turn: turn,
        }
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits until celld answers GetStatus over the forwarded port.
    pub async fn connect(&mut self, timeout: Duration) -> (NodeClient<Channel>, pb::NodeStatus) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU exited ({status}) before celld answered; console:\n{}",
                    self.console()
                );
            }
            let attempt = async {
                let ch = Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
                    .ok()?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .ok()?;
                let mut client = NodeClient::new(ch);
                let status = client
                    .get_status(pb::GetStatusRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                Some((client, status))
            };
            if let Some(ok) = attempt.await {
                return ok;
            }
            if Instant::now() > deadline {
                panic!(
                    "celld did not answer within {timeout:?}; console:\n{}",
                    self.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Presses ctrl-alt-del on the VM's keyboard.
    pub fn ctrl_alt_del(&self) {
        use std::io::Write;
        let mut m =
            std::os::unix::net::UnixStream::connect(&self.monitor).expect("QEMU monitor socket");
        m.write_all(b"sendkey ctrl-alt-delete\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Waits for QEMU to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- serial console of the failed VM:\n{}", self.console());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps the serial log of a VM under `CELLD_CONSOLE_DIR` (default: the workspace's
/// `target/consoles/`), named after the test.
pub fn save_console(vm: &Vm, name: &str) {
    let dir = std::env::var_os("CELLD_CONSOLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/consoles"));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.log")), vm.console());
}
