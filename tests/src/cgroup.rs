//! A cgroup v2 made for one test under the machine's cgroup2 mount, removed on drop.
//!
//! The mount is found in `/proc/self/mountinfo` (filesystem type `cgroup2`): `/sys/fs/cgroup`
//! on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one. Processes are put in it by
//! writing their pid to its `cgroup.procs`; on drop any still there are moved back to the
//! mount's root cgroup (the test kills its own processes first) and the directory is removed,
//! retrying for up to 2 s while the kernel finishes tearing exited processes down.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2").then(|| before.split(' ').nth(4))?
        })
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted (/proc/self/mountinfo)"))
}

/// A cgroup created for a test (`relative` under the cgroup2 mount), removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    mount: PathBuf,
    /// The directories created, outermost first (removed innermost first).
    created: Vec<PathBuf>,
    /// The cgroup's path as `/proc/PID/cgroup` shows it (`/a/b.service`).
    pub path: String,
}

impl TestCgroup {
    /// Creates `relative` (e.g. `observer-test.slice/observer-test-42.service`) and any missing
    /// parents under the cgroup2 mount.
    pub fn create(relative: &str) -> Result<TestCgroup> {
        let mount = cgroup2_mount()?;
        let mut cgroup = TestCgroup {
            mount: mount.clone(),
            created: Vec::new(),
            path: format!("/{}", relative.trim_matches('/')),
        };
        let mut dir = mount;
        for component in relative.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                // Pushed at once: a later failure still removes it (drop).
                cgroup.created.push(dir.clone());
            }
        }
        Ok(cgroup)
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> PathBuf {
        self.mount.join(self.path.trim_start_matches('/'))
    }

    /// Its `cgroup.procs` file: write a pid to move that process in.
    pub fn procs_file(&self) -> PathBuf {
        self.dir().join("cgroup.procs")
    }

    /// The pids in it now.
    pub fn pids(&self) -> Vec<u32> {
        pids_of(&self.dir())
    }
}

fn pids_of(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let root_procs = self.mount.join("cgroup.procs");
        for dir in self.created.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                // A process still inside (the test failed before killing it) goes back to the
                // root cgroup, so that the directory can go.
                for pid in pids_of(dir) {
                    let _ = std::fs::write(&root_procs, pid.to_string());
                }
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!("note: could not remove cgroup {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}
