//! Builds the kernel programs (observer-ebpf) for the BPF target so that a plain `cargo build`
//! produces a complete `observer` binary. Needs the nightly toolchain with rust-src and
//! bpf-linker: `cargo xtask setup` installs both.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../observer-ebpf");
    let package = aya_build::Package {
        name: "observer-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
