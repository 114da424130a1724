//! Sinks: where records go.
pub mod file;
pub mod hangup;
pub mod json;
pub mod socket;
