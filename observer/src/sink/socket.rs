//! The record stream on a unix socket, for local readers (`observer top --connect`, `socat`,
//! scripts), next to the daemon's main output.
//!
//! [`Tee`] wraps the daemon's writer: every byte goes to the writer as before, and every
//! complete line is also handed to the [`SocketBroadcaster`], which copies it to each connected
//! reader's bounded queue. A reader that does not keep up loses records, never the daemon: its
//! queue is full, so the line is dropped and counted for that reader, and once its queue has
//! room again it receives `{"type":"undelivered","time":...,"count":N}` before the next record.
//! The writer never blocks on a reader; one thread per reader does the blocking writes.
//!
//! A new reader first receives the run's `start` record (the latest seen), so it knows the host,
//! the kernel and the sysctls even when it connects hours after the daemon started.
//!
//! The socket file is created with mode 0660 (owner root, or a configured group), never
//! world-accessible: it is bound in a private directory, given its mode and group, then renamed
//! into place, so no one can connect while its permissions are still the umask's.
//!
//! ```no_run
//! use observer::sink::socket::{SocketBroadcaster, SocketOptions, Tee};
//!
//! let socket = SocketBroadcaster::bind(SocketOptions::new("/run/observer/observer.sock"))?;
//! let writer = Tee::new(std::io::stdout(), socket);
//! // daemon::run(options, writer) ...
//! # Ok::<(), observer::sink::socket::SocketError>(())
//! ```
use std::{
    ffi::CString,
    io::{self, Write},
    os::{
        fd::{AsFd as _, AsRawFd, OwnedFd},
        unix::{
            fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use crate::{clock::rfc3339_unix_ns, sink::hangup::hung_up};

/// Where `observer run` serves its records when the socket is enabled without a path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/observer/observer.sock";
/// Read and write for the owner (root) and the group, nothing for others.
pub const DEFAULT_MODE: u32 = 0o660;
/// Bytes queued per reader before its records are dropped (a few seconds of a busy stream).
pub const DEFAULT_QUEUE_BYTES: usize = 4 << 20;
/// Readers served at once; further connections are told so and closed.
pub const DEFAULT_MAX_READERS: usize = 32;
/// How long readers may take to receive what is queued for them when the socket closes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How often an idle reader's connection is checked for a reader that left.
const HANGUP_CHECK: Duration = Duration::from_millis(200);
/// A line longer than this without a newline is not a record: it is dropped, not buffered.
const MAX_PARTIAL_LINE: usize = 16 << 20;

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("creating the socket directory `{path}`: {io_error}")]
    CreateDir {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    #[error("`{path}` exists and is not a socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("`{path}` is already served by another process")]
    InUse { path: PathBuf },
    #[error("removing the stale socket `{path}`: {io_error}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    #[error("binding `{path}`: {io_error}")]
    Bind {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    #[error("setting the mode and group of `{path}`: {io_error}")]
    Permissions {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    #[error("unknown group `{0}`")]
    UnknownGroup(String),
    #[error("starting the socket's accept thread: {0}")]
    Thread(#[source] io::Error),
}

/// How the socket is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// Permission bits of the socket file (connecting needs write permission).
    pub mode: u32,
    /// Group owning the socket file (its members may connect with mode 0660); `None`: root's.
    pub group: Option<u32>,
    /// Bytes queued per reader before records are dropped for it.
    pub queue_bytes: usize,
    pub max_readers: usize,
}

impl SocketOptions {
    /// `path`, mode 0660, no group, the default queue and reader limits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: DEFAULT_MODE,
            group: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            max_readers: DEFAULT_MAX_READERS,
        }
    }

    /// The socket file belongs to group `name` (a name or a numeric id).
    pub fn with_group(mut self, name: &str) -> Result<Self, SocketError> {
        self.group = Some(group_id(name)?);
        Ok(self)
    }
}

/// The id of group `name` (`/etc/group` and NSS, through `getgrnam_r`), or `name` itself when
/// it is a number.
pub fn group_id(name: &str) -> Result<u32, SocketError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || SocketError::UnknownGroup(name.to_owned());
    let c_name = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value for this plain C struct (null pointers,
        // zero id); getgrnam_r only writes into it and into `buf`.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: a NUL-terminated name, a writable struct,
        // a writable buffer of the length given, and a writable result pointer.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return if rc == 0 && !found.is_null() {
            Ok(group.gr_gid)
        } else {
            Err(unknown())
        };
    }
}

/// One connected reader, as the writer side sees it.
struct Reader {
    /// Which connection this is (its thread removes it by this number when the reader leaves).
    seq: u64,
    tx: mpsc::Sender<Arc<[u8]>>,
    /// Bytes in its queue; its thread subtracts what it wrote.
    queued: Arc<AtomicUsize>,
    /// A handle on its connection, to unblock its thread at shutdown.
    stream: UnixStream,
    thread: thread::JoinHandle<()>,
    /// Records dropped since it last received one (reported when it recovers).
    pending_undelivered: u64,
}

struct State {
    readers: Vec<Reader>,
    /// The latest `start` record, sent first to every new reader.
    greeting: Option<Arc<[u8]>>,
}

struct Shared {
    state: Mutex<State>,
    closing: AtomicBool,
    queue_bytes: usize,
    max_readers: usize,
    /// Records dropped for slow readers, all readers, since start.
    undelivered: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking reader thread cannot leave the state half-updated in a way that matters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves the record stream on a unix socket. See the [module documentation](self).
pub struct SocketBroadcaster {
    shared: Arc<Shared>,
    path: PathBuf,
    /// Inode of the socket file we created: removed on drop only if it is still ours.
    inode: u64,
    /// A second handle on the listening socket, to wake the accept thread at shutdown.
    listener: OwnedFd,
    accept: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SocketBroadcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketBroadcaster")
            .field("path", &self.path)
            .field("readers", &self.readers())
            .finish_non_exhaustive()
    }
}

static BIND_SEQ: AtomicU32 = AtomicU32::new(0);

impl SocketBroadcaster {
    /// Creates the socket file (and its directory, mode 0755, if missing) and starts accepting
    /// readers. A stale socket left by a crashed daemon is replaced; a live one is an error.
    pub fn bind(options: SocketOptions) -> Result<Self, SocketError> {
        let SocketOptions {
            path,
            mode,
            group,
            queue_bytes,
            max_readers,
        } = options;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|io_error| SocketError::CreateDir {
                path: dir.clone(),
                io_error,
            })?;
        remove_stale(&path)?;

        // Bound in a private directory, given its mode and group, then renamed into place: no
        // one can connect before the permissions are right.
        let private = dir.join(format!(
            ".observer-socket.{}.{}",
            std::process::id(),
            BIND_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|io_error| SocketError::CreateDir {
                path: private.clone(),
                io_error,
            })?;
        let bound = bind_private(&private, &path, mode, group);
        let _ = std::fs::remove_dir_all(&private);
        let listener = bound?;
        let inode = std::fs::symlink_metadata(&path)
            .map(|m| m.ino())
            .unwrap_or(0);
        let wake = listener
            .try_clone()
            .map(OwnedFd::from)
            .map_err(SocketError::Thread)?;

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                readers: Vec::new(),
                greeting: None,
            }),
            closing: AtomicBool::new(false),
            queue_bytes: queue_bytes.max(1),
            max_readers,
            undelivered: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("observer-socket".to_owned())
            .spawn(move || accept_loop(&listener, &accept_shared))
            .map_err(SocketError::Thread)?;
        Ok(Self {
            shared,
            path,
            inode,
            listener: wake,
            accept: Some(accept),
        })
    }

    /// The socket file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Readers connected now.
    pub fn readers(&self) -> usize {
        self.shared.lock().readers.len()
    }

    /// Records dropped for slow readers since start (each reader counted separately).
    pub fn undelivered(&self) -> u64 {
        self.shared.undelivered.load(Ordering::Relaxed)
    }

    /// Hands complete lines (each ending with `\n`) to every reader; never blocks. A reader
    /// whose queue is full loses them (counted); a reader that went away is forgotten.
    pub fn broadcast(&self, lines: &[u8]) {
        if lines.is_empty() {
            return;
        }
        let records = lines.iter().filter(|&&b| b == b'\n').count() as u64;
        let start = last_start_record(lines);
        let mut state = self.shared.lock();
        if let Some(start) = start {
            state.greeting = Some(Arc::from(start));
        }
        if state.readers.is_empty() {
            return;
        }
        let chunk: Arc<[u8]> = Arc::from(lines);
        let limit = self.shared.queue_bytes;
        let mut dropped = 0u64;
        state.readers.retain_mut(|reader| {
            let queued = reader.queued.load(Ordering::Acquire);
            if queued.saturating_add(chunk.len()) > limit {
                reader.pending_undelivered += records;
                dropped += records;
                return true;
            }
            if reader.pending_undelivered > 0 {
                let notice = undelivered_line(reader.pending_undelivered);
                reader.queued.fetch_add(notice.len(), Ordering::AcqRel);
                if reader.tx.send(notice).is_err() {
                    return false;
                }
                reader.pending_undelivered = 0;
            }
            reader.queued.fetch_add(chunk.len(), Ordering::AcqRel);
            reader.tx.send(Arc::clone(&chunk)).is_ok()
        });
        if dropped > 0 {
            self.shared
                .undelivered
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

impl Drop for SocketBroadcaster {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on a socket descriptor we own; on Linux it wakes a blocked accept
        // (which then fails with EINVAL) on every descriptor of that socket.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Readers get what is queued for them (the `stop` record, usually) for a moment;
        // a reader that does not read is then cut off, which unblocks its thread.
        let readers = std::mem::take(&mut self.shared.lock().readers);
        let mut finishing = Vec::new();
        for reader in readers {
            let Reader {
                seq: _,
                tx,
                queued: _,
                stream,
                thread,
                pending_undelivered: _,
            } = reader;
            drop(tx);
            finishing.push((stream, thread));
        }
        let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
        while std::time::Instant::now() < deadline
            && finishing.iter().any(|(_, thread)| !thread.is_finished())
        {
            thread::sleep(Duration::from_millis(5));
        }
        for (stream, thread) in finishing {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes a socket file nobody serves; refuses to touch anything else.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(io_error) => {
            return Err(SocketError::Bind {
                path: path.to_owned(),
                io_error,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(_) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SocketError::RemoveStale {
                path: path.to_owned(),
                io_error: e,
            }),
            _ => Ok(()),
        },
    }
}

fn bind_private(
    private: &Path,
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<UnixListener, SocketError> {
    let tmp = private.join("s");
    let listener = UnixListener::bind(&tmp).map_err(|io_error| SocketError::Bind {
        path: path.to_owned(),
        io_error,
    })?;
    let permissions = |io_error| SocketError::Permissions {
        path: path.to_owned(),
        io_error,
    };
    std::os::unix::fs::chown(&tmp, None, group).map_err(permissions)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(permissions)?;
    std::fs::rename(&tmp, path).map_err(|io_error| SocketError::Bind {
        path: path.to_owned(),
        io_error,
    })?;
    Ok(listener)
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    let mut seq = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                seq += 1;
                add_reader(stream, shared, seq);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of descriptors or memory: try again later rather than spin.
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn add_reader(stream: UnixStream, shared: &Arc<Shared>, seq: u64) {
    let mut state = shared.lock();
    if state.readers.len() >= shared.max_readers {
        drop(state);
        let _ = send_all(
            &stream,
            br#"{"type":"error","message":"too many readers connected"}
"#,
        );
        return;
    }
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Arc<[u8]>>();
    let queued = Arc::new(AtomicUsize::new(0));
    let thread_queued = Arc::clone(&queued);
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("observer-socket-{seq}"))
        .spawn(move || {
            if serve_reader(&stream, &rx, &thread_queued) == Served::ReaderLeft {
                // Forgotten now, not at the next record: a quiet stream may have none for
                // long, and a reader that left must not hold one of the `max_readers` places.
                thread_shared.lock().readers.retain(|r| r.seq != seq);
            }
        });
    let Ok(thread) = spawned else {
        return;
    };
    if let Some(greeting) = &state.greeting {
        queued.fetch_add(greeting.len(), Ordering::AcqRel);
        let _ = tx.send(Arc::clone(greeting));
    }
    state.readers.push(Reader {
        seq,
        tx,
        queued,
        stream: handle,
        thread,
        pending_undelivered: 0,
    });
}

/// How a reader's thread ended.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// The reader closed its connection, or a write to it failed.
    ReaderLeft,
    /// The broadcaster let go of the reader (shutdown, or it forgot a reader that left).
    Released,
}

/// Sends a reader what is queued for it until it leaves or is released. Between records it
/// looks every `HANGUP_CHECK` for a hang-up: a reader that closes its connection on a quiet
/// stream is noticed within that time, not at the next record.
fn serve_reader(
    stream: &UnixStream,
    rx: &mpsc::Receiver<Arc<[u8]>>,
    queued: &AtomicUsize,
) -> Served {
    loop {
        match rx.recv_timeout(HANGUP_CHECK) {
            Ok(chunk) => {
                if send_all(stream, &chunk).is_err() {
                    return Served::ReaderLeft;
                }
                queued.fetch_sub(chunk.len(), Ordering::AcqRel);
            }
            // Only a hang-up (both directions closed) counts: a reader that shut down just its
            // sending side (`socat` at the end of its stdin) still reads.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if hung_up(stream.as_fd(), 0).unwrap_or(true) {
                    return Served::ReaderLeft;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Served::Released,
        }
    }
}

/// Writes all of `buf`, without SIGPIPE when the reader has gone.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes and the descriptor is the open
        // socket `stream` owns; MSG_NOSIGNAL turns a closed peer into EPIPE instead of a signal.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// The `undelivered` line a reader gets once it keeps up again.
fn undelivered_line(count: u64) -> Arc<[u8]> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let line = format!(
        "{{\"type\":\"undelivered\",\"time\":\"{}\",\"count\":{count}}}\n",
        rfc3339_unix_ns(now)
    );
    Arc::from(line.into_bytes())
}

/// The last `start` record among complete lines, with its newline.
fn last_start_record(lines: &[u8]) -> Option<&[u8]> {
    const START: &[u8] = br#"{"type":"start""#;
    let mut found = None;
    let mut rest = lines;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        if line.starts_with(START) {
            found = Some(line);
        }
        rest = tail;
    }
    found
}

/// A writer that also serves every complete line it writes on a unix socket: wrap the
/// daemon's main output with it. Writes go to `inner` first; only what `inner` accepted is
/// broadcast, so both see the same records.
pub struct Tee<W: Write> {
    inner: W,
    socket: SocketBroadcaster,
    /// The start of a line whose end has not been written yet.
    partial: Vec<u8>,
}

impl<W: Write> Tee<W> {
    pub fn new(inner: W, socket: SocketBroadcaster) -> Self {
        Self {
            inner,
            socket,
            partial: Vec::new(),
        }
    }

    pub fn socket(&self) -> &SocketBroadcaster {
        &self.socket
    }

    pub fn into_parts(self) -> (W, SocketBroadcaster) {
        let Self {
            inner,
            socket,
            partial: _,
        } = self;
        (inner, socket)
    }

    fn forward(&mut self, data: &[u8]) {
        let Some(last) = data.iter().rposition(|&b| b == b'\n') else {
            if self.partial.len() + data.len() > MAX_PARTIAL_LINE {
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(data);
            }
            return;
        };
        let (complete, rest) = data.split_at(last + 1);
        if self.partial.is_empty() {
            self.socket.broadcast(complete);
        } else {
            self.partial.extend_from_slice(complete);
            self.socket.broadcast(&self.partial);
            self.partial.clear();
        }
        self.partial.extend_from_slice(rest);
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.forward(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Read},
        time::Instant,
    };

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "observer-socket-{name}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn record(n: u64) -> String {
        format!(
            "{{\"type\":\"retransmit\",\"n\":{n},\"pad\":\"{}\"}}\n",
            "x".repeat(200)
        )
    }

    #[test]
    fn socket_file_has_mode_0660_and_is_removed_on_drop() {
        let dir = TempDir::new("mode");
        let path = dir.0.join("sub/observer.sock");
        let socket = SocketBroadcaster::bind(SocketOptions::new(&path)).expect("bind");
        let meta = std::fs::symlink_metadata(&path).expect("socket exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
        // No private directory left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.0.join("sub"))
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("observer.sock")]);
        drop(socket);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn a_live_socket_is_not_replaced_a_stale_one_is() {
        let dir = TempDir::new("stale");
        let path = dir.0.join("s.sock");
        let first = SocketBroadcaster::bind(SocketOptions::new(&path)).expect("bind");
        let err = SocketBroadcaster::bind(SocketOptions::new(&path)).expect_err("in use");
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        drop(first);
        // A socket file nobody listens on (a crashed daemon's).
        let stale = UnixListener::bind(&path).expect("stale bind");
        drop(stale);
        assert!(path.exists());
        let _second = SocketBroadcaster::bind(SocketOptions::new(&path)).expect("replaces stale");
        // A regular file is never replaced.
        let file = dir.0.join("file");
        std::fs::write(&file, "keep").expect("write");
        let err = SocketBroadcaster::bind(SocketOptions::new(&file)).expect_err("not a socket");
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep");
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(group_id("0").expect("numeric"), 0);
        assert_eq!(group_id("root").expect("root group"), 0);
        assert!(matches!(
            group_id("no-such-group-observer"),
            Err(SocketError::UnknownGroup(_))
        ));
    }

    #[test]
    fn tee_writes_everything_inside_and_whole_lines_to_readers() {
        let dir = TempDir::new("tee");
        let path = dir.0.join("s.sock");
        let socket = SocketBroadcaster::bind(SocketOptions::new(&path)).expect("bind");
        let mut tee = Tee::new(Vec::new(), socket);
        // The start record is kept for readers that connect later.
        tee.write_all(b"{\"type\":\"start\",\"host\":\"h\"}\n")
            .expect("write");
        let reader = UnixStream::connect(&path).expect("connect");
        wait_for("the reader", || tee.socket().readers() == 1);
        // A record split across writes reaches readers whole.
        tee.write_all(b"{\"type\":\"retr").expect("write");
        tee.write_all(b"ansmit\",\"n\":1}\n{\"type\":\"lost\"")
            .expect("write");
        tee.write_all(b",\"count\":2}\n").expect("write");
        tee.flush().expect("flush");
        let mut lines = BufReader::new(reader).lines();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(lines.next().expect("a line").expect("read"));
        }
        assert_eq!(
            got,
            [
                "{\"type\":\"start\",\"host\":\"h\"}",
                "{\"type\":\"retransmit\",\"n\":1}",
                "{\"type\":\"lost\",\"count\":2}"
            ]
        );
        let (inner, _socket) = tee.into_parts();
        assert_eq!(
            String::from_utf8(inner).expect("utf8"),
            "{\"type\":\"start\",\"host\":\"h\"}\n{\"type\":\"retransmit\",\"n\":1}\n{\"type\":\"lost\",\"count\":2}\n"
        );
    }

    /// Records (`"n"` lines) and the counts of `undelivered` notices among `lines`.
    fn tally<'a>(lines: impl IntoIterator<Item = &'a str>) -> (u64, u64) {
        let mut records = 0;
        let mut missed = 0;
        for line in lines {
            if line.contains("\"n\":") {
                records += 1;
            } else if line.contains("\"undelivered\"") {
                let value: serde_json::Value = serde_json::from_str(line).expect("notice is JSON");
                missed += value["count"].as_u64().expect("count");
            }
        }
        (records, missed)
    }

    /// Two readers keep up, a third reads nothing for a while: the writer is never slowed, the
    /// slow reader's lost records are counted and reported to it once it reads again, and every
    /// reader accounts for every record (received or reported undelivered).
    #[test]
    fn a_slow_reader_loses_records_counted_and_never_blocks_the_writer() {
        const RECORDS: u64 = 100_000;
        let dir = TempDir::new("slow");
        let path = dir.0.join("s.sock");
        let mut options = SocketOptions::new(&path);
        options.queue_bytes = 64 * 1024;
        let socket = SocketBroadcaster::bind(options).expect("bind");
        let mut tee = Tee::new(io::sink(), socket);

        let fast: Vec<_> = (0..2)
            .map(|_| {
                let stream = UnixStream::connect(&path).expect("connect");
                thread::spawn(move || {
                    let mut lines = Vec::new();
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        let end = line.contains("\"end\"");
                        lines.push(line);
                        if end {
                            break;
                        }
                    }
                    tally(lines.iter().map(String::as_str))
                })
            })
            .collect();
        let slow = UnixStream::connect(&path).expect("connect");
        wait_for("three readers", || tee.socket().readers() == 3);

        // ~23 MB of records while the slow reader reads nothing: far more than its queue and
        // the kernel's socket buffer hold.
        let started = Instant::now();
        for n in 0..RECORDS {
            tee.write_all(record(n).as_bytes()).expect("write");
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(20),
            "the writer was slowed down: {elapsed:?}"
        );
        assert!(
            tee.socket().undelivered() > 0,
            "the slow reader should have lost records"
        );

        // The slow reader drains what reached it; then one more record: before it, the reader
        // is told how many it missed.
        slow.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut slow_reader = BufReader::new(slow);
        let mut text = Vec::new();
        loop {
            let mut buf = [0u8; 64 * 1024];
            match slow_reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
        }
        tee.write_all(b"{\"type\":\"stop\",\"end\":true}\n")
            .expect("write");
        slow_reader
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        while !String::from_utf8_lossy(&text).contains("\"end\"") {
            let mut buf = [0u8; 4096];
            let n = slow_reader.read(&mut buf).expect("read the tail");
            assert!(n > 0, "socket closed before the end");
            text.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8(text).expect("utf8");
        let (received, missed) = tally(text.lines());
        assert!(missed > 0, "no undelivered notice reached the slow reader");
        assert_eq!(received + missed, RECORDS, "slow reader");
        let mut reported = missed;
        for reader in fast {
            let (received, missed) = reader.join().expect("reader thread");
            assert_eq!(received + missed, RECORDS, "fast reader");
            reported += missed;
        }
        assert_eq!(reported, tee.socket().undelivered());
    }

    /// On a quiet stream (nothing broadcast), a reader that closes its connection is
    /// forgotten within a moment and its place goes to the next reader.
    #[test]
    fn a_reader_that_leaves_a_quiet_stream_frees_its_place() {
        let dir = TempDir::new("quiet");
        let path = dir.0.join("s.sock");
        let mut options = SocketOptions::new(&path);
        options.max_readers = 1;
        let socket = SocketBroadcaster::bind(options).expect("bind");
        let mut tee = Tee::new(io::sink(), socket);
        tee.write_all(b"{\"type\":\"start\"}\n").expect("write");
        let first = UnixStream::connect(&path).expect("connect");
        wait_for("the reader", || tee.socket().readers() == 1);
        // A reader that only stops sending still reads: it keeps its place.
        first.shutdown(std::net::Shutdown::Write).expect("shutdown");
        thread::sleep(HANGUP_CHECK * 2);
        assert_eq!(tee.socket().readers(), 1);
        let left = Instant::now();
        drop(first);
        wait_for("the reader to be forgotten", || tee.socket().readers() == 0);
        let took = left.elapsed();
        assert!(took < Duration::from_secs(1), "forgotten after {took:?}");
        // The next reader gets the start record, not "too many readers".
        let second = UnixStream::connect(&path).expect("connect");
        let mut line = String::new();
        BufReader::new(second).read_line(&mut line).expect("read");
        assert_eq!(line, "{\"type\":\"start\"}\n");
    }

    #[test]
    fn readers_that_leave_are_forgotten() {
        let dir = TempDir::new("leave");
        let path = dir.0.join("s.sock");
        let socket = SocketBroadcaster::bind(SocketOptions::new(&path)).expect("bind");
        let reader = UnixStream::connect(&path).expect("connect");
        wait_for("the reader", || socket.readers() == 1);
        drop(reader);
        wait_for("the reader to be forgotten", || {
            socket.broadcast(record(1).as_bytes());
            socket.readers() == 0
        });
    }
}
