//! Load generators for `cargo xtask bench` (run inside the bench's network namespaces with
//! `ip netns exec`). Every mode is bounded in time and count, and prints one JSON object on
//! stdout when it ends.
//!
//! - `storm refused --addr 127.0.0.1:1 --duration 3`: blocking `connect()` to a closed port in
//!   a tight loop (each attempt is answered by a RST: one refused connect, one kfree_skb drop).
//! - `storm sink --listen 10.201.0.2:5001 --duration 60`: accepts connections and discards what
//!   they send; prints `{"ready":true}` once listening.
//! - `storm bulk --addr 10.201.0.2:5001 --conns 4 --duration 3`: sends as fast as TCP allows
//!   on `conns` connections; reports bytes and the kernel's retransmit count (`tcpi_total_retrans`).
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "storm",
    about = "Bounded TCP load generators for the observer benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// Scheduling priority (nice value, -20..19; below 0 needs root): keeps other work on a
    /// busy machine from distorting the storm's rate.
    #[arg(long, global = true, allow_hyphen_values = true)]
    nice: Option<i32>,
}

#[derive(Subcommand)]
enum Mode {
    /// Blocking connects to a closed port, as fast as one thread per `--threads` can.
    Refused {
        #[arg(long, default_value = "127.0.0.1:1")]
        addr: SocketAddr,
        /// Seconds to run.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        /// Upper bound on connect attempts (all threads together).
        #[arg(long, default_value_t = 20_000_000)]
        max_connects: u64,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Accept and discard; exits after `--duration` seconds at the latest.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        #[arg(long, default_value_t = 256)]
        max_conns: usize,
    },
    /// Bulk send on `--conns` connections for `--duration` seconds.
    Bulk {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        /// Bytes per write.
        #[arg(long, default_value_t = 65_536)]
        chunk: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(nice) = cli.nice {
        // SAFETY: plain syscall on this process.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice.clamp(-20, 19)) };
        if rc != 0 {
            eprintln!(
                "storm: cannot set nice {nice}: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.mode {
        Mode::Refused {
            addr,
            duration,
            max_connects,
            threads,
        } => refused(addr, secs(duration), max_connects, threads.clamp(1, 64)),
        Mode::Sink {
            listen,
            duration,
            max_conns,
        } => sink(listen, secs(duration), max_conns.clamp(1, 1024)),
        Mode::Bulk {
            addr,
            conns,
            duration,
            chunk,
        } => bulk(
            addr,
            conns.clamp(1, 64),
            secs(duration),
            chunk.clamp(1, 1 << 22),
        ),
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("storm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Durations are capped at ten minutes: a forgotten storm ends by itself.
fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() {
        s.clamp(0.01, 600.0)
    } else {
        1.0
    })
}

fn refused(
    addr: SocketAddr,
    duration: Duration,
    max_connects: u64,
    threads: usize,
) -> Result<serde_json::Value, String> {
    let attempts = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let attempts = Arc::clone(&attempts);
            thread::spawn(move || {
                let (mut refused, mut connected, mut other) = (0u64, 0u64, 0u64);
                let mut last_error = None;
                'outer: loop {
                    // Check the clock and the shared bound every 64 attempts.
                    if Instant::now() >= deadline {
                        break;
                    }
                    if attempts.fetch_add(64, Ordering::Relaxed) >= max_connects {
                        break;
                    }
                    for _ in 0..64 {
                        match TcpStream::connect(addr) {
                            Ok(_) => connected += 1,
                            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
                            Err(e) => {
                                other += 1;
                                last_error = Some(e.to_string());
                                if other > 1000 && refused == 0 {
                                    break 'outer;
                                }
                            }
                        }
                    }
                }
                (refused, connected, other, last_error, Instant::now())
            })
        })
        .collect();
    let (mut refused, mut connected, mut other, mut last_error) = (0u64, 0u64, 0u64, None);
    let mut end = start;
    for worker in workers {
        let (r, c, o, e, t) = worker.join().map_err(|_| "a worker panicked".to_owned())?;
        refused += r;
        connected += c;
        other += o;
        last_error = last_error.or(e);
        end = end.max(t);
    }
    let elapsed = end.duration_since(start).as_secs_f64();
    let cpu = cpu_secs();
    let total = refused + connected + other;
    if refused == 0 {
        return Err(format!(
            "no connect to {addr} was refused ({connected} connected, {other} other errors: {})",
            last_error.unwrap_or_default()
        ));
    }
    Ok(json!({
        "mode": "refused",
        "connects": total,
        "refused": refused,
        "connected": connected,
        "other_errors": other,
        "last_error": last_error,
        "secs": elapsed,
        "per_sec": total as f64 / elapsed.max(1e-9),
        "cpu_secs": cpu,
        "cpu_us_per_connect": cpu * 1e6 / (total as f64).max(1.0),
    }))
}

fn sink(
    listen: SocketAddr,
    duration: Duration,
    max_conns: usize,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + duration;
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    println!("{}", json!({"ready": true, "listen": listen.to_string()}));
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    let received = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let mut accepted = 0usize;
    let mut readers = Vec::new();
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if accepted >= max_conns {
                    continue; // dropped: closes it
                }
                accepted += 1;
                let received = Arc::clone(&received);
                let open = Arc::clone(&open);
                open.fetch_add(1, Ordering::Relaxed);
                readers.push(thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = vec![0u8; 1 << 18];
                    while Instant::now() < deadline {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                received.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock
                                        | ErrorKind::TimedOut
                                        | ErrorKind::Interrupted
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("accept: {e}")),
        }
        // Reap finished readers now and then.
        if readers.len() > 16 {
            readers.retain(|r: &thread::JoinHandle<()>| !r.is_finished());
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
    Ok(json!({
        "mode": "sink",
        "accepted": accepted,
        "bytes": received.load(Ordering::Relaxed),
    }))
}

fn bulk(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    chunk: usize,
) -> Result<serde_json::Value, String> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            thread::spawn(move || -> Result<(u64, u32), String> {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                stream
                    .set_write_timeout(Some(Duration::from_millis(200)))
                    .map_err(|e| format!("set_write_timeout: {e}"))?;
                let buf = vec![0x5au8; chunk];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    match stream.write(&buf) {
                        Ok(n) => sent += n as u64,
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(format!("send: {e}")),
                    }
                }
                Ok((sent, total_retrans(&stream)))
            })
        })
        .collect();
    let (mut bytes, mut retrans, mut ok, mut last_error) = (0u64, 0u64, 0usize, None);
    for worker in workers {
        match worker.join().map_err(|_| "a worker panicked".to_owned())? {
            Ok((b, r)) => {
                bytes += b;
                retrans += u64::from(r);
                ok += 1;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if ok == 0 {
        return Err(last_error.unwrap_or_else(|| "no connection".to_owned()));
    }
    Ok(json!({
        "mode": "bulk",
        "conns_ok": ok,
        "bytes": bytes,
        "secs": elapsed,
        "mbit_per_sec": bytes as f64 * 8.0 / 1e6 / elapsed.max(1e-9),
        "total_retrans": retrans,
        "last_error": last_error,
    }))
}

/// CPU time (user + system) this process used so far, in seconds.
fn cpu_secs() -> f64 {
    // SAFETY: rusage is plain data that getrusage fills.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return f64::NAN;
        }
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The kernel's count of retransmitted segments on this socket (`tcpi_total_retrans`).
fn total_retrans(stream: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain integers; getsockopt writes at most `len` bytes into it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        if rc == 0 { info.tcpi_total_retrans } else { 0 }
    }
}
