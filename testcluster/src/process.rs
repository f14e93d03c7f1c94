//! Child processes that never outlive the test: each gets the kernel's parent-death signal, is
//! stopped by process id (SIGTERM, then SIGKILL after a grace period) and reaped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running child process whose output goes to a log file.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Print the log's tail when the process is stopped or found dead.
    pub print_log_on_exit: bool,
}

impl Process {
    /// Starts `program` with `args`, its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let mut command = Command::new(program);
        command.args(args);
        Self::spawn_command(name, command, log)
    }

    /// Starts `command`, its stdout and stderr appended to `log`.
    pub fn spawn_command(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::options().create(true).append(true).open(log).with_context(|| format!("{}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        crate::sys::die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self { name: name.into(), child: Some(child), log: log.to_path_buf(), print_log_on_exit: false })
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error (with the end of its log) if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!(
                "{} exited ({status}); the end of its log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then SIGKILLs it; always reaps it.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let pid = Pid::from_raw(child.id() as i32);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill(pid, Signal::SIGTERM);
            let started = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && started.elapsed() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        let _ = child.wait();
        if self.print_log_on_exit {
            eprintln!("--- {} log ({}):\n{}", self.name, self.log.display(), tail(&self.log, 60));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
