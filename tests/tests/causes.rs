//! Causes, end to end through `observer run`: stale connections grouped by the owning process,
//! asymmetric reply routes behind SYN-ACK retransmits, and the owning process on event records.
//!
//! Every test builds its own network namespaces joined by veth pairs (created directly inside
//! them), with addresses in 10.200.3x.0/24 (harness topologies) and 10.205.0.0/16 (the
//! three-namespace routes test) and only routes between test namespaces: nothing can leave the
//! machine. Namespaces (with their interfaces, routes, iptables rules and sysctls), client
//! processes and the observer are removed / killed on drop, also on failure. Client processes
//! are python3 (`ip netns exec NS python3 -c ...`: the spawned pid is python's) and bound their
//! own life with `signal.alarm`. Every wait has a deadline.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use observer_tests::{
    Netns, Sink, Topology,
    cgroup::TestCgroup,
    faults, kernel_test,
    live::{LiveObserver, Received},
    nonblocking_connect, note, run_checked, unique_name,
};
use serde_json::Value;

/// Every event exported (no per-flow or per-CPU budget): the tests look at single flows.
const NO_BUDGET: &[&str] = &["--export-per-flow", "0", "--export-per-cpu", "0"];

// ---------------------------------------------------------------------------------------------
// Reading the records

fn of_type<'a>(records: &'a [Received], ty: &str) -> impl Iterator<Item = &'a Received> {
    records.iter().filter(move |r| r.value["type"] == ty)
}

fn ip_of(v: &Value, key: &str) -> Option<IpAddr> {
    v[key].as_str()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Client processes and servers (after observer/tests/cause_kernel.rs)

/// The python3 to run clients with (its process name is `python3`).
fn python3() -> Option<PathBuf> {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        return Some(system);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("python3"))
        .find(|p| p.is_file())
}

/// Opens `count` connections to `server`, sends a request on each, reads the answers if
/// `expect_answers`, says `ready`, then blocks reading the first connection with no timeout.
const WAITING_CLIENT: &str = r#"
import signal, socket, sys
host, port, count, expect = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
signal.alarm(120)
socks = []
for i in range(count):
    socks.append(socket.create_connection((host, port), timeout=5))
for s in socks:
    s.sendall(b"GET /status\n")
if expect:
    for s in socks:
        assert s.recv(100), "no answer"
print("ready", flush=True)
socks[0].settimeout(None)
socks[0].recv(1)
"#;

/// Connects, says `port <local port>`, writes 1000-byte chunks every 10 ms for `secs` seconds,
/// says `done` and waits (with the connection open) until killed.
const STREAMING_CLIENT: &str = r#"
import signal, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
signal.alarm(120)
s = socket.create_connection((host, port), timeout=5)
print("port", s.getsockname()[1], flush=True)
end = time.monotonic() + secs
chunk = b"x" * 1000
while time.monotonic() < end:
    s.sendall(chunk)
    time.sleep(0.01)
print("done", flush=True)
time.sleep(100)
"#;

/// A python3 client process, killed (by its handle) and reaped on drop.
struct ClientProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ClientProcess {
    fn spawn(ns: &Netns, script: &str, args: &[String]) -> Result<Self> {
        Self::spawn_in(ns, script, args, None)
    }

    /// [`ClientProcess::spawn`], the process in the cgroup whose `cgroup.procs` is `procs`
    /// from its start (a shell writes its own pid there, then execs `ip netns exec`: the pid
    /// stays the same through both execs).
    fn spawn_in(
        ns: &Netns,
        script: &str,
        args: &[String],
        procs: Option<&std::path::Path>,
    ) -> Result<Self> {
        let python = python3().ok_or_else(|| anyhow!("no python3"))?;
        let mut command = match procs {
            Some(procs) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                    .arg(procs)
                    .arg("ip");
                sh
            }
            None => Command::new("ip"),
        };
        let mut child = command
            .args(["netns", "exec", &ns.name])
            .arg(&python)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the python client")?;
        let stdout = child.stdout.take().context("client stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn next_line(&mut self, timeout: Duration) -> Result<String> {
        self.lines.recv_timeout(timeout).map_err(|e| {
            anyhow!(
                "no line from the client within {timeout:?} ({e}); exit status {:?}",
                self.child.try_wait()
            )
        })
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        // Our own child, not yet reaped: its pid cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Answers every request with a short reply, on a thread that stops on drop (60 s at most).
struct Responder {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Responder {
    fn start(listener: TcpListener) -> Result<Self> {
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
                        open.push(stream);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
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

/// Accepts `count` connections (bounded: 10 s); they are never read nor answered.
fn accept_all(listener: &TcpListener, count: usize) -> Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
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

fn listen_in(ns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
    ns.run(move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in {}", ns.name))
}

/// Skips (visibly) when python3 is missing, unless kernel tests are required.
fn have_python(test: &str) -> bool {
    if python3().is_some() {
        return true;
    }
    if std::env::var(observer_tests::REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: needs python3");
    }
    note(&format!("SKIPPED {test}: needs python3"));
    false
}

// ---------------------------------------------------------------------------------------------
// 1. Stale connections

/// A server that accepts and never answers; a python3 client with 20 requests waiting for
/// answers: one `stale_connections` record names its pid, `python3`, the server, 20
/// connections. A second client whose requests are answered gets no record.
#[test]
fn unanswered_requests_are_reported_as_stale_by_client_process() -> Result<()> {
    const TEST: &str = "unanswered_requests_are_reported_as_stale_by_client_process";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    if !have_python(TEST) {
        return Ok(());
    }
    let topo = Topology::new("stale", 31)?;
    let server_ip = IpAddr::V4(topo.server_v4);
    let silent_addr = SocketAddr::new(server_ip, 7001);
    let answering_addr = SocketAddr::new(server_ip, 7002);
    let silent = listen_in(&topo.server, silent_addr)?;
    let _responder = Responder::start(listen_in(&topo.server, answering_addr)?)?;
    let client_ns = topo.client.inode()?;

    let obs = LiveObserver::start(&["--stale-after", "2"])?;
    let args = |addr: SocketAddr, expect: bool| {
        vec![
            addr.ip().to_string(),
            addr.port().to_string(),
            "20".to_owned(),
            if expect { "1" } else { "0" }.to_owned(),
        ]
    };
    let mut waiting =
        ClientProcess::spawn(&topo.client, WAITING_CLIENT, &args(silent_addr, false))?;
    let mut answered =
        ClientProcess::spawn(&topo.client, WAITING_CLIENT, &args(answering_addr, true))?;
    ensure!(waiting.next_line(Duration::from_secs(15))? == "ready");
    ensure!(answered.next_line(Duration::from_secs(15))? == "ready");
    let _accepted = accept_all(&silent, 20)?;
    let ready_at = Instant::now();
    let (waiting_pid, answered_pid) = (waiting.pid(), answered.pid());
    note(&format!(
        "{TEST}: waiting client pid {waiting_pid}, answered client pid {answered_pid}, client netns {client_ns}"
    ));

    let for_pid = |recs: &[Received], pid: u32| -> Vec<Value> {
        of_type(recs, "stale_connections")
            .filter(|r| r.value["pid"].as_u64() == Some(u64::from(pid)))
            .map(|r| r.value.clone())
            .collect()
    };
    let record = obs.wait_for_received(
        "a stale_connections record for the waiting client",
        Duration::from_secs(20),
        |recs| for_pid(recs, waiting_pid).into_iter().next(),
    )?;
    note(&format!("{TEST}: after {:?}: {record}", ready_at.elapsed()));
    let records = obs.stop_received()?;
    ensure!(
        record["netns"].as_u64() == Some(client_ns),
        "netns: expected {client_ns}: {record}"
    );
    ensure!(record["comm"] == "python3", "comm: {record}");
    ensure!(ip_of(&record, "peer") == Some(server_ip), "peer: {record}");
    ensure!(record["peer_port"] == 7001, "peer_port: {record}");
    ensure!(record["count"] == 20, "count: {record}");
    ensure!(record["awaiting_reply"] == 20, "awaiting_reply: {record}");
    ensure!(record["threshold_secs"] == 2, "threshold_secs: {record}");
    let answered_records = for_pid(&records, answered_pid);
    ensure!(
        answered_records.is_empty(),
        "stale_connections for the answered client (pid {answered_pid}): {answered_records:?}"
    );
    // Nothing else of this namespace is stale (the answered client, the servers' sockets).
    let others: Vec<&Value> = of_type(&records, "stale_connections")
        .map(|r| &r.value)
        .filter(|v| {
            v["netns"].as_u64() == Some(client_ns)
                && v["pid"].as_u64() != Some(u64::from(waiting_pid))
        })
        .collect();
    ensure!(others.is_empty(), "other stale groups: {others:?}");
    drop(waiting);
    drop(answered);
    Ok(())
}

/// A client started in a cgroup made for the test under the cgroup2 mount
/// (`observer-test.slice/observer-test-PID.service`) with 5 requests a silent server never
/// answers: its `stale_connections` record names that cgroup's path and its unit, as
/// `/proc/PID/cgroup` shows them.
#[test]
fn stale_connections_name_the_owners_cgroup_and_unit() -> Result<()> {
    const TEST: &str = "stale_connections_name_the_owners_cgroup_and_unit";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    if !have_python(TEST) {
        return Ok(());
    }
    let unit = format!("observer-test-{}.service", std::process::id());
    // Declared before the client: dropped after it, once the client is killed and reaped.
    let cgroup = TestCgroup::create(&format!("observer-test.slice/{unit}"))?;
    let topo = Topology::new("svc", 33)?;
    let server_ip = IpAddr::V4(topo.server_v4);
    let silent_addr = SocketAddr::new(server_ip, 7003);
    let silent = listen_in(&topo.server, silent_addr)?;
    let obs = LiveObserver::start(&["--stale-after", "2"])?;
    let args = vec![
        server_ip.to_string(),
        "7003".to_owned(),
        "5".to_owned(),
        "0".to_owned(),
    ];
    let procs = cgroup.procs_file();
    let mut client = ClientProcess::spawn_in(&topo.client, WAITING_CLIENT, &args, Some(&procs))?;
    ensure!(client.next_line(Duration::from_secs(15))? == "ready");
    let _accepted = accept_all(&silent, 5)?;
    let pid = client.pid();
    // Ground truth: the kernel's own view of the client's cgroup.
    let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let expected_line = format!("0::{}", cgroup.path);
    ensure!(
        proc_cgroup.lines().any(|l| l == expected_line),
        "/proc/{pid}/cgroup does not show {expected_line}: {proc_cgroup}"
    );
    ensure!(
        cgroup.pids().contains(&pid),
        "pid {pid} not in {}",
        cgroup.path
    );
    note(&format!("{TEST}: client pid {pid} in {}", cgroup.path));

    let record = obs.wait_for_received(
        "a stale_connections record for the client in the test cgroup",
        Duration::from_secs(20),
        |recs| {
            of_type(recs, "stale_connections")
                .find(|r| r.value["pid"].as_u64() == Some(u64::from(pid)))
                .map(|r| r.value.clone())
        },
    )?;
    note(&format!("{TEST}: {record}"));
    drop(obs.stop_received()?);
    ensure!(record["cgroup"] == cgroup.path.as_str(), "cgroup: {record}");
    ensure!(record["unit"] == unit.as_str(), "unit: {record}");
    ensure!(record["count"] == 5, "count: {record}");
    ensure!(
        record.get("container_id").is_none(),
        "container_id: {record}"
    );
    ensure!(record.get("pod_uid").is_none(), "pod_uid: {record}");
    drop(client);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Asymmetric reply route

/// Client C, server S (eth-a towards C, eth-b towards D), discarding neighbour D.
struct Routes {
    c: Netns,
    s: Netns,
    _d: Netns,
    c_addr: Ipv4Addr,
    s_addr: Ipv4Addr,
}

const ROUTES_PORT: u16 = 7100;

/// A veth pair between two namespaces, created directly inside them, addressed and up.
fn link(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) -> Result<()> {
    run_checked(
        Command::new("ip").args([
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ]),
        Duration::from_secs(15),
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

impl Routes {
    /// `net` picks 10.205.`net`.0/24 (C–S) and 10.205.`net+1`.0/24 (S–D). With `asymmetric`,
    /// S's route back to C's address goes via D out of eth-b.
    fn new(test: &str, net: u8, asymmetric: bool) -> Result<Self> {
        let base = unique_name(test);
        let c = Netns::create(&format!("{base}-c"))?;
        let s = Netns::create(&format!("{base}-s"))?;
        let d = Netns::create(&format!("{base}-d"))?;
        let c_addr = Ipv4Addr::new(10, 205, net, 1);
        let s_addr = Ipv4Addr::new(10, 205, net, 2);
        let s_b = Ipv4Addr::new(10, 205, net + 1, 2);
        let d_addr = Ipv4Addr::new(10, 205, net + 1, 3);
        link(
            &c,
            "c0",
            &format!("{c_addr}/24"),
            &s,
            "eth-a",
            &format!("{s_addr}/24"),
        )?;
        link(
            &s,
            "eth-b",
            &format!("{s_b}/24"),
            &d,
            "d0",
            &format!("{d_addr}/24"),
        )?;
        for ifname in ["all", "default", "eth-a", "eth-b"] {
            s.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
        }
        // D discards what is not for itself.
        d.sysctl("net.ipv4.ip_forward", "0")?;
        if asymmetric {
            s.ip(&[
                "route",
                "add",
                &format!("{c_addr}/32"),
                "via",
                &d_addr.to_string(),
                "dev",
                "eth-b",
            ])?;
        }
        Ok(Self {
            c,
            s,
            _d: d,
            c_addr,
            s_addr,
        })
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::from((self.s_addr, ROUTES_PORT))
    }
}

/// SYNs from C arrive on S's eth-a, the SYN-ACKs leave by eth-b towards D: the handshake
/// never completes, S retransmits SYN-ACKs, and observer reports `asymmetric_route` with both
/// interfaces. The same topology with the correct route: connects complete, and SYN-ACK
/// retransmits there (handshake ACKs dropped at the client) give no `asymmetric_route`.
#[test]
fn synack_retransmits_over_an_asymmetric_route_are_explained() -> Result<()> {
    const TEST: &str = "synack_retransmits_over_an_asymmetric_route_are_explained";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    let good = Routes::new("route-ok", 1, false)?;
    let bad = Routes::new("route-bad", 3, true)?;
    let (good_s, bad_s) = (good.s.inode()?, bad.s.inode()?);
    let _good_listener = listen_in(&good.s, good.server())?;
    let _bad_listener = listen_in(&bad.s, bad.server())?;

    let obs = LiveObserver::start(NO_BUDGET)?;

    // Symmetric first: the connect completes.
    let to = good.server();
    let stream = good
        .c
        .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))?
        .context("connect with the correct route")?;
    drop(stream);
    // Then SYN-ACK retransmits in that namespace: the client's handshake ACKs are dropped, so
    // the reply route is checked there too (and must be found symmetric).
    faults::drop_handshake_acks(&good.c, false, ROUTES_PORT)?;
    let half_open = good
        .c
        .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))?
        .context("connect with the handshake ACK dropped (succeeds client-side)")?;
    let good_peer = IpAddr::V4(good.c_addr);
    obs.wait_for_received(
        "a synack_retransmit event in the symmetric server namespace",
        Duration::from_secs(15),
        |recs| {
            of_type(recs, "synack_retransmit")
                .find(|r| {
                    r.value["netns"].as_u64() == Some(good_s)
                        && ip_of(&r.value, "daddr") == Some(good_peer)
                })
                .map(|_| ())
        },
    )?;

    // Asymmetric: connects that cannot complete (kept pending while we wait): six, so that the
    // server's SYN-ACK retransmits open `handshakes_not_completing` on the client.
    let bad_to = bad.server();
    let _pending: Vec<OwnedFd> = (0..6)
        .map(|_| bad.c.run(move || nonblocking_connect(bad_to))?)
        .collect::<Result<_>>()?;
    let bad_peer = IpAddr::V4(bad.c_addr);
    let record = obs.wait_for_received(
        "an asymmetric_route record for the asymmetric server namespace",
        Duration::from_secs(20),
        |recs| {
            of_type(recs, "asymmetric_route")
                .find(|r| r.value["netns"].as_u64() == Some(bad_s))
                .map(|r| r.value.clone())
        },
    )?;
    note(&format!("{TEST}: {record}"));
    // The anomaly names the route as its cause.
    let explained = obs.wait_for_received(
        "handshakes_not_completing in the asymmetric server namespace, caused by the route",
        Duration::from_secs(20),
        |recs| {
            recs.iter()
                .find(|r| {
                    let v = &r.value;
                    v["type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("anomaly_"))
                        && v["kind"] == "handshakes_not_completing"
                        && v["key"]["netns"].as_u64() == Some(bad_s)
                        && v["cause"]["kind"] == "asymmetric_route"
                })
                .map(|r| r.value["cause"].clone())
        },
    )?;
    note(&format!("{TEST}: cause {explained}"));
    ensure!(
        explained["evidence"]["out_ifname"] == "eth-b"
            && explained["evidence"]["in_ifname"] == "eth-a",
        "cause: {explained}"
    );
    let summary = explained["summary"].as_str().unwrap_or_default();
    ensure!(
        summary.contains("eth-a") && summary.contains("eth-b") && summary.contains("10.205.4.3"),
        "summary: {summary}"
    );
    let records = obs.stop_received()?;
    drop(half_open);

    ensure!(
        record["trigger"] == "synack_retransmit",
        "trigger: {record}"
    );
    ensure!(ip_of(&record, "peer") == Some(bad_peer), "peer: {record}");
    ensure!(
        ip_of(&record, "local_addr") == Some(IpAddr::V4(bad.s_addr)),
        "local_addr: {record}"
    );
    ensure!(record["in_ifname"] == "eth-a", "in_ifname: {record}");
    ensure!(record["out_ifname"] == "eth-b", "out_ifname: {record}");
    ensure!(
        ip_of(&record, "gateway") == Some(IpAddr::V4(Ipv4Addr::new(10, 205, 4, 3))),
        "gateway: {record}"
    );
    // Ground truth: the handshake never completed (the SYN-ACKs went to D).
    let synacks = of_type(&records, "synack_retransmit")
        .filter(|r| r.value["netns"].as_u64() == Some(bad_s))
        .count();
    ensure!(
        synacks > 0,
        "no synack_retransmit event in the asymmetric S"
    );
    let good_synacks = of_type(&records, "synack_retransmit")
        .filter(|r| r.value["netns"].as_u64() == Some(good_s))
        .count();
    let wrong: Vec<&Value> = of_type(&records, "asymmetric_route")
        .map(|r| &r.value)
        .filter(|v| v["netns"].as_u64() == Some(good_s))
        .collect();
    note(&format!(
        "{TEST}: synack_retransmit events: asymmetric S {synacks}, symmetric S {good_synacks}"
    ));
    ensure!(
        wrong.is_empty(),
        "asymmetric_route for the symmetric namespace: {wrong:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Owner attribution

/// A python3 client streams to a server that drops every 5th data segment: the retransmit
/// events of that flow received after its first 2 s carry the client's pid and `python3`.
#[test]
fn retransmit_events_name_the_owning_process() -> Result<()> {
    const TEST: &str = "retransmit_events_name_the_owning_process";
    const PORT: u16 = 7200;
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    if !have_python(TEST) {
        return Ok(());
    }
    let topo = Topology::new("owner", 32)?;
    faults::drop_data_to(&topo.server, false, PORT, 5)?;
    let server = SocketAddr::new(IpAddr::V4(topo.server_v4), PORT);
    let sink = Sink::start(&topo.server, server, 1, Duration::from_secs(40))?;
    let client_ns = topo.client.inode()?;

    let obs = LiveObserver::start(&[
        "--export-per-flow",
        "0",
        "--export-per-cpu",
        "0",
        "--export-kinds",
        "retransmit",
    ])?;
    let mut client = ClientProcess::spawn(
        &topo.client,
        STREAMING_CLIENT,
        &[server.ip().to_string(), PORT.to_string(), "6".to_owned()],
    )?;
    let line = client.next_line(Duration::from_secs(10))?;
    let started = Instant::now();
    let sport: u64 = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("client said {line:?}"))?;
    let pid = client.pid();
    let is_flow = |v: &Value| {
        v["netns"].as_u64() == Some(client_ns)
            && v["sport"].as_u64() == Some(sport)
            && v["dport"] == PORT
            && ip_of(v, "daddr") == Some(server.ip())
    };
    let done = client.next_line(Duration::from_secs(20))?;
    ensure!(done == "done", "client said {done:?}");
    // The stream lasted 6 s: retransmits after its first 2 s exist if the fault happened.
    obs.wait_for_received(
        "retransmit events of the stream after its first 2 s",
        Duration::from_secs(10),
        |recs| {
            recs.iter()
                .any(|r| {
                    r.value["type"] == "retransmit"
                        && is_flow(&r.value)
                        && r.at >= started + Duration::from_secs(2)
                })
                .then_some(())
        },
    )?;
    let records = obs.stop_received()?;
    drop(client);
    let received = sink.join()?;

    let events: Vec<&Received> = of_type(&records, "retransmit")
        .filter(|r| is_flow(&r.value))
        .collect();
    let late: Vec<&Received> = events
        .iter()
        .copied()
        .filter(|r| r.at >= started + Duration::from_secs(2))
        .collect();
    let with_owner = events
        .iter()
        .filter(|r| r.value.get("owner").is_some_and(|o| !o.is_null()))
        .count();
    note(&format!(
        "{TEST}: client pid {pid}, flow port {sport}: {} retransmit events, {} after 2 s, {with_owner} with an owner; sink received {received:?} bytes",
        events.len(),
        late.len()
    ));
    ensure!(!late.is_empty(), "no retransmit events after the first 2 s");
    for r in &late {
        let owner = &r.value["owner"];
        ensure!(
            owner["pid"].as_u64() == Some(u64::from(pid)) && owner["comm"] == "python3",
            "retransmit event after 2 s without the client as owner (pid {pid}): {}",
            r.value
        );
    }
    for r in &events {
        let owner = &r.value["owner"];
        if !owner.is_null() {
            ensure!(
                owner["pid"].as_u64() == Some(u64::from(pid)),
                "owner other than the client (pid {pid}): {}",
                r.value
            );
        }
    }
    Ok(())
}
