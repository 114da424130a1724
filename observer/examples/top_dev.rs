//! Development driver for `observer top` and the record socket, usable before (and besides)
//! the `observer top` subcommand and `observer run --socket`:
//!
//! ```sh
//! cargo build -p observer --examples
//! sudo target/debug/examples/top_dev top [--connect PATH] [--interval SECS] ...
//! sudo target/debug/examples/top_dev serve --socket PATH [--duration SECS]
//! ```
//!
//! `serve` runs the daemon as `observer run` does, its records going to the socket only
//! (stdout stays quiet), until SIGINT/SIGTERM or `--duration`.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use observer::{
    daemon,
    sink::socket::{DEFAULT_SOCKET_PATH, SocketBroadcaster, SocketOptions, Tee},
    top::{self, TopArgs},
};

#[derive(Debug, Parser)]
enum Dev {
    /// `observer top`.
    Top(TopArgs),
    /// `observer run` serving its records on a unix socket only.
    Serve {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
        /// Group allowed to connect (name or id).
        #[arg(long, value_name = "GROUP")]
        socket_group: Option<String>,
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
    },
}

fn main() -> ExitCode {
    match Dev::parse() {
        Dev::Top(args) => top::main(args),
        Dev::Serve {
            socket,
            socket_group,
            duration,
        } => serve(socket, socket_group, duration),
    }
}

fn serve(path: PathBuf, group: Option<String>, duration: Option<f64>) -> ExitCode {
    let mut options = match TopArgs::default().run_options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("top_dev: {e}");
            return ExitCode::from(2);
        }
    };
    options.duration = duration.map(Duration::from_secs_f64);
    let socket_options = match group {
        Some(group) => match SocketOptions::new(&path).with_group(&group) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("top_dev: {e}");
                return ExitCode::from(2);
            }
        },
        None => SocketOptions::new(&path),
    };
    let socket = match SocketBroadcaster::bind(socket_options) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("top_dev: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!("top_dev: serving records on {}", path.display());
    let writer = Tee::new(std::io::sink(), socket);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("top_dev: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(daemon::run(options, writer)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("top_dev: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
