//! Collection: reads the record stream from its source on threads of its own, parses it, and
//! hands batches to the render loop over the event channel. Two sources:
//!
//! - a running daemon's unix socket (`--connect`), reconnecting when the daemon restarts;
//! - an in-process daemon: `daemon::run` on a runtime of its own, writing into a pipe whose
//!   other end is read here, so top sees exactly the records `observer run` would print.
use std::{
    io::{self, BufRead, BufReader, Read},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use super::{
    event::{Event, Sender, SourceStatus},
    wire,
};
use crate::daemon::{self, RunOptions};

/// Lines per batch at most.
const BATCH: usize = 1024;
/// A line longer than this is not a record (it is skipped).
const MAX_LINE: usize = 4 << 20;
/// Pause between attempts to reach the daemon's socket.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// How reading a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// The writer closed its end.
    Eof,
    /// The render loop is gone.
    Closed,
}

/// Reads lines until the end of `reader`, sending them parsed, in batches: whatever is already
/// buffered goes out together, so a busy stream costs one message per read, not per line.
/// When the render loop is gone, the rest of the stream is read and discarded (so that an
/// in-process daemon can finish writing its `stop` record) when `drain_after_close` is set.
pub fn pump<R: Read>(reader: R, tx: &Sender, drain_after_close: bool) -> io::Result<PumpEnd> {
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let mut batch = Vec::new();
    let mut line = Vec::new();
    let mut closed = false;
    loop {
        line.clear();
        let n = read_line(&mut reader, &mut line)?;
        if n == 0 {
            if !closed && !batch.is_empty() {
                let _ = tx.send(Event::Records(std::mem::take(&mut batch)));
            }
            return Ok(if closed {
                PumpEnd::Closed
            } else {
                PumpEnd::Eof
            });
        }
        if closed {
            continue;
        }
        if line.len() > 1 {
            let text = String::from_utf8_lossy(&line);
            batch.push(wire::parse_line(&text));
        }
        if batch.len() >= BATCH || !reader.buffer().contains(&b'\n') {
            if batch.is_empty() {
                continue;
            }
            if tx.send(Event::Records(std::mem::take(&mut batch))).is_err() {
                if !drain_after_close {
                    return Ok(PumpEnd::Closed);
                }
                closed = true;
            }
        }
    }
}

/// One line (with its newline) into `line`; over-long lines are cut at [`MAX_LINE`] and the
/// rest skipped. Returns the bytes consumed (0 at the end).
fn read_line<R: BufRead>(reader: &mut R, line: &mut Vec<u8>) -> io::Result<usize> {
    let mut consumed = 0;
    loop {
        let (done, used) = {
            let available = match reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(consumed);
            }
            match available.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if line.len() < MAX_LINE {
                        line.extend_from_slice(&available[..=i]);
                    }
                    (true, i + 1)
                }
                None => {
                    if line.len() < MAX_LINE {
                        line.extend_from_slice(available);
                    }
                    (false, available.len())
                }
            }
        };
        reader.consume(used);
        consumed += used;
        if done {
            return Ok(consumed);
        }
    }
}

/// Whether a daemon answers on `path` now.
pub fn socket_answers(path: &Path) -> io::Result<()> {
    UnixStream::connect(path).map(drop)
}

/// Reads a daemon's socket, reconnecting every second while it is away, until the render loop
/// is gone.
pub fn spawn_socket(path: PathBuf, tx: Sender) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("top-socket".to_owned())
        .spawn(move || {
            let mut announced_down = false;
            loop {
                let status = match UnixStream::connect(&path) {
                    Ok(stream) => {
                        announced_down = false;
                        if tx.send(Event::Source(SourceStatus::Connected)).is_err() {
                            return;
                        }
                        match pump(stream, &tx, false) {
                            Ok(PumpEnd::Closed) => return,
                            Ok(PumpEnd::Eof) => {
                                format!("the daemon closed {}; reconnecting", path.display())
                            }
                            Err(e) => format!("reading {}: {e}; reconnecting", path.display()),
                        }
                    }
                    Err(e) => format!("cannot connect to {}: {e}; retrying", path.display()),
                };
                if !announced_down {
                    announced_down = true;
                    if tx
                        .send(Event::Source(SourceStatus::Disconnected(status)))
                        .is_err()
                    {
                        return;
                    }
                }
                thread::sleep(RECONNECT_EVERY);
                // Leave once the render loop is gone, even while the daemon stays away.
                if tx
                    .try_send(Event::Resize)
                    .is_err_and(|e| matches!(e, mpsc::TrySendError::Disconnected(_)))
                {
                    return;
                }
            }
        })
}

/// The in-process daemon: its thread, and what it said when it ended.
pub struct InProcess {
    pub daemon: thread::JoinHandle<()>,
    pub reader: thread::JoinHandle<()>,
    /// Receives the daemon's result once `daemon::run` returned.
    pub done: mpsc::Receiver<String>,
}

/// Starts `daemon::run(options, pipe)` on a runtime of its own and reads the pipe.
pub fn spawn_in_process(options: RunOptions, tx: Sender) -> io::Result<InProcess> {
    let (pipe_reader, pipe_writer) = io::pipe()?;
    let (done_tx, done) = mpsc::channel();
    let daemon_tx = tx.clone();
    let daemon = thread::Builder::new()
        .name("top-daemon".to_owned())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))
                .and_then(|runtime| {
                    runtime
                        .block_on(daemon::run(options, pipe_writer))
                        .map_err(|e| format!("observer: error: {e:#}"))
                });
            let message = match result {
                Ok(reason) => format!("the in-process observer stopped ({reason:?})"),
                Err(e) => e,
            };
            let _ = done_tx.send(message.clone());
            let _ = daemon_tx.try_send(Event::Source(SourceStatus::Ended(message)));
        })?;
    let reader = thread::Builder::new()
        .name("top-pipe".to_owned())
        .spawn(move || {
            let _ = tx.send(Event::Source(SourceStatus::Connected));
            // The daemon must be able to write its stop record after top stopped reading.
            let _ = pump(pipe_reader, &tx, true);
        })?;
    Ok(InProcess {
        daemon,
        reader,
        done,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::top::event;

    #[test]
    fn lines_arrive_parsed_in_order_and_batched() {
        let (tx, rx) = event::channel();
        let text = "{\"type\":\"lost\",\"count\":1}\n\nnot json\n{\"type\":\"lost\",\"count\":2}\n{\"type\":\"lost\",\"count\":3}";
        let end = pump(text.as_bytes(), &tx, false).expect("pump");
        assert_eq!(end, PumpEnd::Eof);
        drop(tx);
        let mut counts = Vec::new();
        let mut errors = 0;
        let mut batches = 0;
        for event in rx {
            let Event::Records(batch) = event else {
                panic!("unexpected {event:?}");
            };
            batches += 1;
            for record in batch {
                match record {
                    Ok(wire::Record::Lost { count }) => counts.push(count),
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => errors += 1,
                }
            }
        }
        // The last line has no newline: still a record at the end of the stream.
        assert_eq!(counts, [1, 2, 3]);
        assert_eq!(errors, 1);
        // Buffered lines travel together; the unterminated last line waits for the end.
        assert_eq!(batches, 2);
    }

    #[test]
    fn a_closed_loop_drains_the_writer() {
        let (tx, rx) = event::channel();
        drop(rx);
        let (reader, mut writer) = io::pipe().expect("pipe");
        let writer = thread::spawn(move || {
            // Far more than a pipe holds: the writer finishes only if the reader drains.
            let line = format!(
                "{{\"type\":\"lost\",\"count\":1,\"pad\":\"{}\"}}\n",
                "x".repeat(500)
            );
            for _ in 0..2000 {
                writer.write_all(line.as_bytes()).expect("write");
            }
        });
        assert_eq!(pump(reader, &tx, true).expect("pump"), PumpEnd::Closed);
        writer.join().expect("writer");
    }

    #[test]
    fn over_long_lines_are_cut_not_buffered() {
        let mut long = vec![b'x'; MAX_LINE + 100];
        long.push(b'\n');
        long.extend_from_slice(b"{\"type\":\"lost\",\"count\":1}\n");
        let mut reader = BufReader::new(&long[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line(&mut reader, &mut line).expect("read"),
            MAX_LINE + 101
        );
        assert!(line.len() <= MAX_LINE + 64 * 1024);
        line.clear();
        read_line(&mut reader, &mut line).expect("read");
        assert_eq!(line, b"{\"type\":\"lost\",\"count\":1}\n");
    }
}
