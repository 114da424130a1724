//! build, run, test and lint.

use std::os::unix::process::CommandExt;

use anyhow::{Context, Result, bail};

use crate::{
    cmd::{self, cargo, command, display, find_program, is_root, run},
    setup::setup,
};

/// The eBPF crate: built for the BPF target by aya-build (observer/build.rs), never for the host.
const EBPF_CRATE: &str = "observer-ebpf";

pub fn build() -> Result<()> {
    setup()?;
    build_release()
}

pub fn build_release() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "observer"]))
}

/// Builds, then replaces this process with `observer run ARGS...` (through `sudo -E` when not
/// root), so that Ctrl-C and the exit code belong to observer alone.
pub fn run_observer(args: &[String]) -> Result<()> {
    setup()?;
    build_release()?;
    let observer = cmd::target_dir().join("release").join("observer");
    let mut exec = if is_root() {
        command(&observer)
    } else {
        let Some(sudo) = find_program("sudo") else {
            bail!(
                "observer needs root to load its eBPF programs, and sudo is not installed: \
                 run `cargo xtask run` as root, or run `{}` as root",
                observer.display()
            );
        };
        eprintln!("xtask: observer needs root to load its eBPF programs; running it through sudo");
        let mut sudo = command(sudo);
        sudo.arg("-E").arg(&observer);
        sudo
    };
    exec.arg("run").args(args);
    eprintln!("+ exec {}", display(&exec));
    let err = exec.exec();
    Err(err).with_context(|| format!("could not exec {}", display(&exec)))
}

/// Lint, build, test. A lint failure does not stop the tests (both results are worth seeing in
/// one CI run), but it still fails the command.
pub fn test(with_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    setup()?;
    let lint = if with_lint { lint_steps() } else { Ok(()) };
    let tests = build_and_test(cargo_test_args);
    match (lint, tests) {
        (Ok(()), tests) => tests,
        (Err(lint), Ok(())) => Err(lint.context("tests passed, but lint failed")),
        (Err(lint), Err(tests)) => {
            eprintln!("xtask: {lint:#}");
            Err(tests.context("lint failed, and so did the tests"))
        }
    }
}

fn build_and_test(cargo_test_args: &[String]) -> Result<()> {
    run(cargo().args(["build", "-p", "observer"]))?;
    let observer = cmd::target_dir().join("debug").join("observer");
    let mut test = cargo();
    test.args([
        "test",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--no-fail-fast",
    ])
    .args(cargo_test_args)
    .env("OBSERVER_BIN", &observer);
    if is_root() {
        // As root the kernel tests can run: make them fail rather than skip.
        test.env("OBSERVER_REQUIRE_KERNEL_TESTS", "1");
    } else {
        eprintln!(
            "xtask: not root: kernel integration tests will skip (run as root to include them)"
        );
    }
    run(&mut test)
}

pub fn lint() -> Result<()> {
    setup()?;
    lint_steps()
}

fn lint_steps() -> Result<()> {
    let mut failed = Vec::new();
    let mut steps = [
        ("rustfmt", cargo_args(&["fmt", "--all", "--", "--check"])),
        (
            "clippy (host crates)",
            cargo_args(&[
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        (
            "clippy (eBPF crate, BPF target)",
            cargo_args(&[
                "+nightly",
                "clippy",
                "-p",
                EBPF_CRATE,
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
        ),
    ];
    for (name, step) in &mut steps {
        if let Err(err) = run(step) {
            eprintln!("xtask: lint step failed: {name}: {err:#}");
            failed.push(*name);
        }
    }
    if failed.is_empty() {
        eprintln!("xtask: lint passed");
        Ok(())
    } else {
        bail!("lint failed: {}", failed.join(", "))
    }
}

fn cargo_args(args: &[&str]) -> std::process::Command {
    let mut command = cargo();
    command.args(args);
    command
}
