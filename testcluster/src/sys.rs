//! The few system calls a child needs between fork and exec, the crate's only unsafe code: dying
//! with its parent, and entering a pod's root file system as the pod's user.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};

/// The child gets SIGKILL when the thread that started it exits, so that nothing outlives a test
/// that died (a test's processes are started from its own thread or the runtime's, which end with it).
/// A change of user clears the signal: register this after [`enter`].
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// Where and as whom a pod's process runs.
#[derive(Debug)]
pub struct Sandbox {
    /// The pod's network namespace (an open `/run/netns/<name>`).
    pub netns: std::fs::File,
    /// The pod's root file system.
    pub root: PathBuf,
    /// The working directory inside it.
    pub workdir: PathBuf,
    /// The container's user.
    pub uid: u32,
    /// The container's group.
    pub gid: u32,
    /// Supplementary groups (the pod's `fsGroup`).
    pub groups: Vec<u32>,
}

/// The child enters the pod's network namespace, then its root file system, as its user.
pub fn enter(command: &mut Command, sandbox: Sandbox) {
    let Sandbox { netns, root, workdir, uid, gid, groups } = sandbox;
    let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw).collect();
    // SAFETY: setns(2), chroot(2), chdir(2), setgroups(2), setgid(2) and setuid(2) are
    // async-signal-safe; the closure owns its inputs, allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            let io = std::io::Error::from;
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io)?;
            nix::unistd::chroot(&root).map_err(io)?;
            nix::unistd::chdir(&workdir).map_err(io)?;
            nix::unistd::setgroups(&groups).map_err(io)?;
            nix::unistd::setgid(Gid::from_raw(gid)).map_err(io)?;
            nix::unistd::setuid(Uid::from_raw(uid)).map_err(io)?;
            Ok(())
        });
    }
}
