//! Running commands: each is printed to stderr before it runs, and a failure carries the child's
//! exit code back to `main`.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result};

/// A child command ran and did not succeed.
#[derive(Debug)]
pub struct CommandFailed {
    command: String,
    status: ExitStatus,
}

impl CommandFailed {
    /// The code for xtask to exit with: the child's, or 128+signal, never 0.
    pub fn exit_code(&self) -> u8 {
        let code = match (self.status.code(), self.status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        };
        u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1)
    }
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command failed ({}): {}", self.status, self.command)
    }
}

impl std::error::Error for CommandFailed {}

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.join(".."), Path::to_path_buf)
}

/// Cargo's target directory (CARGO_TARGET_DIR if set, else `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cargo").join("bin"))
}

/// PATH for the children: the current one with cargo's bin directory added when missing (so
/// that a freshly installed bpf-linker is found by aya-build).
pub fn child_path() -> OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

/// Finds an executable on the children's PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&child_path())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A command that runs in the workspace root with the children's PATH.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(workspace_root())
        .env("PATH", child_path());
    command
}

/// `cargo` through rustup's proxy, so that `+nightly` works.
pub fn cargo() -> Command {
    let mut command = command("cargo");
    // Set by the cargo that runs xtask; a child cargo must not inherit them.
    for var in [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    command
}

/// How a command looks when printed: env assignments it sets (PATH aside), program, arguments.
pub fn display(command: &Command) -> String {
    let mut words: Vec<String> = Vec::new();
    for (key, value) in command.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            words.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    words.push(quote(command.get_program()));
    words.extend(command.get_args().map(quote));
    words.join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%^".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Prints the command, runs it with inherited stdio, and fails with its exit code.
pub fn run(command: &mut Command) -> Result<()> {
    let shown = display(command);
    eprintln!("+ {shown}");
    let status = command
        .status()
        .with_context(|| format!("could not start: {shown}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailed {
            command: shown,
            status,
        }
        .into())
    }
}

/// Runs a check quietly: its stdout when it started and succeeded, else None.
pub fn probe(command: &mut Command) -> Option<String> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether this process runs with effective uid 0 (read from /proc/self/status).
pub fn is_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsStr, os::unix::process::ExitStatusExt, process::ExitStatus};

    use super::{CommandFailed, cargo, display, quote};

    #[test]
    fn commands_print_as_shell_words() {
        assert_eq!(quote(OsStr::new("build-std=core")), "build-std=core");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
        let mut command = cargo();
        command
            .args(["test", "--workspace"])
            .env("OBSERVER_BIN", "/x y/observer");
        assert_eq!(
            display(&command),
            "OBSERVER_BIN='/x y/observer' cargo test --workspace"
        );
    }

    #[test]
    fn exit_codes_pass_through_and_are_never_zero() {
        let failed = |raw| CommandFailed {
            command: String::new(),
            status: ExitStatus::from_raw(raw),
        };
        assert_eq!(failed(101 << 8).exit_code(), 101);
        assert_eq!(failed(2).exit_code(), 130); // killed by SIGINT
        assert_eq!(failed(256 << 8).exit_code(), 1); // code 0 after truncation: still a failure
    }
}
