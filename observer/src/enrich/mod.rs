//! Enrichment: context the kernel events do not carry themselves (sysctls, later counters,
//! routes, processes).
pub mod counters;
pub mod listeners;
pub mod netfilter;
pub mod netns;
pub mod sockdiag;
pub mod symbols;
pub mod sysctl;
