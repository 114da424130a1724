//! The BTF header, checked before the blob is handed to `btf_rs`.
//!
//! `btf_rs` sizes its tables from the header's section lengths (up to 16 MiB each, whatever the
//! blob holds): a corrupt 300-byte file claiming a 4 GiB string section made it allocate 34 MB
//! before failing. Checking that both sections lie inside the blob keeps what a parse allocates
//! in proportion to the blob's real size.
//!
//! Layout (`struct btf_header`, `include/uapi/linux/btf.h`): `u16 magic` (0xeB9F, in the
//! blob's byte order), `u8 version`, `u8 flags`, `u32 hdr_len`, then `u32 type_off, type_len,
//! str_off, str_len`, the offsets counted from the end of the header.

/// `BTF_MAGIC`.
const MAGIC: u16 = 0xeb9f;
/// `sizeof(struct btf_header)`: the fields read here.
pub const HEADER_LEN: usize = 24;

/// Why a blob's header does not describe it (a message for [`super::BtfError::BadHeader`]).
pub fn check(prefix: &[u8], total_len: u64) -> Result<(), String> {
    let Some(header) = prefix.first_chunk::<HEADER_LEN>() else {
        return Err(format!(
            "{} bytes, shorter than a BTF header ({HEADER_LEN})",
            prefix.len()
        ));
    };
    let big_endian = match [header[0], header[1]] {
        m if m == MAGIC.to_le_bytes() => cfg!(target_endian = "big"),
        m if m == MAGIC.to_be_bytes() => cfg!(target_endian = "little"),
        m => return Err(format!("bad magic {:#06x}", u16::from_le_bytes(m))),
    };
    let word = |at: usize| {
        let bytes = [header[at], header[at + 1], header[at + 2], header[at + 3]];
        let native = u32::from_ne_bytes(bytes);
        u64::from(if big_endian {
            native.swap_bytes()
        } else {
            native
        })
    };
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (word(4), word(8), word(12), word(16), word(20));
    if hdr_len < HEADER_LEN as u64 {
        return Err(format!("header length {hdr_len} < {HEADER_LEN}"));
    }
    for (name, off, len) in [("type", type_off, type_len), ("string", str_off, str_len)] {
        // u32 + u32 + u32 cannot overflow u64.
        let end = hdr_len + off + len;
        if end > total_len {
            return Err(format!(
                "the {name} section ({len} bytes at {off}) ends at {end}, past the blob's {total_len} bytes"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(words: [u32; 5]) -> Vec<u8> {
        let mut h = MAGIC.to_ne_bytes().to_vec();
        h.extend([1, 0]);
        for w in words {
            h.extend(w.to_ne_bytes());
        }
        h
    }

    #[test]
    fn sections_must_lie_inside_the_blob() {
        assert_eq!(check(&header([24, 0, 100, 100, 20]), 144), Ok(()));
        assert!(check(&header([24, 0, 100, 100, 20]), 143).is_err());
        let huge = check(&header([24, 0, 100, 100, u32::MAX]), 144);
        assert!(huge.is_err_and(|e| e.contains("string section")));
        assert!(check(&header([24, u32::MAX, u32::MAX, 0, 0]), 1 << 40).is_ok());
        assert!(check(&header([8, 0, 0, 0, 0]), 24).is_err());
        assert!(check(&header([24, 0, 0, 0, 0])[..10], 24).is_err());
        assert!(check(&[0u8; 24], 24).is_err_and(|e| e.contains("magic")));
        // The other byte order.
        let mut swapped = MAGIC.swap_bytes().to_ne_bytes().to_vec();
        swapped.extend([1, 0]);
        for w in [24u32, 0, 4, 4, 4] {
            swapped.extend(w.swap_bytes().to_ne_bytes());
        }
        assert_eq!(check(&swapped, 32), Ok(()));
        assert!(check(&swapped, 31).is_err());
    }
}
