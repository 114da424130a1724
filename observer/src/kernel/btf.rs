//! Struct offsets and enum values from the running kernel's BTF.
//!
//! observer's kernel programs read a few kernel structs directly (`sk_buff.cb` for the segment
//! count, `sock -> net -> ns.inum` for the network namespace). Those layouts depend on the kernel
//! version and configuration, and aya 0.14 does not relocate field accesses (no CO-RE) for Rust
//! programs, so userspace looks the offsets up in `/sys/kernel/btf/vmlinux` at start-up and
//! passes them in as plain numbers ([`observer_common::StructOffsets`]).
use std::{
    fmt,
    path::{Path, PathBuf},
};

use btf_rs::{Btf, BtfType, Member, Struct, Type};
use observer_common::{SockOffsets, StructOffsets};

mod header;
mod listener;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// How many typedef/const/volatile/... links [`KernelBtf`] follows before giving up (BTF from a
/// corrupt file could loop).
const MAX_TYPE_CHAIN: usize = 64;

/// Errors loading BTF or finding what observer needs in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read or parsed.
    #[error("cannot load BTF from `{path}`")]
    FileError {
        path: PathBuf,
        #[source]
        error: btf_rs::Error,
    },
    /// The BTF header does not describe the file (truncated or corrupt).
    #[error("cannot load BTF from `{path}`: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    /// A lookup inside the loaded BTF failed (dangling type id or string offset).
    #[error("BTF lookup failed while resolving {what}")]
    LookupError {
        what: String,
        #[source]
        error: btf_rs::Error,
    },
    /// No struct or union of that name (with members) in the BTF.
    #[error("no struct or union `{name}` in BTF")]
    NoSuchStruct { name: String },
    /// No enum of that name in the BTF.
    #[error("no enum `{name}` in BTF")]
    NoSuchEnum { name: String },
    /// A member along the path does not exist.
    #[error("`struct {struct_name}` has no member `{path}` (`{member}` not found)")]
    NoSuchMember {
        struct_name: String,
        path: String,
        member: String,
    },
    /// The path goes through a member that is not a struct or union.
    #[error(
        "`struct {struct_name}` member path `{path}`: `{member}` is a {kind}, not a struct or union"
    )]
    NotComposite {
        struct_name: String,
        path: String,
        member: String,
        kind: &'static str,
    },
    /// The member is a bitfield: it has no byte offset the programs could read.
    #[error("`struct {struct_name}` member `{path}` is a bitfield")]
    Bitfield { struct_name: String, path: String },
    /// The member's type has no size (function, forward declaration, void).
    #[error("`struct {struct_name}` member `{path}` has a {kind} type, which has no size")]
    Unsized {
        struct_name: String,
        path: String,
        kind: &'static str,
    },
    /// The offset does not fit the `u16` the kernel programs take.
    #[error("`struct {struct_name}` member `{path}` is at offset {offset}, beyond u16")]
    TooLarge {
        struct_name: String,
        path: String,
        offset: u32,
    },
    /// The member is not aligned as the raw programs read it (naturally, addresses to 4).
    #[error(
        "`struct {struct_name}` member `{path}` is at offset {offset}, not a multiple of {align}"
    )]
    Misaligned {
        struct_name: String,
        path: String,
        offset: u16,
        align: u16,
    },
    /// The member does not have the size the kernel programs read.
    #[error("`struct {struct_name}` member `{path}` has {found} bytes, expected {expected}")]
    WrongSize {
        struct_name: String,
        path: String,
        expected: u32,
        found: u32,
    },
    /// `struct tcp_skb_cb` does not fit in `sk_buff.cb`: the layout is not what observer knows.
    #[error(
        "no tracepoint `{event}` in BTF (neither `__bpf_trace_{event}` nor `btf_trace_{event}`)"
    )]
    NoSuchTracepoint { event: String },
    #[error("`struct tcp_skb_cb` ({tcp_skb_cb} bytes) does not fit in `sk_buff.cb` ({cb} bytes)")]
    CbTooSmall { tcp_skb_cb: u32, cb: u32 },
}

/// A member found along a path: its byte offset from the outer struct and its type (with
/// typedefs and qualifiers resolved).
/// One argument of a tracepoint (see [`KernelBtf::tracepoint_params`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracepointParam {
    /// The parameter's name in the kernel source, when BTF has it.
    pub name: Option<String>,
    /// Its type, spelled `struct sock *`, `void *`, `int`, `enum skb_drop_reason`.
    pub ty: String,
}

struct Located {
    offset: u32,
    ty: Type,
}

/// A parsed BTF blob, normally the running kernel's, with the lookups observer needs.
pub struct KernelBtf {
    btf: Btf,
    path: PathBuf,
}

impl fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBtf")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// [`header::check`] on a file's first bytes and its size (sysfs reports the size of
/// `/sys/kernel/btf/*` files).
fn check_file_header(path: &Path) -> Result<(), BtfError> {
    use std::io::Read as _;
    let io_error = |error: std::io::Error| BtfError::FileError {
        path: path.to_owned(),
        error: btf_rs::Error::IO(error),
    };
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    let mut prefix = Vec::with_capacity(header::HEADER_LEN);
    (&mut file)
        .take(header::HEADER_LEN as u64)
        .read_to_end(&mut prefix)
        .map_err(io_error)?;
    header::check(&prefix, len).map_err(|reason| BtfError::BadHeader {
        path: path.to_owned(),
        reason,
    })
}

impl KernelBtf {
    /// Loads the running kernel's BTF (`/sys/kernel/btf/vmlinux`, needs CONFIG_DEBUG_INFO_BTF).
    pub fn from_sys() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    /// Loads a raw BTF file (as found in `/sys/kernel/btf/`), e.g. a saved copy of another
    /// kernel's.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        check_file_header(path)?;
        let btf = Btf::from_file(path).map_err(|error| BtfError::FileError {
            path: path.to_owned(),
            error,
        })?;
        Ok(Self {
            btf,
            path: path.to_owned(),
        })
    }

    /// Parses raw BTF bytes (`label` names them in errors): for tests and embedded blobs.
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Self, BtfError> {
        let path = PathBuf::from(label);
        header::check(bytes, bytes.len() as u64).map_err(|reason| BtfError::BadHeader {
            path: path.clone(),
            reason,
        })?;
        let btf = Btf::from_bytes(bytes).map_err(|error| BtfError::FileError {
            path: path.clone(),
            error,
        })?;
        Ok(Self { btf, path })
    }

    /// Where this BTF was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Byte offset of a (possibly nested, dotted) member path inside a struct or union, e.g.
    /// `member_offset("sock", "__sk_common.skc_net")` or `member_offset("net", "ns.inum")`.
    ///
    /// Anonymous structs and unions are descended into transparently, as in C
    /// (`tcp_skb_cb.tcp_gso_segs` sits inside an anonymous union), and members typed through
    /// typedefs or qualifiers are resolved. Bitfields and missing members are errors.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        Ok(self.locate(struct_name, path)?.offset)
    }

    /// Size in bytes of the member at `path` (see [`KernelBtf::member_offset`]): lets callers
    /// check that a member still has the width their reads assume.
    pub fn member_size(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let located = self.locate(struct_name, path)?;
        self.type_size(&located.ty, 0)
            .map_err(|kind| BtfError::Unsized {
                struct_name: struct_name.to_owned(),
                path: path.to_owned(),
                kind,
            })
    }

    /// Size in bytes of a struct or union.
    pub fn struct_size(&self, struct_name: &str) -> Result<u32, BtfError> {
        Ok(size_u32(self.composite(struct_name)?.size()))
    }

    /// All `(name, value)` pairs of an enum, in declaration order, e.g.
    /// `enum_values("skb_drop_reason")`: how the running kernel numbers drop or reset reasons.
    ///
    /// Supports both BTF enum kinds (32- and 64-bit). Unsigned 64-bit values above `i64::MAX`
    /// are reinterpreted as negative (two's complement), which no kernel enum observer reads has.
    pub fn enum_values(&self, enum_name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let candidates = self
            .btf
            .resolve_types_by_name(enum_name)
            .map_err(|error| self.lookup_error(format!("enum `{enum_name}`"), error))?;
        let mut found = None;
        for ty in candidates {
            let ty = self.strip_modifiers(ty)?;
            let populated = match &ty {
                Type::Enum(e) => !e.members.is_empty(),
                Type::Enum64(e) => !e.members.is_empty(),
                _ => continue,
            };
            if populated {
                found = Some(ty);
                break;
            }
            found.get_or_insert(ty);
        }
        let name_of = |member: &dyn BtfType| {
            self.btf.resolve_name(member).map_err(|error| {
                self.lookup_error(format!("a member name of enum `{enum_name}`"), error)
            })
        };
        match found {
            Some(Type::Enum(e)) => e
                .members
                .iter()
                .map(|m| {
                    let value = if e.is_signed() {
                        i64::from(m.val() as i32)
                    } else {
                        i64::from(m.val())
                    };
                    Ok((name_of(m)?, value))
                })
                .collect(),
            Some(Type::Enum64(e)) => e
                .members
                .iter()
                .map(|m| Ok((name_of(m)?, m.val() as i64)))
                .collect(),
            _ => Err(BtfError::NoSuchEnum {
                name: enum_name.to_owned(),
            }),
        }
    }

    /// The struct offsets the kernel programs need, checked for the sizes they read and for
    /// fitting in `u16`.
    pub fn struct_offsets(&self) -> Result<StructOffsets, BtfError> {
        let skb_cb = self.u16_offset("sk_buff", "cb", None)?;
        let cb_size = self.member_size("sk_buff", "cb")?;
        let tcp_skb_cb = self.struct_size("tcp_skb_cb")?;
        if tcp_skb_cb > cb_size {
            return Err(BtfError::CbTooSmall {
                tcp_skb_cb,
                cb: cb_size,
            });
        }
        Ok(StructOffsets {
            skb_cb,
            tcp_skb_cb_gso_segs: self.u16_offset("tcp_skb_cb", "tcp_gso_segs", Some(2))?,
            // `skc_net` is a `possible_net_t`, a struct whose `net` member is the pointer (it is
            // empty without CONFIG_NET_NS, which then fails here with a clear error).
            sock_net: self.u16_offset(
                "sock",
                "__sk_common.skc_net.net",
                Some(size_u32(size_of::<usize>())),
            )?,
            net_ns_inum: self.u16_offset("net", "ns.inum", Some(4))?,
            sock_err: self.u16_offset("sock", "sk_err", Some(4))?,
            sock_state: self.u16_offset("sock", "__sk_common.skc_state", Some(1))?,
            _pad: [0; 2],
        })
    }

    /// Where the raw tracepoint programs read a socket: `struct sock_common` members (one window
    /// from offset 0) and `sock.sk_protocol`.
    pub fn sock_offsets(&self) -> Result<SockOffsets, BtfError> {
        // Each member read also extends the window that one copy must cover. The programs read
        // members with aligned loads (a byte-wise unaligned read costs several instructions per
        // byte): each must be naturally aligned, addresses to 4, as every kernel lays them out.
        let mut end = 0u32;
        let mut member = |path: &str, size: u32| -> Result<u16, BtfError> {
            let offset = self.u16_offset("sock_common", path, Some(size))?;
            let align = u16::try_from(size.min(8))
                .unwrap_or(8)
                .min(if size == 16 { 4 } else { 8 });
            if offset % align != 0 {
                return Err(BtfError::Misaligned {
                    struct_name: "sock_common".to_owned(),
                    path: path.to_owned(),
                    offset,
                    align,
                });
            }
            end = end.max(u32::from(offset) + size);
            Ok(offset)
        };
        let mut offsets = SockOffsets {
            daddr: member("skc_daddr", 4)?,
            rcv_saddr: member("skc_rcv_saddr", 4)?,
            dport: member("skc_dport", 2)?,
            num: member("skc_num", 2)?,
            family: member("skc_family", 2)?,
            state: member("skc_state", 1)?,
            net: member("skc_net.net", size_u32(size_of::<usize>()))?,
            v6_daddr: member("skc_v6_daddr", 16)?,
            v6_rcv_saddr: member("skc_v6_rcv_saddr", 16)?,
            window_len: 0,
            protocol: self.u16_offset("sock", "sk_protocol", Some(2))?,
            inet_sport: self.u16_offset("inet_sock", "inet_sport", Some(2))?,
        };
        offsets.window_len = u16::try_from(end).map_err(|_| BtfError::TooLarge {
            struct_name: "sock_common".to_owned(),
            path: "(the members observer reads)".to_owned(),
            offset: end,
        })?;
        Ok(offsets)
    }

    /// The arguments of tracepoint `event` as a raw tracepoint program receives them (its
    /// `TP_PROTO`, in order). Named from the kernel's `__bpf_trace_<event>` function when BTF
    /// has it; otherwise (events defined from a shared class) unnamed, from the
    /// `btf_trace_<event>` prototype.
    pub fn tracepoint_params(&self, event: &str) -> Result<Vec<TracepointParam>, BtfError> {
        let what = |s: &str| format!("the arguments of tracepoint `{event}` ({s})");
        let named = format!("__bpf_trace_{event}");
        let candidates = self.btf.resolve_types_by_name(&named).unwrap_or_default();
        let proto = if let Some(Type::Func(func)) =
            candidates.into_iter().find(|t| matches!(t, Type::Func(_)))
        {
            self.btf
                .resolve_chained_type(&func)
                .map_err(|error| self.lookup_error(what(&named), error))?
        } else {
            let typedef = format!("btf_trace_{event}");
            let ty = self
                .btf
                .resolve_types_by_name(&typedef)
                .map_err(|error| self.lookup_error(what(&typedef), error))?
                .into_iter()
                .find(|t| matches!(t, Type::Typedef(_)))
                .ok_or_else(|| BtfError::NoSuchTracepoint {
                    event: event.to_owned(),
                })?;
            match self.strip_modifiers(ty)? {
                Type::Ptr(p) => self
                    .btf
                    .resolve_chained_type(&p)
                    .map_err(|error| self.lookup_error(what(&typedef), error))?,
                _ => {
                    return Err(BtfError::NoSuchTracepoint {
                        event: event.to_owned(),
                    });
                }
            }
        };
        let Type::FuncProto(proto) = proto else {
            return Err(BtfError::NoSuchTracepoint {
                event: event.to_owned(),
            });
        };
        // The first parameter is the tracepoint's private data pointer, not an argument.
        proto
            .parameters
            .iter()
            .skip(1)
            .map(|param| {
                let name = self
                    .btf
                    .resolve_name(param)
                    .map_err(|error| self.lookup_error(what("a parameter name"), error))?;
                let ty = self
                    .btf
                    .resolve_chained_type(param)
                    .map_err(|error| self.lookup_error(what("a parameter type"), error))?;
                Ok(TracepointParam {
                    name: (!name.is_empty()).then_some(name),
                    ty: self.spell(ty)?,
                })
            })
            .collect()
    }

    /// A parameter type as [`TracepointParam::ty`] spells it.
    fn spell(&self, ty: Type) -> Result<String, BtfError> {
        let name_of = |t: &dyn BtfType| self.btf.resolve_name(t).unwrap_or_default();
        Ok(match self.strip_modifiers(ty)? {
            Type::Ptr(p) => {
                let target = self.btf.resolve_chained_type(&p).map_or(Type::Void, |t| t);
                match self.strip_modifiers(target)? {
                    Type::Struct(s) => format!("struct {} *", name_of(&s)),
                    Type::Union(u) => format!("union {} *", name_of(&u)),
                    Type::Void => "void *".to_owned(),
                    _ => "pointer".to_owned(),
                }
            }
            Type::Int(i) => name_of(&i),
            Type::Enum(e) => format!("enum {}", name_of(&e)),
            Type::Enum64(e) => format!("enum {}", name_of(&e)),
            other => other.name().to_owned(),
        })
    }

    /// Offset of `path` in `struct_name` as `u16`, checking its size when `size` is given.
    fn u16_offset(
        &self,
        struct_name: &str,
        path: &str,
        size: Option<u32>,
    ) -> Result<u16, BtfError> {
        let offset = self.member_offset(struct_name, path)?;
        if let Some(expected) = size {
            let found = self.member_size(struct_name, path)?;
            if found != expected {
                return Err(BtfError::WrongSize {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                    expected,
                    found,
                });
            }
        }
        u16::try_from(offset).map_err(|_| BtfError::TooLarge {
            struct_name: struct_name.to_owned(),
            path: path.to_owned(),
            offset,
        })
    }

    fn lookup_error(&self, what: String, error: btf_rs::Error) -> BtfError {
        BtfError::LookupError {
            what: format!("{what} in `{}`", self.path.display()),
            error,
        }
    }

    /// The struct or union called `name`. BTF may hold several types of that name (a forward
    /// declaration, a typedef, a function): the first struct or union with members wins, then
    /// a typedef to one, then an empty one.
    fn composite(&self, name: &str) -> Result<Struct, BtfError> {
        let candidates = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|error| self.lookup_error(format!("struct `{name}`"), error))?;
        let mut empty = None;
        let mut via_typedef = None;
        for ty in candidates {
            let direct = matches!(ty, Type::Struct(_) | Type::Union(_));
            if !direct && !matches!(ty, Type::Typedef(_)) {
                continue;
            }
            match self.strip_modifiers(ty)? {
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => {
                    if direct {
                        return Ok(s);
                    }
                    via_typedef.get_or_insert(s);
                }
                Type::Struct(s) | Type::Union(s) => _ = empty.get_or_insert(s),
                _ => {}
            }
        }
        via_typedef.or(empty).ok_or_else(|| BtfError::NoSuchStruct {
            name: name.to_owned(),
        })
    }

    /// Follows typedefs, qualifiers and tags down to the type they name.
    fn strip_modifiers(&self, mut ty: Type) -> Result<Type, BtfError> {
        for _ in 0..MAX_TYPE_CHAIN {
            let next = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t),
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(t)
                }
                Type::TypeTag(t) => self.btf.resolve_chained_type(t),
                Type::DeclTag(t) => self.btf.resolve_chained_type(t),
                _ => return Ok(ty),
            };
            ty = next
                .map_err(|error| self.lookup_error("a typedef or qualifier".to_owned(), error))?;
        }
        Err(self.lookup_error(
            "a typedef or qualifier".to_owned(),
            btf_rs::Error::Format(format!("type chain longer than {MAX_TYPE_CHAIN}")),
        ))
    }

    /// The member type of `member`, modifiers stripped.
    fn member_type(&self, member: &Member) -> Result<Type, BtfError> {
        let ty = self
            .btf
            .resolve_chained_type(member)
            .map_err(|error| self.lookup_error("a member type".to_owned(), error))?;
        self.strip_modifiers(ty)
    }

    /// Finds `name` among the members of `s`, descending into anonymous struct/union members.
    /// Returns the member and its bit offset from the start of `s`.
    fn find_member(&self, s: &Struct, name: &str) -> Result<Option<(u64, Member)>, BtfError> {
        let mut anonymous = Vec::new();
        for member in &s.members {
            let member_name = self
                .btf
                .resolve_name(member)
                .map_err(|error| self.lookup_error(format!("member `{name}`"), error))?;
            if member_name == name {
                return Ok(Some((u64::from(member.bit_offset()), member.clone())));
            }
            if member_name.is_empty() {
                anonymous.push(member);
            }
        }
        for member in anonymous {
            if let Type::Struct(inner) | Type::Union(inner) = self.member_type(member)?
                && let Some((bits, found)) = self.find_member(&inner, name)?
            {
                return Ok(Some((u64::from(member.bit_offset()) + bits, found)));
            }
        }
        Ok(None)
    }

    /// Walks `path` (dot-separated member names) from `struct_name`.
    fn locate(&self, struct_name: &str, path: &str) -> Result<Located, BtfError> {
        let mut current = self.composite(struct_name)?;
        let mut bits: u64 = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let no_such_member = || BtfError::NoSuchMember {
                struct_name: struct_name.to_owned(),
                path: path.to_owned(),
                member: part.to_owned(),
            };
            // An empty name would match the first anonymous member.
            if part.is_empty() {
                return Err(no_such_member());
            }
            let (member_bits, member) = self
                .find_member(&current, part)?
                .ok_or_else(no_such_member)?;
            if member.bitfield_size().is_some_and(|size| size != 0) || member_bits % 8 != 0 {
                return Err(BtfError::Bitfield {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                });
            }
            bits += member_bits;
            let ty = self.member_type(&member)?;
            if parts.peek().is_none() {
                let offset = u32::try_from(bits / 8).map_err(|_| BtfError::TooLarge {
                    struct_name: struct_name.to_owned(),
                    path: path.to_owned(),
                    offset: u32::MAX,
                })?;
                return Ok(Located { offset, ty });
            }
            current = match ty {
                Type::Struct(s) | Type::Union(s) => s,
                other => {
                    return Err(BtfError::NotComposite {
                        struct_name: struct_name.to_owned(),
                        path: path.to_owned(),
                        member: part.to_owned(),
                        kind: other.name(),
                    });
                }
            };
        }
        // `split` always yields at least one part, so the loop returns.
        Err(BtfError::NoSuchMember {
            struct_name: struct_name.to_owned(),
            path: path.to_owned(),
            member: path.to_owned(),
        })
    }

    /// Size of a type (modifiers already stripped), or the kind of a type without a size.
    fn type_size(&self, ty: &Type, depth: usize) -> Result<u32, &'static str> {
        Ok(match ty {
            Type::Int(t) => size_u32(t.size()),
            Type::Float(t) => size_u32(t.size()),
            Type::Enum(t) => size_u32(t.size()),
            Type::Enum64(t) => size_u32(t.size()),
            Type::Struct(t) | Type::Union(t) => size_u32(t.size()),
            // Observer reads the running kernel, which has the same pointer width as itself.
            Type::Ptr(_) => size_u32(size_of::<usize>()),
            Type::Array(a) if depth < MAX_TYPE_CHAIN => {
                let elem = self
                    .btf
                    .resolve_chained_type(a)
                    .ok()
                    .and_then(|t| self.strip_modifiers(t).ok())
                    .ok_or("broken array")?;
                let elem_size = self.type_size(&elem, depth + 1)?;
                u32::try_from(a.len())
                    .ok()
                    .and_then(|n| n.checked_mul(elem_size))
                    .ok_or("huge array")?
            }
            other => return Err(other.name()),
        })
    }
}

/// BTF sizes are 32-bit in the format; btf-rs hands them out as `usize`.
fn size_u32(size: usize) -> u32 {
    u32::try_from(size).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::kernel::tracefs;

    const TRACEFS_ROOTS: [&str; 2] = [tracefs::TRACEFS_PATH, tracefs::DEBUGFS_TRACING_PATH];

    /// The running kernel's BTF, parsed once for all tests; `None` (tests skip) without it.
    fn kernel() -> Option<&'static KernelBtf> {
        static KERNEL: OnceLock<Option<KernelBtf>> = OnceLock::new();
        let btf = KERNEL
            .get_or_init(|| {
                Path::new(VMLINUX_BTF)
                    .exists()
                    .then(|| KernelBtf::from_sys().expect("the kernel's BTF exists and must parse"))
            })
            .as_ref();
        if btf.is_none() {
            eprintln!("skipped: no BTF at {VMLINUX_BTF}");
        }
        btf
    }

    #[test]
    fn kernel_member_offsets_and_sizes() {
        let Some(btf) = kernel() else { return };
        // Sizes are fixed by the kernel's design; offsets vary by version and config.
        assert_eq!(btf.member_size("sk_buff", "cb").ok(), Some(48));
        assert_eq!(btf.member_size("tcp_skb_cb", "tcp_gso_segs").ok(), Some(2));
        assert_eq!(btf.member_size("net", "ns.inum").ok(), Some(4));
        assert_eq!(
            btf.member_size("sock", "__sk_common.skc_net.net").ok(),
            Some(8)
        );
        // `tcp_gso_segs` is inside an anonymous union/struct, right after `seq` and `end_seq`.
        assert_eq!(btf.member_offset("tcp_skb_cb", "seq").ok(), Some(0));
        assert!(
            btf.member_offset("tcp_skb_cb", "tcp_gso_segs").ok()
                >= btf
                    .member_offset("tcp_skb_cb", "end_seq")
                    .ok()
                    .map(|o| o + 4)
        );
        // `sk_common` is the first member of `sock`, so sock and sock_common agree.
        assert_eq!(
            btf.member_offset("sock", "__sk_common.skc_net").ok(),
            btf.member_offset("sock_common", "skc_net").ok()
        );
        // `possible_net_t` is a struct whose `net` is at 0.
        assert_eq!(
            btf.member_offset("sock", "__sk_common.skc_net.net").ok(),
            btf.member_offset("sock", "__sk_common.skc_net").ok()
        );
        assert_eq!(
            btf.member_offset("net", "ns.inum").ok(),
            btf.member_offset("net", "ns")
                .ok()
                .zip(btf.member_offset("ns_common", "inum").ok())
                .map(|(a, b)| a + b)
        );
    }

    #[test]
    fn kernel_struct_offsets() {
        let Some(btf) = kernel() else { return };
        let offsets = btf.struct_offsets();
        eprintln!("struct offsets on this kernel: {offsets:?}");
        let offsets = offsets.expect("the running kernel's offsets must be found");
        // Cross-checks against independent lookups.
        assert_eq!(
            u32::from(offsets.skb_cb),
            btf.member_offset("sk_buff", "cb").unwrap_or(0)
        );
        // Every offset is the one a separate member lookup finds: nothing here assumes the
        // values of one kernel build (they move between builds and configurations).
        let lookup = |ty: &str, path: &str| {
            btf.member_offset(ty, path)
                .ok()
                .and_then(|o| u16::try_from(o).ok())
        };
        assert_eq!(
            Some(offsets.tcp_skb_cb_gso_segs),
            lookup("tcp_skb_cb", "tcp_gso_segs")
        );
        assert_eq!(Some(offsets.sock_net), lookup("sock_common", "skc_net"));
        assert_eq!(Some(offsets.net_ns_inum), lookup("net", "ns.inum"));
        assert_eq!(Some(offsets.sock_err), lookup("sock", "sk_err"));
        assert_eq!(Some(offsets.sock_state), lookup("sock_common", "skc_state"));
        assert!(offsets.sock_net > 0 && offsets.net_ns_inum > 0);
        // `tcp_gso_segs` follows `seq` and `end_seq` (u32 each) in every kernel since 3.x.
        assert!(offsets.tcp_skb_cb_gso_segs >= 8);
    }

    #[test]
    fn kernel_sock_offsets_cover_one_window() {
        let Some(btf) = kernel() else { return };
        let o = btf
            .sock_offsets()
            .expect("the running kernel's sock_common layout");
        eprintln!("sock offsets on this kernel: {o:?}");
        // The window is the end of the furthest member read, and fits the programs' buffer.
        assert_eq!(o.window_len, o.v6_rcv_saddr.max(o.v6_daddr) + 16);
        assert!(o.window_len <= observer_common::RECORD_MAX);
        // Ports are a pair: the remote port (big-endian) then the local one.
        assert_eq!(o.num, o.dport + 2);
        // Offsets outside the window, in the full socket.
        assert!(o.protocol >= o.window_len && o.inet_sport >= o.window_len);
    }

    #[test]
    fn kernel_tracepoint_arguments_resolve_for_every_raw_program() {
        let Some(btf) = kernel() else { return };
        for event in [
            "tcp_retransmit_skb",
            "tcp_retransmit_synack",
            "tcp_send_reset",
            "tcp_receive_reset",
            "kfree_skb",
            "inet_sock_set_state",
        ] {
            let params = btf
                .tracepoint_params(event)
                .unwrap_or_else(|e| panic!("{event}: {e}"));
            eprintln!("{event}: {params:?}");
            let args = super::super::raw_args::resolve(event, &params)
                .unwrap_or_else(|e| panic!("{event}: {e}"));
            // Every program needs the socket or the packet.
            assert!(
                args.sk != observer_common::ARG_ABSENT || args.skb != observer_common::ARG_ABSENT,
                "{event}: {args:?}"
            );
        }
        // A class-defined event has no function of its own: its one argument is found by type.
        let params = btf.tracepoint_params("tcp_receive_reset").expect("params");
        assert_eq!(params.len(), 1);
        assert_eq!(params[0].ty, "struct sock *");
        assert_eq!(
            btf.tracepoint_params("no_such_tracepoint").err().map(|e| e.to_string()),
            Some(
                "no tracepoint `no_such_tracepoint` in BTF (neither `__bpf_trace_no_such_tracepoint` \
                 nor `btf_trace_no_such_tracepoint`)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn kernel_member_errors_name_struct_and_path() {
        let Some(btf) = kernel() else { return };
        let err = btf
            .member_offset("sock", "__sk_common.no_such_member")
            .err();
        assert!(
            matches!(&err, Some(BtfError::NoSuchMember { struct_name, path, member })
                if struct_name == "sock" && path == "__sk_common.no_such_member" && member == "no_such_member"),
            "{err:?}"
        );
        // Through a pointer is not through a struct.
        assert!(matches!(
            btf.member_offset("sk_buff", "sk.sk_mark"),
            Err(BtfError::NotComposite { kind: "ptr", .. })
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct_observer", "x"),
            Err(BtfError::NoSuchStruct { .. })
        ));
        // `sk_buff.pkt_type` is a 3-bit bitfield.
        let err = btf.member_offset("sk_buff", "pkt_type").err();
        assert!(matches!(&err, Some(BtfError::Bitfield { .. })), "{err:?}");
    }

    #[test]
    fn kernel_enums_match_tracepoint_print_formats() {
        let Some(btf) = kernel() else { return };
        let drop = btf.enum_values("skb_drop_reason").expect("skb_drop_reason");
        assert!(
            drop.iter()
                .any(|(n, _)| n == "SKB_DROP_REASON_NETFILTER_DROP")
        );
        assert!(matches!(
            btf.enum_values("no_such_enum_observer"),
            Err(BtfError::NoSuchEnum { .. })
        ));

        // Every name the live kfree_skb / tcp_send_reset print formats show must exist in the
        // live BTF enum with the same value. Saved fixtures are never compared with the running
        // kernel: two builds of one series may number the enum differently (a stable update
        // added a drop reason once); `saved_print_formats_are_self_consistent` checks them.
        let Some(live) = TRACEFS_ROOTS
            .into_iter()
            .map(tracefs::TraceFs::at)
            .find(|t| t.root().join("events").is_dir())
        else {
            eprintln!("skipped live print formats: tracefs is not mounted");
            return;
        };
        for (category, event, enum_name, prefix) in [
            ("skb", "kfree_skb", "skb_drop_reason", "SKB_DROP_REASON_"),
            ("tcp", "tcp_send_reset", "sk_rst_reason", "SK_RST_REASON_"),
        ] {
            if !live.has_event(category, event) {
                eprintln!("skipped live {category}:{event}: not available");
                continue;
            }
            let format = live.format(category, event).expect("live format parses");
            let printed = format.symbolic_values("reason");
            assert!(printed.len() > 20, "live {event}: {printed:?}");
            let values = btf.enum_values(enum_name).expect(enum_name);
            for (value, name) in printed {
                let full = format!("{prefix}{name}");
                let in_btf = values.iter().find(|(n, _)| *n == full).map(|(_, v)| *v);
                assert_eq!(in_btf, Some(value), "live {event}: {full}");
            }
        }
    }

    #[test]
    fn saved_print_formats_are_self_consistent() {
        // A fixture is only checked against itself: names and values are unique, and the
        // enum's MAX sentinel (printed by kfree_skb) is above every reason.
        for (event, fixture) in [
            ("kfree_skb", include_str!("fixtures/kfree_skb.format")),
            (
                "kfree_skb 5.17",
                include_str!("fixtures/kfree_skb_5.17.format"),
            ),
            (
                "tcp_send_reset",
                include_str!("fixtures/tcp_send_reset.format"),
            ),
        ] {
            let format = tracefs::parse_format(fixture).expect("fixture parses");
            let printed = format.symbolic_values("reason");
            // 5.17 had 12 drop reasons; later kernels have many more.
            assert!(printed.len() > 10, "{event}: {printed:?}");
            let mut names: Vec<&str> = printed.iter().map(|(_, n)| n.as_str()).collect();
            let mut values: Vec<i64> = printed.iter().map(|(v, _)| *v).collect();
            names.sort_unstable();
            names.dedup();
            values.sort_unstable();
            values.dedup();
            assert_eq!(names.len(), printed.len(), "{event}: a name printed twice");
            assert_eq!(
                values.len(),
                printed.len(),
                "{event}: a value printed twice"
            );
            if let Some((max, _)) = printed.iter().find(|(_, n)| n == "MAX") {
                assert!(
                    printed.iter().all(|(v, _)| v <= max),
                    "{event}: MAX is not last"
                );
            }
        }
    }

    /// Builds a BTF blob by hand: header, type section, string section.
    #[derive(Default)]
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    const INT: u32 = 1;
    const PTR: u32 = 2;
    const ARRAY: u32 = 3;
    const STRUCT: u32 = 4;
    const UNION: u32 = 5;
    const ENUM: u32 = 6;
    const FWD: u32 = 7;
    const TYPEDEF: u32 = 8;
    const VOLATILE: u32 = 9;
    const CONST: u32 = 10;
    const ENUM64: u32 = 19;

    impl Blob {
        fn new() -> Self {
            Blob {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let offset = u32::try_from(self.strings.len()).expect("small blob");
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            offset
        }

        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        /// A `btf_type` header.
        fn ty(&mut self, name: &str, kind: u32, kind_flag: bool, vlen: u32, size_or_type: u32) {
            let name = self.name(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            self.words(&[name, info, size_or_type]);
        }

        fn int(&mut self, name: &str, bytes: u32, signed: bool) {
            self.ty(name, INT, false, 0, bytes);
            self.words(&[(u32::from(signed) << 24) | (bytes * 8)]);
        }

        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) {
            let vlen = u32::try_from(members.len()).expect("few members");
            self.ty(name, kind, kind_flag, vlen, size);
            for &(member, ty, offset) in members {
                let member = self.name(member);
                self.words(&[member, ty, offset]);
            }
        }

        fn finish(self) -> Vec<u8> {
            let type_len = u32::try_from(self.types.len()).expect("small blob");
            let str_len = u32::try_from(self.strings.len()).expect("small blob");
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
            out.extend_from_slice(&[1, 0]); // version, flags
            for w in [24, 0, type_len, type_len, str_len] {
                // hdr_len, type_off, type_len, str_off, str_len
                out.extend_from_slice(&u32::to_le_bytes(w));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A small BTF with anonymous unions/structs, typedef and qualifier chains, a bitfield,
    /// enums and a forward declaration sharing a struct's name.
    fn hand_built() -> KernelBtf {
        let mut b = Blob::new();
        b.ty("outer", FWD, false, 0, 0); // 1: struct outer; (listed before the definition)
        b.int("int", 4, true); // 2
        b.int("unsigned short", 2, false); // 3
        b.composite(STRUCT, "", 4, false, &[("x", 3, 0), ("y", 3, 16)]); // 4
        b.composite(UNION, "", 4, false, &[("whole", 2, 0), ("", 4, 0)]); // 5
        b.composite(STRUCT, "inner", 8, false, &[("first", 2, 0), ("", 5, 32)]); // 6
        b.ty("inner_t", TYPEDEF, false, 0, 6); // 7
        b.ty("", CONST, false, 0, 7); // 8
        b.ty("", VOLATILE, false, 0, 8); // 9
        b.ty("", PTR, false, 0, 6); // 10
        b.ty("", ARRAY, false, 0, 0); // 11: unsigned short[2]
        b.words(&[3, 2, 2]);
        b.composite(
            STRUCT,
            "outer",
            24,
            false,
            &[
                ("pad", 2, 0),
                ("in", 9, 32),
                ("arr", 11, 96),
                ("ptr", 10, 128),
            ],
        ); // 12
        // 13: kind_flag struct: member offsets carry the bitfield size in the top 8 bits.
        b.composite(
            STRUCT,
            "bits",
            4,
            true,
            &[("flag", 2, (1 << 24) | 3), ("b", 3, 16)],
        );
        b.ty("colour", ENUM, true, 2, 4); // 14: signed enum
        let (red, green) = (b.name("RED"), b.name("GREEN"));
        b.words(&[red, (-1i32).cast_unsigned(), green, 2]);
        b.ty("big", ENUM64, false, 2, 8); // 15
        let (small, large) = (b.name("SMALL"), b.name("LARGE"));
        b.words(&[small, 1, 0, large, 0, 1]);
        b.composite(STRUCT, "inner_alias_user", 8, false, &[("i", 7, 0)]); // 16
        KernelBtf::from_bytes(&b.finish(), "hand-built").expect("hand-built BTF parses")
    }

    #[test]
    fn hand_built_anonymous_descent_and_modifiers() {
        let btf = hand_built();
        let offset = |s: &str, p: &str| btf.member_offset(s, p).ok();
        let size = |s: &str, p: &str| btf.member_size(s, p).ok();
        // outer.in (at 4, through volatile -> const -> typedef) -> anonymous union -> anonymous
        // struct -> y (at 2).
        assert_eq!(offset("outer", "in.y"), Some(10));
        assert_eq!(size("outer", "in.y"), Some(2));
        assert_eq!(offset("outer", "in.x"), Some(8));
        assert_eq!(offset("outer", "in.whole"), Some(8));
        assert_eq!(size("outer", "in.whole"), Some(4));
        assert_eq!(offset("outer", "in.first"), Some(4));
        assert_eq!(size("outer", "in"), Some(8));
        assert_eq!(offset("outer", "arr"), Some(12));
        assert_eq!(size("outer", "arr"), Some(4));
        assert_eq!(offset("outer", "ptr"), Some(16));
        assert_eq!(size("outer", "ptr"), Some(8));
        assert_eq!(offset("inner", "y"), Some(6));
        assert_eq!(offset("inner_alias_user", "i.y"), Some(6));
        // A typedef name resolves to its struct too.
        assert_eq!(offset("inner_t", "y"), Some(6));
        assert_eq!(btf.struct_size("outer").ok(), Some(24));
        assert_eq!(offset("bits", "b"), Some(2));
    }

    #[test]
    fn hand_built_errors() {
        let btf = hand_built();
        assert!(matches!(
            btf.member_offset("outer", "ptr.first"),
            Err(BtfError::NotComposite { kind: "ptr", .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "pad.x"),
            Err(BtfError::NotComposite { kind: "int", .. })
        ));
        let err = btf.member_offset("outer", "in.nope").err();
        assert!(
            matches!(&err, Some(BtfError::NoSuchMember { struct_name, path, member })
                if struct_name == "outer" && path == "in.nope" && member == "nope"),
            "{err:?}"
        );
        assert_eq!(
            err.map(|e| e.to_string()).unwrap_or_default(),
            "`struct outer` has no member `in.nope` (`nope` not found)"
        );
        assert!(matches!(
            btf.member_offset("outer", ""),
            Err(BtfError::NoSuchMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "in..y"),
            Err(BtfError::NoSuchMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("bits", "flag"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            btf.member_offset("colour", "RED"),
            Err(BtfError::NoSuchStruct { .. })
        ));
        assert!(matches!(
            btf.struct_offsets(),
            Err(BtfError::NoSuchStruct { name }) if name == "sk_buff"
        ));
        assert!(matches!(
            KernelBtf::from_bytes(b"not btf", "junk"),
            Err(BtfError::BadHeader { .. })
        ));
        assert!(matches!(
            KernelBtf::from_file(Path::new("/nonexistent/observer.btf")),
            Err(BtfError::FileError { .. })
        ));
    }

    #[test]
    fn hand_built_enums() {
        let btf = hand_built();
        assert_eq!(
            btf.enum_values("colour").ok(),
            Some(vec![("RED".to_owned(), -1), ("GREEN".to_owned(), 2)])
        );
        assert_eq!(
            btf.enum_values("big").ok(),
            Some(vec![("SMALL".to_owned(), 1), ("LARGE".to_owned(), 1 << 32)])
        );
        assert!(matches!(
            btf.enum_values("outer"),
            Err(BtfError::NoSuchEnum { .. })
        ));
    }
}

#[cfg(test)]
mod proptests;
