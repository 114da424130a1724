//! Sinks: where records go.
pub mod json;
