//! `observer top` in a real terminal: tmux runs it at 120x40 while a retransmit fault runs in
//! test namespaces; the screen must show the faulty flow with a non-zero rate, and `q` (or
//! SIGTERM) must give the terminal back (alternate screen left, the shell's screen restored).
//! Once in-process (top loads the programs itself), once attached to a running daemon's socket.
//!
//! Subnets: 10.200.90-91.0/24. Port 5001.
//!
//! Binaries: `observer top` / `observer run --socket` when the CLI has them, otherwise the
//! development driver `target/debug/examples/top_dev` (`cargo build -p observer --examples`).
use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use observer_tests::{
    Sink, Topology, connect_in, faults, kernel_test, note, observer_bin, poll_until,
    run_with_timeout,
};

const PORT: u16 = 5001;
/// Every 8th data segment to the server is dropped: steady retransmits.
const DROP_EVERY: u32 = 8;
const WIDTH: u16 = 120;
const HEIGHT: u16 = 40;
const CMD_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The binaries

/// `observer` when it has the subcommand, else the example driver.
fn driver(subcommand: &str, flag: &str) -> Result<Vec<String>> {
    let observer = observer_bin();
    if let Ok((status, stdout, _)) = run_with_timeout(
        Command::new(&observer).args([subcommand, "--help"]),
        CMD_TIMEOUT,
    ) && status.success()
        && stdout.contains(flag)
    {
        return Ok(vec![observer.display().to_string(), subcommand.to_owned()]);
    }
    let dev = observer
        .parent()
        .map(|dir| dir.join("examples/top_dev"))
        .unwrap_or_else(|| PathBuf::from("target/debug/examples/top_dev"));
    ensure!(
        dev.exists(),
        "neither `{} {subcommand} {flag}` nor {} exists: build with `cargo build -p observer --examples`",
        observer.display(),
        dev.display()
    );
    let dev_subcommand = if subcommand == "run" { "serve" } else { "top" };
    Ok(vec![dev.display().to_string(), dev_subcommand.to_owned()])
}

fn shell_quote(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// tmux

/// A tmux server of its own (`-L`), one session running `sh`, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(test: &str) -> Result<Self> {
        let tmux = Self {
            socket: format!("obs-top-{test}-{}", std::process::id()),
        };
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            &WIDTH.to_string(),
            "-y",
            &HEIGHT.to_string(),
            "sh",
        ])
        .context("starting tmux (is it installed? `cargo xtask setup` installs it)")?;
        Ok(tmux)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let (status, stdout, stderr) = run_with_timeout(
            Command::new("tmux")
                .args(["-L", &self.socket, "-f", "/dev/null"])
                .args(args),
            CMD_TIMEOUT,
        )?;
        ensure!(status.success(), "tmux {args:?}: {status}: {stderr}");
        Ok(stdout)
    }

    /// Types a command line into the shell.
    fn type_line(&self, line: &str) -> Result<()> {
        self.run(&["send-keys", "-t", "main", "-l", line])?;
        self.run(&["send-keys", "-t", "main", "Enter"])?;
        Ok(())
    }

    fn keys(&self, keys: &[&str]) -> Result<()> {
        let mut args = vec!["send-keys", "-t", "main"];
        args.extend_from_slice(keys);
        self.run(&args)?;
        Ok(())
    }

    fn screen(&self) -> Result<String> {
        self.run(&["capture-pane", "-p", "-t", "main"])
    }

    fn alternate_screen(&self) -> Result<bool> {
        Ok(self
            .run(&["display-message", "-p", "-t", "main", "#{alternate_on}"])?
            .trim()
            == "1")
    }

    /// The process running in the shell (top), as a child of the pane's shell.
    fn foreground_pid(&self) -> Result<Option<i32>> {
        let shell: i32 = self
            .run(&["display-message", "-p", "-t", "main", "#{pane_pid}"])?
            .trim()
            .parse()
            .context("pane pid")?;
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .unwrap_or_default();
        Ok(children.split_whitespace().find_map(|p| p.parse().ok()))
    }

    fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> Result<String> {
        let mut last = String::new();
        let found = poll_until(what, timeout, Duration::from_millis(250), || {
            last = self.screen()?;
            Ok(f(&last).then(|| last.clone()))
        });
        found.with_context(|| format!("the screen was:\n{last}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("tmux").args(["-L", &self.socket, "kill-server"]),
            CMD_TIMEOUT,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic: one long flow over a lossy path

/// A client writing to a sink on the server until stopped (45 s at most), through
/// [`faults::drop_data_to`]: the flow keeps retransmitting.
struct Stream {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    writer: Option<thread::JoinHandle<Result<u64>>>,
    sink: Option<Sink>,
}

impl Stream {
    fn start(topo: &Topology) -> Result<Self> {
        let to = SocketAddr::new(topo.server_ip(false), PORT);
        let sink = Sink::start(&topo.server, to, 1, Duration::from_secs(90))?;
        let mut stream: TcpStream = connect_in(&topo.client, to, Duration::from_secs(5))?;
        let local = stream.local_addr()?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let writer = thread::spawn(move || -> Result<u64> {
            let chunk = vec![0x5au8; 64 * 1024];
            let deadline = Instant::now() + Duration::from_secs(45);
            let mut sent = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match stream.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e).context("writing the stream"),
                }
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        Ok(Self {
            local,
            stop,
            writer: Some(writer),
            sink: Some(sink),
        })
    }

    fn finish(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = match self.writer.take() {
            Some(w) => w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??,
            None => 0,
        };
        if let Some(sink) = self.sink.take() {
            sink.join()?;
        }
        Ok(sent)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The screen

/// `12.3` -> 12.3, `4.5k` -> 4500.
fn number(token: &str) -> Option<f64> {
    let (digits, scale) = match token.strip_suffix('k') {
        Some(d) => (d, 1e3),
        None => match token.strip_suffix('M') {
            Some(d) => (d, 1e6),
            None => (token, 1.0),
        },
    };
    digits.parse::<f64>().ok().map(|v| v * scale)
}

/// The retransmit rate shown for the flow labelled `label`, if its row is on screen.
fn rate_of(screen: &str, label: &str) -> Option<f64> {
    screen.lines().find_map(|line| {
        let at = line.find(label)?;
        line[at + label.len()..]
            .split_whitespace()
            .next()
            .and_then(number)
    })
}

/// Waits until the flow shows with a non-zero retransmit rate; returns the screen.
fn flow_with_rate(tmux: &Tmux, label: &str) -> Result<String> {
    tmux.wait_for(
        &format!("{label} with a non-zero Rtx/s"),
        Duration::from_secs(30),
        |screen| rate_of(screen, label).is_some_and(|r| r > 0.0),
    )
}

/// The status `echo {marker}=$?` printed after top, if it did (the command line itself shows
/// `{marker}=$?`).
fn exit_status(screen: &str, marker: &str) -> Option<u8> {
    let pattern = format!("{marker}=");
    screen.match_indices(&pattern).find_map(|(at, _)| {
        let rest = &screen[at + pattern.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// `q`: the program ends with status 0 and the shell's own screen is back.
fn quit_restores_the_terminal(tmux: &Tmux, marker: &str) -> Result<()> {
    tmux.keys(&["q"])?;
    let screen = tmux.wait_for("the shell after q", Duration::from_secs(15), |s| {
        exit_status(s, marker).is_some()
    })?;
    ensure!(
        exit_status(&screen, marker) == Some(0),
        "top did not exit cleanly:\n{screen}"
    );
    ensure!(
        !tmux.alternate_screen()?,
        "the alternate screen is still on:\n{screen}"
    );
    ensure!(
        !screen.contains("Flows  Peers  Listeners"),
        "top's screen is still shown:\n{screen}"
    );
    Ok(())
}

fn top_screen_ready(tmux: &Tmux) -> Result<String> {
    tmux.wait_for(
        "top's screen with the start record",
        Duration::from_secs(30),
        |s| s.contains("Flows  Peers  Listeners") && s.contains("kernel "),
    )
}

/// The Findings view, top's default pane: the retransmit anomaly of the faulty peer shows with
/// its cause, the firewall rule that drops the segments in the server's namespace; then Tab
/// leaves for the flows table.
fn check_findings(tmux: &Tmux, topo: &Topology) -> Result<()> {
    let server = topo.server_ip(false).to_string();
    // Other tests' anomalies may share the list: narrow it to this peer.
    tmux.keys(&["/"])?;
    tmux.run(&["send-keys", "-t", "main", "-l", &server])?;
    tmux.keys(&["Enter"])?;
    let screen = tmux.wait_for(
        "the retransmit finding with its firewall rule",
        Duration::from_secs(45),
        |s| {
            let lines: Vec<&str> = s.lines().collect();
            lines.windows(2).any(|pair| {
                pair[0].contains("retransmit_spike")
                    && pair[0].contains(&server)
                    && pair[1].contains("↳ firewall rule `")
            })
        },
    )?;
    let line = screen
        .lines()
        .find(|l| l.contains("retransmit_spike") && l.contains(&server))
        .unwrap_or_default();
    note(&format!("top's finding: {}", line.trim_end()));
    ensure!(
        line.starts_with("CRIT") || line.starts_with("WARN"),
        "a finding starts with its severity: {line}"
    );
    // Esc, then Tab once the filter is gone (sent together they would read as Alt-Tab).
    tmux.keys(&["Escape"])?;
    tmux.wait_for("the filter cleared", Duration::from_secs(10), |s| {
        !s.contains(&format!("filter {server}"))
    })?;
    tmux.keys(&["Tab"])?;
    tmux.wait_for("the flows table", Duration::from_secs(10), |s| {
        s.contains("Rtx/s")
    })?;
    Ok(())
}

fn check_flow(tmux: &Tmux, topo: &Topology, stream: &Stream) -> Result<()> {
    let label = format!(
        "{}:{}→{}:{PORT}",
        topo.client_ip(false),
        stream.local.port(),
        topo.server_ip(false)
    );
    let screen = flow_with_rate(tmux, &label)?;
    let rate = rate_of(&screen, &label).unwrap_or(0.0);
    note(&format!("top shows {label} at {rate} retransmits/s"));
    // Among the rows of the table (it is sorted by severity; other tests' flows may share it).
    let rows: Vec<&str> = screen
        .lines()
        .skip_while(|l| !l.contains("Rtx/s"))
        .skip(1)
        .take_while(|l| !l.contains("last 60 s"))
        .collect();
    ensure!(
        rows.iter().any(|l| l.contains(&label)),
        "{label} is not in the table rows:\n{screen}"
    );
    // The filter narrows the table to the flows of that port (both ends of the connection,
    // as each namespace sees it).
    let port = stream.local.port().to_string();
    tmux.keys(&["/"])?;
    tmux.run(&["send-keys", "-t", "main", "-l", &port])?;
    tmux.keys(&["Enter"])?;
    let filtered = tmux.wait_for("the filtered table", Duration::from_secs(10), |s| {
        s.contains(&format!("filter {port}")) && s.contains(&label)
    })?;
    let rows: Vec<&str> = filtered
        .lines()
        .skip_while(|l| !l.contains("Rtx/s"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        rows.iter().all(|l| l.contains(&port)),
        "rows without the port {port} pass the filter:\n{filtered}"
    );
    let index = rows
        .iter()
        .position(|l| l.contains(&label))
        .with_context(|| format!("{label} not among the filtered rows:\n{filtered}"))?;
    // The first row is selected after filtering: move down to the flow, open its details.
    for _ in 0..index {
        tmux.keys(&["j"])?;
    }
    tmux.keys(&["Enter"])?;
    tmux.wait_for("the details window", Duration::from_secs(10), |s| {
        s.contains(&format!("flow {label}")) && s.contains("retransmit")
    })?;
    tmux.keys(&["Escape"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests

/// `observer top` loading the programs itself.
#[test]
fn top_in_process_shows_the_retransmitting_flow_and_restores_the_terminal() -> Result<()> {
    let Some(t) = kernel_test("top_in_process") else {
        return Ok(());
    };
    let top = driver("top", "--connect")?;
    let topo = Topology::new(&t.name, 90)?;
    faults::drop_data_to(&topo.server, false, PORT, DROP_EVERY)?;
    let tmux = Tmux::start("inproc")?;
    let mut command = top;
    command.extend([
        "--no-connect".into(),
        "--interval".into(),
        "0.5".into(),
        "--export-per-cpu".into(),
        "0".into(),
    ]);
    tmux.type_line(&format!("{}; echo TOP_EXIT=$?", shell_quote(&command)))?;
    top_screen_ready(&tmux)?;
    ensure!(
        tmux.alternate_screen()?,
        "top should use the alternate screen"
    );
    let stream = Stream::start(&topo)?;
    check_findings(&tmux, &topo)?;
    check_flow(&tmux, &topo, &stream)?;
    quit_restores_the_terminal(&tmux, "TOP_EXIT")?;
    let sent = stream.finish()?;
    ensure!(sent > 0, "nothing was sent");
    Ok(())
}

/// A running daemon (`observer run --socket PATH`), stopped with SIGINT on drop.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
}

impl Daemon {
    fn start(test: &str) -> Result<(Self, PathBuf)> {
        let dir = std::env::temp_dir().join(format!("obs-top-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("observer.sock");
        let mut command = driver("run", "--socket")?;
        // No per-CPU export budget: other tests' storms must not crowd out this flow's events.
        command.extend([
            "--socket".into(),
            socket.display().to_string(),
            "--export-per-cpu".into(),
            "0".into(),
        ]);
        let (program, args) = command.split_first().context("empty command")?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        let daemon = Self {
            child: Some(child),
            dir,
        };
        poll_until(
            "the daemon's socket",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || Ok(std::os::unix::net::UnixStream::connect(&socket).ok()),
        )?;
        Ok((daemon, socket))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain syscall on a child we spawned and have not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGINT);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `observer top --connect PATH` attached to a running daemon; then SIGTERM restores the
/// terminal too.
#[test]
fn top_attached_to_a_daemon_shows_the_flow_and_leaves_cleanly() -> Result<()> {
    let Some(t) = kernel_test("top_connect") else {
        return Ok(());
    };
    let top = driver("top", "--connect")?;
    let topo = Topology::new(&t.name, 91)?;
    faults::drop_data_to(&topo.server, false, PORT, DROP_EVERY)?;
    let (daemon, socket) = Daemon::start("connect")?;
    let tmux = Tmux::start("connect")?;
    let mut command = top.clone();
    command.extend([
        "--connect".into(),
        socket.display().to_string(),
        "--interval".into(),
        "0.5".into(),
    ]);
    tmux.type_line(&format!("{}; echo TOP_EXIT=$?", shell_quote(&command)))?;
    let screen = top_screen_ready(&tmux)?;
    ensure!(
        screen.contains(&socket.display().to_string()),
        "the header should name the socket:\n{screen}"
    );
    let stream = Stream::start(&topo)?;
    check_findings(&tmux, &topo)?;
    check_flow(&tmux, &topo, &stream)?;
    quit_restores_the_terminal(&tmux, "TOP_EXIT")?;

    // Again, ended by SIGTERM this time.
    tmux.type_line(&format!("{}; echo TOP2_EXIT=$?", shell_quote(&command)))?;
    top_screen_ready(&tmux)?;
    let pid = tmux
        .foreground_pid()?
        .context("no process runs in the pane")?;
    // SAFETY: plain syscall on the process we started in our tmux pane.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let screen = tmux.wait_for("the shell after SIGTERM", Duration::from_secs(15), |s| {
        exit_status(s, "TOP2_EXIT").is_some()
    })?;
    ensure!(
        !tmux.alternate_screen()?,
        "alternate screen left on:\n{screen}"
    );
    ensure!(
        exit_status(&screen, "TOP2_EXIT") == Some(0),
        "top should exit cleanly on SIGTERM:\n{screen}"
    );
    stream.finish()?;
    drop(daemon);
    ensure!(
        !Path::new(&socket).exists(),
        "the daemon should remove its socket on exit"
    );
    Ok(())
}

/// A panic while top owns the screen: the hook gives the terminal back before the message.
/// Needs the development driver (`top_dev panic-check`); skipped without it.
#[test]
fn a_panic_restores_the_terminal() -> Result<()> {
    let Some(_t) = kernel_test("top_panic") else {
        return Ok(());
    };
    let dev = observer_bin()
        .parent()
        .map(|dir| dir.join("examples/top_dev"))
        .unwrap_or_default();
    if !dev.exists() {
        note("SKIPPED a_panic_restores_the_terminal: no target/debug/examples/top_dev");
        return Ok(());
    }
    let tmux = Tmux::start("panic")?;
    let command = vec![dev.display().to_string(), "panic-check".to_owned()];
    tmux.type_line(&format!("{}; echo TOP_EXIT=$?", shell_quote(&command)))?;
    tmux.wait_for("the alternate screen", Duration::from_secs(10), |s| {
        s.contains("observer top")
    })?;
    let screen = tmux.wait_for("the shell after the panic", Duration::from_secs(15), |s| {
        exit_status(s, "TOP_EXIT").is_some()
    })?;
    ensure!(
        !tmux.alternate_screen()?,
        "alternate screen left on:\n{screen}"
    );
    ensure!(
        exit_status(&screen, "TOP_EXIT") == Some(101),
        "a panic exits with 101:\n{screen}"
    );
    ensure!(
        screen.contains("a deliberate panic"),
        "the panic message should be on the restored screen:\n{screen}"
    );
    Ok(())
}

#[test]
fn rates_are_read_off_the_screen() {
    let screen = "Flow (this host → peer)  Rtx/s  SYN\n10.200.90.1:4000→10.200.90.2:5001   12.5    0\n!10.200.90.1:4001→10.200.90.2:5001  1.2k 0\n";
    assert_eq!(
        rate_of(screen, "10.200.90.1:4000→10.200.90.2:5001"),
        Some(12.5)
    );
    assert_eq!(
        rate_of(screen, "10.200.90.1:4001→10.200.90.2:5001"),
        Some(1200.0)
    );
    assert_eq!(rate_of(screen, "10.200.90.1:4002→10.200.90.2:5001"), None);
    let shell = "# 'top' --connect x; echo TOP_EXIT=$?\n# TOP_EXIT=0\n";
    assert_eq!(exit_status(shell, "TOP_EXIT"), Some(0));
    assert_eq!(exit_status("# top; echo TOP_EXIT=$?", "TOP_EXIT"), None);
}
