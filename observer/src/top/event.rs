//! What reaches the render loop, over one bounded channel: keys and resizes from the terminal,
//! ticks, batches of records from the source, source news, and the order to stop.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use crossterm::event::{self as term, KeyEvent, KeyEventKind};

use super::wire::{Record, WireError};

/// Batches of records in flight at most; a full channel slows the reader of the source (the
/// daemon's socket then drops records for top and says so; the in-process daemon counts them
/// `undelivered`).
const CAPACITY: usize = 256;

/// One thing for the render loop to take in.
#[derive(Debug)]
pub enum Event {
    Key(KeyEvent),
    /// The terminal changed size: draw again.
    Resize,
    /// Refresh the view (every `--interval`).
    Tick,
    /// Lines of the stream, parsed, in order.
    Records(Vec<Result<Record, WireError>>),
    Source(SourceStatus),
    /// SIGTERM, SIGINT or SIGHUP: leave.
    Terminate,
}

/// News from the source of records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStatus {
    Connected,
    /// Connection lost or refused; the source retries.
    Disconnected(String),
    /// The source is done for good (the in-process daemon stopped).
    Ended(String),
    /// A line the in-process daemon wrote to stderr, or other news.
    Message(String),
}

/// The sending side, cloned into every producer.
pub type Sender = mpsc::SyncSender<Event>;
pub type Receiver = mpsc::Receiver<Event>;

pub fn channel() -> (Sender, Receiver) {
    mpsc::sync_channel(CAPACITY)
}

/// Reads the terminal's events until `stop` is set or the render loop is gone.
pub fn spawn_input(tx: Sender, stop: Arc<AtomicBool>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("top-input".to_owned())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match term::poll(Duration::from_millis(100)) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                let event = match term::read() {
                    Ok(term::Event::Key(key)) if key.kind != KeyEventKind::Release => {
                        Event::Key(key)
                    }
                    Ok(term::Event::Resize(..)) => Event::Resize,
                    _ => continue,
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        })
}

/// Sends [`Event::Tick`] every `interval` until the render loop is gone or `stop` is set.
pub fn spawn_ticker(
    tx: Sender,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("top-tick".to_owned())
        .spawn(move || {
            let step = Duration::from_millis(50).min(interval);
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(step);
                waited += step;
                if waited >= interval {
                    waited = Duration::ZERO;
                    // A full channel: the loop is busy; skip this tick rather than queue it.
                    match tx.try_send(Event::Tick) {
                        Ok(()) | Err(mpsc::TrySendError::Full(_)) => {}
                        Err(mpsc::TrySendError::Disconnected(_)) => return,
                    }
                }
            }
        })
}

/// Turns SIGTERM, SIGINT and SIGHUP into [`Event::Terminate`], on a small runtime of its own.
/// Returns once the handlers are installed (so that a signal from then on cannot kill top
/// before the terminal is restored).
pub fn spawn_signals(tx: Sender) -> std::io::Result<thread::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("top-signals".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let installed = (|| {
                    Ok::<_, std::io::Error>((
                        signal(SignalKind::terminate())?,
                        signal(SignalKind::interrupt())?,
                        signal(SignalKind::hangup())?,
                    ))
                })();
                let (mut term, mut int, mut hup) = match installed {
                    Ok(signals) => {
                        let _ = ready_tx.send(Ok(()));
                        signals
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                        _ = hup.recv() => {}
                    }
                    // The loop may be gone already (we are quitting): keep absorbing signals,
                    // which is the point of having the handlers.
                    let _ = tx.try_send(Event::Terminate);
                }
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("the signal thread ended early")),
    }
}
