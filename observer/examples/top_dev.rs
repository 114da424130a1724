//! Development driver for `observer top` and the record socket, usable before (and besides)
//! the `observer top` subcommand and `observer run --socket`:
//!
//! ```sh
//! cargo build -p observer --examples
//! sudo target/debug/examples/top_dev top [--connect PATH] [--interval SECS] ...
//! sudo target/debug/examples/top_dev serve --socket PATH [--duration SECS]
//! target/debug/examples/top_dev panic-check
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
    /// Takes the terminal as top does, draws an empty screen, then panics: the panic hook must
    /// give the terminal back (the e2e tests check it).
    PanicCheck,
    /// `observer run` serving its records on a unix socket only.
    Serve {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
        /// Group allowed to connect (name or id).
        #[arg(long, value_name = "GROUP")]
        socket_group: Option<String>,
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// As for `observer run`.
        #[arg(long, value_name = "N")]
        export_per_flow: Option<u32>,
        /// As for `observer run`.
        #[arg(long, value_name = "N")]
        export_per_cpu: Option<u32>,
    },
}

fn main() -> ExitCode {
    match Dev::parse() {
        Dev::Top(args) => top::main(args),
        Dev::PanicCheck => panic_check(),
        Dev::Serve {
            socket,
            socket_group,
            duration,
            export_per_flow,
            export_per_cpu,
        } => {
            let args = TopArgs {
                export_per_flow,
                export_per_cpu,
                ..TopArgs::default()
            };
            serve(&args, socket, socket_group, duration)
        }
    }
}

fn panic_check() -> ExitCode {
    let mut app = match top::app::App::new(0, None, "panic-check", Default::default()) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("top_dev: {e}");
            return ExitCode::from(1);
        }
    };
    let mut terminal = match top::terminal::Terminal::enter() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("top_dev: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = terminal.draw(&mut app) {
        eprintln!("top_dev: {e}");
        return ExitCode::from(1);
    }
    std::thread::sleep(Duration::from_millis(1500));
    panic!("top_dev: a deliberate panic, to check that the terminal is restored");
}

fn serve(args: &TopArgs, path: PathBuf, group: Option<String>, duration: Option<f64>) -> ExitCode {
    let mut options = match args.run_options() {
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
