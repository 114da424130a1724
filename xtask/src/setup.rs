//! `cargo xtask setup`: installs what building observer needs, checking each step first so that
//! a second run installs nothing and takes seconds.

use std::process::Stdio;

use anyhow::{Result, bail};

use crate::cmd::{self, cargo, command, find_program, is_root, probe, run};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the integration tests and demos use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iptables",
    "nftables",
    "iproute2",
    "bpftool",
    "tmux",
    // systemd-analyze, to verify the packaged unit file in the tests.
    "systemd",
    // promtool (`promtool check metrics`) and syslog-ng, for tests/tests/outputs.rs.
    "prometheus",
    "syslog-ng-core",
    // `cargo xtask package`: dpkg-shlibdeps (the package's Depends), strip.
    "dpkg-dev",
    "binutils",
    // The web workload of `cargo xtask bench`: nginx, wrk, and libbpf-tools' tcpstates beside it.
    "nginx-light",
    "wrk",
    "libbpf-tools",
];

/// The nightly toolchain builds the eBPF crate (`-Z build-std=core`); clippy lints it.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn say(message: &str) {
    eprintln!("setup: {message}");
}

pub fn setup() -> Result<()> {
    apt_packages()?;
    stable_components()?;
    nightly_toolchain()?;
    bpf_linker()?;
    say("done: everything is installed");
    Ok(())
}

fn apt_packages() -> Result<()> {
    if find_program("dpkg-query").is_none() {
        bail!(
            "dpkg-query not found: `cargo xtask setup` supports Debian/Ubuntu only. \
             Install by hand the equivalents of: {}",
            APT_PACKAGES.join(" ")
        );
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            let status = probe(command("dpkg-query").args(["-W", "-f=${Status}", package]));
            !status.is_some_and(|s| s.trim_end().ends_with("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        say(&format!(
            "apt packages: all {} installed ({})",
            APT_PACKAGES.len(),
            APT_PACKAGES.join(" ")
        ));
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "apt packages missing: {list}. Installing them needs root: run \
             `sudo apt-get update && sudo apt-get install -y {list}` (or run `cargo xtask setup` \
             as root), then run this command again"
        );
    }
    say(&format!("apt packages: installing {list}"));
    run(command("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null()))?;
    run(command("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null()))
}

fn require_rustup() -> Result<()> {
    if find_program("rustup").is_none() {
        bail!(
            "rustup not found: observer's eBPF programs need a nightly toolchain with rust-src, \
             managed by rustup. Install rustup (https://rustup.rs), then run `cargo xtask setup` again"
        );
    }
    Ok(())
}

/// rustfmt and clippy for the toolchain that runs xtask (`cargo xtask lint` uses them).
fn stable_components() -> Result<()> {
    let missing: Vec<&str> = [("rustfmt", "fmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(_, sub)| probe(cargo().args([sub, "--version"])).is_none())
        .map(|(component, _)| component)
        .collect();
    if missing.is_empty() {
        say("default toolchain: rustfmt and clippy installed");
        return Ok(());
    }
    require_rustup()?;
    say(&format!("default toolchain: adding {}", missing.join(" ")));
    run(command("rustup").args(["component", "add"]).args(&missing))
}

fn nightly_toolchain() -> Result<()> {
    require_rustup()?;
    let installed = probe(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    let Some(installed) = installed else {
        say(
            "nightly toolchain: not installed; installing it (minimal profile) with rust-src and clippy",
        );
        let mut install = command("rustup");
        install.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
        for component in NIGHTLY_COMPONENTS {
            install.args(["--component", component]);
        }
        return run(&mut install);
    };
    // Lines look like `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|component| {
            !installed.lines().any(|line| {
                let line = line.trim();
                line == *component
                    || line
                        .strip_prefix(component)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
        })
        .collect();
    if missing.is_empty() {
        say("nightly toolchain: installed, with rust-src and clippy");
        return Ok(());
    }
    say(&format!("nightly toolchain: adding {}", missing.join(" ")));
    run(command("rustup")
        .args(["component", "add", "--toolchain", "nightly"])
        .args(&missing))
}

fn bpf_linker() -> Result<()> {
    let version = probe(command("bpf-linker").arg("--version"));
    if let Some(version) = &version
        && version.contains(BPF_LINKER_VERSION)
    {
        say(&format!("bpf-linker: {} installed", version.trim()));
        return Ok(());
    }
    let llvm_config = format!("{LLVM_PREFIX}/bin/llvm-config");
    if !std::path::Path::new(&llvm_config).exists() {
        bail!("{llvm_config} not found: bpf-linker needs LLVM 22 (apt package llvm-22-dev)");
    }
    match &version {
        Some(other) => say(&format!(
            "bpf-linker: found {}, want {BPF_LINKER_VERSION}; installing it (about 2 minutes)",
            other.trim()
        )),
        None => say(&format!(
            "bpf-linker: not found; installing {BPF_LINKER_VERSION} (about 2 minutes)"
        )),
    }
    // Without LLVM_PREFIX its build finds /usr/bin/llvm-config (LLVM 14) and fails to link.
    let mut install = cargo();
    install
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX);
    if version.is_some() {
        install.arg("--force");
    }
    run(&mut install)?;
    if probe(command("bpf-linker").arg("--version")).is_none_or(|v| !v.contains(BPF_LINKER_VERSION))
    {
        let dir = cmd::cargo_bin_dir().map_or_else(
            || "cargo's bin directory".to_owned(),
            |d| d.display().to_string(),
        );
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but is not the one found on PATH: \
             put {dir} first on PATH"
        );
    }
    Ok(())
}
