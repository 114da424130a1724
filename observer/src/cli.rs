pub fn main() -> std::process::ExitCode {
    let bytes: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));
    eprintln!("{} bytes", bytes.len());
    std::process::ExitCode::SUCCESS
}
