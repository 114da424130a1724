//! Everything that touches the running kernel's specifics: tracefs formats, BTF offsets, and
//! loading/attaching the programs. Discovered once at start-up and handed on as plain data.
pub mod btf;
pub mod loader;
pub mod perf_ring;
pub mod raw_args;
pub mod reasons;
pub mod tracefs;

/// The running kernel's drop-reason names (from the kfree_skb format, else BTF).
pub fn list_drop_reasons() -> anyhow::Result<reasons::ReasonNames> {
    use anyhow::Context as _;
    let tracefs = tracefs::TraceFs::locate_or_mount().context("tracefs is not available")?;
    if let Ok(format) = tracefs.format("skb", "kfree_skb") {
        let names =
            reasons::ReasonNames::from_pairs(format.symbolic_values("reason"), "SKB_DROP_REASON_");
        if !names.is_empty() {
            return Ok(names);
        }
    }
    let btf = btf::KernelBtf::from_sys()?;
    let values = btf.enum_values("skb_drop_reason")?;
    Ok(reasons::ReasonNames::from_pairs(
        values.iter().map(|(n, v)| (*v, n)),
        "SKB_DROP_REASON_",
    ))
}
