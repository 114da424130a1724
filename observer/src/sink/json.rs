//! Newline-delimited JSON on a writer (stdout by default).
use std::io::{self, Write};

use serde::Serialize;

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The reader went away (EPIPE): stop cleanly.
    #[error("the output was closed by its reader")]
    Closed,
    #[error("writing a record failed: {0}")]
    Io(#[source] io::Error),
    #[error("encoding a record failed: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Writes one JSON object per line, counting what it wrote and what it could not.
pub struct JsonLines<W: Write> {
    out: io::BufWriter<W>,
    written: u64,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: io::BufWriter::with_capacity(64 * 1024, out),
            written: 0,
        }
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Buffers one record; call [`flush`](Self::flush) when a batch is done.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<(), SinkError> {
        serde_json::to_writer(&mut self.out, record).map_err(|e| match e.io_error_kind() {
            Some(io::ErrorKind::BrokenPipe) => SinkError::Closed,
            Some(_) => SinkError::Io(io::Error::other(e)),
            None => SinkError::Encode(e),
        })?;
        self.out.write_all(b"\n").map_err(classify)?;
        self.written += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(classify)
    }

    /// Writes and flushes at once (for start/stop records).
    pub fn write_now<T: Serialize>(&mut self, record: &T) -> Result<(), SinkError> {
        self.write(record)?;
        self.flush()
    }
}

fn classify(e: io::Error) -> SinkError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        SinkError::Closed
    } else {
        SinkError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_per_line() {
        let mut buf = Vec::new();
        {
            let mut sink = JsonLines::new(&mut buf);
            sink.write(&serde_json::json!({"type": "a"}))
                .expect("write");
            sink.write(&serde_json::json!({"type": "b", "n": 1}))
                .expect("write");
            sink.flush().expect("flush");
            assert_eq!(sink.written(), 2);
        }
        assert_eq!(
            String::from_utf8(buf).expect("utf8"),
            "{\"type\":\"a\"}\n{\"n\":1,\"type\":\"b\"}\n"
        );
    }

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_closed_reader_is_reported_as_closed() {
        let mut sink = JsonLines::new(Closed);
        let result = sink.write_now(&serde_json::json!({"type": "a"}));
        assert!(matches!(result, Err(SinkError::Closed)), "{result:?}");
    }
}
