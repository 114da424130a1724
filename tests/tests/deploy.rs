//! Deployment: `observer check`, the configuration file, file output with rotation, the
//! capability set and the systemd unit in packaging/.
//!
//! Tests that need the kernel skip visibly when not root (fail with
//! OBSERVER_REQUIRE_KERNEL_TESTS=1); the others run anywhere.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use observer_tests::{
    ALL_EVENT_TYPES, Netns, START_TIMEOUT, STOP_TIMEOUT, TempDir, connect_in, kernel_test, note,
    observer_bin, poll_until, require_tool, run_with_timeout, send_signal, unique_name, wait_child,
};
use serde_json::Value;

const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/observer.service");

// ---------------------------------------------------------------------------------------------
// Helpers

fn observer() -> Result<Command> {
    let bin = observer_bin();
    ensure!(
        bin.exists(),
        "{} does not exist: build it first (cargo build -p observer) or set OBSERVER_BIN",
        bin.display()
    );
    Ok(Command::new(bin))
}

/// One row of `observer check`'s table.
#[derive(Debug)]
struct Row {
    name: String,
    verdict: String,
    detail: String,
}

/// What `observer check` printed and its exit code.
#[derive(Debug)]
struct CheckRun {
    code: Option<i32>,
    rows: Vec<Row>,
    summary: String,
    stdout: String,
    stderr: String,
}

impl CheckRun {
    fn row(&self, name: &str) -> Result<&Row> {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .with_context(|| format!("no `{name}` line in:\n{}", self.stdout))
    }

    fn rows_starting(&self, prefix: &str) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.name.starts_with(prefix))
            .collect()
    }

    fn with_verdict(&self, verdict: &str) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.verdict == verdict).collect()
    }

    /// Exit 0, or 1 with only the `instances` line warning: other observers (other tests,
    /// other developers) may be running on the machine.
    fn ensure_full(&self) -> Result<()> {
        self.ensure_full_but(&[])
    }

    /// [`CheckRun::ensure_full`], with WARN lines named in `expected_warnings` required.
    fn ensure_full_but(&self, expected_warnings: &[&str]) -> Result<()> {
        let failed = self.with_verdict("FAIL");
        ensure!(failed.is_empty(), "FAIL lines: {failed:?}\n{}", self.stdout);
        let warned: Vec<&str> = self
            .with_verdict("WARN")
            .into_iter()
            .map(|r| r.name.as_str())
            .filter(|name| *name != "instances")
            .collect();
        ensure!(
            warned == expected_warnings,
            "WARN lines {warned:?}, expected {expected_warnings:?}\n{}",
            self.stdout
        );
        let any_warn = !warned.is_empty() || self.row("instances")?.verdict == "WARN";
        let expected = if any_warn { 1 } else { 0 };
        ensure!(
            self.code == Some(expected),
            "exit code {:?}, expected {expected}\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(())
    }
}

fn parse_check(code: Option<i32>, stdout: String, stderr: String) -> Result<CheckRun> {
    let mut lines = stdout.lines();
    let header = lines.next().context("empty output")?;
    ensure!(header.starts_with("CHECK"), "no header: {stdout}");
    let mut rows = Vec::new();
    let mut summary = String::new();
    for line in lines {
        let mut cols = line.split_whitespace();
        let (Some(name), Some(verdict)) = (cols.next(), cols.next()) else {
            bail!("short line `{line}` in:\n{stdout}");
        };
        if matches!(verdict, "OK" | "WARN" | "FAIL") {
            rows.push(Row {
                name: name.to_owned(),
                verdict: verdict.to_owned(),
                detail: cols.collect::<Vec<_>>().join(" "),
            });
        } else {
            summary = line.to_owned();
        }
    }
    ensure!(
        summary.starts_with("observer "),
        "no summary line in:\n{stdout}"
    );
    Ok(CheckRun {
        code,
        rows,
        summary,
        stdout,
        stderr,
    })
}

/// Runs `observer check` through `wrapper` (e.g. setpriv ...), or directly.
fn run_check(wrapper: &[&str], bin: &Path, args: &[&str]) -> Result<CheckRun> {
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("check").args(args).current_dir("/");
    let (status, stdout, stderr) = run_with_timeout(&mut cmd, CHECK_TIMEOUT)?;
    parse_check(status.code(), stdout, stderr)
}

/// Capability names of a `CapabilityBoundingSet=` line, lower case without `cap_`, as setpriv
/// takes them.
fn unit_capabilities(unit: &str) -> Result<Vec<String>> {
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .context("the unit has no CapabilityBoundingSet=")?;
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .map(str::to_ascii_lowercase)
                .with_context(|| format!("`{c}` is not a capability name"))
        })
        .collect()
}

/// setpriv arguments that leave exactly `caps` (inheritable, ambient, bounding), optionally
/// switching to `uid`.
fn setpriv(caps: &[String], uid: Option<u32>) -> Vec<String> {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["setpriv".to_owned()];
    if let Some(uid) = uid {
        args.extend([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
        ]);
    }
    args.extend([
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
    ]);
    args
}

/// Copies the binary where any user may run it (the build tree may be under a private home).
fn public_copy(dir: &TempDir) -> Result<PathBuf> {
    let to = dir.path().join("observer");
    std::fs::copy(observer_bin(), &to).context("copying the observer binary")?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(to)
}

/// JSON objects, one per line; fails on any other line.
fn parse_records(text: &str, what: &str) -> Result<Vec<Value>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{what} line {}: not JSON: {line}", i + 1))?;
            ensure!(
                v.is_object(),
                "{what} line {}: not an object: {line}",
                i + 1
            );
            Ok(v)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// observer check

#[test]
fn check_passes_as_root() -> Result<()> {
    let Some(_t) = kernel_test("check_passes_as_root") else {
        return Ok(());
    };
    let run = run_check(&[], &observer_bin(), &["--config", "/dev/null"])?;
    note(&run.stdout);
    run.ensure_full()?;
    let tracepoints = run.rows_starting("tracepoint:");
    ensure!(tracepoints.len() == 6, "tracepoint lines: {tracepoints:?}");
    for tp in [
        "tcp:tcp_retransmit_skb",
        "tcp:tcp_retransmit_synack",
        "tcp:tcp_send_reset",
        "tcp:tcp_receive_reset",
        "skb:kfree_skb",
        "sock:inet_sock_set_state",
    ] {
        let row = run.row(&format!("tracepoint:{tp}"))?;
        ensure!(row.verdict == "OK", "{row:?}");
    }
    for name in [
        "kernel",
        "privileges",
        "btf",
        "tracefs",
        "programs",
        "maps",
        "perf-buffers",
        "bpf-stats",
        "context",
    ] {
        let row = run.row(name)?;
        ensure!(row.verdict == "OK", "{row:?}");
    }
    let programs = run.rows_starting("program:");
    ensure!(programs.len() == 6, "program lines: {programs:?}");
    ensure!(
        programs
            .iter()
            .all(|r| r.detail.starts_with("attached to ")),
        "{programs:?}"
    );
    ensure!(run.row("maps")?.detail.contains("perf_event_array"));
    Ok(())
}

#[test]
fn check_cannot_run_without_bpf_privileges() -> Result<()> {
    let Some(t) = kernel_test("check_cannot_run_without_bpf_privileges") else {
        return Ok(());
    };
    if !require_tool(&t.name, "setpriv", "util-linux") {
        return Ok(());
    }
    let drop = "-bpf,-perfmon,-sys_admin";
    let run = run_check(
        &[
            "setpriv",
            &format!("--inh-caps={drop}"),
            &format!("--bounding-set={drop}"),
        ],
        &observer_bin(),
        &["--config", "/dev/null"],
    )?;
    note(&run.stdout);
    ensure!(
        run.code == Some(2),
        "exit {:?}, expected 2\n{}",
        run.code,
        run.stdout
    );
    let privileges = run.row("privileges")?;
    ensure!(privileges.verdict == "FAIL", "{privileges:?}");
    ensure!(
        privileges.detail.contains("CAP_BPF and CAP_PERFMON"),
        "{privileges:?}"
    );
    ensure!(run.row("programs")?.verdict == "FAIL", "{}", run.stdout);
    ensure!(
        run.summary.starts_with("observer cannot run") && run.summary.contains("privileges"),
        "{}",
        run.summary
    );
    // What does not depend on the capabilities is still checked.
    ensure!(run.row("btf")?.verdict == "OK", "{}", run.stdout);
    Ok(())
}

/// The capability set of packaging/observer.service (uid 0, bounding set only) is enough.
#[test]
fn the_units_capabilities_suffice() -> Result<()> {
    let Some(t) = kernel_test("the_units_capabilities_suffice") else {
        return Ok(());
    };
    if !require_tool(&t.name, "setpriv", "util-linux") {
        return Ok(());
    }
    let unit = std::fs::read_to_string(UNIT).context("reading the unit")?;
    let caps = unit_capabilities(&unit)?;
    note(&format!("unit capabilities: {caps:?}"));
    let wrapper = setpriv(&caps, None);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let run = run_check(&wrapper, &observer_bin(), &["--config", "/dev/null"])?;
    note(&run.stdout);
    run.ensure_full()?;

    // And a real run under it: start and stop records, exit 0.
    let (program, rest) = wrapper.split_first().context("empty wrapper")?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .arg(observer_bin())
        .args(["run", "--config", "/dev/null", "--duration", "2"])
        .current_dir("/");
    let (status, stdout, stderr) = run_with_timeout(&mut cmd, Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "observer run: {status}; stderr:\n{stderr}"
    );
    let records = parse_records(&stdout, "stdout")?;
    ensure!(
        records.first().is_some_and(|r| r["type"] == "start")
            && records.last().is_some_and(|r| r["type"] == "stop"),
        "no start/stop; stderr:\n{stderr}"
    );
    ensure!(
        records[0]["programs"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["attached"] == true)),
        "not all programs attached: {}",
        records[0]["programs"]
    );
    Ok(())
}

/// Without root's uid: CAP_BPF, CAP_PERFMON, plus CAP_DAC_READ_SEARCH for the root-only tracefs
/// and CAP_SYSLOG for kernel symbols, load and attach everything (docs/config.md); only the
/// context worker is missing (it needs CAP_SYS_ADMIN).
#[test]
fn non_root_with_least_capabilities_can_run() -> Result<()> {
    let Some(t) = kernel_test("non_root_with_least_capabilities_can_run") else {
        return Ok(());
    };
    if !require_tool(&t.name, "setpriv", "util-linux") {
        return Ok(());
    }
    let dir = TempDir::new(&t.name)?;
    let bin = public_copy(&dir)?;
    let caps: Vec<String> = ["bpf", "perfmon", "dac_read_search", "syslog"]
        .map(str::to_owned)
        .to_vec();
    let wrapper = setpriv(&caps, Some(65534));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let run = run_check(&wrapper, &bin, &["--config", "/dev/null"])?;
    note(&run.stdout);
    // Every kernel event; the context worker needs CAP_SYS_ADMIN (setns) and says so.
    run.ensure_full_but(&["context"])?;
    for name in ["programs", "perf-buffers", "tracefs", "kernel-symbols"] {
        let row = run.row(name)?;
        ensure!(row.verdict == "OK", "{row:?}");
    }

    // Without CAP_DAC_READ_SEARCH, tracefs (root-only) is out of reach.
    let caps: Vec<String> = ["bpf", "perfmon", "syslog"].map(str::to_owned).to_vec();
    let wrapper = setpriv(&caps, Some(65534));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let run = run_check(&wrapper, &bin, &["--config", "/dev/null"])?;
    note(&run.stdout);
    ensure!(run.code == Some(2), "exit {:?}\n{}", run.code, run.stdout);
    let tracefs = run.row("tracefs")?;
    ensure!(
        tracefs.verdict == "FAIL" && tracefs.detail.contains("CAP_DAC_READ_SEARCH"),
        "{tracefs:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The systemd unit

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let test = "systemd_unit_verifies";
    if !require_tool(test, "systemd-analyze", "systemd") {
        return Ok(());
    }
    let unit = std::fs::read_to_string(UNIT).context("reading the unit")?;
    ensure!(
        unit.contains("ExecStart=/usr/local/bin/observer run --config /etc/observer/observer.toml"),
        "unexpected ExecStart"
    );
    ensure!(
        unit.lines().any(|l| l == "Type=notify"),
        "the unit should wait for observer's READY=1"
    );
    // verify wants the ExecStart binary to exist: point it at the one under test.
    let bin = observer_bin();
    ensure!(bin.exists(), "{} does not exist", bin.display());
    let bin = bin.canonicalize()?;
    let dir = TempDir::new(test)?;
    let path = dir.write(
        "observer.service",
        &unit.replace("/usr/local/bin/observer", &bin.to_string_lossy()),
    )?;
    let (status, stdout, stderr) = run_with_timeout(
        Command::new("systemd-analyze").arg("verify").arg(&path),
        Duration::from_secs(60),
    )?;
    // verify exits 0 on unknown keys and bad values, and only says so: read what it says.
    let about_us: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains("observer.service"))
        .collect();
    ensure!(
        status.success() && about_us.is_empty(),
        "systemd-analyze verify: {status}\n{stderr}{stdout}"
    );
    // The check is not blind: a typo is reported.
    let broken = dir.write(
        "broken.service",
        &std::fs::read_to_string(&path)?.replace("NoNewPrivileges=", "NoNewPrivilege="),
    )?;
    let (_, _, stderr) = run_with_timeout(
        Command::new("systemd-analyze").arg("verify").arg(&broken),
        Duration::from_secs(60),
    )?;
    ensure!(
        stderr.contains("broken.service"),
        "a typo went unnoticed: {stderr}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configuration file

#[test]
fn config_file_sets_run_options_and_flags_override_it() -> Result<()> {
    let Some(t) = kernel_test("config_file_sets_run_options_and_flags_override_it") else {
        return Ok(());
    };
    let dir = TempDir::new(&t.name)?;
    let config = dir.write(
        "observer.toml",
        "# test\nexport_per_flow = 7\nexport_per_cpu = 11\n\n[output]\ntarget = \"stdout\"\n\n[thresholds.connect_trouble]\nopen_per_sec = 2.0\n",
    )?;
    let config = config.to_string_lossy().into_owned();
    for (extra, per_flow) in [(&[][..], 7), (&["--export-per-flow", "3"][..], 3)] {
        let mut cmd = observer()?;
        cmd.args(["run", "--config", &config, "--duration", "1"])
            .args(extra);
        let (status, stdout, stderr) = run_with_timeout(&mut cmd, Duration::from_secs(60))?;
        ensure!(status.success(), "{status}; stderr:\n{stderr}");
        let records = parse_records(&stdout, "stdout")?;
        let start = records.first().context("no records")?;
        ensure!(start["type"] == "start", "{start}");
        ensure!(
            start["export_per_flow"] == per_flow && start["export_per_cpu"] == 11,
            "flags {extra:?}: start record has export_per_flow {} export_per_cpu {}",
            start["export_per_flow"],
            start["export_per_cpu"]
        );
        ensure!(
            records.last().is_some_and(|r| r["type"] == "stop"),
            "no stop record"
        );
    }
    Ok(())
}

/// Refused before anything touches the kernel: runs without root too.
#[test]
fn an_invalid_config_is_refused_naming_line_and_key() -> Result<()> {
    let dir = TempDir::new("invalid_config")?;
    let cases = [
        (
            "max_flows = 1024\n\nexport_per_flow = \"lots\"\n",
            "line 3",
            "export_per_flow",
        ),
        (
            "[output]\nkeep = 2\nmax_byte = 10\n",
            "line 3",
            "output.max_byte",
        ),
        ("\nperf_pages = 3\n", "line 2", "perf_pages"),
        (
            "perf_pages = 1\nwakeup_events = 64\n",
            "line 2",
            "wakeup_events",
        ),
        (
            "export_kinds = \"retransmit,bogus\"\n",
            "line 1",
            "export_kinds",
        ),
        ("max_flows = 1024\n[output\n", "line 2", ""),
    ];
    for (i, (text, line, key)) in cases.iter().enumerate() {
        let path = dir.write(&format!("bad{i}.toml"), text)?;
        let mut cmd = observer()?;
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .args(["--duration", "1"]);
        let (status, stdout, stderr) = run_with_timeout(&mut cmd, Duration::from_secs(30))?;
        ensure!(
            status.code() == Some(2),
            "{text:?}: exit {status}, expected 2; stderr:\n{stderr}"
        );
        ensure!(stdout.is_empty(), "{text:?}: wrote records: {stdout}");
        ensure!(
            stderr.contains(&*path.to_string_lossy()) && stderr.contains(line),
            "{text:?}: stderr does not name the file and {line}:\n{stderr}"
        );
        ensure!(
            key.is_empty() || stderr.contains(&format!("key `{key}`")),
            "{text:?}: stderr does not name key `{key}`:\n{stderr}"
        );
    }
    // A missing file named explicitly is an error too.
    let mut cmd = observer()?;
    cmd.arg("run")
        .arg("--config")
        .arg(dir.path().join("missing.toml"));
    let (status, _, stderr) = run_with_timeout(&mut cmd, Duration::from_secs(30))?;
    ensure!(
        status.code() == Some(2) && stderr.contains("missing.toml"),
        "{status}: {stderr}"
    );
    // `observer check` reports the same error on its config line.
    let path = dir.write("bad.toml", "export_per_flow = -1\n")?;
    let run = run_check(&[], &observer_bin(), &["--config", &path.to_string_lossy()])?;
    let row = run.row("config")?;
    ensure!(
        row.verdict == "FAIL"
            && row.detail.contains("line 1")
            && row.detail.contains("export_per_flow"),
        "{row:?}"
    );
    ensure!(run.code == Some(2), "exit {:?}", run.code);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// File output

#[test]
fn file_output_rotates_at_record_boundaries() -> Result<()> {
    let Some(t) = kernel_test("file_output_rotates_at_record_boundaries") else {
        return Ok(());
    };
    const MAX_BYTES: u64 = 16 * 1024;
    const KEEP: u32 = 30;
    const CONNECTIONS: usize = 150;
    let dir = TempDir::new(&t.name)?;
    let out = dir.path().join("observer.ndjson");
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let mut child = observer()?
        .args(["run", "--config", "/dev/null", "--duration", "60"])
        .arg("--output")
        .arg(format!("file:{}", out.display()))
        .args(["--output-max-bytes", &MAX_BYTES.to_string()])
        .args(["--output-keep", &KEEP.to_string()])
        // Every event of every flow, within the default per-CPU budget: other work on the
        // machine (every namespace is observed) cannot flood the output unboundedly.
        .args(["--export-kinds", "all", "--export-per-flow", "0"])
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path)?)
        .stderr(File::create(&stderr_path)?)
        .spawn()
        .context("spawning observer")?;
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let started = poll_until(
        "the start record in the output file",
        START_TIMEOUT,
        Duration::from_millis(50),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("observer exited early ({status}); stderr:\n{}", stderr());
            }
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            Ok(text.contains("\"type\":\"start\"").then_some(()))
        },
    );
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }

    // Loopback connections in a namespace of our own: connect, accept and close events.
    let ns = Netns::create(&unique_name(&t.name))?;
    let netns = ns.inode()?;
    let listener = ns
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?
        .context("binding the listener")?;
    let to: SocketAddr = listener.local_addr()?;
    for i in 0..CONNECTIONS {
        let mut client = connect_in(&ns, to, Duration::from_secs(5))?;
        let (mut server, _) = listener.accept().context("accept")?;
        client.write_all(b"x")?;
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte)?;
        // Alternate who closes first, so both sides' close paths are seen.
        if i % 2 == 0 {
            drop(client);
            drop(server);
        } else {
            drop(server);
            drop(client);
        }
    }
    drop(listener);
    std::thread::sleep(Duration::from_millis(500));
    send_signal(child.id(), libc::SIGINT)?;
    // Generous: the final drain of a busy machine's events takes a while.
    let status = wait_child(&mut child, STOP_TIMEOUT * 3)?;
    ensure!(
        status.success(),
        "observer: {status}; stderr:\n{}",
        stderr()
    );
    let stdout = std::fs::read_to_string(&stdout_path)?;
    ensure!(stdout.is_empty(), "records on stdout: {stdout}");

    // observer.ndjson.N (oldest) ... observer.ndjson.1, observer.ndjson (newest).
    let mut rotated = Vec::new();
    for entry in std::fs::read_dir(dir.path())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("observer.ndjson.") {
            rotated.push(
                n.parse::<u32>()
                    .with_context(|| format!("odd file {name}"))?,
            );
        }
    }
    rotated.sort_unstable();
    ensure!(
        rotated.len() >= 3,
        "expected several rotations, found {rotated:?}"
    );
    ensure!(
        rotated.iter().copied().eq(1..=rotated.len() as u32),
        "gaps in the rotated files: {rotated:?}"
    );
    let files: Vec<PathBuf> = rotated
        .iter()
        .rev()
        .map(|n| dir.path().join(format!("observer.ndjson.{n}")))
        .chain([out.clone()])
        .collect();
    let mut records = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file)?;
        let what = file.display().to_string();
        ensure!(text.ends_with('\n'), "{what} does not end with a newline");
        let longest = text.lines().map(str::len).max().unwrap_or(0) as u64;
        // A rotated file reached the limit with its last record, and not before.
        if i + 1 < files.len() {
            let size = text.len() as u64;
            ensure!(
                size >= MAX_BYTES && size <= MAX_BYTES + longest + 1,
                "{what}: {size} bytes, limit {MAX_BYTES}, longest line {longest}"
            );
        }
        records.extend(parse_records(&text, &what)?);
    }
    note(&format!(
        "{} records in {} files",
        records.len(),
        files.len()
    ));
    let stop = records.last().filter(|r| r["type"] == "stop");
    let stop = stop.context("the last record is not `stop`")?;
    ensure!(
        records.iter().filter(|r| r["type"] == "stop").count() == 1,
        "stop repeated"
    );
    // With more than KEEP rotations the oldest files are gone (a busy machine): the checks of
    // completeness need every file.
    if records.first().is_none_or(|r| r["type"] != "start") {
        ensure!(
            rotated.len() == KEEP as usize,
            "the first record is not `start`, yet only {} rotated files are kept",
            rotated.len()
        );
        note("more rotations than kept files: completeness not checked");
        return Ok(());
    }
    ensure!(
        records.iter().filter(|r| r["type"] == "start").count() == 1,
        "start repeated"
    );

    // Every event the daemon received was written: nothing lost across rotations.
    let written_events = records
        .iter()
        .filter(|r| {
            r["type"]
                .as_str()
                .is_some_and(|t| ALL_EVENT_TYPES.contains(&t))
        })
        .count() as u64;
    let totals = stop["totals"].as_object().context("stop.totals")?;
    let received: u64 = totals
        .values()
        .map(|k| k["received"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        written_events == received,
        "{written_events} event records written, the daemon received {received}"
    );

    // Our connections are there, each once, unless the budget or a full buffer held some back.
    let ours = |ty: &str| {
        records
            .iter()
            .filter(|r| r["type"] == ty && r["netns"].as_u64() == Some(netns))
            .count()
    };
    let held_back = |kind: &str| totals[kind]["suppressed"].as_u64().unwrap_or(0) > 0;
    let lossless = stop["lost"] == 0 && stop["undelivered"] == 0;
    for ty in ["connect", "accept"] {
        let n = ours(ty);
        if lossless && !held_back(ty) {
            ensure!(
                n == CONNECTIONS,
                "{n} `{ty}` records in our namespace, {CONNECTIONS} connections"
            );
        } else {
            note(&format!(
                "{n} `{ty}` records of {CONNECTIONS} (budget or buffers held some back)"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Readiness (sd_notify)

/// A notification socket the test provides as NOTIFY_SOCKET: a path in a temp dir, or an
/// abstract name (`@...`). Every message received is kept with whether the output file
/// already held the start record when it arrived.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    /// The value for NOTIFY_SOCKET.
    address: String,
}

impl NotifySocket {
    fn bind(dir: &TempDir, abstract_name: bool) -> Result<Self> {
        use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};
        let (socket, address) = if abstract_name {
            let name = dir
                .path()
                .file_name()
                .context("temp dir name")?
                .to_string_lossy()
                .into_owned();
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            (UnixDatagram::bind_addr(&addr)?, format!("@{name}"))
        } else {
            let path = dir.path().join("notify.sock");
            (
                UnixDatagram::bind(&path)?,
                path.to_str().context("socket path")?.to_owned(),
            )
        };
        Ok(Self { socket, address })
    }

    /// The next message within `timeout`, or None.
    fn receive(&self, timeout: Duration) -> Result<Option<String>> {
        self.socket.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("recv on the notify socket"),
        }
    }

    /// Messages until one has the line `line`, within `timeout`; each with what `at_receipt`
    /// said when it arrived.
    fn until<T>(
        &self,
        line: &str,
        timeout: Duration,
        mut at_receipt: impl FnMut() -> T,
    ) -> Result<Vec<(String, T)>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while std::time::Instant::now() < deadline {
            if let Some(message) = self.receive(Duration::from_millis(100))? {
                let seen = at_receipt();
                let done = message.lines().any(|l| l == line);
                got.push((message, seen));
                if done {
                    return Ok(got);
                }
            }
        }
        let messages: Vec<&String> = got.iter().map(|(m, _)| m).collect();
        bail!("no `{line}` within {timeout:?}; received {messages:?}")
    }
}

/// The record types in an output file so far.
fn record_types(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `observer run` with NOTIFY_SOCKET: READY=1 arrives once the start record is written (never
/// before), STOPPING=1 after SIGINT, and the run ends with its stop record and exit 0.
fn notify_protocol(test: &str, abstract_name: bool) -> Result<()> {
    let Some(t) = kernel_test(test) else {
        return Ok(());
    };
    let dir = TempDir::new(&t.name)?;
    let notify = NotifySocket::bind(&dir, abstract_name)?;
    let out = dir.path().join("out.ndjson");
    let stderr_path = dir.path().join("stderr");
    let child = observer()?
        .args(["run", "--output"])
        .arg(format!("file:{}", out.display()))
        .env("NOTIFY_SOCKET", &notify.address)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path)?)
        .spawn()
        .context("spawning observer")?;
    let mut child = KillOnDrop(Some(child));
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let ready = notify
        .until("READY=1", START_TIMEOUT, || record_types(&out))
        .with_context(|| format!("observer stderr:\n{}", stderr()))?;
    for (message, types) in &ready {
        ensure!(
            types.first().map(String::as_str) == Some("start"),
            "`{message}` arrived before the start record was written (records: {types:?})"
        );
    }
    let (ready_message, _) = ready.last().context("READY=1")?;
    note(&format!("notify ({}): {ready_message:?}", notify.address));
    send_signal(child.id()?, libc::SIGINT)?;
    let stopping = notify
        .until("STOPPING=1", STOP_TIMEOUT, || ())
        .with_context(|| format!("observer stderr:\n{}", stderr()))?;
    let status = wait_child(child.take()?, STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "exit {status}; stderr:\n{}",
        stderr()
    );
    ensure!(
        record_types(&out).last().map(String::as_str) == Some("stop"),
        "no stop record at the end of the output"
    );
    // Nothing after STOPPING=1 says ready again.
    while let Some(message) = notify.receive(Duration::from_millis(1))? {
        ensure!(!message.contains("READY=1"), "READY=1 after STOPPING=1");
    }
    note(&format!(
        "notify at shutdown: {:?}",
        stopping.last().map(|(m, _)| m)
    ));
    Ok(())
}

/// A child killed and reaped on drop (unless taken).
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn id(&self) -> Result<u32> {
        self.0
            .as_ref()
            .map(std::process::Child::id)
            .context("reaped")
    }

    fn take(&mut self) -> Result<&mut std::process::Child> {
        self.0.as_mut().context("reaped")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn notify_ready_after_start_and_stopping_at_shutdown() -> Result<()> {
    notify_protocol("notify_ready_after_start_and_stopping_at_shutdown", false)
}

#[test]
fn notify_on_an_abstract_socket() -> Result<()> {
    notify_protocol("notify_on_an_abstract_socket", true)
}

/// A start that fails exits non-zero with the reason on stderr, and never says READY=1.
#[test]
fn a_failed_start_is_never_ready() -> Result<()> {
    let Some(t) = kernel_test("a_failed_start_is_never_ready") else {
        return Ok(());
    };
    let dir = TempDir::new(&t.name)?;
    let notify = NotifySocket::bind(&dir, false)?;
    let missing = dir.path().join("no/such/dir/out.ndjson");
    let (status, _, stderr) = run_with_timeout(
        observer()?
            .args(["run", "--output"])
            .arg(format!("file:{}", missing.display()))
            .env("NOTIFY_SOCKET", &notify.address),
        START_TIMEOUT,
    )?;
    ensure!(!status.success(), "observer started: {status}");
    ensure!(
        stderr.contains("no/such/dir/out.ndjson"),
        "the reason is not on stderr: {stderr}"
    );
    // The process is gone: anything it sent is queued on the socket already.
    while let Some(message) = notify.receive(Duration::from_millis(1))? {
        ensure!(
            !message.contains("READY=1"),
            "a failed start said `{message}`"
        );
    }
    Ok(())
}
