//! Empty-program floors: `mov r0, 0; exit` loaded with the raw bpf(2) syscall and attached to
//! the tracepoints observer uses, classic (perf_event_open + PERF_EVENT_IOC_SET_BPF) or raw
//! (BPF_RAW_TRACEPOINT_OPEN). What any tool on these hooks pays before doing anything: the
//! kernel's record building (classic) and the program call.
//!
//! The programs stay attached while [`EmptyPrograms`] lives; dropping it closes every fd, which
//! detaches them.
use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};

use super::harness::run_checked;

/// The tracepoints observer attaches to, as (category, name).
pub const TRACEPOINTS: &[(&str, &str)] = &[
    ("tcp", "tcp_retransmit_skb"),
    ("tcp", "tcp_retransmit_synack"),
    ("tcp", "tcp_send_reset"),
    ("tcp", "tcp_receive_reset"),
    ("skb", "kfree_skb"),
    ("sock", "inet_sock_set_state"),
];

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// `BPF_PROG_TYPE_TRACEPOINT` on a perf event of the tracepoint.
    Classic,
    /// `BPF_PROG_TYPE_RAW_TRACEPOINT` through `BPF_RAW_TRACEPOINT_OPEN`.
    Raw,
}

// From include/uapi/linux/bpf.h and perf_event.h.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const BPF_OBJ_NAME_LEN: usize = 16;

/// `mov r0, 0` then `exit`.
const EMPTY_PROGRAM: [u64; 2] = [
    u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
    u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
];

/// The BPF_PROG_LOAD part of `union bpf_attr` (the kernel zero-fills what follows).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; BPF_OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The BPF_RAW_TRACEPOINT_OPEN part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 64);
const _: () = assert!(std::mem::size_of::<ProgLoadAttr>() == 72);

/// Empty programs attached to [`TRACEPOINTS`]; detached on drop.
pub struct EmptyPrograms {
    /// Program id -> the tracepoint it is attached to.
    pub names: BTreeMap<u32, String>,
    // Perf event or raw tracepoint fds first: they are closed before the programs.
    _links: Vec<OwnedFd>,
    _programs: Vec<OwnedFd>,
}

impl EmptyPrograms {
    /// Loads one empty program per tracepoint and attaches it.
    pub fn attach(how: Attach) -> Result<Self> {
        let tracefs = match how {
            Attach::Classic => Some(tracefs()?),
            Attach::Raw => None,
        };
        let mut names = BTreeMap::new();
        let mut links = Vec::new();
        let mut programs = Vec::new();
        for (category, name) in TRACEPOINTS {
            let prog_type = match how {
                Attach::Classic => BPF_PROG_TYPE_TRACEPOINT,
                Attach::Raw => BPF_PROG_TYPE_RAW_TRACEPOINT,
            };
            let prog = load_empty(prog_type, name)
                .with_context(|| format!("loading an empty program for {category}:{name}"))?;
            let link = match &tracefs {
                Some(tracefs) => attach_classic(tracefs, category, name, &prog),
                None => attach_raw(name, &prog),
            }
            .with_context(|| format!("attaching the empty program to {category}:{name}"))?;
            names.insert(prog_id(&prog)?, (*name).to_owned());
            links.push(link);
            programs.push(prog);
        }
        Ok(Self {
            names,
            _links: links,
            _programs: programs,
        })
    }
}

/// The tracefs mount (mounted at /sys/kernel/tracing when nothing is).
fn tracefs() -> Result<PathBuf> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    run_checked(std::process::Command::new("mount").args([
        "-t",
        "tracefs",
        "nodev",
        "/sys/kernel/tracing",
    ]))
    .context("mounting tracefs at /sys/kernel/tracing")?;
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<OwnedFd> {
    let size = u32::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `attr` points to a live, initialised `#[repr(C)]` bpf_attr prefix of `size`
    // bytes that the kernel only reads; pointers inside it are valid for the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    fd_from(ret)
}

/// An fd returned by a syscall (negative: errno).
fn fd_from(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn load_empty(prog_type: u32, tracepoint: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; BPF_OBJ_NAME_LEN];
    // "e_" + the tracepoint name, truncated (the kernel allows 15 characters and a NUL).
    let name = format!("e_{tracepoint}");
    for (dst, src) in prog_name
        .iter_mut()
        .zip(name.bytes().take(BPF_OBJ_NAME_LEN - 1))
    {
        *dst = src;
    }
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: EMPTY_PROGRAM.len() as u32,
        insns: EMPTY_PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..ProgLoadAttr::default()
    };
    let size = std::mem::size_of::<ProgLoadAttr>();
    match bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Again with the verifier's log, for the error message.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let retry = bpf(BPF_PROG_LOAD, (&raw const attr).cast(), size);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            match retry {
                Ok(fd) => Ok(fd),
                Err(_) => bail!("BPF_PROG_LOAD failed: {first}; verifier log: {text}"),
            }
        }
    }
}

/// The program's id, from /proc/self/fdinfo.
fn prog_id(prog: &OwnedFd) -> Result<u32> {
    let path = format!("/proc/self/fdinfo/{}", prog.as_raw_fd());
    let info = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no prog_id in {path}"))
}

/// One perf event of the tracepoint (pid -1, CPU 0) with the program attached and enabled.
/// One event is enough: the program goes into the tracepoint's own program array and runs on
/// every CPU (attaching the same program again on another CPU fails with EEXIST); libbpf and
/// aya attach the same way.
fn attach_classic(tracefs: &Path, category: &str, name: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    let id_file = tracefs.join("events").join(category).join(name).join("id");
    let id: u64 = fs::read_to_string(&id_file)
        .with_context(|| format!("reading {}", id_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", id_file.display()))?;
    let attr = PerfEventAttr {
        type_: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_period: 1,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it declares; pid -1 with cpu 0 and
    // no group fd is a system-wide event on CPU 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    let event = fd_from(ret).context("perf_event_open")?;
    // SAFETY: both fds are open and owned by us; SET_BPF takes the program fd by value.
    let ret = unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) };
    if ret < 0 {
        return Err(io::Error::last_os_error()).context("ioctl PERF_EVENT_IOC_SET_BPF");
    }
    // SAFETY: an open perf event fd; ENABLE takes no argument.
    let ret = unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error()).context("ioctl PERF_EVENT_IOC_ENABLE");
    }
    Ok(event)
}

fn attach_raw(name: &str, prog: &OwnedFd) -> Result<OwnedFd> {
    let name = CString::new(name).context("tracepoint name")?;
    let prog_fd = u32::try_from(prog.as_raw_fd()).context("program fd")?;
    let attr = RawTracepointAttr {
        name: name.as_ptr() as u64,
        prog_fd,
        _pad: 0,
    };
    bpf(
        BPF_RAW_TRACEPOINT_OPEN,
        (&raw const attr).cast(),
        std::mem::size_of::<RawTracepointAttr>(),
    )
    .context("BPF_RAW_TRACEPOINT_OPEN")
}
