//! The terminal while top owns it: raw mode and the alternate screen on the way in, both undone
//! on the way out, on drop and on a panic of the render thread (a hook). stderr is captured in
//! the meantime, so that messages (the in-process daemon's warnings) neither scribble over the
//! screen nor get lost: they show on the status line and are printed once the screen is back.
use std::{
    collections::VecDeque,
    io::{self, BufRead as _, BufReader, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex, Once, OnceLock,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crossterm::{
    cursor::{Hide, Show},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::backend::CrosstermBackend;

use super::{
    app::App,
    event::{Event, Sender, SourceStatus},
    ui,
};

/// Whether the screen is ours (raw mode, alternate screen) right now.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The thread that draws: only its panic restores the terminal (a collection thread's panic
/// leaves the screen to the render loop).
static RENDER_THREAD: OnceLock<thread::ThreadId> = OnceLock::new();
/// A copy of the real stderr while it is captured (-1: not captured).
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);
static HOOK: Once = Once::new();

/// Leaves raw mode and the alternate screen, shows the cursor. Idempotent.
fn restore_terminal() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    }
}

/// Points fd 2 back at the real stderr. Idempotent.
fn restore_stderr() {
    let saved = SAVED_STDERR.swap(-1, Ordering::SeqCst);
    if saved >= 0 {
        // SAFETY: `saved` is an open descriptor (the capture keeps it open until after this
        // returns); dup2 onto 2 replaces the pipe with it atomically.
        unsafe {
            libc::dup2(saved, libc::STDERR_FILENO);
        }
    }
}

fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if RENDER_THREAD.get() == Some(&thread::current().id()) {
                restore_terminal();
                restore_stderr();
            }
            previous(info);
        }));
    });
}

/// The screen, while top owns it.
pub struct Terminal {
    inner: ratatui::Terminal<CrosstermBackend<io::Stdout>>,
}

impl Terminal {
    /// Raw mode, alternate screen, hidden cursor; the panic hook is installed first.
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();
        let _ = RENDER_THREAD.set(thread::current().id());
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        if let Err(e) = execute!(io::stdout(), EnterAlternateScreen, Hide) {
            restore_terminal();
            return Err(e);
        }
        match ratatui::Terminal::new(CrosstermBackend::new(io::stdout())) {
            Ok(inner) => Ok(Self { inner }),
            Err(e) => {
                restore_terminal();
                Err(e)
            }
        }
    }

    pub fn draw(&mut self, app: &mut App) -> io::Result<()> {
        self.inner.draw(|frame| ui::render(frame, app))?;
        Ok(())
    }

    /// Gives the terminal back.
    pub fn leave(self) -> anyhow::Result<()> {
        drop(self);
        Ok(())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // No flush here: after a panic the screen is already the shell's, and a flush would
        // paint the last frame's cells over the panic message.
        restore_terminal();
    }
}

/// Lines written to stderr while captured, kept to print them again afterwards.
const KEPT_LINES: usize = 200;

/// stderr redirected into a pipe read by a thread of its own.
pub struct StderrCapture {
    saved: OwnedFd,
    reader: thread::JoinHandle<()>,
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl StderrCapture {
    /// Captures fd 2; `None` (and stderr left alone) if that cannot be done.
    pub fn start(tx: Sender) -> Option<Self> {
        let (pipe_reader, pipe_writer) = io::pipe().ok()?;
        // SAFETY: dup of fd 2 has no preconditions; the result is checked before use.
        let saved = unsafe { libc::dup(libc::STDERR_FILENO) };
        if saved < 0 {
            return None;
        }
        // SAFETY: `saved` is a fresh descriptor returned by dup, owned by nobody else.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let kept = Arc::clone(&lines);
        let reader = thread::Builder::new()
            .name("top-stderr".to_owned())
            .spawn(move || {
                for line in BufReader::new(pipe_reader).lines() {
                    let Ok(line) = line else { break };
                    if line.trim().is_empty() {
                        continue;
                    }
                    // Never blocks: a busy render loop misses a status update, not a line.
                    let _ = tx.try_send(Event::Source(SourceStatus::Message(line.clone())));
                    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                    kept.push_back(line);
                    while kept.len() > KEPT_LINES {
                        kept.pop_front();
                    }
                }
            })
            .ok()?;
        SAVED_STDERR.store(saved.as_raw_fd(), Ordering::SeqCst);
        // SAFETY: both descriptors are open; dup2 atomically makes fd 2 the pipe's write end.
        // The pipe writer is then dropped: fd 2 is the only write end left.
        let rc = unsafe { libc::dup2(pipe_writer.as_raw_fd(), libc::STDERR_FILENO) };
        drop(pipe_writer);
        if rc < 0 {
            SAVED_STDERR.store(-1, Ordering::SeqCst);
            return None;
        }
        Some(Self {
            saved,
            reader,
            lines,
        })
    }

    /// Gives stderr back and prints what was written to it meanwhile.
    pub fn finish(self) {
        let Self {
            saved,
            reader,
            lines,
        } = self;
        restore_stderr();
        // The reader sees the end once no process holds the pipe any more (a child started by
        // the daemon might, for a while): wait a little, not forever.
        let deadline = Instant::now() + Duration::from_millis(500);
        while !reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
        let lines = lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut stderr = io::stderr().lock();
        for line in lines.iter() {
            let _ = writeln!(stderr, "{line}");
        }
        drop(saved);
    }
}
