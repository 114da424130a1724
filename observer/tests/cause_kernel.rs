//! Real-kernel tests of `observer::enrich::{owners, stale, routes}`: who holds a socket, which
//! connections are stuck and by whom, and whether replies leave by the interface requests
//! arrive on.
//!
//! Each test builds its own network namespaces (`obs-cause-<test>-<role>-<pid>`) joined by
//! veth pairs, with addresses in 10.203.0.0/16 and 10.204.0.0/16 and only the connected routes
//! between them (plus one route between test namespaces in the routes test): no namespace has
//! a route out of the machine, and the veths are created directly inside the namespaces.
//! Deleting a namespace (on drop, also on panic) removes its interfaces, routes, sysctls and
//! sockets; client processes are killed by their handle on drop. They need root and `ip`
//! (and python3 for the client processes): without them they print `SKIPPED` and pass, unless
//! `OBSERVER_REQUIRE_KERNEL_TESTS=1`, which makes them fail. Every wait has a deadline.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use observer::{
    decode::{Family as FlowFamily, Flow},
    enrich::{
        counters, netns,
        owners::{MIN_RESCAN_INTERVAL, OwnerMap, owner_of_flow},
        routes::{self, ArrivalSource, check_reply_route, route_get},
        sockdiag::{Extensions, Family, SocketTimer, StateMask, TcpState, dump_tcp_detailed},
        stale::{self, StaleKind, StaleTracker},
    },
};

const REQUIRE_ENV: &str = "OBSERVER_REQUIRE_KERNEL_TESTS";
const CMD_TIMEOUT: Duration = Duration::from_secs(15);
/// The stale threshold of these tests (30 s in production).
const THRESHOLD: Duration = Duration::from_secs(2);

static KERNEL_LOCK: Mutex<()> = Mutex::new(());

/// Whether the test can run here (root, and the tools); panics instead of skipping when
/// `OBSERVER_REQUIRE_KERNEL_TESTS=1`. Holds a lock so the tests of this binary run one at a
/// time (two cores, and the stale thresholds are timing).
fn kernel_test(name: &str, python: bool) -> Option<MutexGuard<'static, ()>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = if !root {
        Some("needs root".to_owned())
    } else if !tool_exists("ip") {
        Some("needs `ip`".to_owned())
    } else if python && python3().is_none() {
        Some("needs python3".to_owned())
    } else {
        None
    };
    if let Some(reason) = reason {
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{name}: {reason}, and {REQUIRE_ENV}=1 forbids skipping");
        }
        // Not eprintln!: libtest captures it and hides it for passing tests.
        let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {reason}");
        return None;
    }
    Some(KERNEL_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

fn search_path() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .collect()
}

fn tool_exists(tool: &str) -> bool {
    search_path().iter().any(|dir| dir.join(tool).is_file())
}

/// The python3 to run clients with: the system's when there is one (its process name is
/// `python3` either way).
fn python3() -> Option<PathBuf> {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        return Some(system);
    }
    search_path()
        .into_iter()
        .map(|dir| dir.join("python3"))
        .find(|p| p.is_file())
}

/// Runs a command with a deadline; its stdout, or an error naming it.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {program} {args:?}"))?;
    let deadline = Instant::now() + CMD_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            // Our own child, not yet reaped: killing it by its handle is safe.
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} {args:?} did not finish within {CMD_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace for one test, deleted on drop (also on panic), which removes its
/// interfaces, routes, sysctls and sockets.
struct TestNs {
    name: String,
    path: PathBuf,
}

impl TestNs {
    fn new(test: &str, role: &str) -> Result<TestNs> {
        let name = format!("obs-cause-{test}-{role}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = TestNs {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a closure inside the namespace through the API under test.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        Ok(netns::in_namespace(&self.path, f)?)
    }

    fn inode(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.path)?.ino())
    }

    /// Writes a sysctl of this namespace (`/proc/sys` resolves against the writing thread).
    fn sysctl(&self, name: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value))?
            .with_context(|| format!("setting {name} in {}", self.name))
    }

    /// An interface's index, as the namespace sees it (`if_nametoindex` asks through a socket
    /// of the calling thread's namespace; sysfs would show the mounter's).
    fn ifindex(&self, ifname: &str) -> Result<u32> {
        let c_name = std::ffi::CString::new(ifname)?;
        let index = self.run(move || {
            // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
            unsafe { libc::if_nametoindex(c_name.as_ptr()) }
        })?;
        ensure!(index != 0, "no interface {ifname} in {}", self.name);
        Ok(index)
    }

    /// (rx_packets, tx_packets) of an interface, from the namespace's `/proc/thread-self/net/dev`.
    fn packets(&self, ifname: &str) -> Result<(u64, u64)> {
        let text = self.run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
        let line = text
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{ifname}:")))
            .ok_or_else(|| anyhow!("{ifname} not in /proc/net/dev of {}", self.name))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(fields.len() >= 10, "short /proc/net/dev line: {line}");
        Ok((fields[1], fields[9]))
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// A veth pair between two namespaces, created directly inside them, addressed and up.
fn link(a: &TestNs, a_if: &str, a_addr: &str, b: &TestNs, b_if: &str, b_addr: &str) -> Result<()> {
    run(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A listener created inside the namespace.
fn listen_in(ns: &TestNs, addr: SocketAddr) -> Result<TcpListener> {
    Ok(ns.run(move || TcpListener::bind(addr))??)
}

/// A client process, killed (by its handle) and reaped on drop.
struct ClientProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

/// Opens `count` connections to `server`, `keepalive` of them with SO_KEEPALIVE, sends a
/// request on each, reads the answers if `expect_answers`, says `ready`, then blocks reading
/// the first connection with no timeout. `signal.alarm` bounds its life if the test cannot
/// kill it.
const CLIENT: &str = r#"
import signal, socket, sys
host, port, count, keepalive, expect = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
signal.alarm(120)
socks = []
for i in range(count):
    s = socket.create_connection((host, port), timeout=5)
    if i < keepalive:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    socks.append(s)
for s in socks:
    s.sendall(b"GET /status\n")
if expect:
    for s in socks:
        assert s.recv(100), "no answer"
print("ready", flush=True)
socks[0].settimeout(None)
socks[0].recv(1)
"#;

impl ClientProcess {
    fn spawn(
        ns: &TestNs,
        server: SocketAddr,
        count: u32,
        keepalive: u32,
        expect_answers: bool,
    ) -> Result<ClientProcess> {
        let python = python3().ok_or_else(|| anyhow!("no python3"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&python)
            .args([
                "-c",
                CLIENT,
                &server.ip().to_string(),
                &server.port().to_string(),
                &count.to_string(),
                &keepalive.to_string(),
                if expect_answers { "1" } else { "0" },
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the python client")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("client stdout not piped"))?;
        let (tx, lines) = mpsc::channel();
        // Ends when the client's stdout closes (it exits or is killed).
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ClientProcess { child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) -> Result<()> {
        match self.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == "ready" => Ok(()),
            Ok(line) => bail!("client said {line:?}"),
            Err(e) => bail!(
                "client not ready within 10 s ({e}); exit status {:?}",
                self.child.try_wait()
            ),
        }
    }

    fn kill(&mut self) -> Result<()> {
        // Our own child, not yet reaped: its pid cannot have been reused.
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Answers every request line with a short reply, on a thread that stops on drop (and after
/// 60 s at most).
struct Responder {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Responder {
    fn start(listener: TcpListener) -> Result<Responder> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut open = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 256];
                        if matches!(stream.read(&mut buf), Ok(n) if n > 0) {
                            let _ = stream.write_all(b"200 OK\n");
                        }
                        // Kept open: the client's connections stay established and idle.
                        open.push(stream);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Responder {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Accepts `count` connections that are already in the accept queue (bounded: 5 s).
fn accept_all(listener: &TcpListener, count: usize) -> Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut streams = Vec::new();
    while streams.len() < count {
        match listener.accept() {
            Ok((stream, _)) => streams.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ensure!(
                    Instant::now() < deadline,
                    "accepted {} of {count}",
                    streams.len()
                );
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(streams)
}

/// A silent server and a client process that waits for answers that never come: one stale
/// group naming the client's pid and `python3`, the server's address, 20 connections (the 5
/// with SO_KEEPALIVE excluded). A second client whose requests are answered, and the servers'
/// own sockets, give none. When the client is killed, its sockets and owner are gone.
#[test]
fn unanswered_requests_group_by_client_process_and_server() -> Result<()> {
    let Some(_guard) = kernel_test(
        "unanswered_requests_group_by_client_process_and_server",
        true,
    ) else {
        return Ok(());
    };
    let client_ns = TestNs::new("stale", "c")?;
    let server_ns = TestNs::new("stale", "s")?;
    link(
        &client_ns,
        "c0",
        "10.203.1.1/24",
        &server_ns,
        "s0",
        "10.203.1.2/24",
    )?;
    let server_ip = IpAddr::V4(Ipv4Addr::new(10, 203, 1, 2));
    let silent_addr = SocketAddr::new(server_ip, 7001);
    let answering_addr = SocketAddr::new(server_ip, 7002);
    let silent = listen_in(&server_ns, silent_addr)?;
    let _responder = Responder::start(listen_in(&server_ns, answering_addr)?)?;

    let mut waiting = ClientProcess::spawn(&client_ns, silent_addr, 25, 5, false)?;
    let mut answered = ClientProcess::spawn(&client_ns, answering_addr, 20, 0, true)?;
    waiting.wait_ready()?;
    answered.wait_ready()?;
    // The silent server accepts, and never reads or answers.
    let _accepted = accept_all(&silent, 25)?;
    let sent_at = Instant::now();

    let client_inode = client_ns.inode()?;
    let server_inode = server_ns.inode()?;
    let mut owners = OwnerMap::new();
    let mut tracker = StaleTracker::new(3);

    // Below the threshold: nothing is stale yet.
    let early = stale::sweep(&client_ns.path, THRESHOLD, &mut owners)?;
    assert!(early.is_empty(), "stale before the threshold: {early:?}");
    assert!(
        tracker
            .update(client_inode, Instant::now(), &early)
            .is_empty()
    );

    // The keepalive timer shows in sock_diag as such.
    let timers = client_ns
        .run(|| dump_tcp_detailed(Family::V4, StateMask::ESTABLISHED, Extensions::TCP_INFO))??;
    let to_silent: Vec<_> = timers
        .iter()
        .filter(|d| d.socket.dport == silent_addr.port())
        .collect();
    assert_eq!(to_silent.len(), 25);
    let keepalive = to_silent
        .iter()
        .filter(|d| matches!(d.timer, SocketTimer::KeepAlive { .. }))
        .count();
    let no_timer = to_silent
        .iter()
        .filter(|d| d.timer == SocketTimer::None)
        .count();
    assert_eq!((keepalive, no_timer), (5, 20), "timers: {to_silent:?}");

    thread::sleep((THRESHOLD + Duration::from_millis(600)).saturating_sub(sent_at.elapsed()));
    let connections = stale::sweep(&client_ns.path, THRESHOLD, &mut owners)?;
    let groups = tracker.update(client_inode, Instant::now(), &connections);
    let _ = writeln!(
        std::io::stderr(),
        "stale groups after {:?}: {groups:#?}",
        sent_at.elapsed()
    );
    assert_eq!(groups.len(), 1, "one group expected: {groups:#?}");
    let group = &groups[0];
    assert_eq!(group.netns, client_inode);
    assert_eq!(group.pid, Some(waiting.pid()));
    assert_eq!(group.comm.as_deref(), Some("python3"));
    assert!(
        group
            .cmdline
            .as_deref()
            .is_some_and(|c| c.contains("python3")),
        "{:?}",
        group.cmdline
    );
    assert_eq!((group.peer, group.peer_port), (server_ip, 7001));
    assert_eq!((group.count, group.awaiting_reply), (20, 20));
    assert_eq!((group.unacknowledged, group.send_blocked), (0, 0));
    assert_eq!(group.bytes_waiting, 0, "the requests were acknowledged");
    assert_eq!(group.newly_stale, 20);
    assert!(group.growing, "from 0 to 20 since the previous sweep");
    let waited = sent_at.elapsed().as_secs();
    assert!(
        group.oldest_age_secs >= THRESHOLD.as_secs() && group.oldest_age_secs <= waited + 1,
        "age {} s, waited {waited} s",
        group.oldest_age_secs
    );
    assert!(
        connections
            .iter()
            .all(|c| c.kind == StaleKind::AwaitingReply)
    );

    // The servers' sockets: one received a request and sent nothing, the other answered and
    // waits for the next request (passive side): neither is stale.
    let server_side = stale::sweep(&server_ns.path, THRESHOLD, &mut owners)?;
    assert!(server_side.is_empty(), "server side: {server_side:#?}");
    assert!(
        tracker
            .update(server_inode, Instant::now(), &server_side)
            .is_empty()
    );

    // owner_of_flow: a connection of the waiting client, and the silent listener (held by
    // this test process) for a flow that has no connection of its own.
    let conn = &connections[0];
    let flow = Flow {
        family: FlowFamily::Ipv4,
        saddr: conn.local,
        sport: conn.local_port,
        daddr: conn.peer,
        dport: conn.peer_port,
        netns: u32::try_from(client_inode)?,
    };
    let (socket, owner) = owner_of_flow(&flow, &client_ns.path, &mut owners)?
        .ok_or_else(|| anyhow!("no owner for {flow:?}"))?;
    assert_eq!((socket.inode, socket.listener), (conn.inode, false));
    assert_eq!((owner.pid, owner.comm.as_str()), (waiting.pid(), "python3"));
    let synack_flow = Flow {
        family: FlowFamily::Ipv4,
        saddr: server_ip,
        sport: 7001,
        daddr: IpAddr::V4(Ipv4Addr::new(10, 203, 1, 1)),
        dport: 1,
        netns: u32::try_from(server_inode)?,
    };
    let (socket, owner) = owner_of_flow(&synack_flow, &server_ns.path, &mut owners)?
        .ok_or_else(|| anyhow!("no owner for the listener"))?;
    assert!(socket.listener);
    assert_eq!(owner.pid, std::process::id());

    // The client exits: its sockets close, and a rescan no longer knows their inodes.
    waiting.kill()?;
    thread::sleep(MIN_RESCAN_INTERVAL + Duration::from_millis(100));
    assert!(
        owners.lookup_or_refresh(u64::from(conn.inode)).is_none(),
        "owner of a closed socket of an exited process"
    );
    assert_eq!(
        owner_of_flow(&flow, &client_ns.path, &mut owners)?,
        None,
        "the exited client's connection"
    );
    let after = stale::sweep(&client_ns.path, THRESHOLD, &mut owners)?;
    assert!(after.is_empty(), "after the client exited: {after:#?}");
    let groups = tracker.update(client_inode, Instant::now(), &after);
    assert!(groups.is_empty());
    drop(answered);
    Ok(())
}

/// Data written towards a peer that vanished (its link went down) is retransmitted and never
/// acknowledged: `unacknowledged` connections of this test process, with the bytes waiting.
#[test]
fn unacknowledged_data_towards_a_vanished_peer() -> Result<()> {
    let Some(_guard) = kernel_test("unacknowledged_data_towards_a_vanished_peer", false) else {
        return Ok(());
    };
    let client_ns = TestNs::new("unack", "c")?;
    let server_ns = TestNs::new("unack", "s")?;
    link(
        &client_ns,
        "c0",
        "10.203.2.1/24",
        &server_ns,
        "s0",
        "10.203.2.2/24",
    )?;
    let server = SocketAddr::from((Ipv4Addr::new(10, 203, 2, 2), 7003));
    let listener = listen_in(&server_ns, server)?;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(
            client_ns
                .run(move || TcpStream::connect_timeout(&server, Duration::from_secs(2)))??,
        );
    }
    let _accepted = accept_all(&listener, 3)?;
    server_ns.ip(&["link", "set", "s0", "down"])?;
    let payload = [7u8; 1000];
    for stream in &mut streams {
        stream.write_all(&payload)?;
    }
    let written = Instant::now();
    thread::sleep(THRESHOLD + Duration::from_millis(1500));

    let mut owners = OwnerMap::new();
    let connections = stale::sweep(&client_ns.path, THRESHOLD, &mut owners)?;
    let groups = StaleTracker::default().update(client_ns.inode()?, Instant::now(), &connections);
    let _ = writeln!(
        std::io::stderr(),
        "after {:?} without ACKs: {groups:#?}",
        written.elapsed()
    );
    assert_eq!(groups.len(), 1, "{groups:#?}");
    let group = &groups[0];
    assert_eq!(group.pid, Some(std::process::id()));
    assert_eq!((group.peer, group.peer_port), (server.ip(), 7003));
    assert_eq!((group.count, group.unacknowledged), (3, 3));
    assert_eq!(group.bytes_waiting, 3 * 1000);
    Ok(())
}

/// Addresses of the routes test: client C, server S (eth-a towards C, eth-b towards D), and a
/// discarding neighbour D.
const C_ADDR: Ipv4Addr = Ipv4Addr::new(10, 204, 1, 1);
const S_ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 204, 1, 2);
const S_ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 204, 2, 2);
const D_ADDR: Ipv4Addr = Ipv4Addr::new(10, 204, 2, 3);
const ROUTES_PORT: u16 = 7100;

/// One connection attempt from C, bounded by 1.5 s (one SYN retransmission).
fn try_connect(client: &TestNs) -> Result<bool> {
    let addr = SocketAddr::from((S_ADDR_A, ROUTES_PORT));
    Ok(client
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(1500)))?
        .is_ok())
}

/// SYNs from C arrive on S's eth-a; S's route back to C points out of eth-b towards D, which
/// discards: route_get names eth-b, the SYN-ACKs are measured leaving by eth-b, the check
/// reports the asymmetry with both interfaces, and strict rp_filter on eth-a drops the SYNs
/// (TcpExtIPReversePathFilter). With the correct route, nothing is reported and connections
/// complete.
#[test]
fn reply_route_out_of_another_interface_is_asymmetric() -> Result<()> {
    let Some(_guard) = kernel_test("reply_route_out_of_another_interface_is_asymmetric", false)
    else {
        return Ok(());
    };
    let c = TestNs::new("route", "c")?;
    let s = TestNs::new("route", "s")?;
    let d = TestNs::new("route", "d")?;
    link(&c, "c0", "10.204.1.1/24", &s, "eth-a", "10.204.1.2/24")?;
    link(&s, "eth-b", "10.204.2.2/24", &d, "d0", "10.204.2.3/24")?;
    for ifname in ["all", "default", "eth-a", "eth-b"] {
        s.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
    }
    // D discards what is not for itself.
    d.sysctl("net.ipv4.ip_forward", "0")?;
    let eth_a = s.ifindex("eth-a")?;
    let eth_b = s.ifindex("eth-b")?;
    let _listener = listen_in(&s, SocketAddr::from((S_ADDR_A, ROUTES_PORT)))?;
    let client = IpAddr::V4(C_ADDR);
    let local = IpAddr::V4(S_ADDR_A);

    // Correct routing: the route back to C leaves by eth-a, where C's packets arrive.
    let route = s.run(move || route_get(client, Some(local)))??;
    assert_eq!((route.oif, route.oif_name.as_str()), (eth_a, "eth-a"));
    assert_eq!((route.gateway, route.table), (None, 254));
    assert!(!routes::asymmetric(eth_a, route.oif));
    assert_eq!(
        s.run(move || check_reply_route(client, local, None))??,
        None
    );
    assert!(try_connect(&c)?, "connect with symmetric routing");

    // The wrong route: C's address via D, out of eth-b.
    s.ip(&[
        "route",
        "add",
        "10.204.1.1/32",
        "via",
        "10.204.2.3",
        "dev",
        "eth-b",
    ])?;
    let route = s.run(move || route_get(client, Some(local)))??;
    let _ = writeln!(std::io::stderr(), "asymmetric route: {route:?}");
    assert_eq!((route.oif, route.oif_name.as_str()), (eth_b, "eth-b"));
    assert_eq!(route.gateway, Some(IpAddr::V4(D_ADDR)));
    assert_eq!(route.table, 254);
    assert!(routes::asymmetric(eth_a, route.oif));
    // Without a source the kernel picks eth-b's address.
    let unsourced = s.run(move || route_get(client, None))??;
    assert_eq!(unsourced.prefsrc, Some(IpAddr::V4(S_ADDR_B)));

    // Measured: SYNs arrive on eth-a, SYN-ACKs leave by eth-b and reach D, and C receives no
    // TCP segment.
    let in_segs = |c: &counters::Counters| c.get("TcpInSegs").copied().unwrap_or(0);
    let c_before = c.run(counters::read_current)??;
    let (a_rx, _) = s.packets("eth-a")?;
    let (_, b_tx) = s.packets("eth-b")?;
    let (d_rx, _) = d.packets("d0")?;
    let (c_rx, _) = c.packets("c0")?;
    assert!(!try_connect(&c)?, "connect must fail: the SYN-ACKs go to D");
    let (a_rx2, _) = s.packets("eth-a")?;
    let (_, b_tx2) = s.packets("eth-b")?;
    let (d_rx2, _) = d.packets("d0")?;
    let (c_rx2, _) = c.packets("c0")?;
    let c_after = c.run(counters::read_current)??;
    let _ = writeln!(
        std::io::stderr(),
        "packets during the attempt: eth-a rx {}, eth-b tx {}, D rx {}, C rx {}",
        a_rx2 - a_rx,
        b_tx2 - b_tx,
        d_rx2 - d_rx,
        c_rx2 - c_rx
    );
    assert!(
        a_rx2 - a_rx >= 2,
        "SYN and its retransmission arrive on eth-a"
    );
    assert!(b_tx2 - b_tx >= 2, "SYN-ACKs leave by eth-b");
    assert!(d_rx2 - d_rx >= 2, "SYN-ACKs reach D");
    assert_eq!(
        in_segs(&c_after),
        in_segs(&c_before),
        "a TCP segment reached C"
    );
    // The request sockets do not name the arrival interface (unbound listener).
    let requests =
        s.run(|| dump_tcp_detailed(Family::V4, StateMask::SYN_RECV, Extensions::NONE))??;
    let request = requests
        .iter()
        .find(|r| r.socket.state == TcpState::SynRecv && r.socket.sport == ROUTES_PORT)
        .ok_or_else(|| anyhow!("no request socket: {requests:?}"))?;
    let _ = writeln!(
        std::io::stderr(),
        "request socket idiag_if = {} (eth-a is {eth_a})",
        request.ifindex
    );
    assert!(request.ifindex == 0 || request.ifindex == eth_a);

    // The check, with the arrival interface inferred from the local address and observed.
    let netns_inode = s.inode()?;
    let record = s
        .run(move || check_reply_route(client, local, None))??
        .ok_or_else(|| anyhow!("asymmetry not reported"))?;
    let _ = writeln!(std::io::stderr(), "record: {record:?}");
    assert_eq!(record.netns, netns_inode);
    assert_eq!((record.peer, record.local_addr), (client, local));
    assert_eq!(
        (
            record.in_ifindex,
            record.in_ifname.as_str(),
            record.in_source
        ),
        (eth_a, "eth-a", ArrivalSource::LocalAddress)
    );
    assert_eq!(
        (record.out_ifindex, record.out_ifname.as_str()),
        (eth_b, "eth-b")
    );
    assert_eq!(record.gateway, Some(IpAddr::V4(D_ADDR)));
    assert_eq!(
        (record.rp_filter_in, record.rp_filter_out),
        (Some(0), Some(0))
    );
    let observed = s
        .run(move || check_reply_route(client, local, Some(eth_a)))??
        .ok_or_else(|| anyhow!("asymmetry not reported"))?;
    assert_eq!(observed.in_source, ArrivalSource::Observed);

    // Strict reverse-path filtering on eth-a: the SYNs themselves are dropped.
    s.sysctl("net.ipv4.conf.eth-a.rp_filter", "1")?;
    let before = s.run(counters::read_current)??;
    assert!(!try_connect(&c)?);
    let after = s.run(counters::read_current)??;
    let rpf = |c: &counters::Counters| c.get("TcpExtIPReversePathFilter").copied().unwrap_or(0);
    assert!(
        rpf(&after) > rpf(&before),
        "no TcpExtIPReversePathFilter drop counted"
    );
    let record = s
        .run(move || check_reply_route(client, local, None))??
        .ok_or_else(|| anyhow!("asymmetry not reported"))?;
    assert_eq!(
        (record.rp_filter_in, record.rp_filter_out),
        (Some(1), Some(0))
    );

    // The route fixed: symmetric again, and strict rp_filter lets the SYNs in.
    s.ip(&["route", "del", "10.204.1.1/32"])?;
    let route = s.run(move || route_get(client, Some(local)))??;
    assert_eq!(route.oif, eth_a);
    assert_eq!(
        s.run(move || check_reply_route(client, local, None))??,
        None
    );
    assert!(try_connect(&c)?, "connect after the route is fixed");
    Ok(())
}

/// Route lookups report kernel errors: no route to an address outside every subnet of an
/// isolated namespace, and a source address that is not local.
#[test]
fn route_errors_come_from_the_kernel() -> Result<()> {
    let Some(_guard) = kernel_test("route_errors_come_from_the_kernel", false) else {
        return Ok(());
    };
    let ns = TestNs::new("rterr", "x")?;
    let outside = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let err = ns
        .run(move || route_get(outside, None))?
        .expect_err("no route in an isolated namespace");
    assert!(
        matches!(&err, routes::RouteError::Kernel { io_error, .. } if io_error.raw_os_error() == Some(libc::ENETUNREACH)),
        "{err:?}"
    );
    let lo = ns.run(|| route_get(IpAddr::V4(Ipv4Addr::LOCALHOST), None))??;
    assert_eq!(lo.oif_name, "lo");
    // Without policy rules the kernel merges the local table into main and reports main.
    assert!(matches!(lo.table, 254 | 255), "table {}", lo.table);
    let not_local = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
    assert!(
        ns.run(move || route_get(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(not_local)))?
            .is_err()
    );
    Ok(())
}
