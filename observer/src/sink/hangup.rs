//! Noticing at once that the reader of an output went away, even when nothing is written.
//!
//! A write to a pipe whose reader closed fails with EPIPE, but a quiet host may write nothing
//! for minutes, and `observer run | head -c 1` would then run on. The kernel flags the
//! descriptor as soon as the reader is gone: poll(2) reports `POLLERR` on the write end of a
//! pipe without readers and `POLLHUP` on a stream socket whose peer closed, or on a terminal
//! that hung up. Both are reported even when no event is asked for, so the descriptor is polled
//! with `events = 0`: a regular file or `/dev/null` never reports either, and is then simply
//! never seen as closed.
//!
//! [`HangupWatch`] does this on a thread of its own for the daemon's stdout; [`hung_up`] is the
//! one-shot check the socket readers' threads use between records.
use std::{
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    thread,
};

/// Whether poll(2)'s `revents` say the other side is gone.
pub fn is_hangup(revents: libc::c_short) -> bool {
    revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Polls `fds` (each with `events`) for at most `timeout_ms` (-1: no limit), retrying on EINTR;
/// returns each descriptor's `revents`.
fn poll<const N: usize>(
    fds: [(BorrowedFd<'_>, libc::c_short); N],
    timeout_ms: libc::c_int,
) -> io::Result<[libc::c_short; N]> {
    let mut polled = fds.map(|(fd, events)| libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    });
    loop {
        // SAFETY: `polled` is a valid array of N pollfd structs for the duration of the call,
        // and each fd is borrowed, so open, for that long; poll only writes their `revents`.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if rc >= 0 {
            return Ok(polled.map(|p| p.revents));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::new(e.kind(), format!("poll: {e}")));
        }
    }
}

/// Whether the peer of `fd` is gone, waiting at most `timeout_ms` for it (0: just look).
/// `POLLNVAL` (not an open descriptor) is an error.
pub fn hung_up(fd: BorrowedFd<'_>, timeout_ms: libc::c_int) -> io::Result<bool> {
    let [revents] = poll([(fd, 0)], timeout_ms)?;
    if revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(is_hangup(revents))
}

/// Watches a descriptor on a thread of its own and calls `on_hangup` once when its reader goes
/// away. Dropping the watch stops the thread (and closes its copy of the descriptor).
#[derive(Debug)]
pub struct HangupWatch {
    /// Dropped to wake the thread: its end of the pair then reports `POLLHUP`.
    wake: Option<UnixStream>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HangupWatch {
    /// Starts watching `fd` (a duplicate of the output's descriptor: it is closed with the watch).
    pub fn spawn(fd: OwnedFd, on_hangup: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let (wake, woken) = UnixStream::pair()?;
        let thread = thread::Builder::new()
            .name("observer-hangup".to_owned())
            .spawn(move || {
                // Only two outcomes end the wait: the output's reader left, or the watch was
                // dropped (its wake end closed). A failing poll ends the watch quietly; the
                // next write still reports a closed output.
                match poll([(fd.as_fd(), 0), (woken.as_fd(), libc::POLLIN)], -1) {
                    Ok([out, _]) if is_hangup(out) => on_hangup(),
                    Ok(_) => {}
                    Err(e) => eprintln!(
                        "observer: warning: cannot watch the output for a reader that leaves: {e}"
                    ),
                }
            })?;
        Ok(Self {
            wake: Some(wake),
            thread: Some(thread),
        })
    }
}

impl Drop for HangupWatch {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        os::fd::FromRawFd as _,
        sync::mpsc,
        time::{Duration, Instant},
    };

    use super::*;

    /// A pipe: (read end, write end).
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn revents_with_err_or_hup_are_hangups() {
        assert!(is_hangup(libc::POLLERR));
        assert!(is_hangup(libc::POLLHUP | libc::POLLOUT));
        assert!(!is_hangup(libc::POLLOUT));
        assert!(!is_hangup(0));
    }

    #[test]
    fn a_pipe_whose_reader_closed_is_hung_up_at_once() {
        let (read, write) = pipe();
        assert!(!hung_up(write.as_fd(), 0).expect("poll"));
        drop(read);
        assert!(hung_up(write.as_fd(), 0).expect("poll"));
    }

    #[test]
    fn a_socket_whose_peer_closed_is_hung_up() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        assert!(!hung_up(ours.as_fd(), 0).expect("poll"));
        // A peer that only stops sending is still a reader.
        theirs
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        assert!(!hung_up(ours.as_fd(), 0).expect("poll"));
        drop(theirs);
        assert!(hung_up(ours.as_fd(), 0).expect("poll"));
    }

    #[test]
    fn the_watch_fires_when_the_reader_leaves() {
        let (read, write) = pipe();
        let (tx, rx) = mpsc::channel();
        let _watch = HangupWatch::spawn(OwnedFd::from(write), move || {
            let _ = tx.send(Instant::now());
        })
        .expect("spawn");
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        let closed = Instant::now();
        drop(read);
        let fired = rx.recv_timeout(Duration::from_secs(5)).expect("fired");
        assert!(fired.duration_since(closed) < Duration::from_secs(1));
    }

    #[test]
    fn dropping_the_watch_stops_it_without_firing() {
        let (_read, write) = pipe();
        let (tx, rx) = mpsc::channel::<()>();
        let watch = HangupWatch::spawn(OwnedFd::from(write), move || {
            let _ = tx.send(());
        })
        .expect("spawn");
        drop(watch);
        // The callback (and its sender) is gone without having been called.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
