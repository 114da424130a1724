//! BTF from outside (a corrupt or truncated `/sys/kernel/btf/vmlinux`, a saved copy of another
//! kernel's): arbitrary bytes and mutated copies of a small valid blob give an error or an
//! answer, never a panic, and lookups allocate in proportion to the blob.
use proptest::prelude::*;

use super::*;
use crate::prop_support::{self, assert_bounded};

/// A string table under construction: offset of each name.
#[derive(Default)]
struct Strings(Vec<u8>);

impl Strings {
    fn add(&mut self, name: &str) -> u32 {
        if self.0.is_empty() {
            self.0.push(0);
        }
        if name.is_empty() {
            return 0;
        }
        let offset = self.0.len() as u32;
        self.0.extend(name.as_bytes());
        self.0.push(0);
        offset
    }
}

fn info(kind: u32, vlen: u32) -> u32 {
    (kind << 24) | vlen
}

/// A small BTF blob: `int`, `struct sock_common { int skc_state; int skc_num; }`, `enum
/// skb_drop_reason`, a pointer, the kfree_skb tracepoint's prototype and function, a typedef.
fn small_blob() -> Vec<u8> {
    let mut s = Strings::default();
    let mut types: Vec<u32> = Vec::new();
    // 1: int (BTF_KIND_INT), 4 bytes, signed, 32 bits.
    types.extend([s.add("int"), info(1, 0), 4, (1 << 24) | 32]);
    // 2: struct sock_common, 8 bytes, two members (offsets in bits).
    types.extend([s.add("sock_common"), info(4, 2), 8]);
    types.extend([s.add("skc_state"), 1, 0, s.add("skc_num"), 1, 32]);
    // 3: enum skb_drop_reason (4 bytes, two values).
    types.extend([s.add("skb_drop_reason"), info(6, 2), 4]);
    types.extend([s.add("NOT_SPECIFIED"), 2, s.add("NO_SOCKET"), 3]);
    // 4: struct sock_common *.
    types.extend([0, info(2, 0), 2]);
    // 5: void (void *__data, struct sock_common *sk, enum skb_drop_reason reason).
    types.extend([0, info(13, 3), 0]);
    types.extend([s.add("__data"), 8, s.add("sk"), 4, s.add("reason"), 3]);
    // 6: __bpf_trace_kfree_skb, of prototype 5.
    types.extend([s.add("__bpf_trace_kfree_skb"), info(12, 0), 5]);
    // 7: typedef int u32.
    types.extend([s.add("u32"), info(8, 0), 1]);
    // 8: void *.
    types.extend([0, info(2, 0), 0]);
    let type_bytes: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut blob = Vec::new();
    blob.extend(0xeb9f_u16.to_le_bytes());
    blob.extend([1, 0]);
    for word in [
        24,
        0,
        type_bytes.len() as u32,
        type_bytes.len() as u32,
        s.0.len() as u32,
    ] {
        blob.extend(word.to_le_bytes());
    }
    blob.extend(type_bytes);
    blob.extend(s.0);
    blob
}

/// Every lookup observer makes, on a parsed blob.
fn query(btf: &KernelBtf) {
    let _ = btf.member_offset("sock_common", "skc_num");
    let _ = btf.member_size("sock_common", "skc_state");
    let _ = btf.member_offset("sock_common", "skc_num.deeper");
    let _ = btf.struct_size("sock_common");
    let _ = btf.enum_values("skb_drop_reason");
    let _ = btf.enum_values("u32");
    let _ = btf.struct_offsets();
    let _ = btf.sock_offsets();
    let _ = btf.listener_offsets();
    if let Ok(params) = btf.tracepoint_params("kfree_skb") {
        let _ = crate::kernel::raw_args::resolve("kfree_skb", &params);
    }
    let _ = btf.tracepoint_params("missing");
}

fn check(blob: &[u8]) -> Result<(), TestCaseError> {
    // btf-rs keeps the blob and indexes its types and names: a few times its size.
    assert_bounded(blob.len(), 64, 64 * 1024, || {
        if let Ok(btf) = KernelBtf::from_bytes(blob, "fuzzed") {
            query(&btf);
        }
    })
}

#[test]
fn the_small_blob_is_valid() -> Result<(), BtfError> {
    let btf = KernelBtf::from_bytes(&small_blob(), "small")?;
    assert_eq!(btf.member_offset("sock_common", "skc_num")?, 4);
    assert_eq!(btf.struct_size("sock_common")?, 8);
    assert_eq!(
        btf.enum_values("skb_drop_reason")?,
        [("NOT_SPECIFIED".to_owned(), 2), ("NO_SOCKET".to_owned(), 3)]
    );
    let params = btf.tracepoint_params("kfree_skb")?;
    assert_eq!(params.len(), 2);
    assert_eq!(params[1].ty, "enum skb_drop_reason");
    Ok(())
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_bytes_never_panic(blob in prop_support::bytes(512)) {
        check(&blob)?;
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(rest in prop_support::bytes(512)) {
        let mut blob = small_blob()[..24].to_vec();
        blob.extend(rest);
        check(&blob)?;
    }

    #[test]
    fn mutated_blobs_never_panic(blob in prop_support::mutated(vec![small_blob()])) {
        check(&blob)?;
    }
}

/// Found by these properties: a 300-byte blob whose header claims 4 GiB sections made btf_rs
/// reserve tables for them (34 MB) before failing; the header is now checked first.
#[test]
fn huge_section_lengths_are_refused_before_parsing() {
    for at in [8usize, 12, 16, 20] {
        let mut blob = small_blob();
        blob[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let (result, allocated) =
            crate::prop_support::allocated_by(|| KernelBtf::from_bytes(&blob, "huge"));
        assert!(
            matches!(result, Err(BtfError::BadHeader { .. })),
            "field at {at}: {result:?}"
        );
        assert!(allocated < 4096, "field at {at}: {allocated} bytes");
    }
}
