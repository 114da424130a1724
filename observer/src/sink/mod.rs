//! Sinks: where records go.
pub mod file;
pub mod json;
pub mod socket;
