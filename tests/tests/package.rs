//! The Debian package (`cargo xtask package`): installed on this machine with `dpkg -i`, its
//! binary checked and run from where it is installed, its unit verified, then purged, and
//! nothing of it left behind.
//!
//! Takes the package from `OBSERVER_DEB`, else builds it (`cargo xtask package`, a release
//! build). Needs root (skips visibly otherwise; fails with OBSERVER_REQUIRE_KERNEL_TESTS=1), and
//! skips, saying why, when observer is already installed here (by the package or by hand): the
//! test never touches an install it did not make. A guard purges the package whatever happens.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use observer_tests::{kernel_test, note, require_tool, run_checked, run_with_timeout};
use serde_json::Value;

const PACKAGE: &str = "observer";
const BIN: &str = "/usr/bin/observer";
const UNIT: &str = "/lib/systemd/system/observer.service";
const CONFIG_DIR: &str = "/etc/observer";
const CONFIG: &str = "/etc/observer/observer.toml";
const LOG_DIR: &str = "/var/log/observer";
const DPKG_TIMEOUT: Duration = Duration::from_secs(180);
/// A release build from scratch on a loaded two-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// What `dpkg-query` says of the package: `install ok installed`, `deinstall ok config-files`,
/// ... or None when dpkg knows nothing of it.
fn package_status() -> Result<Option<String>> {
    let (status, stdout, _) = run_with_timeout(
        Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]),
        Duration::from_secs(30),
    )?;
    let stdout = stdout.trim();
    Ok(
        (status.success() && !stdout.is_empty() && !stdout.ends_with("not-installed"))
            .then(|| stdout.to_owned()),
    )
}

/// Purges the package on drop if it is (even partly) installed: the machine is left as the
/// test found it, whichever step failed.
struct Installed;

impl Installed {
    fn purge() -> Result<String> {
        run_checked(
            Command::new("dpkg").args(["--purge", PACKAGE]),
            DPKG_TIMEOUT,
        )
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if package_status().ok().flatten().is_some()
            && let Err(e) = Installed::purge()
        {
            eprintln!("package test: cleaning up, `dpkg --purge {PACKAGE}` failed: {e:#}");
        }
    }
}

/// `OBSERVER_DEB`, else `cargo xtask package` (its last stdout line is the package's path).
fn the_deb() -> Result<PathBuf> {
    if let Some(deb) = std::env::var_os("OBSERVER_DEB") {
        let deb = PathBuf::from(deb);
        ensure!(
            deb.is_file(),
            "OBSERVER_DEB={} is not a file",
            deb.display()
        );
        return Ok(deb);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    note("package test: building the package (`cargo xtask package`; set OBSERVER_DEB to skip)");
    let stdout = run_checked(
        Command::new(cargo)
            .args(["xtask", "package"])
            .current_dir(&root)
            .env_remove("CARGO_MANIFEST_DIR"),
        BUILD_TIMEOUT,
    )?;
    let deb = PathBuf::from(
        stdout
            .lines()
            .last()
            .context("cargo xtask package printed nothing")?
            .trim(),
    );
    ensure!(
        deb.is_file() && deb.extension().is_some_and(|e| e == "deb"),
        "cargo xtask package printed `{}`, not a package",
        deb.display()
    );
    Ok(deb)
}

/// A field of the package's control file.
fn control_field(deb: &Path, field: &str) -> Result<String> {
    Ok(run_checked(
        Command::new("dpkg-deb").arg("--field").arg(deb).arg(field),
        Duration::from_secs(30),
    )?
    .trim()
    .to_owned())
}

/// Why the test must not run here, if it must not: observer installed already.
fn already_installed() -> Result<Option<String>> {
    if let Some(status) = package_status()? {
        return Ok(Some(format!(
            "the `{PACKAGE}` package is on this machine ({status}); the test installs and purges \
             it, so it leaves it alone (`dpkg --purge {PACKAGE}` to run this test)"
        )));
    }
    for path in [BIN, UNIT, CONFIG_DIR, LOG_DIR] {
        if Path::new(path).exists() {
            return Ok(Some(format!(
                "{path} exists (observer installed by hand?); the package would replace it and \
                 its purge remove it, so the test does not run"
            )));
        }
    }
    Ok(None)
}

/// The `observer` user and group entries (`getent`), if any.
fn accounts() -> Result<Vec<String>> {
    let mut found = Vec::new();
    for database in ["passwd", "group"] {
        let (status, entry, _) = run_with_timeout(
            Command::new("getent").args([database, PACKAGE]),
            Duration::from_secs(10),
        )?;
        if status.success() {
            found.push(entry.trim().to_owned());
        }
    }
    Ok(found)
}

#[test]
fn the_package_installs_runs_and_purges_cleanly() -> Result<()> {
    let Some(t) = kernel_test("the_package_installs_runs_and_purges_cleanly") else {
        return Ok(());
    };
    for (tool, package) in [("dpkg-deb", "dpkg"), ("systemd-analyze", "systemd")] {
        if !require_tool(&t.name, tool, package) {
            return Ok(());
        }
    }
    if let Some(why) = already_installed()? {
        eprintln!("SKIPPED {}: {why}", t.name);
        return Ok(());
    }
    let deb = the_deb()?;
    let accounts_before = accounts()?;

    // The control file: the runtime's needs only, the build toolchain nowhere.
    let depends = control_field(&deb, "Depends")?;
    let recommends = control_field(&deb, "Recommends")?;
    ensure!(depends.contains("libc6"), "Depends: {depends}");
    for toolchain in [
        "llvm",
        "clang",
        "rust",
        "cargo",
        "bpf-linker",
        "libzstd",
        "zlib",
    ] {
        ensure!(
            !depends.contains(toolchain) && !recommends.contains(toolchain),
            "the build toolchain ({toolchain}) in Depends: {depends} / Recommends: {recommends}"
        );
    }
    ensure!(
        recommends.contains("nftables") && recommends.contains("iptables"),
        "Recommends: {recommends}"
    );

    let guard = Installed;
    run_checked(Command::new("dpkg").arg("-i").arg(&deb), DPKG_TIMEOUT)?;
    ensure!(
        package_status()?.as_deref() == Some("install ok installed"),
        "after dpkg -i: {:?}",
        package_status()?
    );
    let listed = run_checked(
        Command::new("dpkg").args(["-L", PACKAGE]),
        Duration::from_secs(30),
    )?;
    let files: Vec<PathBuf> = listed
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    for expected in [
        BIN,
        UNIT,
        CONFIG,
        "/usr/share/man/man1/observer.1.gz",
        "/usr/share/man/man1/observer-run.1.gz",
        "/usr/share/bash-completion/completions/observer",
        "/usr/share/zsh/vendor-completions/_observer",
        "/usr/share/fish/vendor_completions.d/observer.fish",
        "/usr/share/doc/observer/copyright",
        "/usr/share/doc/observer/README.md",
        "/usr/share/doc/observer/docs/metrics.md",
    ] {
        ensure!(
            files.iter().any(|f| f == Path::new(expected)),
            "{expected} not installed; dpkg -L:\n{listed}"
        );
    }
    let conffiles = run_checked(
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]),
        Duration::from_secs(30),
    )?;
    ensure!(conffiles.contains(CONFIG), "conffiles: {conffiles}");
    // Every installed file matches the package's md5sums.
    let verify = run_checked(
        Command::new("dpkg").args(["--verify", PACKAGE]),
        Duration::from_secs(60),
    )?;
    ensure!(verify.trim().is_empty(), "dpkg --verify: {verify}");

    // The unit runs the installed binary, and systemd accepts it.
    let unit = std::fs::read_to_string(UNIT)?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("no ExecStart= in the installed unit")?;
    ensure!(
        exec.split_whitespace().next() == Some(BIN),
        "ExecStart={exec}"
    );
    let (status, stdout, stderr) = run_with_timeout(
        Command::new("systemd-analyze").args(["verify", UNIT]),
        Duration::from_secs(60),
    )?;
    let about_us: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains("observer.service"))
        .collect();
    ensure!(
        status.success() && about_us.is_empty(),
        "systemd-analyze verify {UNIT}: {status}\n{stderr}{stdout}"
    );

    // The man page documents the flags; the bash completion loads.
    let man = run_checked(
        Command::new("gzip").args(["-dc", "/usr/share/man/man1/observer-run.1.gz"]),
        Duration::from_secs(10),
    )?;
    ensure!(man.contains("metrics"), "observer-run.1 without --metrics");
    let complete = run_checked(
        Command::new("bash").args([
            "-c",
            "source /usr/share/bash-completion/completions/observer && complete -p observer",
        ]),
        Duration::from_secs(10),
    )?;
    ensure!(complete.contains("observer"), "complete -p: {complete}");

    // The installed binary: `observer check`, then a 3 s run with the packaged configuration
    // (its output pointed at stdout, where the test reads it).
    let (status, check, stderr) = run_with_timeout(
        Command::new(BIN).arg("check").current_dir("/"),
        Duration::from_secs(60),
    )?;
    let failed: Vec<&str> = check.lines().filter(|l| l.contains(" FAIL ")).collect();
    ensure!(
        matches!(status.code(), Some(0 | 1)) && failed.is_empty(),
        "installed observer check: {status}\n{check}{stderr}"
    );
    note(&format!("package: installed `observer check`:\n{check}"));
    let (status, stdout, stderr) = run_with_timeout(
        Command::new(BIN)
            .args(["run", "--duration", "3", "--output", "stdout"])
            .current_dir("/"),
        Duration::from_secs(60),
    )?;
    ensure!(
        status.success(),
        "installed observer run: {status}\n{stderr}"
    );
    ensure!(
        stderr.contains(&format!("using configuration {CONFIG}")),
        "the packaged configuration was not read: {stderr}"
    );
    let records: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("non-JSON output:\n{stdout}"))?;
    let types: Vec<&str> = records.iter().filter_map(|r| r["type"].as_str()).collect();
    ensure!(
        types.first() == Some(&"start") && types.last() == Some(&"stop"),
        "records: {types:?}\nstderr:\n{stderr}"
    );

    // Purge: nothing of the package is left.
    Installed::purge()?;
    drop(guard);
    ensure!(
        package_status()?.is_none(),
        "after purge: {:?}",
        package_status()?
    );
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    ensure!(left.is_empty(), "left after purge: {left:?}");
    for path in [BIN, UNIT, CONFIG_DIR, LOG_DIR] {
        ensure!(!Path::new(path).exists(), "{path} left after purge");
    }
    if Path::new("/etc/systemd/system/multi-user.target.wants/observer.service").exists() {
        bail!("the unit's enable link is left after purge");
    }
    // The package runs as root and creates no user or group: none is left either.
    ensure!(
        accounts()? == accounts_before,
        "user or group entries changed: {accounts_before:?} before, {:?} after",
        accounts()?
    );
    note(&format!(
        "package: {} installed {} files, ran, purged; Depends: {depends}",
        deb.display(),
        files.len()
    ));
    Ok(())
}
