//! Real-kernel test of `observer::enrich::netfilter`: in a private network namespace, iptables
//! (nf_tables backend) rules drop SYNs; rule counters read from a thread that has `setns`ed into
//! the namespace must name the dropping rule, with iptables' own counter as ground truth.
//!
//! Needs root (skips with `SKIPPED` otherwise, or fails when `OBSERVER_REQUIRE_KERNEL_TESTS=1`).
//! Nothing touches the host's firewall: every rule lives in the namespace, which is deleted on
//! drop, and all traffic stays on its loopback.
use std::{
    fs::File,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use observer::enrich::netfilter::{self, Attribution, RuleCounter, attribute};

const REQUIRE_ENV: &str = "OBSERVER_REQUIRE_KERNEL_TESTS";

/// Port whose SYNs are dropped.
const PORT_DROPPED: u16 = 5001;
/// Port of a second drop rule that nothing is sent to.
const PORT_UNUSED: u16 = 5002;
/// Port without a rule (for the chain policy test).
const PORT_POLICY: u16 = 5005;
/// Connection attempts; each waits at most [`ATTEMPT_WAIT`].
const ATTEMPTS: u32 = 4;
const ATTEMPT_WAIT: Duration = Duration::from_millis(250);

/// False (after printing `SKIPPED`) when the test cannot run here; panics instead when
/// `OBSERVER_REQUIRE_KERNEL_TESTS=1`.
fn can_run(test: &str) -> bool {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let missing = ["ip", "iptables"]
        .into_iter()
        .find(|tool| !tool_exists(tool));
    let reason = match (root, missing) {
        (false, _) => "needs root".to_owned(),
        (true, Some(tool)) => format!("needs `{tool}`"),
        (true, None) => return true,
    };
    if required {
        panic!("{test}: {reason}, and {REQUIRE_ENV}=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {reason}");
    false
}

/// Whether `tool` is an executable file in PATH or the sbin directories.
fn tool_exists(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .any(|dir| dir.join(tool).is_file())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    ensure!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A network namespace of our own with loopback up; deleted on drop (with its rules).
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("obs-nf-{tag}-{}", std::process::id());
        // A namespace left over by a killed run of this very process id.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread that has entered the namespace (`setns` changes only the calling
    /// thread; sockets it creates and processes it starts live in the namespace).
    fn run_in<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                    // SAFETY: `file` is an open namespace file for the whole call; setns with
                    // CLONE_NEWNET moves only this thread, which ends with the scope.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        bail!("setns({path}): {}", std::io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .map_err(|_| anyhow!("the thread in {} panicked", self.name))?
        })
    }

    /// `iptables -L INPUT -v -x -n`: the packet count of the rule mentioning `dpt:PORT`.
    fn rule_packets(&self, port: u16) -> Result<u64> {
        let listing = self.exec(&["iptables", "-L", "INPUT", "-v", "-x", "-n"])?;
        let needle = format!("dpt:{port} ");
        listing
            .lines()
            .find(|line| line.contains(&needle) || line.ends_with(&format!("dpt:{port}")))
            .and_then(|line| line.split_whitespace().next())
            .and_then(|packets| packets.parse().ok())
            .with_context(|| format!("no rule for port {port} in\n{listing}"))
    }

    /// `iptables -L INPUT -v -x -n`: the packets counted by the chain policy, from the header
    /// `Chain INPUT (policy DROP 3 packets, 180 bytes)`.
    fn policy_packets(&self) -> Result<u64> {
        let listing = self.exec(&["iptables", "-L", "INPUT", "-v", "-x", "-n"])?;
        listing
            .lines()
            .next()
            .and_then(|header| header.split_once("(policy "))
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|packets| packets.parse().ok())
            .with_context(|| format!("no policy count in\n{listing}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup of namespace {}: {e:#}", self.name);
        }
    }
}

/// `ATTEMPTS` connection attempts to 127.0.0.1:`port`, each given up after `ATTEMPT_WAIT`
/// (before the first SYN retransmit at 1 s; closing a SYN_SENT socket stops retransmits).
fn blocked_connects(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..ATTEMPTS {
        ensure!(
            Instant::now() < deadline,
            "connection attempts took too long"
        );
        match TcpStream::connect_timeout(&addr, ATTEMPT_WAIT) {
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {}
            Err(e) => bail!("connect to {addr}: expected a timeout (SYN dropped), got {e}"),
            Ok(_) => bail!("connect to {addr} succeeded although its SYNs are dropped"),
        }
    }
    Ok(())
}

fn find_port(rules: &[RuleCounter], port: u16) -> Option<&RuleCounter> {
    let dport = format!("dport {port}");
    rules
        .iter()
        .find(|r| r.text.contains(&format!("{dport} ")) || r.text.ends_with(&dport))
}

/// Asserts `attribution` names exactly the drop rule for `PORT_DROPPED`, with `truth` packets.
fn assert_names_rule_a(attribution: &Attribution, truth: u64, source: &str) {
    let Attribution { exact, candidates } = attribution;
    assert_eq!(
        exact.len(),
        1,
        "{source}: exactly one rule explains the drops: {attribution:#?}"
    );
    let named = &exact[0];
    assert!(
        find_port(std::slice::from_ref(&named.rule), PORT_DROPPED).is_some(),
        "{source}: the named rule is the one for port {PORT_DROPPED}: {named:#?}"
    );
    assert_eq!(
        named.delta, truth,
        "{source}: delta vs iptables' own counter"
    );
    assert_eq!(
        (
            named.rule.family.as_str(),
            named.rule.table.as_str(),
            named.rule.chain.as_str()
        ),
        ("ip", "filter", "INPUT"),
        "{source}"
    );
    assert_eq!(named.rule.verdict.as_deref(), Some("drop"), "{source}");
    assert_eq!(
        candidates.len(),
        1,
        "{source}: only rule A grew: {attribution:#?}"
    );
    assert!(
        candidates
            .iter()
            .all(|c| find_port(std::slice::from_ref(&c.rule), PORT_UNUSED).is_none()),
        "{source}: rule B is not named: {attribution:#?}"
    );
}

#[test]
fn the_rule_that_dropped_syns_is_named() -> Result<()> {
    if !can_run("the_rule_that_dropped_syns_is_named") {
        return Ok(());
    }
    let ns = Netns::new("rule")?;
    let (a, b) = (PORT_DROPPED.to_string(), PORT_UNUSED.to_string());
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &a, "--syn", "-j", "DROP",
    ])?;
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &b, "--syn", "-j", "DROP",
    ])?;

    let have_nft = tool_exists("nft");
    let have_save = tool_exists("iptables-save");
    let (before, after, before_save, after_save) = ns.run_in(|| {
        let before = netfilter::snapshot()?;
        let before_save = if have_save {
            Some(netfilter::snapshot_iptables_save()?)
        } else {
            None
        };
        blocked_connects(PORT_DROPPED)?;
        let after = netfilter::snapshot()?;
        let after_save = if have_save {
            Some(netfilter::snapshot_iptables_save()?)
        } else {
            None
        };
        Ok((before, after, before_save, after_save))
    })?;
    let truth = ns.rule_packets(PORT_DROPPED)?;
    assert_eq!(ns.rule_packets(PORT_UNUSED)?, 0);
    assert!(
        truth >= u64::from(ATTEMPTS),
        "each attempt sent a SYN: {truth} < {ATTEMPTS}"
    );

    // The snapshots read the namespace's ruleset (rule B is there, with no packets).
    let rule_b = find_port(&before, PORT_UNUSED).context("rule B in the snapshot")?;
    assert_eq!(rule_b.packets, 0);
    assert!(rule_b.drops());
    assert_eq!(find_port(&before, PORT_DROPPED).map(|r| r.packets), Some(0));
    let source = if have_nft {
        "nft -j list ruleset"
    } else {
        "iptables-save -c"
    };
    assert_names_rule_a(&attribute(&before, &after, truth), truth, source);

    if let (Some(before), Some(after)) = (before_save, after_save) {
        assert!(
            find_port(&before, PORT_UNUSED).is_some(),
            "rule B in iptables-save"
        );
        assert_names_rule_a(
            &attribute(&before, &after, truth),
            truth,
            "iptables-save -c",
        );
    }
    eprintln!("named the rule for port {PORT_DROPPED}: {truth} packets dropped");
    Ok(())
}

#[test]
fn a_drop_policy_is_named() -> Result<()> {
    if !can_run("a_drop_policy_is_named") {
        return Ok(());
    }
    let ns = Netns::new("policy")?;
    let b = PORT_UNUSED.to_string();
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &b, "--syn", "-j", "DROP",
    ])?;
    ns.exec(&["iptables", "-P", "INPUT", "DROP"])?;

    let have_nft = tool_exists("nft");
    let (before, after, nft_only) = ns.run_in(|| {
        let before = netfilter::snapshot()?;
        let nft_before = if have_nft {
            Some(netfilter::snapshot_nft()?)
        } else {
            None
        };
        blocked_connects(PORT_POLICY)?;
        let after = netfilter::snapshot()?;
        let nft_after = if have_nft {
            Some(netfilter::snapshot_nft()?)
        } else {
            None
        };
        Ok((before, after, nft_before.zip(nft_after)))
    })?;
    let truth = ns.policy_packets()?;
    assert!(
        truth >= u64::from(ATTEMPTS),
        "each attempt sent a SYN: {truth} < {ATTEMPTS}"
    );

    // With iptables-nft's policy count (merged in, or from iptables-save): an exact answer.
    let attribution = attribute(&before, &after, truth);
    assert_eq!(attribution.exact.len(), 1, "{attribution:#?}");
    let policy = &attribution.exact[0];
    assert!(policy.rule.is_chain_policy(), "{attribution:#?}");
    assert_eq!(
        (
            policy.rule.table.as_str(),
            policy.rule.chain.as_str(),
            policy.delta
        ),
        ("filter", "INPUT", truth)
    );
    assert_eq!(
        attribution.candidates.len(),
        1,
        "rule B did not grow: {attribution:#?}"
    );

    // nft's JSON alone has no policy count: the policy is inferred as the only candidate.
    if let Some((before, after)) = nft_only {
        let attribution = attribute(&before, &after, truth);
        assert!(attribution.exact.is_empty(), "{attribution:#?}");
        assert_eq!(attribution.candidates.len(), 1, "{attribution:#?}");
        let inferred = &attribution.candidates[0];
        assert!(inferred.rule.is_chain_policy());
        assert_eq!(
            (inferred.rule.chain.as_str(), inferred.delta),
            ("INPUT", truth)
        );
    }
    Ok(())
}
