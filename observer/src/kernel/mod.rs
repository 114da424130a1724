//! Everything that touches the running kernel's specifics: tracefs formats, BTF offsets, and
//! loading/attaching the programs. Discovered once at start-up and handed on as plain data.
pub mod btf;
pub mod tracefs;
pub mod loader;
