//! Enrichment: context the kernel events do not carry themselves (sysctls, later counters,
//! routes, processes).
pub mod netfilter;
pub mod symbols;
pub mod sysctl;
