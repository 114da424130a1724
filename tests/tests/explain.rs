//! `observer explain` on recorded streams (kernel-free): the built binary reads a fixture, a
//! file that does not exist, and standard input.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Result, ensure};
use observer_tests::{observer_bin, run_with_timeout};

const TIMEOUT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../observer/tests/fixtures/explain")
        .join(name)
}

#[test]
fn explain_reports_a_recorded_incident() -> Result<()> {
    let bin = observer_bin();
    ensure!(
        bin.exists(),
        "{} is not built (cargo build -p observer)",
        bin.display()
    );
    let (status, stdout, stderr) = run_with_timeout(
        Command::new(&bin)
            .arg("explain")
            .arg(fixture("netfilter.ndjson")),
        TIMEOUT,
    )?;
    ensure!(status.success(), "exit {status}: {stderr}");
    for wanted in [
        "observer incident report",
        "host web-1 · kernel 6.18.44",
        "03:40:03 WARN peer_retransmit_spike · peer 10.200.1.2 · netns client",
        "cause (netfilter_rule, known 1s after it opened): firewall rule `tcp dport 5001",
        "10.200.1.2 (netns client): 430 retransmitted segments",
        "retransmit: 380 events, 430 counted, 380 exported, 380 written",
    ] {
        ensure!(stdout.contains(wanted), "missing `{wanted}`:\n{stdout}");
    }
    ensure!(
        stdout.lines().all(|l| l.chars().count() <= 100),
        "a line is wider than 100 columns:\n{stdout}"
    );
    Ok(())
}

#[test]
fn explain_of_a_missing_file_exits_2_with_a_message() -> Result<()> {
    let bin = observer_bin();
    ensure!(
        bin.exists(),
        "{} is not built (cargo build -p observer)",
        bin.display()
    );
    let (status, stdout, stderr) = run_with_timeout(
        Command::new(&bin).args(["explain", "/nonexistent/observer.ndjson"]),
        TIMEOUT,
    )?;
    ensure!(status.code() == Some(2), "exit {status}, stdout {stdout}");
    ensure!(
        stderr.contains("cannot open /nonexistent/observer.ndjson"),
        "stderr: {stderr}"
    );
    ensure!(stdout.is_empty(), "stdout: {stdout}");
    Ok(())
}

#[test]
fn explain_reads_standard_input() -> Result<()> {
    let bin = observer_bin();
    ensure!(
        bin.exists(),
        "{} is not built (cargo build -p observer)",
        bin.display()
    );
    // `-`: a pipe of one line that is no record.
    let script = format!("printf 'garbage\\n' | '{}' explain -", bin.display());
    let (status, stdout, stderr) =
        run_with_timeout(Command::new("sh").args(["-c", &script]), TIMEOUT)?;
    ensure!(status.success(), "exit {status}: {stderr}");
    ensure!(stdout.contains("1 line not understood"), "{stdout}");
    ensure!(stdout.contains("Nothing was recorded"), "{stdout}");
    // No argument: standard input too (here empty).
    let (status, stdout, stderr) = run_with_timeout(Command::new(&bin).arg("explain"), TIMEOUT)?;
    ensure!(status.success(), "exit {status}: {stderr}");
    ensure!(stdout.contains("0 lines\n"), "{stdout}");
    ensure!(stdout.contains("Nothing was recorded"), "{stdout}");
    Ok(())
}
