//! Network-namespace inodes of sockets and devices, reused within a jiffy.

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::{
    clock::jiffies,
    reads::{kread, slot},
};

/// Network-namespace inode behind a `struct net *`.
#[inline(always)]
pub(crate) fn netns_inum(net: u64, slot: u32) -> u32 {
    if net == 0 {
        return 0;
    }
    reuse_within_jiffy(&NET_NETNS, net, slot, || {
        kread::<u32>(net + u64::from(config!(offsets.net_ns_inum))).unwrap_or(0)
    })
}

/// Network-namespace inode of socket `sk` (0 when it cannot be read).
#[inline(always)]
pub(crate) fn netns_of_sock(sk: u64, slot: u32) -> u32 {
    if sk == 0 {
        return 0;
    }
    netns_inum(
        kread::<u64>(sk + u64::from(config!(offsets.sock_net))).unwrap_or(0),
        slot,
    )
}

/// A program's last answer for the namespace of one object (a device or a `struct net`),
/// and the jiffy it was read in.
#[repr(C)]
pub(crate) struct NetnsAnswer {
    object: u64,
    jiffies: u64,
    inum: u32,
    _pad: u32,
}

/// One [`NetnsAnswer`] per program slot and CPU, for devices and for `struct net`s (a program
/// does not interrupt itself on a CPU, so a slot is never read half-written).
#[map]
pub(crate) static DEV_NETNS: PerCpuArray<NetnsAnswer> =
    PerCpuArray::with_max_entries(slot::COUNT, 0);
#[map]
pub(crate) static NET_NETNS: PerCpuArray<NetnsAnswer> =
    PerCpuArray::with_max_entries(slot::COUNT, 0);

/// `read()` for `object`, or the answer this program slot got for it in the same jiffy. A
/// storm repeats the same device and namespace event after event; a device moved to another
/// namespace is seen at the next tick at the latest, and a `struct net` never changes inode.
#[inline(always)]
pub(crate) fn reuse_within_jiffy(
    cache: &PerCpuArray<NetnsAnswer>,
    object: u64,
    slot: u32,
    read: impl FnOnce() -> u32,
) -> u32 {
    let Some(answer) = cache.get_ptr_mut(slot) else {
        return read();
    };
    let jiffies = jiffies();
    // SAFETY: this CPU's slot of this program (see DEV_NETNS).
    unsafe {
        if (*answer).object == object && (*answer).jiffies == jiffies {
            return (*answer).inum;
        }
        let inum = read();
        *answer = NetnsAnswer {
            object,
            jiffies,
            inum,
            _pad: 0,
        };
        inum
    }
}

/// Network-namespace inode of a network device (0 when there is none).
#[inline(always)]
pub(crate) fn netns_of_dev(dev: u64, slot: u32) -> u32 {
    if dev == 0 {
        return 0;
    }
    reuse_within_jiffy(&DEV_NETNS, dev, slot, || {
        netns_inum(
            kread::<u64>(dev + u64::from(config!(packet.dev_net))).unwrap_or(0),
            slot,
        )
    })
}
