//! Shared harness for the integration tests.
//!
//! - [`kernel_test`]: root check (skip or fail) plus a process-wide lock so that the kernel tests
//!   run one at a time (every observer sees every namespace, and two cores are easily saturated).
//! - [`Topology`]: two network namespaces (client, server) joined by a veth pair, IPv4 and IPv6,
//!   no default route; removed on drop (which also removes their iptables rules and sysctls).
//! - [`Netns`]: run commands in a namespace, create sockets in it ([`Netns::run`]: a thread that
//!   `setns`es; a socket stays in the namespace it was created in), read its SNMP counters
//!   ([`Netns::counters`], the numbers `nstat -az` shows).
//! - Bounded traffic: [`Sink`], [`send_bulk`], [`connect_in`].
//! - [`Observer`]: runs the binary under test, parses its JSON lines, stops it with SIGINT.
//! - [`live::LiveObserver`]: the binary under test read while it runs (poll for a record with a
//!   deadline), records with the time each was received.
//! - [`support`]: connects from explicitly bound ports, accepts and closes, exact per-event
//!   accounting of a run with every event exported.
//! - Small shared pieces: [`TempDir`], [`require_tool`], [`send_signal`], [`ALL_EVENT_TYPES`].
//!
//! Every wait has a deadline; every loop is bounded in count and time.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Test gating

/// Env var that turns "needs root" skips into failures (set it in CI).
pub const REQUIRE_ENV: &str = "OBSERVER_REQUIRE_KERNEL_TESTS";

/// True when the test can run. When not root: panics if `OBSERVER_REQUIRE_KERNEL_TESTS=1`,
/// otherwise prints `SKIPPED <test>: needs root` to stderr and returns false.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: needs root, and {REQUIRE_ENV}=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

static KERNEL_LOCK: Mutex<()> = Mutex::new(());

/// Held for the whole of a kernel test: serializes them within this test binary.
pub struct KernelTest {
    pub name: String,
    _guard: MutexGuard<'static, ()>,
}

/// [`require_root`] plus the kernel-test lock. `None`: skip the test.
pub fn kernel_test(name: &str) -> Option<KernelTest> {
    if !require_root(name) {
        return None;
    }
    // A test that panicked while holding the lock poisons it; the lock only orders tests.
    let guard = KERNEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    Some(KernelTest {
        name: name.to_owned(),
        _guard: guard,
    })
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Runs a command with a deadline; returns its output, failing on a non-zero exit.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let (status, stdout, stderr) = run_with_timeout(cmd, timeout)?;
    ensure!(
        status.success(),
        "{cmd:?} failed ({status}): {}{}",
        stderr.trim(),
        if stdout.trim().is_empty() {
            String::new()
        } else {
            format!(" / stdout: {}", stdout.trim())
        }
    );
    Ok(stdout)
}

/// Runs a command with a deadline (killed when it passes): (status, stdout, stderr).
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out.with_context(|| format!("waiting for {cmd:?}"))?;
            Ok((
                out.status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
        Err(_) => {
            // The child is not reaped until wait_with_output returns, so the pid is still ours.
            kill(pid, libc::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("{cmd:?} did not finish within {timeout:?} (killed)")
        }
    }
}

fn kill(pid: u32, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

const CMD_TIMEOUT: Duration = Duration::from_secs(15);

/// Polls `f` every `every` until it returns `Some`, at most until `timeout` has passed.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique name: `obs-<test>-<pid>-<seq>`.
pub fn unique_name(test: &str) -> String {
    let short: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    format!(
        "obs-{short}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
    handle: File,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run_checked(Command::new("ip").args(["netns", "add", name]), CMD_TIMEOUT)?;
        let path = format!("/run/netns/{name}");
        let handle = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = run_checked(Command::new("ip").args(["netns", "del", name]), CMD_TIMEOUT);
                return Err(e).with_context(|| format!("opening {path}"));
            }
        };
        let ns = Self {
            name: name.to_owned(),
            handle,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's inode number (what observer reports as `netns`).
    pub fn inode(&self) -> Result<u64> {
        Ok(self.handle.metadata().context("stat netns")?.ino())
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            CMD_TIMEOUT,
        )
    }

    /// `ip netns exec NAME program args...`, checked.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run_checked(&mut self.command(program, args), CMD_TIMEOUT)
    }

    /// A `Command` running `program` inside the namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Spawns a long-running process inside the namespace; killed and reaped on drop.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<ChildGuard> {
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {program} in {}", self.name))?;
        Ok(ChildGuard(Some(child)))
    }

    /// Adds an iptables rule inside the namespace (`iptables`/`ip6tables` + args).
    pub fn iptables(&self, v6: bool, args: &[&str]) -> Result<()> {
        self.exec(if v6 { "ip6tables" } else { "iptables" }, args)
            .map(drop)
    }

    /// Appends `-w 5 -A INPUT -p tcp <matches> -j DROP` (`iptables`/`ip6tables`) in the namespace:
    /// drops the inbound TCP packets that `matches` select.
    pub fn drop_inbound_tcp(&self, v6: bool, matches: &[&str]) -> Result<()> {
        let mut args = vec!["-w", "5", "-A", "INPUT", "-p", "tcp"];
        args.extend_from_slice(matches);
        args.extend_from_slice(&["-j", "DROP"]);
        self.iptables(v6, &args)
    }

    /// Packet counter of the rules of `chain` in `filter` (sum): how many packets were dropped.
    pub fn iptables_packets(&self, v6: bool, chain: &str) -> Result<u64> {
        let out = self.exec(
            if v6 { "ip6tables" } else { "iptables" },
            &["-w", "5", "-L", chain, "-v", "-n", "-x"],
        )?;
        Ok(out
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    /// `sysctl -w name=value` inside the namespace (namespaced sysctls only: net.*).
    pub fn sysctl(&self, name: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{name}={value}")])
            .map(drop)
    }

    /// Like [`Netns::run`], but in the background: the thread joins the namespace, then runs `f`.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<thread::JoinHandle<Result<T>>> {
        let handle = self.handle.try_clone().context("dup netns fd")?;
        Ok(thread::spawn(move || {
            // SAFETY: `handle` is an open nsfs file owned by this thread; setns only changes
            // this dedicated thread's network namespace.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
            drop(handle);
            f()
        }))
    }

    /// Runs `f` on a thread that has joined this namespace. Sockets created there stay in it and
    /// may be used from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.handle.as_raw_fd();
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: fd is an open nsfs file owned by self, alive for the whole scope; setns
                // only changes this (short-lived, dedicated) thread's network namespace.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(anyhow!("setns: {}", std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    /// The namespace's SNMP counters, named as `nstat` names them (`TcpRetransSegs`,
    /// `TcpExtTCPSynRetrans`, `TcpExtListenOverflows`, `Ip6InReceives`, ...).
    pub fn counters(&self) -> Result<Counters> {
        let files = self.run(|| {
            // /proc/thread-self/net follows this thread's namespace (/proc/self/net would
            // follow the main thread's).
            ["netstat", "snmp", "snmp6"]
                .iter()
                .map(|f| {
                    std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                        .with_context(|| format!("reading /proc/thread-self/net/{f}"))
                })
                .collect::<Result<Vec<_>>>()
        })??;
        let mut map = BTreeMap::new();
        for text in &files[..2] {
            parse_proc_net_pairs(text, &mut map)?;
        }
        parse_snmp6(&files[2], &mut map);
        Ok(Counters(map))
    }

    /// Sockets of this namespace listed in /proc/net/tcp{,6} with `local port` == `port` and
    /// the given state (hex as in the file, e.g. "03" = SYN_RECV).
    pub fn count_sockets(&self, port: u16, state: &str) -> Result<usize> {
        let files = self.run(|| {
            ["tcp", "tcp6"]
                .iter()
                .map(|f| {
                    std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                        .with_context(|| format!("reading /proc/thread-self/net/{f}"))
                })
                .collect::<Result<Vec<_>>>()
        })??;
        let suffix = format!(":{port:04X}");
        Ok(files
            .iter()
            .flat_map(|t| t.lines().skip(1))
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&suffix) && cols[3] == state
            })
            .count())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_checked(
            Command::new("ip").args(["netns", "del", &self.name]),
            CMD_TIMEOUT,
        ) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A child process killed and reaped on drop.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses /proc/net/netstat or /proc/net/snmp: pairs of `Prefix: names...` / `Prefix: values...`.
fn parse_proc_net_pairs(text: &str, map: &mut BTreeMap<String, u64>) -> Result<()> {
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let (prefix, names) = names
            .split_once(':')
            .context("counter header without ':'")?;
        let (prefix2, values) = values.split_once(':').context("counter line without ':'")?;
        ensure!(
            prefix == prefix2,
            "mismatched counter lines {prefix} / {prefix2}"
        );
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            // Some values are signed (Tcp MaxConn = -1): keep only the counters.
            if let Ok(v) = value.parse::<u64>() {
                map.insert(format!("{prefix}{name}"), v);
            }
        }
    }
    Ok(())
}

/// Parses /proc/net/snmp6: `Name value` lines.
fn parse_snmp6(text: &str, map: &mut BTreeMap<String, u64>) {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(name), Some(value)) = (it.next(), it.next())
            && let Ok(v) = value.parse::<u64>()
        {
            map.insert(name.to_owned(), v);
        }
    }
}

/// A snapshot of one namespace's SNMP counters.
#[derive(Clone, Debug)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    pub fn get(&self, name: &str) -> Result<u64> {
        self.0
            .get(name)
            .copied()
            .with_context(|| format!("counter {name} not found"))
    }

    /// `after - before` for `name`.
    pub fn delta(&self, after: &Counters, name: &str) -> Result<u64> {
        let (b, a) = (self.get(name)?, after.get(name)?);
        a.checked_sub(b)
            .with_context(|| format!("counter {name} went backwards: {b} -> {a}"))
    }

    /// Every counter that changed, for diagnostics.
    pub fn changes(&self, after: &Counters) -> BTreeMap<String, u64> {
        after
            .0
            .iter()
            .filter_map(|(k, &a)| {
                let b = self.0.get(k).copied().unwrap_or(0);
                (a != b).then(|| (k.clone(), a.wrapping_sub(b)))
            })
            .collect()
    }
}

/// Client and server namespaces joined by a veth pair:
/// client `10.200.N.1/24` + `fd00:200:N::1/64` on `veth0`, server `.2` / `::2` on `veth1`.
/// No default route. Dropped in reverse order of the fields: nothing of it outlives the test.
pub struct Topology {
    pub client: Netns,
    pub server: Netns,
    pub client_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
}

impl Topology {
    /// `subnet` picks 10.200.`subnet`.0/24 and fd00:200:`subnet`::/64: distinct per test.
    pub fn new(test: &str, subnet: u8) -> Result<Self> {
        let base = unique_name(test);
        let client = Netns::create(&format!("{base}-c"))?;
        let server = Netns::create(&format!("{base}-s"))?;
        let topo = Self {
            client_v4: Ipv4Addr::new(10, 200, subnet, 1),
            server_v4: Ipv4Addr::new(10, 200, subnet, 2),
            client_v6: Ipv6Addr::new(0xfd00, 0x200, u16::from(subnet), 0, 0, 0, 0, 1),
            server_v6: Ipv6Addr::new(0xfd00, 0x200, u16::from(subnet), 0, 0, 0, 0, 2),
            client,
            server,
        };
        // Created inside the client namespace with its peer put straight into the server's:
        // nothing appears in the host namespace, so the names need not be unique there.
        topo.client.ip(&[
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            &topo.server.name,
        ])?;
        for (ns, dev, v4, v6) in [
            (&topo.client, "veth0", topo.client_v4, topo.client_v6),
            (&topo.server, "veth1", topo.server_v4, topo.server_v6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for (ns, dev) in [(&topo.client, "veth0"), (&topo.server, "veth1")] {
            poll_until(
                &format!("{dev} in {} to be up", ns.name),
                Duration::from_secs(10),
                Duration::from_millis(20),
                || {
                    let out = ns.ip(&["-o", "link", "show", dev])?;
                    Ok((out.contains("LOWER_UP") && out.contains("state UP")).then_some(()))
                },
            )?;
        }
        for ns in [&topo.client, &topo.server] {
            let routes = ns.ip(&["route", "show", "default"])?
                + &ns.ip(&["-6", "route", "show", "default"])?;
            ensure!(
                routes.trim().is_empty(),
                "unexpected default route in {}: {routes}",
                ns.name
            );
        }
        Ok(topo)
    }

    pub fn client_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.client_v6.into()
        } else {
            self.client_v4.into()
        }
    }

    pub fn server_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.server_v6.into()
        } else {
            self.server_v4.into()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic

/// A listener (created inside a namespace) that accepts connections and reads them to EOF on a
/// background thread, until `expected` connections are done or the deadline passes.
pub struct Sink {
    pub addr: SocketAddr,
    handle: Option<thread::JoinHandle<Result<Vec<u64>>>>,
}

impl Sink {
    pub fn start(ns: &Netns, addr: SocketAddr, expected: usize, timeout: Duration) -> Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", ns.name))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let handle = thread::spawn(move || -> Result<Vec<u64>> {
            let mut readers = Vec::new();
            while readers.len() < expected {
                match listener.accept() {
                    Ok((stream, _)) => {
                        readers.push(thread::spawn(move || read_to_eof(stream, deadline)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ensure!(Instant::now() < deadline, "sink: accept timed out");
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).context("sink: accept"),
                }
            }
            readers
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("sink reader panicked"))?)
                .collect()
        });
        Ok(Self {
            addr,
            handle: Some(handle),
        })
    }

    /// Bytes received per connection.
    pub fn join(mut self) -> Result<Vec<u64>> {
        self.handle
            .take()
            .context("sink already joined")?
            .join()
            .map_err(|_| anyhow!("sink thread panicked"))?
    }
}

fn read_to_eof(mut stream: TcpStream, deadline: Instant) -> Result<u64> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        ensure!(
            Instant::now() < deadline,
            "sink: reading timed out after {total} bytes"
        );
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("sink: read"),
        }
    }
}

/// Connects from inside `ns` (the socket belongs to `ns`).
pub fn connect_in(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&to, timeout))?
        .with_context(|| format!("connecting to {to} from {}", ns.name))
}

/// What a bulk transfer saw.
#[derive(Clone, Copy, Debug)]
pub struct BulkResult {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// `tcpi_total_retrans` of the client socket at the end (segments).
    pub total_retrans: u32,
}

/// After our FIN: reads `stream` until the peer's FIN (end of stream) by `deadline`; fails if the
/// peer sends data. Errors start with `what`; `late` says the deadline passed. The stream needs a
/// read timeout (so that the deadline is checked).
pub fn await_fin(stream: &mut TcpStream, deadline: Instant, what: &str, late: &str) -> Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        ensure!(Instant::now() < deadline, "{what}: {late}");
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => bail!("{what}: the sink sent data"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context(format!("{what}: read")),
        }
    }
}

/// Connects from `ns` to `to`, sends `bytes`, shuts down its side and waits for the peer's FIN:
/// when it returns, every byte and the FIN were acknowledged, so the client retransmits no more.
pub fn send_bulk(
    ns: &Netns,
    to: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> Result<BulkResult> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_in(ns, to, Duration::from_secs(10))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let local = stream.local_addr()?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0usize;
    while sent < bytes {
        ensure!(
            Instant::now() < deadline,
            "send_bulk: timed out after {sent} bytes"
        );
        let n = chunk.len().min(bytes - sent);
        match stream.write(&chunk[..n]) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("send_bulk: write"),
        }
    }
    stream.shutdown(Shutdown::Write)?;
    await_fin(
        &mut stream,
        deadline,
        "send_bulk",
        "timed out waiting for the peer's FIN",
    )?;
    let total_retrans = tcp_info(&stream)?.tcpi_total_retrans;
    Ok(BulkResult {
        local,
        peer: to,
        total_retrans,
    })
}

/// `getsockopt(TCP_INFO)`.
pub fn tcp_info(stream: &TcpStream) -> Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>())?;
    // SAFETY: the pointer and length describe `info`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    ensure!(rc == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info)
}

// ---------------------------------------------------------------------------------------------
// The observer under test

/// `OBSERVER_BIN`, else `<workspace>/target/debug/observer`. Nothing is built here.
pub fn observer_bin() -> PathBuf {
    std::env::var_os("OBSERVER_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/observer"),
        PathBuf::from,
    )
}

enum Line {
    Json(Value),
    NotJson(String),
}

/// A running `observer run ...`. Killed and reaped on drop if still running.
pub struct Observer {
    child: Option<Child>,
    lines: mpsc::Receiver<Line>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
    records: Vec<Value>,
    bad_lines: Vec<String>,
}

/// Everything an observer run wrote.
#[derive(Debug)]
pub struct Run {
    pub records: Vec<Value>,
    pub stderr: String,
}

pub const START_TIMEOUT: Duration = Duration::from_secs(20);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Spawns `bin run <args>` with its stdout and stderr piped.
pub fn spawn_observer(bin: &std::path::Path, args: &[&str]) -> Result<Child> {
    ensure!(
        bin.exists(),
        "{} does not exist: build it first (cargo build -p observer) or set OBSERVER_BIN",
        bin.display()
    );
    let spawn = || {
        Command::new(bin)
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // A file just written (the harness tests' fake) can be briefly held open for writing by
    // a child another test thread forked before its exec closed the descriptor: exec then
    // fails with ETXTBSY until that child has exec'd. Bounded retries, only for that error.
    let mut attempt = 0;
    loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 100 => {
                attempt += 1;
                thread::sleep(Duration::from_millis(10));
            }
            other => return other.with_context(|| format!("spawning {}", bin.display())),
        }
    }
}

impl Observer {
    /// Spawns `observer run <args>` and waits (20 s at most) for its `start` record.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_bin(&observer_bin(), args)
    }

    /// [`Observer::start`] with another binary (the harness tests use a fake).
    pub fn start_bin(bin: &std::path::Path, args: &[&str]) -> Result<Self> {
        let mut child = spawn_observer(bin, args)?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr_pipe = child.stderr.take().context("stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => Line::Json(v),
                    _ => Line::NotJson(line),
                };
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut obs = Self {
            child: Some(child),
            lines: rx,
            stderr,
            records: Vec::new(),
            stderr_reader: Some(stderr_reader),
            bad_lines: Vec::new(),
        };
        obs.collect_until("start", START_TIMEOUT)?;
        ensure!(
            obs.records.len() == 1,
            "`start` is not the first record: {:?}",
            obs.records
        );
        Ok(obs)
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// All of stderr once the process has exited (the reader thread then meets EOF).
    fn final_stderr(&mut self) -> String {
        let exited = self
            .child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some());
        if exited && let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        self.stderr()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn collect_until(&mut self, ty: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Json(v)) => {
                    let done = v["type"] == ty;
                    self.records.push(v);
                    if done {
                        return Ok(());
                    }
                }
                Ok(Line::NotJson(l)) => self.bad_lines.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "no `{ty}` record within {timeout:?}; stderr:\n{}",
                    self.stderr()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .as_mut()
                        .map(|c| wait_child(c, Duration::from_secs(5)));
                    bail!(
                        "observer closed stdout before a `{ty}` record (exit: {status:?}); stderr:\n{}",
                        self.final_stderr()
                    )
                }
            }
        }
    }

    /// Sends SIGINT, collects everything up to the `stop` record and EOF, and checks that
    /// stdout held only JSON objects and the exit code is 0.
    pub fn stop(&mut self) -> Result<Run> {
        self.finish(Some(libc::SIGINT), STOP_TIMEOUT)
    }

    /// Sends `signal` (if any), then collects everything up to the `stop` record (within
    /// `timeout`) and EOF, and checks that stdout held only JSON objects and the exit code is 0.
    pub fn finish(&mut self, signal: Option<i32>, timeout: Duration) -> Result<Run> {
        let pid = self.pid().context("observer already stopped")?;
        if let Some(signal) = signal {
            kill(pid, signal);
        }
        // Keeps `self.child` until the process has exited: final_stderr joins the stderr reader
        // only then, so nothing here can wait forever.
        let collected = self.collect_until("stop", timeout);
        let mut child = self.child.take().context("observer already stopped")?;
        let status = wait_child(&mut child, STOP_TIMEOUT);
        let stderr = self.final_stderr();
        collected?;
        let status = status.with_context(|| format!("stderr:\n{stderr}"))?;
        // Anything after `stop` (there should be nothing) until EOF.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            match line {
                Line::Json(v) => bail!("record after `stop`: {v}"),
                Line::NotJson(l) => self.bad_lines.push(l),
            }
        }
        ensure!(
            self.bad_lines.is_empty(),
            "non-JSON lines on stdout: {:?}",
            self.bad_lines
        );
        ensure!(
            status.code() == Some(0),
            "observer exited with {status}; stderr:\n{stderr}"
        );
        Ok(Run {
            records: std::mem::take(&mut self.records),
            stderr,
        })
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for a child with a deadline; kills it when the deadline passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "process {} did not exit within {timeout:?} (killed)",
                child.id()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the records

pub const EVENT_TYPES: [&str; 4] = [
    "retransmit",
    "retransmit_failed",
    "syn_retransmit",
    "synack_retransmit",
];

/// Which flow (or events) a test is about. `None` fields match anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    pub saddr: Option<IpAddr>,
    pub sport: Option<u16>,
    pub daddr: Option<IpAddr>,
    pub dport: Option<u16>,
    pub netns: Option<u64>,
}

impl Filter {
    pub fn matches(&self, v: &Value) -> bool {
        let ip = |k: &str| v[k].as_str().and_then(|s| s.parse::<IpAddr>().ok());
        let port = |k: &str| v[k].as_u64();
        self.saddr.is_none_or(|a| ip("saddr") == Some(a))
            && self.daddr.is_none_or(|a| ip("daddr") == Some(a))
            && self
                .sport
                .is_none_or(|p| port("sport") == Some(u64::from(p)))
            && self
                .dport
                .is_none_or(|p| port("dport") == Some(u64::from(p)))
            && self.netns.is_none_or(|n| v["netns"].as_u64() == Some(n))
    }
}

impl Run {
    pub fn start(&self) -> &Value {
        &self.records[0]
    }

    /// Checks that all six programs attached as `kind` (`tracepoint` or `raw_tracepoint`).
    pub fn ensure_programs_are(&self, kind: &str) -> Result<()> {
        let programs = self.start()["programs"]
            .as_array()
            .context("start record without programs")?;
        ensure!(
            programs.len() == 6
                && programs
                    .iter()
                    .all(|p| p["kind"] == kind && p["attached"] == true),
            "expected 6 attached {kind} programs, got {programs:?}"
        );
        Ok(())
    }

    pub fn stop(&self) -> Result<&Value> {
        self.records
            .last()
            .filter(|v| v["type"] == "stop")
            .context("no stop record")
    }

    /// Event records of type `ty` matching `filter`, in output order.
    pub fn events(&self, ty: &str, filter: &Filter) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|v| v["type"] == ty && filter.matches(v))
            .collect()
    }

    /// `stop.flows` entries matching `filter`.
    pub fn flows(&self, filter: &Filter) -> Result<Vec<&Value>> {
        let flows = self.stop()?["flows"]
            .as_array()
            .context("stop.flows is not an array")?;
        Ok(flows.iter().filter(|v| filter.matches(v)).collect())
    }

    /// Lost samples: `stop.lost` and the `lost` records.
    pub fn lost(&self) -> Result<(u64, u64)> {
        let in_stop = self.stop()?["lost"].as_u64().context("stop.lost")?;
        let records = self
            .records
            .iter()
            .filter(|v| v["type"] == "lost")
            .map(|v| v["count"].as_u64().unwrap_or(0))
            .sum();
        Ok((in_stop, records))
    }

    /// Fails when any sample was lost (exact per-event comparisons are then impossible).
    pub fn ensure_nothing_lost(&self) -> Result<()> {
        let (in_stop, records) = self.lost()?;
        ensure!(
            in_stop == 0 && records == 0,
            "the perf buffers lost samples (stop.lost={in_stop}, lost records={records}): \
             per-event counts cannot be compared"
        );
        let missed = self.stop()?["missed_runs"].as_u64();
        ensure!(
            missed == Some(0),
            "stop.missed_runs = {missed:?}: the kernel skipped program runs, so events are \
             missing from every count"
        );
        Ok(())
    }

    /// Checks every record against the schema (docs/schema.md and the tests' contract);
    /// returns the problems found, one line each.
    pub fn schema_problems(&self, export_per_flow: Option<u64>) -> Vec<String> {
        let mut p = Vec::new();
        let start = self.start();
        check_start(start, export_per_flow, &mut p);
        let mut seen_stop = false;
        // Event times (boot clock turned into wall time) must fall within the run (+- 2 s).
        let end = self.records.last().map_or(&Value::Null, |r| &r["time"]);
        let window = rfc3339_ns(&start["time"]).zip(rfc3339_ns(end));
        for (i, r) in self.records.iter().enumerate().skip(1) {
            if let (Some((from, to)), Some(t)) = (window, rfc3339_ns(&r["time"]))
                && (t + 2_000_000_000 < from || t > to + 2_000_000_000)
            {
                p.push(format!(
                    "record {i}: `time` {} outside the run ({} .. {end})",
                    r["time"], start["time"]
                ));
            }
            let ty = r["type"].as_str().unwrap_or("");
            if seen_stop {
                p.push(format!("record {i} after stop: {r}"));
            }
            check_time(r, i, &mut p);
            match ty {
                t if EVENT_TYPES.contains(&t) => check_event(r, i, &mut p),
                "lost" => {
                    for k in ["cpu", "count"] {
                        if !r[k].is_u64() {
                            p.push(format!(
                                "record {i} (lost): `{k}` not an unsigned integer: {r}"
                            ));
                        }
                    }
                }
                "stop" => {
                    seen_stop = true;
                    self.check_stop(r, export_per_flow, &mut p);
                }
                "start" => p.push(format!("record {i}: second start record")),
                "" => p.push(format!("record {i}: no `type`: {r}")),
                // Other kinds (drops, resets, connects, ...) are not this harness's subject:
                // consumers must ignore what they do not know.
                _ => {}
            }
        }
        if !seen_stop {
            p.push("no stop record".into());
        }
        p
    }

    fn check_stop(&self, r: &Value, export_per_flow: Option<u64>, p: &mut Vec<String>) {
        if r["reason"] != "signal" && r["reason"] != "duration" {
            p.push(format!(
                "stop.reason: expected \"signal\" or \"duration\", got {}",
                r["reason"]
            ));
        }
        for k in ["lost", "missed_runs"] {
            if !r[k].is_u64() {
                p.push(format!("stop.{k}: not an unsigned integer: {}", r[k]));
            }
        }
        let count = |ty: &str| self.records.iter().filter(|v| v["type"] == ty).count() as u64;
        let Some(totals) = r["totals"].as_object() else {
            p.push(format!("stop.totals: not an object: {}", r["totals"]));
            return;
        };
        for kind in ["retransmit", "syn_retransmit", "synack_retransmit"] {
            if !totals.contains_key(kind) {
                p.push(format!("stop.totals.{kind}: missing"));
            }
        }
        for (kind, t) in totals {
            let kind = kind.as_str();
            // Totals are keyed by record type; `retransmit` also covers `retransmit_failed`.
            let record_types: &[&str] = if kind == "retransmit" {
                &["retransmit", "retransmit_failed"]
            } else {
                std::slice::from_ref(&kind)
            };
            for k in ["events", "counted", "exported", "suppressed"] {
                if !t[k].is_u64() {
                    p.push(format!(
                        "stop.totals.{kind}.{k}: not an unsigned integer: {}",
                        t[k]
                    ));
                }
            }
            let written: u64 = record_types.iter().map(|ty| count(ty)).sum();
            if let Some(received) = t["received"].as_u64()
                && received != written
            {
                p.push(format!(
                    "stop.totals.{kind}.received={received} but {written} {record_types:?} records were written"
                ));
            }
            if export_per_flow == Some(0)
                && EVENT_TYPES.contains(&kind)
                && t["suppressed"].as_u64() != Some(0)
            {
                p.push(format!(
                    "stop.totals.{kind}.suppressed: expected 0 with --export-per-flow 0, got {}",
                    t["suppressed"]
                ));
            }
        }
        match r["flows"].as_array() {
            None => p.push(format!("stop.flows: not an array: {}", r["flows"])),
            Some(flows) => {
                for f in flows {
                    check_addr_fields(f, "stop.flows[]", p);
                    for k in [
                        "netns",
                        "retransmit_segs",
                        "retransmit_skbs",
                        "retransmit_failed",
                        "syn_retransmits",
                        "synack_retransmits",
                        "suppressed",
                    ] {
                        if !f[k].is_u64() {
                            p.push(format!("stop.flows[]: `{k}` not an unsigned integer: {f}"));
                        }
                    }
                }
            }
        }
    }

    /// The accounting identity of docs/schema.md: every exported event was written or is
    /// accounted as lost/undelivered/undecodable: `exported = received + lost + undelivered +
    /// decode_errors` over all kinds. Returns the problem, if any.
    pub fn accounting_problem(&self) -> Option<String> {
        let r = self.stop().ok()?;
        let Some(totals) = r["totals"].as_object() else {
            return Some(format!("stop.totals: not an object: {}", r["totals"]));
        };
        let mut p = Vec::new();
        // exported = received + lost + undelivered + decode_errors (docs/schema.md).
        let sum = |k: &str| -> Option<u64> { totals.values().map(|t| t[k].as_u64()).sum() };
        if let (Some(exported), Some(received), Some(lost)) =
            (sum("exported"), sum("received"), r["lost"].as_u64())
        {
            let other =
                r["undelivered"].as_u64().unwrap_or(0) + r["decode_errors"].as_u64().unwrap_or(0);
            if exported != received + lost + other {
                let per_kind: Vec<String> = totals
                    .iter()
                    .filter(|(_, t)| t["exported"] != t["received"])
                    .map(|(k, t)| {
                        format!("{k}: exported {} received {}", t["exported"], t["received"])
                    })
                    .collect();
                p.push(format!(
                    "stop.totals: exported={exported} != received={received} + lost={lost} + undelivered/decode_errors={other} ({})",
                    per_kind.join(", ")
                ));
            }
        }
        (!p.is_empty()).then(|| p.join("; "))
    }
}

fn check_start(r: &Value, export_per_flow: Option<u64>, p: &mut Vec<String>) {
    if r["type"] != "start" {
        p.push(format!("first record is not start: {r}"));
        return;
    }
    check_time(r, 0, p);
    if r["schema_version"] != 1 {
        p.push(format!(
            "start.schema_version: expected 1, got {}",
            r["schema_version"]
        ));
    }
    for k in ["observer_version", "host", "kernel"] {
        if !r[k].is_string() {
            p.push(format!("start.{k}: not a string: {}", r[k]));
        }
    }
    if !r["sysctls"].is_object() {
        p.push(format!("start.sysctls: not an object: {}", r["sysctls"]));
    }
    if let Some(n) = export_per_flow
        && r["export_per_flow"].as_u64() != Some(n)
    {
        p.push(format!(
            "start.export_per_flow: expected {n}, got {}",
            r["export_per_flow"]
        ));
    }
    match r["programs"].as_array() {
        Some(progs) if !progs.is_empty() => {
            for prog in progs {
                if prog["attached"] != true
                    || !prog["name"].is_string()
                    || !prog["tracepoint"].is_string()
                {
                    p.push(format!("start.programs: not attached or malformed: {prog}"));
                }
            }
            for tp in ["tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack"] {
                if !progs.iter().any(|prog| prog["tracepoint"] == tp) {
                    p.push(format!("start.programs: no program on {tp}"));
                }
            }
        }
        _ => p.push(format!(
            "start.programs: missing or empty: {}",
            r["programs"]
        )),
    }
}

/// RFC 3339 UTC: `YYYY-MM-DDTHH:MM:SS[.frac]Z`.
fn check_time(r: &Value, i: usize, p: &mut Vec<String>) {
    let ok = r["time"].as_str().is_some_and(|t| {
        let b = t.as_bytes();
        b.len() >= 20
            && t.ends_with('Z')
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && (b.len() == 20 || b[19] == b'.')
            && t[..t.len() - 1]
                .bytes()
                .enumerate()
                .all(|(j, c)| matches!(j, 4 | 7 | 10 | 13 | 16 | 19) || c.is_ascii_digit())
    });
    if !ok {
        p.push(format!(
            "record {i}: `time` is not RFC 3339 UTC: {}",
            r["time"]
        ));
    }
}

/// Nanoseconds since the Unix epoch of an RFC 3339 UTC time (`...Z`), if it is one.
pub fn rfc3339_ns(v: &Value) -> Option<i128> {
    let t = v.as_str()?.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut h = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
}

fn check_addr_fields(r: &Value, what: &str, p: &mut Vec<String>) {
    let family = r["family"].as_str();
    if !matches!(family, Some("ipv4" | "ipv6")) {
        p.push(format!("{what}: family not ipv4/ipv6: {r}"));
    }
    for k in ["saddr", "daddr"] {
        match r[k].as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
            Some(IpAddr::V4(_)) if family == Some("ipv4") => {}
            Some(IpAddr::V6(a)) if family == Some("ipv6") && a.to_ipv4_mapped().is_none() => {}
            _ => p.push(format!(
                "{what}: `{k}` does not match family {family:?}: {r}"
            )),
        }
    }
    for k in ["sport", "dport"] {
        if r[k].as_u64().is_none_or(|v| v > 65535) {
            p.push(format!("{what}: `{k}` not a port: {r}"));
        }
    }
}

fn check_event(r: &Value, i: usize, p: &mut Vec<String>) {
    let what = format!("record {i} ({})", r["type"]);
    check_addr_fields(r, &what, p);
    if r["state"].as_str().is_none_or(str::is_empty) {
        p.push(format!("{what}: `state` missing: {r}"));
    }
    for k in ["segs", "flow_count", "netns", "pid"] {
        if !r[k].is_u64() {
            p.push(format!("{what}: `{k}` not an unsigned integer: {r}"));
        }
    }
    if !r["err"].is_i64() {
        p.push(format!("{what}: `err` not an integer: {r}"));
    }
    let ty = r["type"].as_str().unwrap_or("");
    if matches!(ty, "syn_retransmit" | "synack_retransmit") && r["segs"] != 1 {
        p.push(format!("{what}: `segs` should be 1: {r}"));
    }
    if ty != "retransmit_failed" && r["err"] != 0 {
        p.push(format!("{what}: `err` should be 0: {r}"));
    }
    if ty == "retransmit_failed" && r["err"] == 0 {
        p.push(format!("{what}: `err` should be non-zero: {r}"));
    }
}

/// Sum of a numeric field over records.
pub fn sum(records: &[&Value], field: &str) -> u64 {
    records.iter().map(|v| v[field].as_u64().unwrap_or(0)).sum()
}

/// Per flow (4-tuple + netns) of `events`: checks that `flow_count` is the running total of
/// `segs` (its maximum equals the sum, and the values are distinct). Returns problems.
pub fn flow_count_problems(events: &[&Value]) -> Vec<String> {
    let mut by_flow: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in events {
        let key = format!(
            "{} {}:{} -> {}:{} netns {}",
            e["type"], e["saddr"], e["sport"], e["daddr"], e["dport"], e["netns"]
        );
        by_flow.entry(key).or_default().push(e);
    }
    let mut p = Vec::new();
    for (key, evs) in by_flow {
        let total = sum(&evs, "segs");
        let mut counts: Vec<u64> = evs
            .iter()
            .map(|e| e["flow_count"].as_u64().unwrap_or(0))
            .collect();
        counts.sort_unstable();
        let max = counts.last().copied().unwrap_or(0);
        let distinct = counts.windows(2).all(|w| w[0] < w[1]);
        if max != total || !distinct {
            p.push(format!(
                "{key}: flow_count should run up to the sum of segs ({total}), got max {max}, distinct={distinct}"
            ));
        }
    }
    p
}

/// The text of a run for failure messages (records + stderr), shortened.
pub fn describe(run: &Run) -> String {
    let mut s = String::new();
    for r in run.records.iter().take(60) {
        let line = r.to_string();
        match line.char_indices().nth(600) {
            Some((cut, _)) => {
                s.push_str(&line[..cut]);
                s.push_str("...");
            }
            None => s.push_str(&line),
        }
        s.push('\n');
    }
    if run.records.len() > 60 {
        s.push_str(&format!("... {} records in all\n", run.records.len()));
        if let Some(last) = run.records.last() {
            s.push_str(&last.to_string());
            s.push('\n');
        }
    }
    s.push_str("stderr:\n");
    s.push_str(&run.stderr);
    s
}

/// Writes `s` to stderr (visible with `--nocapture` or on failure).
pub fn note(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

// ---------------------------------------------------------------------------------------------
// Faults and their ground truth

/// `iptables` rules and traffic that make the kernel retransmit, and what it counted.
/// A cgroup v2 made for a test.
pub mod cgroup;

pub mod faults {
    use super::*;

    fn ip_flag(v6: bool) -> &'static str {
        if v6 { "ip6tables" } else { "iptables" }
    }

    /// Server side: drops every `every`-th inbound data segment (packets with payload, no
    /// SYN/FIN/RST) to `port`. Deterministic (`statistic --mode nth`).
    pub fn drop_data_to(server: &Netns, v6: bool, port: u16, every: u32) -> Result<()> {
        server.drop_inbound_tcp(
            v6,
            &[
                "--dport",
                &port.to_string(),
                "--tcp-flags",
                "SYN,RST,FIN",
                "NONE",
                "-m",
                "length",
                "--length",
                "100:65535",
                "-m",
                "statistic",
                "--mode",
                "nth",
                "--every",
                &every.to_string(),
                "--packet",
                "0",
            ],
        )
    }

    /// Server side: drops every `every`-th inbound SYN to `port`.
    pub fn drop_syns_to(server: &Netns, v6: bool, port: u16, every: u32) -> Result<()> {
        server.drop_inbound_tcp(
            v6,
            &[
                "--dport",
                &port.to_string(),
                "--syn",
                "-m",
                "statistic",
                "--mode",
                "nth",
                "--every",
                &every.to_string(),
                "--packet",
                "0",
            ],
        )
    }

    /// Client side: drops everything it sends to `port` except SYNs, so the handshake-completing
    /// ACK never leaves: the server keeps retransmitting its SYN-ACK.
    pub fn drop_handshake_acks(client: &Netns, v6: bool, port: u16) -> Result<()> {
        client.exec(
            ip_flag(v6),
            &[
                "-w",
                "5",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "!",
                "--syn",
                "-j",
                "DROP",
            ],
        )?;
        Ok(())
    }

    /// In `ns` (loopback only): drops every SYN to 127.0.0.1:9, then for `duration` opens
    /// `per_tick` non-blocking connects to it every 10 ms and closes each after 1.2 s, i.e. right
    /// after its first SYN retransmit (1 s). Returns the number of connects.
    pub fn syn_storm(
        ns: &Netns,
        duration: Duration,
        per_tick: usize,
    ) -> Result<thread::JoinHandle<Result<u64>>> {
        ns.exec(
            "iptables",
            &[
                "-w",
                "5",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "-d",
                "127.0.0.1",
                "--dport",
                "9",
                "--syn",
                "-j",
                "DROP",
            ],
        )?;
        ns.spawn_thread(move || {
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
            let mut open: std::collections::VecDeque<(Instant, std::os::fd::OwnedFd)> =
                std::collections::VecDeque::new();
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < duration {
                for _ in 0..per_tick {
                    open.push_back((Instant::now(), nonblocking_connect(to)?));
                    n += 1;
                }
                while open
                    .front()
                    .is_some_and(|(t, _)| t.elapsed() >= Duration::from_millis(1200))
                {
                    open.pop_front();
                }
                thread::sleep(Duration::from_millis(10));
            }
            // The last ones get their retransmit too, then go.
            if let Some((t, _)) = open.back() {
                thread::sleep(Duration::from_millis(1200).saturating_sub(t.elapsed()));
            }
            Ok(n)
        })
    }

    /// A bulk transfer over a lossy path and the client namespace's counters around it.
    #[derive(Debug)]
    pub struct DataOutcome {
        pub bulk: BulkResult,
        /// Client namespace `TcpRetransSegs` delta.
        pub retrans_segs: u64,
        /// Client namespace `TcpExtTCPSynRetrans` delta (should be 0).
        pub syn_retrans: u64,
        pub changes: BTreeMap<String, u64>,
    }

    /// Sends `bytes` from the client to a sink on the server at `port` (after
    /// [`drop_data_to`]); returns when the transfer is complete (nothing left to retransmit).
    pub fn bulk_transfer(
        topo: &Topology,
        v6: bool,
        port: u16,
        bytes: usize,
    ) -> Result<DataOutcome> {
        let to = SocketAddr::new(topo.server_ip(v6), port);
        let sink = Sink::start(&topo.server, to, 1, Duration::from_secs(60))?;
        let before = topo.client.counters()?;
        let bulk = send_bulk(&topo.client, to, bytes, Duration::from_secs(60))?;
        let received = sink.join()?;
        ensure!(
            received == [bytes as u64],
            "sink received {received:?}, sent {bytes}"
        );
        let after = topo.client.counters()?;
        Ok(DataOutcome {
            bulk,
            retrans_segs: before.delta(&after, "TcpRetransSegs")?,
            syn_retrans: before.delta(&after, "TcpExtTCPSynRetrans")?,
            changes: before.changes(&after),
        })
    }

    /// Parallel connects through SYN loss and the client namespace's counters around them.
    #[derive(Debug)]
    pub struct SynOutcome {
        pub client_ports: Vec<u16>,
        /// Client namespace `TcpExtTCPSynRetrans` delta.
        pub syn_retrans: u64,
        pub changes: BTreeMap<String, u64>,
    }

    /// `n` connects in parallel to a listener on the server at `port` (after [`drop_syns_to`]),
    /// each allowed `timeout`; all must succeed.
    pub fn parallel_connects(
        topo: &Topology,
        v6: bool,
        port: u16,
        n: usize,
        timeout: Duration,
    ) -> Result<SynOutcome> {
        let to = SocketAddr::new(topo.server_ip(v6), port);
        let sink = Sink::start(&topo.server, to, n, timeout + Duration::from_secs(10))?;
        let before = topo.client.counters()?;
        let streams: Vec<Result<TcpStream>> = thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| s.spawn(|| connect_in(&topo.client, to, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("connect thread panicked"))?)
                .collect()
        });
        let streams = streams.into_iter().collect::<Result<Vec<_>>>()?;
        let after = topo.client.counters()?;
        let client_ports = streams
            .iter()
            .map(|s| Ok(s.local_addr()?.port()))
            .collect::<Result<Vec<_>>>()?;
        drop(streams);
        sink.join()?;
        Ok(SynOutcome {
            client_ports,
            syn_retrans: before.delta(&after, "TcpExtTCPSynRetrans")?,
            changes: before.changes(&after),
        })
    }

    /// Half-open handshakes and the server namespace's counters around them.
    #[derive(Debug)]
    pub struct SynAckOutcome {
        pub client_ports: Vec<u16>,
        /// Server namespace `TcpExtTCPSynRetrans` delta (SYN-ACK retransmits only here).
        pub synack_retrans: u64,
        pub expected: u64,
        pub changes: BTreeMap<String, u64>,
    }

    /// Server `net.ipv4.tcp_synack_retries` is set to `retries`; `n` clients connect to a
    /// listener at `port` that never sees their ACK (after [`drop_handshake_acks`]). Returns once
    /// the server retransmitted exactly `n * retries` SYN-ACKs (its cap) and the counter stayed
    /// put for a moment; fails if that does not happen within 30 s.
    pub fn half_open_handshakes(
        topo: &Topology,
        v6: bool,
        port: u16,
        n: usize,
        retries: u32,
    ) -> Result<SynAckOutcome> {
        topo.server
            .sysctl("net.ipv4.tcp_synack_retries", &retries.to_string())?;
        let to = SocketAddr::new(topo.server_ip(v6), port);
        let listener = topo
            .server
            .run(|| TcpListener::bind(to))?
            .with_context(|| format!("binding {to}"))?;
        let before = topo.server.counters()?;
        let streams = (0..n)
            .map(|_| connect_in(&topo.client, to, Duration::from_secs(5)))
            .collect::<Result<Vec<_>>>()?;
        let client_ports = streams
            .iter()
            .map(|s| Ok(s.local_addr()?.port()))
            .collect::<Result<Vec<_>>>()?;
        let expected = n as u64 * u64::from(retries);
        // SYN-ACK retransmits come after 1, 2, 4, ... s: 2 retries take ~3 s.
        let mut last: Option<(u64, Instant)> = None;
        let delta = poll_until(
            &format!("{expected} SYN-ACK retransmits in {}", topo.server.name),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let d = before.delta(&topo.server.counters()?, "TcpExtTCPSynRetrans")?;
                ensure!(
                    d <= expected,
                    "more SYN-ACK retransmits ({d}) than the cap ({expected})"
                );
                match last {
                    Some((prev, since)) if prev == d => {
                        // Reached the cap and quiet for 300 ms (the tracepoint fires next to the
                        // counter increment; this leaves it ample time).
                        Ok(
                            (d == expected && since.elapsed() >= Duration::from_millis(300))
                                .then_some(d),
                        )
                    }
                    _ => {
                        last = Some((d, Instant::now()));
                        Ok(None)
                    }
                }
            },
        )?;
        let after = topo.server.counters()?;
        drop(streams);
        drop(listener);
        Ok(SynAckOutcome {
            client_ports,
            synack_retrans: delta,
            expected,
            changes: before.changes(&after),
        })
    }
}

/// `connect` on a non-blocking IPv4 socket (returns at once; the handshake goes on).
pub fn nonblocking_connect(to: SocketAddr) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        bail!("nonblocking_connect: IPv4 only");
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET)?,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the given length.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>())?,
        )
    };
    let err = std::io::Error::last_os_error();
    ensure!(
        rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
        "connect: {err}"
    );
    Ok(fd)
}

// ---------------------------------------------------------------------------------------------
// Small helpers of several test files

/// Every event record type the observer writes (`close` is not exported by default).
pub const ALL_EVENT_TYPES: [&str; 11] = [
    "retransmit",
    "retransmit_failed",
    "syn_retransmit",
    "synack_retransmit",
    "drop",
    "reset_sent",
    "reset_received",
    "connect",
    "connect_failed",
    "accept",
    "close",
];

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<temp dir>/<unique name for test>`.
    pub fn new(test: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name(test));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Writes `text` to the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tool the test needs: fails with REQUIRE_ENV=1, otherwise says SKIPPED. False: skip.
pub fn require_tool(test: &str, tool: &str, package: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return true;
    }
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{test}: `{tool}` is missing (apt-get install {package}; `cargo xtask setup` installs it), and {REQUIRE_ENV}=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: `{tool}` is missing (apt-get install {package})");
    false
}

/// Sends `signal` to `pid` (a child the test spawned and has not reaped).
pub fn send_signal(pid: u32, signal: i32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: plain syscall on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(pid, signal) };
    ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Connects with known 4-tuples, and exact per-event accounting

/// Connects from explicitly bound source ports (so every flow the observer reports can be matched
/// to one connect of the test), accepts and closes, iptables rule counters, and the exact
/// per-event checks of a run with every event exported (`check_run`). Used by the drop/reset and
/// lifecycle tests.
pub mod support {
    use std::{
        collections::BTreeMap,
        io::{self, Read},
        net::{SocketAddr, TcpListener, TcpStream},
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        thread,
        time::{Duration, Instant},
    };

    use crate::{Filter, Netns, Run, describe, note, poll_until};
    use anyhow::{Context, Result, anyhow, bail, ensure};
    use serde_json::Value;

    /// `v[k]` as an unsigned integer; fails naming the key when it is missing.
    pub fn u64_of(v: &Value, k: &str) -> Result<u64> {
        v[k].as_u64()
            .with_context(|| format!("`{k}` missing in {v}"))
    }

    /// How a connect ended.
    #[derive(Debug)]
    // The payloads are shown in failure messages (Debug), which the dead-code lint ignores.
    #[allow(dead_code)]
    pub enum Outcome {
        Connected(TcpStream),
        Refused,
        TimedOut,
        Failed(io::Error),
    }

    #[derive(Debug)]
    /// One connect: from where, how it ended and how long it took.
    pub struct Attempt {
        pub local: SocketAddr,
        pub outcome: Outcome,
        /// From connect(2) until the outcome was known (for timeouts: until the socket closed).
        pub elapsed: Duration,
    }

    fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }

    fn check(rc: libc::c_int, what: &str) -> Result<()> {
        if rc < 0 {
            Err(io::Error::last_os_error()).with_context(|| what.to_owned())
        } else {
            Ok(())
        }
    }

    /// Connects from `local` (bound first: the test knows every flow's 4-tuple) to `to` in the
    /// calling thread's network namespace, waiting at most `timeout`. On a timeout the socket is
    /// closed (the kernel sees SYN_SENT -> CLOSE) before this returns.
    pub fn connect_here(local: SocketAddr, to: SocketAddr, timeout: Duration) -> Result<Attempt> {
        let domain = if to.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        };
        // SAFETY: plain syscall; the fd is owned right below.
        let fd = unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        check(fd, "socket")?;
        // SAFETY: fd is a fresh socket owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: the pointer and length describe `one`.
        check(
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            },
            "SO_REUSEADDR",
        )?;
        let (addr, len) = sockaddr(local);
        // SAFETY: addr/len describe a valid socket address.
        check(
            unsafe { libc::bind(fd, (&raw const addr).cast(), len) },
            &format!("bind {local}"),
        )?;
        let (addr, len) = sockaddr(to);
        let start = Instant::now();
        let deadline = start + timeout;
        // SAFETY: addr/len describe a valid socket address.
        let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
        let mut err = 0;
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                err = e.raw_os_error().unwrap_or(libc::EIO);
            } else {
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        drop(sock);
                        return Ok(Attempt {
                            local,
                            outcome: Outcome::TimedOut,
                            elapsed: start.elapsed(),
                        });
                    }
                    let mut pfd = libc::pollfd {
                        fd: sock.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(1000);
                    // SAFETY: pfd is one valid pollfd.
                    let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e).context("poll");
                    }
                    if n > 0 {
                        let mut so_error: libc::c_int = 0;
                        let mut l = size_of::<libc::c_int>() as libc::socklen_t;
                        // SAFETY: the pointer and length describe `so_error`.
                        check(
                            unsafe {
                                libc::getsockopt(
                                    fd,
                                    libc::SOL_SOCKET,
                                    libc::SO_ERROR,
                                    (&raw mut so_error).cast(),
                                    &mut l,
                                )
                            },
                            "SO_ERROR",
                        )?;
                        err = so_error;
                        break;
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        let outcome = match err {
            0 => {
                let stream = TcpStream::from(sock);
                stream.set_nonblocking(false)?;
                Outcome::Connected(stream)
            }
            libc::ECONNREFUSED => Outcome::Refused,
            e => Outcome::Failed(io::Error::from_raw_os_error(e)),
        };
        Ok(Attempt {
            local,
            outcome,
            elapsed,
        })
    }

    /// Connects one after the other from each of `locals` (one thread in `ns`), each allowed
    /// `timeout`, all within `total`.
    pub fn connect_sequential(
        ns: &Netns,
        locals: &[SocketAddr],
        to: SocketAddr,
        timeout: Duration,
        total: Duration,
    ) -> Result<Vec<Attempt>> {
        ns.run(|| {
            let deadline = Instant::now() + total;
            let mut out = Vec::with_capacity(locals.len());
            for &local in locals {
                ensure!(
                    Instant::now() < deadline,
                    "connects took longer than {total:?} ({} of {} done)",
                    out.len(),
                    locals.len()
                );
                out.push(connect_here(local, to, timeout)?);
            }
            Ok(out)
        })?
    }

    /// Connects in parallel (one thread per connect, each in `ns`): `(local, to)` pairs.
    pub fn connect_parallel(
        ns: &Netns,
        pairs: &[(SocketAddr, SocketAddr)],
        timeout: Duration,
    ) -> Result<Vec<Attempt>> {
        thread::scope(|s| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|&(local, to)| s.spawn(move || ns.run(|| connect_here(local, to, timeout))?))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("connect thread panicked"))?)
                .collect()
        })
    }

    /// `ifindex` of `dev` in `ns` (`ip -j link show`).
    pub fn ifindex(ns: &Netns, dev: &str) -> Result<u64> {
        let out = ns.ip(&["-j", "link", "show", dev])?;
        let v: Value = serde_json::from_str(&out).with_context(|| format!("parsing {out}"))?;
        v[0]["ifindex"]
            .as_u64()
            .with_context(|| format!("no ifindex for {dev} in {}: {out}", ns.name))
    }

    /// Packet counter of the rule(s) of `chain` whose `-L -v -n` line has the token `needle`
    /// (e.g. `dpt:5061`, `spt:41000`); fails if no rule has it.
    pub fn rule_packets(ns: &Netns, v6: bool, chain: &str, needle: &str) -> Result<u64> {
        let out = ns.exec(
            if v6 { "ip6tables" } else { "iptables" },
            &["-w", "5", "-L", chain, "-v", "-n", "-x"],
        )?;
        let mut found = false;
        let mut total = 0;
        for line in out.lines().skip(2) {
            if line.split_whitespace().any(|t| t == needle) {
                found = true;
                total += line
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .with_context(|| format!("no packet count in {line:?}"))?;
            }
        }
        ensure!(
            found,
            "no rule with {needle} in {chain} of {}:\n{out}",
            ns.name
        );
        Ok(total)
    }

    /// Each of `ports` appears exactly once as `field` of `events` (and nothing else does).
    pub fn one_each(events: &[&Value], field: &str, ports: &[u16], what: &str) -> Result<()> {
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        for e in events {
            *seen
                .entry(e[field].as_u64().unwrap_or(u64::MAX))
                .or_default() += 1;
        }
        let want: BTreeMap<u64, usize> = ports.iter().map(|&p| (u64::from(p), 1)).collect();
        if seen != want {
            let missing: Vec<u64> = want
                .keys()
                .filter(|p| !seen.contains_key(p))
                .copied()
                .collect();
            let extra: Vec<(u64, usize)> = seen
                .iter()
                .filter(|(p, n)| want.get(p) != Some(n))
                .map(|(p, n)| (*p, *n))
                .collect();
            bail!(
                "{what} events: expected one per client port ({} ports); missing {missing:?}, \
                 unexpected or repeated (port, count) {extra:?}",
                ports.len()
            );
        }
        Ok(())
    }

    /// Field checks of the event kinds these tests use (the harness's schema check predates
    /// them). Only events matching one of `filters` are checked.
    pub fn event_problems(run: &Run, filters: &[Filter]) -> Vec<String> {
        let mut p = Vec::new();
        for (i, r) in run.records.iter().enumerate() {
            let ty = r["type"].as_str().unwrap_or("");
            let required: &[&str] = match ty {
                "drop" => &[
                    "reason",
                    "reason_code",
                    "location",
                    "ifindex",
                    "tcp_flags",
                    "direction",
                ],
                "reset_sent" => &["reason", "reason_code"],
                "reset_received" => &[],
                "connect" => &["duration_ms", "syn_retransmits"],
                "connect_failed" => &["outcome", "duration_ms", "syn_retransmits"],
                "accept" => &["handshake_rtt_us"],
                "close" => &["duration_ms", "from_state", "active"],
                _ => continue,
            };
            if !filters.iter().any(|f| f.matches(r)) {
                continue;
            }
            for k in ["time", "family", "saddr", "daddr", "state"] {
                if !r[k].is_string() {
                    p.push(format!("record {i} ({ty}): `{k}` missing: {r}"));
                }
            }
            for k in ["sport", "dport", "netns", "segs", "flow_count", "pid"] {
                if !r[k].is_u64() {
                    p.push(format!(
                        "record {i} ({ty}): `{k}` not an unsigned integer: {r}"
                    ));
                }
            }
            for &k in required {
                let ok = match k {
                    "reason" | "location" | "tcp_flags" | "from_state" => {
                        r[k].as_str().is_some_and(|s| !s.is_empty())
                    }
                    "direction" => matches!(r[k].as_str(), Some("inbound" | "outbound")),
                    "outcome" => matches!(r[k].as_str(), Some("refused" | "timeout")),
                    "duration_ms" => r[k].as_f64().is_some_and(|d| d >= 0.0),
                    "active" => r[k].is_boolean(),
                    _ => r[k].is_u64(),
                };
                if !ok {
                    p.push(format!(
                        "record {i} ({ty}): `{k}` missing or malformed: {r}"
                    ));
                }
            }
        }
        p
    }

    /// Record types written per `stop.totals` kind.
    pub const KINDS: [(&str, &[&str]); 10] = [
        ("retransmit", &["retransmit", "retransmit_failed"]),
        ("syn_retransmit", &["syn_retransmit"]),
        ("synack_retransmit", &["synack_retransmit"]),
        ("drop", &["drop"]),
        ("reset_sent", &["reset_sent"]),
        ("reset_received", &["reset_received"]),
        ("connect", &["connect"]),
        ("connect_failed", &["connect_failed"]),
        ("accept", &["accept"]),
        ("close", &["close"]),
    ];

    /// With every event exported (`--export-per-flow 0 --export-per-cpu 0 --export-kinds all`):
    /// nothing lost, undelivered or suppressed, every received event written, and the test's
    /// events well formed. Then per-event counts can be compared exactly.
    ///
    /// `exported = received + lost + undelivered + decode_errors` (docs/schema.md) is a global
    /// identity over every namespace, so traffic of other tests running at the same time enters
    /// it; a mismatch is printed (and shows in the test's own exact counts if it touches them)
    /// rather than failing here.
    pub fn check_run(run: &Run, filters: &[Filter]) -> Result<()> {
        let stop = run.stop()?;
        run.ensure_nothing_lost().with_context(|| describe(run))?;
        for k in ["undelivered", "decode_errors"] {
            ensure!(
                stop[k] == 0,
                "stop.{k} = {}: events were not written",
                stop[k]
            );
        }
        let mut unaccounted = Vec::new();
        for (kind, types) in KINDS {
            let t = &stop["totals"][kind];
            let written = run
                .records
                .iter()
                .filter(|r| r["type"].as_str().is_some_and(|ty| types.contains(&ty)))
                .count() as u64;
            let (exported, received, suppressed) = (
                u64_of(t, "exported")?,
                u64_of(t, "received")?,
                u64_of(t, "suppressed")?,
            );
            ensure!(
                received == written && suppressed == 0,
                "stop.totals.{kind}: received {received}, suppressed {suppressed}, but {written} \
                 {types:?} records written (expected equal, nothing suppressed)"
            );
            if exported != received {
                unaccounted.push(format!("{kind}: exported {exported}, received {received}"));
            }
        }
        if !unaccounted.is_empty() {
            note(&format!(
                "OBSERVER CONTRACT: exported != received + lost (0) + undelivered (0) + \
                 decode_errors (0) for {}",
                unaccounted.join("; ")
            ));
        }
        let problems = event_problems(run, filters);
        ensure!(
            problems.is_empty(),
            "event records do not match the schema:\n  {}",
            problems.join("\n  ")
        );
        Ok(())
    }

    /// Accepts `n` connections within `timeout` (blocking streams).
    pub fn accept_n(listener: &TcpListener, n: usize, timeout: Duration) -> Result<Vec<TcpStream>> {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    out.push(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ensure!(
                        Instant::now() < deadline,
                        "accepted {} of {n} connections within {timeout:?}",
                        out.len()
                    );
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
        Ok(out)
    }

    /// Reads each stream to EOF (the peer closed), then closes it; all within `timeout`.
    pub fn close_after_eof(streams: Vec<TcpStream>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1024];
        for mut s in streams {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            loop {
                ensure!(Instant::now() < deadline, "no EOF within {timeout:?}");
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => bail!("the peer sent data"),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(e).context("read"),
                }
            }
        }
        Ok(())
    }

    /// Waits (10 s at most) until no socket of `ns` with one of `ports` as local port is in a
    /// state before CLOSE other than LISTEN and TIME_WAIT (whose full socket already closed).
    pub fn wait_until_closed(ns: &Netns, ports: &[u16]) -> Result<()> {
        // /proc/net/tcp states: 01 ESTABLISHED .. 0B CLOSING; 06 TIME_WAIT and 0A LISTEN pass.
        const OPEN: [&str; 9] = ["01", "02", "03", "04", "05", "07", "08", "09", "0B"];
        let suffixes: Vec<String> = ports.iter().map(|p| format!(":{p:04X}")).collect();
        poll_until(
            &format!("sockets on ports {ports:?} in {} to close", ns.name),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                let files = ns.run(|| {
                    ["tcp", "tcp6"]
                        .iter()
                        .map(|f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")))
                        .collect::<io::Result<Vec<_>>>()
                })??;
                let open = files
                    .iter()
                    .flat_map(|t| t.lines().skip(1))
                    .filter(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.len() > 3
                            && suffixes.iter().any(|s| cols[1].ends_with(s.as_str()))
                            && OPEN.contains(&cols[3])
                    })
                    .count();
                Ok((open == 0).then_some(()))
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The observer, watched while it runs

/// An observer watched while it runs (not only after it stopped), so that every wait is a poll for
/// a record with a deadline.
pub mod live {
    use std::{
        io::{BufRead, BufReader},
        process::Child,
        sync::{Arc, Mutex, MutexGuard},
        thread,
        time::{Duration, Instant},
    };

    use crate::{Run, START_TIMEOUT, observer_bin, poll_until, wait_child};
    use anyhow::{Context, Result, bail, ensure};
    use serde_json::Value;

    /// Waits for the end of the output after the stop signal.
    const STOP_TIMEOUT: Duration = Duration::from_secs(20);

    #[derive(Default)]
    struct Output {
        records: Vec<Value>,
        /// When this process received each of `records` (same index).
        arrivals: Vec<Instant>,
        bad_lines: Vec<String>,
        eof: bool,
    }

    /// A record and when the test received it.
    #[derive(Clone, Debug)]
    pub struct Received {
        pub at: Instant,
        pub value: Value,
    }

    impl Output {
        fn received(&self) -> Vec<Received> {
            self.records
                .iter()
                .zip(&self.arrivals)
                .map(|(value, &at)| Received {
                    at,
                    value: value.clone(),
                })
                .collect()
        }
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `observer run ...` whose records are read as they come (a thread per pipe), so a test can poll for a record
    /// while the observer runs. Killed and reaped on drop if still running.
    pub struct LiveObserver {
        child: Option<Child>,
        output: Arc<Mutex<Output>>,
        stderr: Arc<Mutex<String>>,
        readers: Vec<thread::JoinHandle<()>>,
    }

    impl LiveObserver {
        /// Spawns `observer run <args>` and waits for its `start` record.
        pub fn start(args: &[&str]) -> Result<Self> {
            let mut child = super::spawn_observer(&observer_bin(), args)?;
            let stdout = child.stdout.take().context("stdout")?;
            let stderr_pipe = child.stderr.take().context("stderr")?;
            let output = Arc::new(Mutex::new(Output::default()));
            let stderr = Arc::new(Mutex::new(String::new()));
            let out = Arc::clone(&output);
            let out_reader = thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut o = lock(&out);
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.is_object() => {
                            o.records.push(v);
                            o.arrivals.push(Instant::now());
                        }
                        _ => o.bad_lines.push(line),
                    }
                }
                lock(&out).eof = true;
            });
            let err = Arc::clone(&stderr);
            let err_reader = thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut s = lock(&err);
                    s.push_str(&line);
                    s.push('\n');
                }
            });
            let observer = Self {
                child: Some(child),
                output,
                stderr,
                readers: vec![out_reader, err_reader],
            };
            observer.wait_for("the start record", START_TIMEOUT, |records| {
                match records.first() {
                    None => Ok(None),
                    Some(r) if r["type"] == "start" => Ok(Some(())),
                    Some(r) => bail!("the first record is not `start`: {r}"),
                }
            })?;
            Ok(observer)
        }

        /// Everything the observer wrote to stderr so far.
        pub fn stderr(&self) -> String {
            lock(&self.stderr).clone()
        }

        /// Record number `i` written so far.
        pub fn record(&self, i: usize) -> Result<Value> {
            lock(&self.output)
                .records
                .get(i)
                .cloned()
                .with_context(|| format!("no record {i}"))
        }

        /// How many records so far satisfy `f`.
        pub fn count(&self, f: impl Fn(&Value) -> bool) -> Result<usize> {
            Ok(lock(&self.output).records.iter().filter(|r| f(r)).count())
        }

        /// Sends `signal` to the running observer.
        pub fn signal(&self, signal: i32) -> Result<()> {
            let child = self.child.as_ref().context("observer already stopped")?;
            let pid = libc::pid_t::try_from(child.id())?;
            // SAFETY: plain kill(2) on our own child, not reaped yet (so the pid is still ours).
            let rc = unsafe { libc::kill(pid, signal) };
            ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
            Ok(())
        }

        /// Polls the records written so far (every 50 ms, at most `timeout`) until `f` returns
        /// `Some`; fails early when the observer's output ended.
        pub fn wait_for<T>(
            &self,
            what: &str,
            timeout: Duration,
            mut f: impl FnMut(&[Value]) -> Result<Option<T>>,
        ) -> Result<T> {
            self.wait_for_output(what, timeout, |o| f(&o.records))
        }

        /// [`Self::wait_for`] over the records with the time each was received.
        pub fn wait_for_received<T>(
            &self,
            what: &str,
            timeout: Duration,
            mut f: impl FnMut(&[Received]) -> Option<T>,
        ) -> Result<T> {
            self.wait_for_output(what, timeout, |o| Ok(f(&o.received())))
        }

        /// Every record written so far, with the time each was received.
        pub fn received(&self) -> Vec<Received> {
            lock(&self.output).received()
        }

        fn wait_for_output<T>(
            &self,
            what: &str,
            timeout: Duration,
            mut f: impl FnMut(&Output) -> Result<Option<T>>,
        ) -> Result<T> {
            poll_until(what, timeout, Duration::from_millis(50), || {
                let o = lock(&self.output);
                if let Some(found) = f(&o)? {
                    return Ok(Some(found));
                }
                if o.eof {
                    bail!(
                        "observer output ended while waiting for {what}; stderr:\n{}",
                        self.stderr()
                    );
                }
                Ok(None)
            })
            .with_context(|| format!("observer stderr so far:\n{}", self.stderr()))
        }

        /// SIGINT, then everything up to the end of the output (see [`Self::stop_with`]).
        pub fn stop(self) -> Result<Run> {
            Ok(self.stop_with(libc::SIGINT)?.0)
        }

        /// Sends `signal`, then collects everything up to the end of the output; checks that
        /// stdout held only JSON objects, `stop` came last and the exit code is 0. Also returns
        /// the time from the signal to the process's exit.
        pub fn stop_with(self, signal: i32) -> Result<(Run, Duration)> {
            let (output, stderr, took) = self.finish(signal)?;
            Ok((
                Run {
                    records: output.records,
                    stderr,
                },
                took,
            ))
        }

        /// [`Self::stop`], returning every record with the time it was received.
        pub fn stop_received(self) -> Result<Vec<Received>> {
            Ok(self.finish(libc::SIGINT)?.0.received())
        }

        /// [`Self::stop_with`]: the checked output, stderr and the time to exit.
        fn finish(mut self, signal: i32) -> Result<(Output, String, Duration)> {
            self.signal(signal)?;
            let sent = Instant::now();
            let mut child = self.child.take().context("observer already stopped")?;
            // Poll for the exit first (finely), so the time measured is the process's.
            let mut exited = None;
            while sent.elapsed() < STOP_TIMEOUT {
                if let Some(status) = child.try_wait()? {
                    exited = Some((status, sent.elapsed()));
                    break;
                }
                thread::sleep(Duration::from_millis(2));
            }
            let (status, took) = match exited {
                Some(e) => e,
                None => {
                    let status = wait_child(&mut child, Duration::from_secs(1));
                    bail!(
                        "observer did not exit within {STOP_TIMEOUT:?} of signal {signal} ({status:?}); stderr:\n{}",
                        self.stderr()
                    );
                }
            };
            let ended = poll_until(
                "the observer's output to end",
                Duration::from_secs(10),
                Duration::from_millis(20),
                || Ok(lock(&self.output).eof.then_some(())),
            );
            for reader in self.readers.drain(..) {
                let _ = reader.join();
            }
            let stderr = self.stderr();
            ended.with_context(|| format!("stderr:\n{stderr}"))?;
            let output = std::mem::take(&mut *lock(&self.output));
            ensure!(
                output.bad_lines.is_empty(),
                "non-JSON lines on stdout: {:?}",
                output.bad_lines
            );
            let stops = output
                .records
                .iter()
                .filter(|r| r["type"] == "stop")
                .count();
            ensure!(
                stops == 1 && output.records.last().is_some_and(|r| r["type"] == "stop"),
                "expected one `stop` record, last; got {stops}; stderr:\n{stderr}"
            );
            ensure!(
                status.code() == Some(0),
                "observer exited with {status}; stderr:\n{stderr}"
            );
            Ok((output, stderr, took))
        }
    }

    impl Drop for LiveObserver {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_to_unix_ns() {
        let v = |s: &str| rfc3339_ns(&Value::from(s));
        assert_eq!(v("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(v("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(v("2000-03-01T00:00:00Z"), Some(951_868_800_000_000_000));
        assert_eq!(
            v("2026-11-22T03:40:00.123456789Z"),
            Some(1_795_318_800_123_456_789)
        );
        assert_eq!(v("2026-11-22 03:40:00Z"), None);
        assert_eq!(v("2026-11-22T03:40:00"), None);
    }

    #[test]
    fn parses_proc_net_counters() {
        let mut m = BTreeMap::new();
        parse_proc_net_pairs(
            "TcpExt: SyncookiesSent TCPSynRetrans\nTcpExt: 1 7\nTcp: RtoMin MaxConn RetransSegs\nTcp: 200 -1 42\n",
            &mut m,
        )
        .expect("parses");
        parse_snmp6(
            "Ip6InReceives                   \t5\nIcmp6InMsgs 2\n",
            &mut m,
        );
        assert_eq!(m.get("TcpExtTCPSynRetrans"), Some(&7));
        assert_eq!(m.get("TcpRetransSegs"), Some(&42));
        assert_eq!(m.get("TcpMaxConn"), None);
        assert_eq!(m.get("Ip6InReceives"), Some(&5));
        let before = Counters(m.clone());
        m.insert("TcpRetransSegs".into(), 50);
        assert_eq!(
            before.delta(&Counters(m), "TcpRetransSegs").expect("delta"),
            8
        );
    }
}
