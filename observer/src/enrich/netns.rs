//! Network namespaces: finding them, and running code inside one without moving the caller.
//!
//! Everything observer enriches with (SNMP counters, sock_diag dumps, `/proc/sys/net` sysctls)
//! is per network namespace, and the kernel resolves each of them against the namespace of the
//! *calling thread*:
//! - a netlink socket belongs to the namespace of the thread that created it;
//! - `/proc/sys/net/...` is resolved against the opening thread's namespace;
//! - `/proc/net` is a link to `/proc/self/net`, and `/proc/self` is the *thread group leader*: a
//!   thread that `setns`ed sees its leader's namespace there. Only `/proc/thread-self/net`
//!   follows the calling thread (checked by the `enrich_kernel` tests).
//!
//! [`in_namespace`] therefore runs a closure on a fresh thread that enters the namespace first:
//! the caller (often a tokio worker) never changes namespace, and nothing leaks into other work
//! if the closure panics.
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// The calling thread's network namespace, as a path that always refers to the caller itself.
pub const THREAD_SELF_NETNS: &str = "/proc/thread-self/ns/net";
/// Where `ip netns add` keeps the bind mounts that name namespaces.
pub const NAMED_NETNS_DIR: &str = "/run/netns";
/// PID 1's namespace: "the host" from observer's point of view.
pub const HOST_NETNS: &str = "/proc/1/ns/net";

/// Errors running code inside a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file (e.g. `/run/netns/NAME`, `/proc/PID/ns/net`) could not be opened: the
    /// namespace was removed or the process exited.
    #[error("cannot open network namespace file `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// `setns(fd, CLONE_NEWNET)` failed: not a network namespace file, or missing
    /// CAP_SYS_ADMIN over the namespace's owning user namespace.
    #[error("setns(`{path}`, CLONE_NEWNET) failed")]
    Setns {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// The helper thread could not be started.
    #[error("cannot spawn a thread to enter `{path}`")]
    Spawn {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// The closure panicked on the helper thread (the panic is contained there).
    #[error("the function run in network namespace `{path}` panicked: {message}")]
    Panicked { path: PathBuf, message: String },
}

/// A network namespace that was found on the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRef {
    /// The namespace's inode number on nsfs: its identity (what `ip netns identify`,
    /// `lsns` and `readlink /proc/PID/ns/net` show as `net:[INODE]`).
    pub inode: u64,
    /// The name under /run/netns, if the namespace has one.
    pub name: Option<String>,
    /// A file that can be opened and passed to `setns` (see [`in_namespace`]). For namespaces
    /// known only through a process this is `/proc/PID/ns/net`, valid while that process lives.
    pub path: PathBuf,
}

/// Inode of the calling thread's network namespace.
///
/// Uses `/proc/thread-self`, not `/proc/self`: the latter is the thread group leader, which
/// is in a different namespace while this thread runs inside [`in_namespace`].
pub fn current_inode() -> io::Result<u64> {
    Ok(std::fs::metadata(THREAD_SELF_NETNS)?.ino())
}

/// Where a namespace was seen; also the order of preference for [`NamespaceRef::path`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// PID 1's namespace.
    Host,
    /// A bind mount in /run/netns (named by `ip netns add`).
    Named(String),
    /// A running process's `/proc/PID/ns/net`.
    Process(u32),
}

/// One sighting of a namespace file, before deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub source: Source,
    /// The file's inode (the namespace's identity when `dev` is nsfs).
    pub inode: u64,
    /// The file's device: nsfs for a live namespace. A stale /run/netns entry whose mount is
    /// gone is a plain file on tmpfs with some other device and inode.
    pub dev: u64,
    pub path: PathBuf,
}

/// Deduplicates sightings by inode (pure; [`discover`] feeds it).
///
/// Sightings not on `nsfs_dev` are dropped (stale /run/netns files). For each namespace the
/// path of the most stable source is kept (host, then named, then the lowest PID), and the
/// name is the first in sort order among its names. Output order: the host first, then named
/// namespaces by name, then the rest by inode.
pub fn dedup(nsfs_dev: u64, candidates: impl IntoIterator<Item = Candidate>) -> Vec<NamespaceRef> {
    // inode -> (best source, its path, first name)
    let mut by_inode: BTreeMap<u64, (Source, PathBuf, Option<String>)> = BTreeMap::new();
    for candidate in candidates {
        let Candidate {
            source,
            inode,
            dev,
            path,
        } = candidate;
        if dev != nsfs_dev {
            continue;
        }
        let name = match &source {
            Source::Named(name) => Some(name.clone()),
            Source::Host | Source::Process(_) => None,
        };
        match by_inode.get_mut(&inode) {
            None => {
                by_inode.insert(inode, (source, path, name));
            }
            Some((best, best_path, best_name)) => {
                if name.is_some() && (best_name.is_none() || name < *best_name) {
                    *best_name = name;
                }
                if source < *best {
                    *best = source;
                    *best_path = path;
                }
            }
        }
    }
    let mut refs: Vec<(Source, NamespaceRef)> = by_inode
        .into_iter()
        .map(|(inode, (source, path, name))| (source, NamespaceRef { inode, name, path }))
        .collect();
    refs.sort_by(|(a_source, a), (b_source, b)| {
        let rank = |source: &Source, r: &NamespaceRef| match (source, &r.name) {
            (Source::Host, _) => 0,
            (_, Some(_)) => 1,
            (_, None) => 2,
        };
        rank(a_source, a)
            .cmp(&rank(b_source, b))
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.inode.cmp(&b.inode))
    });
    refs.into_iter().map(|(_, r)| r).collect()
}

/// Stats one namespace file; `None` when it vanished or is not ours to see (EACCES for other
/// users' processes when not root).
fn sighting(source: Source, path: PathBuf) -> Option<Candidate> {
    let meta = std::fs::metadata(&path).ok()?;
    Some(Candidate {
        source,
        inode: meta.ino(),
        dev: meta.dev(),
        path,
    })
}

/// All network namespaces in use: the host's (PID 1's), every named one in /run/netns, and
/// those of running processes (`/proc/*/ns/net`), deduplicated by inode.
///
/// Best effort: files that vanish or cannot be read while scanning are skipped. That includes
/// PID 1's when a sandbox refuses access to it (EACCES even for root): then no entry is marked
/// as the host, and observer's own namespace is still found through its process. Namespaces kept
/// alive only by a socket or a thread (not a thread group leader) or a bind mount elsewhere are
/// not found.
pub fn discover() -> Vec<NamespaceRef> {
    let Ok(nsfs_dev) = std::fs::metadata(THREAD_SELF_NETNS).map(|m| m.dev()) else {
        return Vec::new();
    };
    let mut candidates = Vec::new();
    candidates.extend(sighting(Source::Host, PathBuf::from(HOST_NETNS)));
    if let Ok(entries) = std::fs::read_dir(NAMED_NETNS_DIR) {
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            candidates.extend(sighting(Source::Named(name), entry.path()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            candidates.extend(sighting(
                Source::Process(pid),
                entry.path().join("ns").join("net"),
            ));
        }
    }
    dedup(nsfs_dev, candidates)
}

/// The named namespaces (`ip netns add`): inode and name of every live bind mount in
/// /run/netns. Cheap (no /proc scan); empty when the directory is absent.
pub fn named_namespaces() -> Vec<(u64, String)> {
    let Ok(nsfs_dev) = std::fs::metadata(THREAD_SELF_NETNS).map(|m| m.dev()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(NAMED_NETNS_DIR) else {
        return Vec::new();
    };
    let candidates = entries.flatten().filter_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        sighting(Source::Named(name), entry.path())
    });
    dedup(nsfs_dev, candidates)
        .into_iter()
        .filter_map(|ns| Some((ns.inode, ns.name?)))
        .collect()
}

/// The namespace with this inode, if [`discover`] finds it.
pub fn find_by_inode(inode: u64) -> Option<NamespaceRef> {
    discover().into_iter().find(|ns| ns.inode == inode)
}

/// Runs `f` inside the network namespace at `path` (e.g. `/run/netns/NAME`,
/// `/proc/PID/ns/net`, [`NamespaceRef::path`]) and returns its result.
///
/// `f` runs on a new thread that first calls `setns(fd, CLONE_NEWNET)`; the calling thread's
/// namespace never changes. Inside `f`, sockets are created in the entered namespace, and
/// `/proc/sys/net/...` and `/proc/thread-self/net/...` show it (`/proc/net` and `/proc/self/net`
/// do not: they follow the process's main thread). Threads that `f` spawns inherit the
/// namespace. Blocks until `f` returns: from async code, call it in
/// `tokio::task::spawn_blocking`.
pub fn in_namespace<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = File::open(path).map_err(|io_error| NetnsError::Open {
        path: path.to_owned(),
        io_error,
    })?;
    let handle = std::thread::Builder::new()
        .name("observer-netns".to_owned())
        .spawn(move || -> io::Result<T> {
            // SAFETY: `file` is an open descriptor owned by this closure for the whole call;
            // setns only reads it. CLONE_NEWNET changes this thread's network namespace alone
            // (unlike the mount or user namespace it has no single-threaded requirement).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(file);
            Ok(f())
        })
        .map_err(|io_error| NetnsError::Spawn {
            path: path.to_owned(),
            io_error,
        })?;
    match handle.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(io_error)) => Err(NetnsError::Setns {
            path: path.to_owned(),
            io_error,
        }),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(NetnsError::Panicked {
                path: path.to_owned(),
                message,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NSFS: u64 = 4;

    fn c(source: Source, inode: u64, dev: u64, path: &str) -> Candidate {
        Candidate {
            source,
            inode,
            dev,
            path: PathBuf::from(path),
        }
    }

    #[test]
    fn dedup_prefers_host_then_named_then_lowest_pid() {
        let refs = dedup(
            NSFS,
            [
                c(Source::Process(900), 200, NSFS, "/proc/900/ns/net"),
                c(Source::Process(1), 100, NSFS, "/proc/1/ns/net"),
                c(Source::Process(40), 200, NSFS, "/proc/40/ns/net"),
                c(Source::Named("b".into()), 300, NSFS, "/run/netns/b"),
                c(Source::Process(7), 300, NSFS, "/proc/7/ns/net"),
                c(Source::Host, 100, NSFS, "/proc/1/ns/net"),
                c(Source::Process(2), 100, NSFS, "/proc/2/ns/net"),
            ],
        );
        assert_eq!(
            refs,
            vec![
                NamespaceRef {
                    inode: 100,
                    name: None,
                    path: PathBuf::from("/proc/1/ns/net"),
                },
                NamespaceRef {
                    inode: 300,
                    name: Some("b".into()),
                    path: PathBuf::from("/run/netns/b"),
                },
                NamespaceRef {
                    inode: 200,
                    name: None,
                    path: PathBuf::from("/proc/40/ns/net"),
                },
            ]
        );
    }

    #[test]
    fn host_keeps_its_path_but_takes_a_name() {
        let refs = dedup(
            NSFS,
            [
                c(Source::Named("zeta".into()), 1, NSFS, "/run/netns/zeta"),
                c(Source::Named("alpha".into()), 1, NSFS, "/run/netns/alpha"),
                c(Source::Host, 1, NSFS, "/proc/1/ns/net"),
            ],
        );
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name.as_deref(), Some("alpha"));
        assert_eq!(refs[0].path, PathBuf::from("/proc/1/ns/net"));
    }

    #[test]
    fn stale_named_entries_are_dropped() {
        // A /run/netns file whose bind mount is gone: a tmpfs file, other device.
        let refs = dedup(
            NSFS,
            [
                c(Source::Named("stale".into()), 77, 25, "/run/netns/stale"),
                c(Source::Named("live".into()), 78, NSFS, "/run/netns/live"),
            ],
        );
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name.as_deref(), Some("live"));
    }

    #[test]
    fn named_namespaces_sort_by_name() {
        let refs = dedup(
            NSFS,
            [
                c(Source::Named("b".into()), 1, NSFS, "/run/netns/b"),
                c(Source::Named("a".into()), 2, NSFS, "/run/netns/a"),
            ],
        );
        let names: Vec<_> = refs.iter().map(|r| r.name.as_deref()).collect();
        assert_eq!(names, vec![Some("a"), Some("b")]);
    }

    #[test]
    fn current_inode_matches_own_namespace() -> io::Result<()> {
        // Readable without privileges: our own thread's namespace.
        let inode = current_inode()?;
        assert_eq!(inode, std::fs::metadata("/proc/thread-self/ns/net")?.ino());
        Ok(())
    }

    #[test]
    fn in_namespace_reports_missing_file() {
        let err = in_namespace(Path::new("/nonexistent/observer-netns"), || 1)
            .expect_err("no such namespace file");
        assert!(matches!(err, NetnsError::Open { .. }), "{err:?}");
    }

    #[test]
    fn in_namespace_contains_panics() {
        // Entering our own namespace needs CAP_SYS_ADMIN; skip the setns part when not root.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // Not eprintln!: libtest hides captured output of passing tests.
            use std::io::Write as _;
            let _ = writeln!(
                io::stderr(),
                "SKIPPED in_namespace_contains_panics: needs root"
            );
            return;
        }
        let err = in_namespace(Path::new(THREAD_SELF_NETNS), || -> u32 { panic!("boom") })
            .expect_err("closure panicked");
        match err {
            NetnsError::Panicked { message, .. } => assert_eq!(message, "boom"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
