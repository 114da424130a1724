//! `observer generate`: the man pages and shell completions, made from the command line's own
//! clap definitions so that they never drift from it. Hidden: packagers run it
//! (`cargo xtask package` does), operators read its output.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory as _, Subcommand};
use clap_complete::Shell;

use crate::cli::Cli;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Man pages: observer.1 and one per command (observer-run.1, ...), in roff.
    Man {
        /// Directory to write them into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// The completion script for SHELL (bash: observer.bash, zsh: _observer, fish:
    /// observer.fish, ...).
    Completions {
        #[arg(value_enum)]
        shell: Shell,
        /// Directory to write it into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub fn main(args: &GenerateArgs) -> ExitCode {
    match generate(&args.what) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("observer: generate: {e}");
            ExitCode::from(1)
        }
    }
}

/// Writes the files; returns their paths.
fn generate(what: &What) -> std::io::Result<Vec<PathBuf>> {
    let with_dir = |e: std::io::Error, dir: &Path| {
        std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()))
    };
    match what {
        What::Man { out } => {
            std::fs::create_dir_all(out).map_err(|e| with_dir(e, out))?;
            clap_mangen::generate_to(Cli::command(), out).map_err(|e| with_dir(e, out))?;
            let mut pages: Vec<PathBuf> = std::fs::read_dir(out)
                .map_err(|e| with_dir(e, out))?
                .filter_map(|entry| Some(entry.ok()?.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "1"))
                .collect();
            pages.sort();
            Ok(pages)
        }
        What::Completions { shell, out } => {
            std::fs::create_dir_all(out).map_err(|e| with_dir(e, out))?;
            let mut cmd = Cli::command();
            let file = clap_complete::generate_to(*shell, &mut cmd, "observer", out)
                .map_err(|e| with_dir(e, out))?;
            Ok(vec![file])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("observer-generate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn man_pages_cover_every_visible_command() {
        let dir = temp_dir("man");
        let pages = generate(&What::Man { out: dir.clone() }).expect("generated");
        let names: Vec<String> = pages
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect();
        for page in [
            "observer.1",
            "observer-run.1",
            "observer-check.1",
            "observer-top.1",
            "observer-explain.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} missing: {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("generate")),
            "the hidden command has no page: {names:?}"
        );
        let run = std::fs::read_to_string(dir.join("observer-run.1")).expect("readable");
        assert!(
            run.starts_with(".ie"),
            "roff: {}",
            &run[..run.len().min(80)]
        );
        assert!(run.contains("metrics"), "the flags are documented");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_are_written_per_shell() {
        let dir = temp_dir("completions");
        for (shell, file) in [
            (Shell::Bash, "observer.bash"),
            (Shell::Zsh, "_observer"),
            (Shell::Fish, "observer.fish"),
        ] {
            let files = generate(&What::Completions {
                shell,
                out: dir.clone(),
            })
            .expect("generated");
            assert_eq!(files, [dir.join(file)]);
            let text = std::fs::read_to_string(dir.join(file)).expect("readable");
            assert!(text.contains("export-per-flow"), "{shell}: flags of run");
            // clap_complete offers hidden commands too (`generate`): harmless, not asserted.
            assert!(text.contains("reasons"), "{shell}: the commands");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
