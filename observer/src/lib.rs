//! observer: a kernel-level TCP observer.
//!
//! Data flows one way: `kernel` (load programs, discover layouts) -> `decode` (perf samples to
//! events) -> `enrich` (sysctls) -> aggregation -> `sink` (JSON lines). `daemon` wires the stages
//! together; `cli` is the command line.
pub mod aggregate;
pub mod analysis;
pub mod cause;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod context;
pub mod daemon;
pub mod decode;
pub mod enrich;
pub mod explain;
pub mod generate;
pub mod kernel;
pub mod metrics;
pub mod notify;
pub mod privileges;
#[cfg(test)]
pub(crate) mod prop_support;
pub mod reconcile;
pub mod record;
pub mod services;
pub mod sink;
pub mod top;
