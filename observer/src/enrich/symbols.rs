//! Kernel addresses to `function+0xoffset`, from /proc/kallsyms (read once at start-up).
use std::collections::BTreeMap;

/// A sorted symbol table.
#[derive(Clone, Debug, Default)]
pub struct KernelSymbols {
    by_address: BTreeMap<u64, String>,
}

impl KernelSymbols {
    /// Reads /proc/kallsyms; an empty table (addresses hidden by kptr_restrict, or no access)
    /// makes every lookup return the raw address.
    pub fn load() -> Self {
        Self {
            by_address: aya::util::kernel_symbols().unwrap_or_default(),
        }
    }

    pub fn from_map(by_address: BTreeMap<u64, String>) -> Self {
        Self { by_address }
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }

    /// `tcp_v4_rcv+0x1a2`, or `0xffff...` when no symbol covers the address.
    pub fn resolve(&self, address: u64) -> String {
        if address == 0 {
            return String::new();
        }
        match self.by_address.range(..=address).next_back() {
            Some((start, name)) if address - start < 1 << 20 => {
                format!("{name}+{:#x}", address - start)
            }
            _ => format!("{address:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_to_the_covering_symbol() {
        let syms = KernelSymbols::from_map(BTreeMap::from([
            (0x1000, "tcp_v4_rcv".to_owned()),
            (0x2000, "nf_hook_slow".to_owned()),
        ]));
        assert_eq!(syms.resolve(0x1010), "tcp_v4_rcv+0x10");
        assert_eq!(syms.resolve(0x2000), "nf_hook_slow+0x0");
        assert_eq!(syms.resolve(0x10), "0x10");
        assert_eq!(syms.resolve(0), "");
    }
}
