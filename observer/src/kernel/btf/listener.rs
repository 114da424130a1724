//! Where a listener keeps its drop counter and queue lengths: what the state-change program
//! reads when a socket enters or leaves LISTEN.
use observer_common::{FIELD_ABSENT, ListenerOffsets};

use super::{BtfError, KernelBtf};

impl KernelBtf {
    /// `struct sock` offsets of the listener's drop counter (`sk_drops`, and the per-NUMA
    /// `sk_drop_counters` of Linux 6.18+ when the kernel has them), its accept queue and limit,
    /// and the path to its socket inode.
    ///
    /// `sk_drops` must be a 4-byte counter (`atomic_t`); a kernel where it is something else
    /// fails here, and listener changes are then not recorded (sock_diag still reads them).
    pub fn listener_offsets(&self) -> Result<ListenerOffsets, BtfError> {
        let (sk_drop_counters, numa_drops0, numa_drops1) =
            match self.member_offset("sock", "sk_drop_counters") {
                // Absent before 6.18: the counter is `sk_drops` alone.
                Err(BtfError::NoSuchMember { .. }) => (FIELD_ABSENT, FIELD_ABSENT, FIELD_ABSENT),
                Err(e) => return Err(e),
                Ok(_) => (
                    self.u16_offset(
                        "sock",
                        "sk_drop_counters",
                        Some(super::size_u32(size_of::<usize>())),
                    )?,
                    self.u16_offset("numa_drop_counters", "drops0", Some(4))?,
                    self.u16_offset("numa_drop_counters", "drops1", Some(4))?,
                ),
            };
        // A `struct socket` lives inside a `struct socket_alloc`, beside its inode
        // (`SOCK_INODE`); sock_diag reports that inode's number.
        let socket = self.member_offset("socket_alloc", "socket")?;
        let inode = self.member_offset("socket_alloc", "vfs_inode")?;
        let ino = self.member_offset("inode", "i_ino")?;
        let ino_size = self.member_size("inode", "i_ino")?;
        if ino_size < 4 {
            return Err(BtfError::WrongSize {
                struct_name: "inode".to_owned(),
                path: "i_ino".to_owned(),
                expected: 4,
                found: ino_size,
            });
        }
        let socket_ino = (inode + ino)
            .checked_sub(socket)
            .and_then(|o| u16::try_from(o).ok())
            .ok_or_else(|| BtfError::TooLarge {
                struct_name: "socket_alloc".to_owned(),
                path: "vfs_inode.i_ino".to_owned(),
                offset: inode + ino,
            })?;
        Ok(ListenerOffsets {
            sk_drops: self.u16_offset("sock", "sk_drops", Some(4))?,
            sk_drop_counters,
            numa_drops0,
            numa_drops1,
            sk_ack_backlog: self.u16_offset("sock", "sk_ack_backlog", Some(4))?,
            sk_max_ack_backlog: self.u16_offset("sock", "sk_max_ack_backlog", Some(4))?,
            sk_socket: self.u16_offset(
                "sock",
                "sk_socket",
                Some(super::size_u32(size_of::<usize>())),
            )?,
            socket_ino,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_listener_offsets_match_separate_lookups() {
        let Ok(btf) = KernelBtf::from_sys() else {
            return;
        };
        let o = btf
            .listener_offsets()
            .expect("the running kernel's listener layout");
        eprintln!("listener offsets on this kernel: {o:?}");
        let lookup = |ty: &str, path: &str| {
            btf.member_offset(ty, path)
                .ok()
                .and_then(|o| u16::try_from(o).ok())
        };
        assert_eq!(Some(o.sk_drops), lookup("sock", "sk_drops"));
        assert_eq!(Some(o.sk_ack_backlog), lookup("sock", "sk_ack_backlog"));
        assert_eq!(
            Some(o.sk_max_ack_backlog),
            lookup("sock", "sk_max_ack_backlog")
        );
        assert_eq!(Some(o.sk_socket), lookup("sock", "sk_socket"));
        match lookup("sock", "sk_drop_counters") {
            Some(at) => {
                assert_eq!(o.sk_drop_counters, at);
                assert_eq!(Some(o.numa_drops0), lookup("numa_drop_counters", "drops0"));
                assert_eq!(Some(o.numa_drops1), lookup("numa_drop_counters", "drops1"));
            }
            None => assert_eq!(o.sk_drop_counters, FIELD_ABSENT),
        }
        // The inode follows the socket in socket_alloc.
        assert!(o.socket_ino > 0);
    }
}
