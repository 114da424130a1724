//! `observer explain [FILE|-]`: a recorded stream (what `observer run` wrote) as a one-page
//! incident report in plain text (docs/explain.md).
//!
//! A pure core: [`model`] reads the lines into a [`model::Report`] (the anomalies through
//! their lives with the cause they ended up with, sysctl changes and their effects, the worst
//! peers, listeners, rules and stale processes, the totals), [`render`] writes it at most 100
//! columns wide. Only [`main`] touches files.
pub mod model;
pub mod render;
#[cfg(test)]
mod tests;

use std::{
    io::{BufRead, BufReader, Read, Write as _},
    path::PathBuf,
    process::ExitCode,
};

/// Options of `observer explain`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct ExplainArgs {
    /// The recorded stream (JSON lines, as `observer run` writes them); `-` or none reads
    /// standard input.
    #[arg(value_name = "FILE|-")]
    pub file: Option<PathBuf>,
}

/// Reads the stream from `input` line by line (any size; invalid UTF-8 is a line not
/// understood, not an error).
pub fn report_from(input: impl Read) -> std::io::Result<model::Report> {
    let mut reader = BufReader::new(input);
    let mut builder = model::ReportBuilder::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        builder.line(&line);
    }
    Ok(builder.finish())
}

/// Runs `observer explain`: 0 with a report, 2 when the file cannot be read.
pub fn main(args: &ExplainArgs) -> ExitCode {
    let (name, result) = match args.file.as_deref() {
        None => (
            "standard input".to_owned(),
            report_from(std::io::stdin().lock()),
        ),
        Some(path) if path.as_os_str() == "-" => (
            "standard input".to_owned(),
            report_from(std::io::stdin().lock()),
        ),
        Some(path) => {
            let name = path.display().to_string();
            match std::fs::File::open(path) {
                Ok(file) => (name, report_from(file)),
                Err(e) => {
                    eprintln!("observer: cannot open {name}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    match result {
        Ok(report) => {
            let mut stdout = std::io::stdout().lock();
            // A reader that went away (`| head`) is no error of ours.
            let _ = stdout.write_all(render::render(&report).as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("observer: cannot read {name}: {e}");
            ExitCode::from(2)
        }
    }
}
