//! Enrichment: context the kernel events do not carry themselves (sysctls, later counters,
//! routes, processes and their services).
pub mod cgroup;
pub mod counters;
pub mod listeners;
pub mod netfilter;
pub mod netns;
pub mod owners;
pub mod routes;
pub mod sockdiag;
pub mod stale;
pub mod symbols;
pub mod sysctl;
