//! NDJSON to a file, rotated by size.
//!
//! `path` is the live file; on rotation it becomes `path.1`, `path.1` becomes `path.2`, ... and
//! `path.KEEP` is replaced (renames only, so a shipper following `path` by name, like
//! `tail -F`, Vector, Fluent Bit or Filebeat, sees a rename and a new file, never a truncation).
//!
//! Rotation happens only at record boundaries: [`RotatingFile`] implements [`Write`] for the
//! daemon's `JsonLines`, whose buffer hands it arbitrary chunks of text, so it only rotates once
//! the last byte written to the current file was a newline. A file therefore holds whole records
//! and grows at most one record past `max_bytes`.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Default size at which the output file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 5;
/// Most rotated files kept: the suffixes are renamed one by one at each rotation.
pub const MAX_KEEP: u32 = 1000;

/// Errors opening the output file.
#[derive(Debug, thiserror::Error)]
pub enum FileSinkError {
    /// The file could not be opened (or created) for appending.
    #[error("cannot open output file `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// The end of an existing file could not be read or completed.
    #[error("cannot append to output file `{path}`")]
    Append {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
}

/// An append-only file rotated by size at record (line) boundaries.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    /// Rotate once the file reaches this size; 0: never.
    max_bytes: u64,
    /// Rotated files kept (`path.1` ... `path.keep`); 0: the full file is deleted.
    keep: u32,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Size at which the next rotation is due (moves on after a failed rotation, so a
    /// persistent failure is retried once per `max_bytes`, not on every write).
    limit: u64,
    /// Whether the last byte in the current file ends a record (or the file is empty).
    at_boundary: bool,
    rotations: u64,
}

impl RotatingFile {
    /// Opens `path` for appending (creating it, mode 0640). An existing file is continued; if
    /// it ends in the middle of a record (a crash mid-write), that record is terminated with a
    /// newline so the next one starts on a line of its own.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<Self, FileSinkError> {
        let file = open_append(path).map_err(|io_error| FileSinkError::Open {
            path: path.to_owned(),
            io_error,
        })?;
        let append_error = |io_error| FileSinkError::Append {
            path: path.to_owned(),
            io_error,
        };
        let mut size = file.metadata().map_err(append_error)?.len();
        if size > 0 {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, size - 1)
                .map_err(append_error)?;
            if last[0] != b'\n' {
                (&file).write_all(b"\n").map_err(append_error)?;
                size += 1;
            }
        }
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            keep: keep.min(MAX_KEEP),
            file,
            size,
            limit: max_bytes,
            at_boundary: true,
            rotations: 0,
        })
    }

    /// The live file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rotations done so far.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Bytes in the current file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `path.N`.
    pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Shifts `path.N` -> `path.N+1` (the oldest is replaced), `path` -> `path.1`, and opens a
    /// new `path`.
    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                rename_if_exists(
                    &Self::rotated_path(&self.path, n),
                    &Self::rotated_path(&self.path, n + 1),
                )?;
            }
            rename_if_exists(&self.path, &Self::rotated_path(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        self.at_boundary = true;
        self.rotations += 1;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.max_bytes > 0 && self.at_boundary && self.size >= self.limit {
            match self.rotate() {
                Ok(()) => self.limit = self.max_bytes,
                Err(e) => {
                    // Losing the records (or stopping the daemon) because old files cannot be
                    // renamed would be worse than one file growing: keep writing, say why.
                    eprintln!(
                        "observer: warning: rotating `{}` failed ({e}); writing on and retrying after another {} bytes",
                        self.path.display(),
                        self.max_bytes
                    );
                    self.limit = self.size.saturating_add(self.max_bytes);
                }
            }
        }
        let n = if self.max_bytes == 0 {
            buf.len()
        } else {
            chunk_len(self.size, self.limit, buf)
        };
        let written = self.file.write(&buf[..n])?;
        self.size += written as u64;
        if let Some(&last) = buf[..written].last() {
            self.at_boundary = last == b'\n';
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// How much of `buf` goes into a file holding `size` bytes that is due for rotation at `limit`:
/// all of it while it fits; otherwise up to the end of the record that reaches the limit, so that
/// the next write starts a record and can rotate first.
pub fn chunk_len(size: u64, limit: u64, buf: &[u8]) -> usize {
    let room = limit.saturating_sub(size);
    if buf.len() as u64 <= room {
        return buf.len();
    }
    // `room` < buf.len() here, so it fits usize. The record ending at index room - 1 exactly
    // fills the file; one ending later crosses the limit.
    let from = usize::try_from(room.saturating_sub(1)).unwrap_or(0);
    match buf[from..].iter().position(|&b| b == b'\n') {
        Some(i) => from + i + 1,
        None => buf.len(),
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    // Readable too: opening checks whether an existing file ends with a whole record.
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("renaming `{}` to `{}`: {e}", from.display(), to.display()),
        )),
        Ok(()) => Ok(()),
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("removing `{}`: {e}", path.display()),
        )),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::json::JsonLines;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "observer-file-sink-{name}-{}-{seq}",
                std::process::id()
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

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn chunks_stop_after_the_record_reaching_the_limit() {
        // Fits entirely.
        assert_eq!(chunk_len(0, 10, b"abc\n"), 4);
        assert_eq!(chunk_len(6, 10, b"abc\n"), 4);
        // Crosses: up to the end of the crossing record, the rest waits for the rotation.
        assert_eq!(chunk_len(8, 10, b"abc\ndef\n"), 4);
        assert_eq!(chunk_len(0, 5, b"abc\ndef\nghi\n"), 8);
        // A record ending exactly at the limit.
        assert_eq!(chunk_len(0, 4, b"abc\ndef\n"), 4);
        // No newline: the record goes on, everything is written.
        assert_eq!(chunk_len(8, 10, b"abcdef"), 6);
        // Already past the limit in the middle of a record: finish that record.
        assert_eq!(chunk_len(12, 10, b"xy\nz\n"), 3);
    }

    #[test]
    fn rotates_at_record_boundaries_and_keeps_n_files() {
        let dir = TempDir::new("rotate");
        let path = dir.0.join("out.ndjson");
        let file = RotatingFile::open(&path, 100, 2).expect("open");
        let mut sink = JsonLines::new(file);
        let mut all = Vec::new();
        for i in 0..40u32 {
            let record = serde_json::json!({"type": "test", "n": i, "pad": "x".repeat(20)});
            sink.write(&record).expect("write");
            all.push(i);
            // Batches of 3, like the daemon's flush per batch.
            if i % 3 == 2 {
                sink.flush().expect("flush");
            }
        }
        sink.flush().expect("flush");
        let files = [
            RotatingFile::rotated_path(&path, 2),
            RotatingFile::rotated_path(&path, 1),
            path.clone(),
        ];
        assert!(!RotatingFile::rotated_path(&path, 3).exists());
        let mut seen = Vec::new();
        for f in &files {
            let text = read(f);
            assert!(text.ends_with('\n'), "{f:?}: {text:?}");
            // Each record is ~40 bytes: a file is at most max_bytes plus one record.
            assert!(text.len() <= 100 + 60, "{f:?} has {} bytes", text.len());
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON line");
                seen.push(v["n"].as_u64().expect("n"));
            }
        }
        // The newest records, in order, without gaps across files.
        let first = seen.first().copied().expect("records");
        let expected: Vec<u64> = (first..40).collect();
        assert_eq!(seen, expected);
        assert!(first > 0, "older files should have been dropped");
    }

    #[test]
    fn keep_zero_deletes_the_full_file() {
        let dir = TempDir::new("keep0");
        let path = dir.0.join("out");
        let mut file = RotatingFile::open(&path, 10, 0).expect("open");
        file.write_all(b"0123456789\n").expect("write");
        file.write_all(b"next\n").expect("write");
        assert_eq!(read(&path), "next\n");
        assert!(!RotatingFile::rotated_path(&path, 1).exists());
        assert_eq!(file.rotations(), 1);
    }

    #[test]
    fn zero_max_bytes_never_rotates() {
        let dir = TempDir::new("never");
        let path = dir.0.join("out");
        let mut file = RotatingFile::open(&path, 0, 3).expect("open");
        for _ in 0..100 {
            file.write_all(b"0123456789\n").expect("write");
        }
        assert_eq!(file.rotations(), 0);
        assert_eq!(read(&path).len(), 1100);
    }

    #[test]
    fn a_split_record_is_never_split_across_files() {
        let dir = TempDir::new("split");
        let path = dir.0.join("out");
        let mut file = RotatingFile::open(&path, 8, 1).expect("open");
        // One record arriving in pieces, crossing the limit in the middle.
        for piece in [&b"{\"a\":"[..], b"123456", b"789}\n", b"{\"b\":1}\n"] {
            file.write_all(piece).expect("write");
        }
        assert_eq!(
            read(&RotatingFile::rotated_path(&path, 1)),
            "{\"a\":123456789}\n"
        );
        assert_eq!(read(&path), "{\"b\":1}\n");
    }

    #[test]
    fn an_existing_file_is_continued_and_a_torn_record_terminated() {
        let dir = TempDir::new("continue");
        let path = dir.0.join("out");
        std::fs::write(&path, "{\"a\":1}\n{\"tor").expect("seed");
        let mut file = RotatingFile::open(&path, 0, 1).expect("open");
        assert_eq!(file.size(), 14);
        file.write_all(b"{\"b\":2}\n").expect("write");
        assert_eq!(read(&path), "{\"a\":1}\n{\"tor\n{\"b\":2}\n");
    }

    #[test]
    fn a_failed_rotation_keeps_writing() {
        let dir = TempDir::new("fail");
        let path = dir.0.join("out");
        // path.1 is a non-empty directory: renaming the file over it fails.
        let blocker = RotatingFile::rotated_path(&path, 1);
        std::fs::create_dir_all(blocker.join("x")).expect("blocker");
        let mut file = RotatingFile::open(&path, 10, 1).expect("open");
        file.write_all(b"0123456789\n").expect("write");
        file.write_all(b"more\n")
            .expect("write after a failed rotation");
        assert_eq!(file.rotations(), 0);
        assert_eq!(read(&path), "0123456789\nmore\n");
    }

    #[test]
    fn opening_in_a_missing_directory_names_the_file() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("no/such/dir/out");
        let err = RotatingFile::open(&path, 10, 1).expect_err("must fail");
        assert!(err.to_string().contains("no/such/dir/out"), "{err}");
    }
}
