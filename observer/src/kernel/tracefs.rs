//! Tracepoint format discovery.
//!
//! A tracepoint's record layout is not ABI: fields move between kernel versions (`err` appeared
//! in `tcp_retransmit_skb`, `rx_sk` shifted `kfree_skb`'s `reason`) and between configurations
//! (PREEMPT_RT adds `common_*` fields that shift everything after them). The only authority is
//! the tracepoint's `format` file in tracefs, so observer reads it at start-up and hands the
//! offsets to its kernel programs instead of hard-coding them.
//!
//! The parsing ([`parse_format`], [`EventFormat`]) is pure so it can be tested on saved format
//! files; [`TraceFs`] is the thin I/O layer around it.
use std::{
    cell::RefCell,
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use observer_common::{
    FIELD_ABSENT, KfreeSkbLayout, RECORD_MAX, RetransmitSkbLayout, RetransmitSynackLayout,
    SEND_RESET_SOCKADDR, SEND_RESET_SPLIT, SendResetLayout, SetStateLayout, SockTupleLayout,
};

/// Where tracefs is mounted on current kernels (and where we mount it if nobody has).
pub const TRACEFS_PATH: &str = "/sys/kernel/tracing";
/// The older location, inside debugfs (auto-mounted by the kernel when debugfs is).
pub const DEBUGFS_TRACING_PATH: &str = "/sys/kernel/debug/tracing";

/// Errors reading tracepoint formats from tracefs.
#[derive(Debug, thiserror::Error)]
pub enum TraceFsError {
    /// A tracefs file could not be read.
    #[error("cannot read `{path}`")]
    FileError {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// A format file was read but could not be understood.
    #[error("cannot parse tracepoint format `{path}`")]
    FormatError {
        path: PathBuf,
        #[source]
        error: FormatError,
    },
    /// Mounting tracefs failed (no tracefs was mounted at the usual places).
    #[error(
        "no tracefs found at {TRACEFS_PATH} or {DEBUGFS_TRACING_PATH}, and mounting it at `{path}` failed"
    )]
    MountError {
        path: PathBuf,
        #[source]
        io_error: io::Error,
    },
    /// tracefs was mounted but has no `events/` directory (kernel built without tracepoints).
    #[error(
        "tracefs mounted at `{path}` has no `events/` directory (kernel without tracepoint support?)"
    )]
    NoEvents { path: PathBuf },
    /// A category or event name that cannot name a tracefs directory.
    #[error("invalid tracepoint name `{category}:{name}`")]
    InvalidName { category: String, name: String },
}

/// Errors understanding a tracepoint format, or finding the fields observer needs in it.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The text does not follow the tracefs `format` file syntax.
    #[error("malformed format file, line {line}: {reason}: `{text}`")]
    Malformed {
        /// 1-based line number (0 when the problem is the file as a whole).
        line: usize,
        reason: &'static str,
        text: String,
    },
    /// A required header line (`name:` or `ID:`) is missing.
    #[error("malformed format file: no `{header}` line")]
    MissingHeader { header: &'static str },
    /// The event has no field of that name.
    #[error("tracepoint `{event}` has no field `{field}`")]
    Missing { event: String, field: String },
    /// The field exists but does not have the size observer reads.
    #[error("tracepoint `{event}` field `{field}` has {found} bytes, expected {expected}")]
    WrongSize {
        event: String,
        field: String,
        expected: usize,
        found: usize,
    },
    /// The field's offset does not fit the `u16` the kernel programs take.
    #[error("tracepoint `{event}` field `{field}` is at offset {offset}, beyond u16")]
    OffsetTooLarge {
        event: String,
        field: String,
        offset: usize,
    },
    /// The fields observer reads end beyond the buffer its programs copy the record into.
    #[error(
        "tracepoint `{event}`: the fields observer reads end at byte {end}, beyond the {max}-byte record buffer of its programs"
    )]
    RecordTooLarge { event: String, end: usize, max: u16 },
}

/// A mounted tracefs. Only reads format files; never enables or configures tracing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceFs {
    root: PathBuf,
}

impl TraceFs {
    /// Finds a mounted tracefs (`/sys/kernel/tracing`, then `/sys/kernel/debug/tracing`),
    /// mounting tracefs at `/sys/kernel/tracing` if neither has `events/`.
    ///
    /// Minimal systems and containers often boot without tracefs mounted; observer runs as root
    /// anyway, so mounting it is friendlier than failing.
    pub fn locate_or_mount() -> Result<TraceFs, TraceFsError> {
        for candidate in [TRACEFS_PATH, DEBUGFS_TRACING_PATH] {
            let tracefs = TraceFs::at(candidate);
            if tracefs.events_dir().is_dir() {
                return Ok(tracefs);
            }
        }
        let tracefs = TraceFs::at(TRACEFS_PATH);
        mount_tracefs(tracefs.root()).map_err(|io_error| TraceFsError::MountError {
            path: tracefs.root.clone(),
            io_error,
        })?;
        if tracefs.events_dir().is_dir() {
            Ok(tracefs)
        } else {
            Err(TraceFsError::NoEvents {
                path: tracefs.root.clone(),
            })
        }
    }

    /// A tracefs rooted at `root`, without checking anything (tests, unusual mounts).
    pub fn at(root: impl Into<PathBuf>) -> TraceFs {
        TraceFs { root: root.into() }
    }

    /// The directory tracefs is mounted on.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn events_dir(&self) -> PathBuf {
        self.root.join("events")
    }

    /// Path of the `format` file of `category:name`, or `None` if the names cannot be a single
    /// path component each (so a caller's typo cannot escape tracefs).
    pub fn format_path(&self, category: &str, name: &str) -> Option<PathBuf> {
        let valid = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\0']);
        (valid(category) && valid(name))
            .then(|| self.events_dir().join(category).join(name).join("format"))
    }

    /// Whether the running kernel has tracepoint `category:name` (its `format` file exists).
    pub fn has_event(&self, category: &str, name: &str) -> bool {
        self.format_path(category, name)
            .is_some_and(|path| path.is_file())
    }

    /// Reads and parses the format of tracepoint `category:name`.
    pub fn format(&self, category: &str, name: &str) -> Result<EventFormat, TraceFsError> {
        let path = self
            .format_path(category, name)
            .ok_or_else(|| TraceFsError::InvalidName {
                category: category.to_owned(),
                name: name.to_owned(),
            })?;
        let text = std::fs::read_to_string(&path).map_err(|io_error| TraceFsError::FileError {
            path: path.clone(),
            io_error,
        })?;
        parse_format(&text).map_err(|error| TraceFsError::FormatError { path, error })
    }
}

/// `mount -t tracefs nodev <target>`.
fn mount_tracefs(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: every pointer is a valid NUL-terminated C string that outlives the call (the
    // literals are 'static, `target` lives until the end of this function); `data` may be NULL.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A tracepoint's record layout, as its tracefs `format` file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFormat {
    /// Event name (`tcp_retransmit_skb`), without category.
    pub name: String,
    /// The event's id (what `common_type` holds in its records).
    pub id: u32,
    /// Every field, `common_*` ones included, in file order.
    pub fields: Vec<FieldDef>,
    /// The `print fmt:` text: the format string and its arguments, as the kernel prints it.
    pub print_fmt: String,
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldDef {
    /// The C declaration as the kernel prints it, e.g. `__u8 saddr_v6[16]`.
    pub decl: String,
    /// The field name alone, e.g. `saddr_v6`.
    pub name: String,
    /// Byte offset within the record.
    pub offset: usize,
    /// Size in bytes (of the whole array for array fields).
    pub size: usize,
    /// Whether the kernel marks the field signed (`false` when the file does not say).
    pub signed: bool,
}

/// Parses the text of a tracefs `format` file.
///
/// Lines other than `name:`, `ID:`, `field:` and `print fmt:` (e.g. `format:`, blank lines) are
/// ignored, so a future header line does not break observer; `field:` lines must be complete.
pub fn parse_format(text: &str) -> Result<EventFormat, FormatError> {
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    let mut print_fmt = None;
    let mut lines = text.lines().enumerate();
    while let Some((index, raw)) = lines.next() {
        let line = raw.trim();
        let malformed = |reason| FormatError::Malformed {
            line: index + 1,
            reason,
            text: raw.to_owned(),
        };
        if let Some(rest) = line.strip_prefix("name:") {
            let rest = rest.trim();
            if rest.is_empty() {
                return Err(malformed("empty event name"));
            }
            name = Some(rest.to_owned());
        } else if let Some(rest) = line.strip_prefix("ID:") {
            id = Some(
                rest.trim()
                    .parse::<u32>()
                    .map_err(|_| malformed("bad ID"))?,
            );
        } else if line.starts_with("field:") {
            fields.push(parse_field(line).map_err(malformed)?);
        } else if let Some(rest) = line.strip_prefix("print fmt:") {
            // The print format is the rest of the file (one line in practice).
            let mut fmt = rest.trim().to_owned();
            for (_, more) in lines.by_ref() {
                if !more.trim().is_empty() {
                    fmt.push(' ');
                    fmt.push_str(more.trim());
                }
            }
            print_fmt = Some(fmt);
        }
    }
    let name = name.ok_or(FormatError::MissingHeader { header: "name:" })?;
    let id = id.ok_or(FormatError::MissingHeader { header: "ID:" })?;
    if fields.is_empty() {
        return Err(FormatError::Malformed {
            line: 0,
            reason: "no `field:` lines",
            text: name,
        });
    }
    Ok(EventFormat {
        name,
        id,
        fields,
        print_fmt: print_fmt.unwrap_or_default(),
    })
}

/// Parses `field:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;` (already trimmed).
fn parse_field(line: &str) -> Result<FieldDef, &'static str> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = None;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':').ok_or("field attribute without `:`")?;
        let value = value.trim();
        match key.trim() {
            "field" => decl = Some(value),
            "offset" => offset = Some(value.parse::<usize>().map_err(|_| "bad offset")?),
            "size" => size = Some(value.parse::<usize>().map_err(|_| "bad size")?),
            "signed" => {
                signed = Some(match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err("bad signed"),
                })
            }
            // Unknown attributes may be added by future kernels.
            _ => {}
        }
    }
    let decl = decl.ok_or("no declaration")?;
    let name = field_name(decl).ok_or("no field name in declaration")?;
    Ok(FieldDef {
        decl: decl.to_owned(),
        name: name.to_owned(),
        offset: offset.ok_or("no offset")?,
        size: size.ok_or("no size")?,
        signed: signed.unwrap_or(false),
    })
}

/// The declared name in a C declaration: the last identifier, once array suffixes are dropped
/// (`__u8 saddr_v6[16]` -> `saddr_v6`, `__data_loc char[] name` -> `name`).
fn field_name(decl: &str) -> Option<&str> {
    let mut decl = decl.trim_end();
    while let Some(stripped) = decl.strip_suffix(']') {
        decl = stripped[..stripped.rfind('[')?].trim_end();
    }
    // Past the last character that cannot be in a name, whatever its width in bytes (a corrupt
    // file may hold any UTF-8).
    let start = decl
        .char_indices()
        .rev()
        .find(|(_, c)| !is_ident_char(*c))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let name = &decl[start..];
    (!name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit())).then_some(name)
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl EventFormat {
    /// The field called `name`, if the event has one.
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of `name` as u16, checking it exists and has exactly `size` bytes: the kernel
    /// programs read that many bytes there, so a resized field must be refused, not misread.
    pub fn offset_of(&self, name: &str, size: usize) -> Result<u16, FormatError> {
        self.optional_offset_of(name, size)?
            .ok_or_else(|| FormatError::Missing {
                event: self.name.clone(),
                field: name.to_owned(),
            })
    }

    /// How many bytes of the record the programs copy to read the fields `names` (those the
    /// event has): the end of the last one. Checked against [`RECORD_MAX`], the size of the
    /// programs' record buffer.
    pub fn read_span(&self, names: &[&str]) -> Result<u16, FormatError> {
        let end = names
            .iter()
            .filter_map(|name| self.field(name))
            .map(|f| f.offset + f.size)
            .max()
            .unwrap_or(0);
        u16::try_from(end)
            .ok()
            .filter(|&end| end <= RECORD_MAX)
            .ok_or_else(|| FormatError::RecordTooLarge {
                event: self.name.clone(),
                end,
                max: RECORD_MAX,
            })
    }

    /// Same as [`EventFormat::offset_of`] but `Ok(None)` when the field is absent (optional
    /// fields like `err` that older kernels lack).
    pub fn optional_offset_of(&self, name: &str, size: usize) -> Result<Option<u16>, FormatError> {
        let Some(field) = self.field(name) else {
            return Ok(None);
        };
        if field.size != size {
            return Err(FormatError::WrongSize {
                event: self.name.clone(),
                field: name.to_owned(),
                expected: size,
                found: field.size,
            });
        }
        // FIELD_ABSENT (u16::MAX) is reserved as the "no such field" marker.
        u16::try_from(field.offset)
            .ok()
            .filter(|&offset| offset != FIELD_ABSENT)
            .map(Some)
            .ok_or_else(|| FormatError::OffsetTooLarge {
                event: self.name.clone(),
                field: name.to_owned(),
                offset: field.offset,
            })
    }

    /// The `{ value, "NAME" }` pairs of `__print_symbolic(REC-><field>, ...)` in the print
    /// format, in order: how the running kernel numbers an enum field such as `kfree_skb`'s
    /// `reason` (the numbering changes between kernel versions).
    ///
    /// Pairs whose value is not a number (e.g. `{ TCP_ESTABLISHED, "TCP_ESTABLISHED" }` on
    /// kernels that do not resolve the enum) are skipped; when the field is printed by several
    /// `__print_symbolic` calls, their pairs are concatenated without repeating a pair.
    pub fn symbolic_values(&self, field: &str) -> Vec<(i64, String)> {
        let mut out: Vec<(i64, String)> = Vec::new();
        for args in print_symbolic_calls(&self.print_fmt) {
            let Some((subject, pairs)) = args.split_first() else {
                continue;
            };
            if !refers_to_field(subject, field) {
                continue;
            }
            for pair in pairs.iter().filter_map(|p| parse_symbolic_pair(p)) {
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
        }
        out
    }
}

/// The top-level argument lists of every `__print_symbolic(...)` call in `fmt`, outside string
/// literals, including calls nested in other calls' arguments.
fn print_symbolic_calls(fmt: &str) -> Vec<Vec<&str>> {
    const CALL: &str = "__print_symbolic";
    let bytes = fmt.as_bytes();
    let mut calls = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'\'' => i = skip_quoted(bytes, i),
            _ if bytes[i..].starts_with(CALL.as_bytes())
                && (i == 0 || !is_ident_char(char::from(bytes[i - 1]))) =>
            {
                let after = i + CALL.len();
                let open = after + (fmt[after..].len() - fmt[after..].trim_start().len());
                if bytes.get(open) == Some(&b'(')
                    && let Some(args) = split_args(fmt, open)
                {
                    calls.push(args);
                }
                // Continue inside the call: nested calls are found too.
                i = after;
            }
            _ => i += 1,
        }
    }
    calls
}

/// Index just past the string or char literal starting at `start` (which holds the quote).
fn skip_quoted(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Splits the parenthesised list opening at `open` into its top-level, trimmed arguments,
/// respecting nested `()`, `{}`, `[]` and literals. `None` if the list is not closed.
fn split_args(text: &str, open: usize) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut args = Vec::new();
    let mut start = open + 1;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'\'' => {
                i = skip_quoted(bytes, i);
                continue;
            }
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    args.push(text[start..i].trim());
                    return Some(args);
                }
            }
            b',' if depth == 1 => {
                args.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Whether `expr` (the first argument of `__print_symbolic`) is `REC-><field>`, possibly cast
/// or parenthesised.
fn refers_to_field(expr: &str, field: &str) -> bool {
    let mut expr = expr.trim();
    while let Some(inner) = expr.strip_prefix('(').and_then(|e| e.strip_suffix(')')) {
        expr = inner.trim();
    }
    let Some(before) = expr
        .strip_suffix(field)
        .and_then(|e| e.trim_end().strip_suffix("->"))
        .and_then(|e| e.trim_end().strip_suffix("REC"))
    else {
        return false;
    };
    !before.ends_with(is_ident_char)
}

/// Parses `{ 12, "NETFILTER_DROP" }`; `None` unless the value is an integer literal.
fn parse_symbolic_pair(pair: &str) -> Option<(i64, String)> {
    let inner = pair.trim().strip_prefix('{')?.strip_suffix('}')?;
    // Reuse the argument splitter by viewing the pair as a parenthesised list.
    let wrapped = format!("({inner})");
    let parts = split_args(&wrapped, 0)?;
    let [value, name] = parts.as_slice() else {
        return None;
    };
    Some((parse_int(value)?, parse_c_string(name)?))
}

/// Parses a C integer literal: decimal, `0x` hex or octal, optional sign, optional `u`/`l`
/// suffixes, optional surrounding parentheses (`(-1)`).
fn parse_int(text: &str) -> Option<i64> {
    let mut text = text.trim();
    while let Some(inner) = text.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        text = inner.trim();
    }
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, text),
    };
    let text = text.trim_end_matches(['u', 'U', 'l', 'L']);
    let magnitude = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(&text[1..], 8).ok()?
    } else if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>().ok()?
    } else {
        return None;
    };
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Parses a C string literal, handling the common escapes.
fn parse_c_string(text: &str) -> Option<String> {
    let inner = text.trim().strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            other => out.push(other),
        }
    }
    Some(out)
}

/// Pointer fields are read as 64-bit values: observer's kernel programs only run on 64-bit
/// kernels.
const POINTER_SIZE: usize = 8;

/// The fields one layout reads, looked up in a tracepoint's format: remembers every field it
/// hands out, so that the layout's `record_size` (how much of the record the program copies)
/// covers exactly the fields the layout names, never a list kept beside it.
struct LayoutFields<'a> {
    format: &'a EventFormat,
    read: RefCell<Vec<&'static str>>,
}

impl<'a> LayoutFields<'a> {
    fn new(format: &'a EventFormat) -> Self {
        Self {
            format,
            read: RefCell::new(Vec::new()),
        }
    }

    /// [`EventFormat::offset_of`], remembered.
    fn offset_of(&self, name: &'static str, size: usize) -> Result<u16, FormatError> {
        self.read.borrow_mut().push(name);
        self.format.offset_of(name, size)
    }

    /// [`EventFormat::optional_offset_of`], remembered; [`FIELD_ABSENT`] when absent.
    fn optional_offset_of(&self, name: &'static str, size: usize) -> Result<u16, FormatError> {
        self.read.borrow_mut().push(name);
        Ok(self
            .format
            .optional_offset_of(name, size)?
            .unwrap_or(FIELD_ABSENT))
    }

    /// How many bytes of the record cover every field handed out so far.
    fn record_size(&self) -> Result<u16, FormatError> {
        self.format.read_span(&self.read.borrow())
    }
}

/// Where `tcp:tcp_retransmit_skb` keeps the fields observer reads; `err` (added in Linux 6.x)
/// is [`FIELD_ABSENT`] on kernels without it.
pub fn retransmit_skb_layout(f: &EventFormat) -> Result<RetransmitSkbLayout, FormatError> {
    let f = LayoutFields::new(f);
    Ok(RetransmitSkbLayout {
        skbaddr: f.offset_of("skbaddr", POINTER_SIZE)?,
        skaddr: f.offset_of("skaddr", POINTER_SIZE)?,
        state: f.offset_of("state", 4)?,
        sport: f.offset_of("sport", 2)?,
        dport: f.offset_of("dport", 2)?,
        family: f.offset_of("family", 2)?,
        saddr_v6: f.offset_of("saddr_v6", 16)?,
        daddr_v6: f.offset_of("daddr_v6", 16)?,
        err: f.optional_offset_of("err", 4)?,
        record_size: f.record_size()?,
        _pad: [0; 2],
    })
}

/// Where `tcp:tcp_retransmit_synack` keeps the fields observer reads.
pub fn retransmit_synack_layout(f: &EventFormat) -> Result<RetransmitSynackLayout, FormatError> {
    let f = LayoutFields::new(f);
    Ok(RetransmitSynackLayout {
        sport: f.offset_of("sport", 2)?,
        dport: f.offset_of("dport", 2)?,
        family: f.offset_of("family", 2)?,
        saddr_v6: f.offset_of("saddr_v6", 16)?,
        daddr_v6: f.offset_of("daddr_v6", 16)?,
        skaddr: f.offset_of("skaddr", POINTER_SIZE)?,
        record_size: f.record_size()?,
        _pad: 0,
    })
}

/// Where `tcp:tcp_receive_reset` keeps the fields observer reads (the same set as
/// `tcp_retransmit_synack`).
pub fn receive_reset_layout(f: &EventFormat) -> Result<SockTupleLayout, FormatError> {
    retransmit_synack_layout(f)
}

/// Where `tcp:tcp_send_reset` keeps the fields observer reads: since 6.10 `saddr`/`daddr` are
/// 28-byte socket-address copies with family and port inside; before, split fields.
pub fn send_reset_layout(format: &EventFormat) -> Result<SendResetLayout, FormatError> {
    let f = LayoutFields::new(format);
    let common = |style, saddr, daddr, sport, dport| -> Result<SendResetLayout, FormatError> {
        Ok(SendResetLayout {
            skaddr: f.offset_of("skaddr", POINTER_SIZE)?,
            skbaddr: f.offset_of("skbaddr", POINTER_SIZE)?,
            state: f.offset_of("state", 4)?,
            reason: f.optional_offset_of("reason", 4)?,
            saddr,
            daddr,
            sport,
            dport,
            style,
            record_size: f.record_size()?,
            _pad: [0; 2],
        })
    };
    match format.field("saddr") {
        Some(field) if field.size == SOCKADDR_IN6_SIZE => common(
            SEND_RESET_SOCKADDR,
            f.offset_of("saddr", SOCKADDR_IN6_SIZE)?,
            f.offset_of("daddr", SOCKADDR_IN6_SIZE)?,
            FIELD_ABSENT,
            FIELD_ABSENT,
        ),
        _ => common(
            SEND_RESET_SPLIT,
            f.offset_of("saddr_v6", 16)?,
            f.offset_of("daddr_v6", 16)?,
            f.offset_of("sport", 2)?,
            f.offset_of("dport", 2)?,
        ),
    }
}

/// `sizeof(struct sockaddr_in6)`, the size of tcp_send_reset's address copies.
const SOCKADDR_IN6_SIZE: usize = 28;

/// Where `skb:kfree_skb` keeps the fields observer reads; `rx_sk` (6.11+) is optional.
pub fn kfree_skb_layout(f: &EventFormat) -> Result<KfreeSkbLayout, FormatError> {
    let f = LayoutFields::new(f);
    Ok(KfreeSkbLayout {
        skbaddr: f.offset_of("skbaddr", POINTER_SIZE)?,
        location: f.offset_of("location", POINTER_SIZE)?,
        protocol: f.offset_of("protocol", 2)?,
        reason: f.offset_of("reason", 4)?,
        rx_sk: f.optional_offset_of("rx_sk", POINTER_SIZE)?,
        record_size: f.record_size()?,
        _pad: [0; 2],
    })
}

/// Where `sock:inet_sock_set_state` keeps the fields observer reads.
pub fn set_state_layout(f: &EventFormat) -> Result<SetStateLayout, FormatError> {
    let f = LayoutFields::new(f);
    Ok(SetStateLayout {
        skaddr: f.offset_of("skaddr", POINTER_SIZE)?,
        oldstate: f.offset_of("oldstate", 4)?,
        newstate: f.offset_of("newstate", 4)?,
        sport: f.offset_of("sport", 2)?,
        dport: f.offset_of("dport", 2)?,
        family: f.offset_of("family", 2)?,
        protocol: f.offset_of("protocol", 2)?,
        saddr_v6: f.offset_of("saddr_v6", 16)?,
        daddr_v6: f.offset_of("daddr_v6", 16)?,
        record_size: f.record_size()?,
        _pad: [0; 2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRANSMIT_SKB: &str = include_str!("fixtures/tcp_retransmit_skb.format");
    const RETRANSMIT_SKB_RT: &str = include_str!("fixtures/tcp_retransmit_skb_rt.format");
    const RETRANSMIT_SKB_OLD: &str = include_str!("fixtures/tcp_retransmit_skb_old.format");
    const RETRANSMIT_SYNACK: &str = include_str!("fixtures/tcp_retransmit_synack.format");
    const SEND_RESET: &str = include_str!("fixtures/tcp_send_reset.format");
    const RECEIVE_RESET: &str = include_str!("fixtures/tcp_receive_reset.format");
    const INET_SOCK_SET_STATE: &str = include_str!("fixtures/inet_sock_set_state.format");
    /// This machine's kernel (6.18).
    const KFREE_SKB: &str = include_str!("fixtures/kfree_skb.format");
    /// Linux 5.17: no `rx_sk`, the first drop reason numbering.
    const KFREE_SKB_OLD: &str = include_str!("fixtures/kfree_skb_5.17.format");
    const MALFORMED: &str = include_str!("fixtures/malformed.format");

    #[expect(
        clippy::unwrap_used,
        reason = "test helper: a fixture that does not parse is a bug"
    )]
    fn parse(text: &str) -> EventFormat {
        parse_format(text).unwrap()
    }

    #[test]
    fn parses_header_fields_and_print_fmt() {
        let f = parse(RETRANSMIT_SKB);
        assert_eq!(f.name, "tcp_retransmit_skb");
        assert_eq!(f.id, 2281);
        assert_eq!(f.fields.len(), 15);
        assert_eq!(
            f.fields[0],
            FieldDef {
                decl: "unsigned short common_type".into(),
                name: "common_type".into(),
                offset: 0,
                size: 2,
                signed: false,
            }
        );
        assert_eq!(
            f.field("saddr_v6"),
            Some(&FieldDef {
                decl: "__u8 saddr_v6[16]".into(),
                name: "saddr_v6".into(),
                offset: 42,
                size: 16,
                signed: false,
            })
        );
        let skbaddr = f.field("skbaddr");
        assert_eq!(
            skbaddr.map(|s| s.decl.as_str()),
            Some("const void * skbaddr")
        );
        assert_eq!(f.field("common_pid").map(|p| p.signed), Some(true));
        assert!(f.print_fmt.starts_with("\"skbaddr=%p skaddr=%p"));
        assert!(f.print_fmt.ends_with("REC->err"));
        assert!(f.field("nope").is_none());
    }

    #[test]
    fn all_real_fixtures_parse() {
        for (text, name) in [
            (RETRANSMIT_SYNACK, "tcp_retransmit_synack"),
            (SEND_RESET, "tcp_send_reset"),
            (RECEIVE_RESET, "tcp_receive_reset"),
            (INET_SOCK_SET_STATE, "inet_sock_set_state"),
            (KFREE_SKB, "kfree_skb"),
        ] {
            let f = parse(text);
            assert_eq!(f.name, name);
            assert_eq!(f.fields[0].name, "common_type");
        }
        let rr = parse(RECEIVE_RESET);
        assert_eq!(rr.offset_of("sock_cookie", 8).ok(), Some(64));
    }

    #[test]
    fn retransmit_skb_layout_on_this_kernel() {
        let layout = retransmit_skb_layout(&parse(RETRANSMIT_SKB)).ok();
        assert_eq!(
            layout,
            Some(RetransmitSkbLayout {
                skbaddr: 8,
                skaddr: 16,
                state: 24,
                sport: 28,
                dport: 30,
                family: 32,
                saddr_v6: 42,
                daddr_v6: 58,
                err: 76,
                record_size: 80,
                _pad: [0; 2],
            })
        );
    }

    #[test]
    fn rt_kernel_offsets_follow_the_file() {
        let f = parse(RETRANSMIT_SKB_RT);
        assert_eq!(f.offset_of("common_preempt_lazy_count", 1).ok(), Some(4));
        assert_eq!(f.offset_of("common_pid", 4).ok(), Some(8));
        let layout = retransmit_skb_layout(&f).ok();
        assert_eq!(
            layout,
            Some(RetransmitSkbLayout {
                skbaddr: 16,
                skaddr: 24,
                state: 32,
                sport: 36,
                dport: 38,
                family: 40,
                saddr_v6: 50,
                daddr_v6: 66,
                err: 84,
                record_size: 88,
                _pad: [0; 2],
            })
        );
    }

    #[test]
    fn old_retransmit_skb_without_err() {
        let f = parse(RETRANSMIT_SKB_OLD);
        assert!(f.field("err").is_none());
        assert!(matches!(f.optional_offset_of("err", 4), Ok(None)));
        let layout = retransmit_skb_layout(&f).ok();
        assert_eq!(layout.map(|l| l.err), Some(FIELD_ABSENT));
        assert_eq!(layout.map(|l| l.daddr_v6), Some(58));
    }

    #[test]
    fn retransmit_synack_layout_on_this_kernel() {
        let layout = retransmit_synack_layout(&parse(RETRANSMIT_SYNACK)).ok();
        assert_eq!(
            layout,
            Some(RetransmitSynackLayout {
                sport: 24,
                dport: 26,
                family: 28,
                saddr_v6: 38,
                daddr_v6: 54,
                skaddr: 8,
                record_size: 70,
                _pad: 0,
            })
        );
    }

    #[test]
    fn missing_and_wrongly_sized_fields_are_named() {
        let f = parse(RETRANSMIT_SKB);
        let err = f.offset_of("rx_sk", 8).err();
        assert!(
            matches!(&err, Some(FormatError::Missing { event, field })
                if event == "tcp_retransmit_skb" && field == "rx_sk"),
            "{err:?}"
        );
        let err = f.offset_of("sport", 4).err();
        assert!(
            matches!(&err, Some(FormatError::WrongSize { event, field, expected: 4, found: 2 })
                if event == "tcp_retransmit_skb" && field == "sport"),
            "{err:?}"
        );
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            msg,
            "tracepoint `tcp_retransmit_skb` field `sport` has 2 bytes, expected 4"
        );
        // An optional field that exists with the wrong size is an error, not "absent".
        assert!(matches!(
            f.optional_offset_of("err", 8),
            Err(FormatError::WrongSize { .. })
        ));
        // The synack event has no `state`: the skb layout must refuse it.
        let synack = parse(RETRANSMIT_SYNACK);
        assert!(matches!(
            retransmit_skb_layout(&synack),
            Err(FormatError::Missing { field, .. }) if field == "skbaddr"
        ));
    }

    #[test]
    fn kfree_skb_reason_moves_and_renumbers() {
        let new = parse(KFREE_SKB);
        let old = parse(KFREE_SKB_OLD);
        assert_eq!(new.offset_of("reason", 4).ok(), Some(36));
        assert_eq!(old.offset_of("reason", 4).ok(), Some(28));
        assert!(old.field("rx_sk").is_none());

        let value_of = |f: &EventFormat, name: &str| {
            f.symbolic_values("reason")
                .into_iter()
                .find(|(_, n)| n == name)
                .map(|(v, _)| v)
        };
        assert_eq!(value_of(&new, "NETFILTER_DROP"), Some(12));
        assert_eq!(value_of(&old, "NETFILTER_DROP"), Some(6));
        assert_eq!(value_of(&new, "NOT_SPECIFIED"), Some(2));
        assert_eq!(value_of(&old, "NOT_SPECIFIED"), Some(0));

        let all = new.symbolic_values("reason");
        assert_eq!(all.len(), 127, "2..=128");
        assert_eq!(all.first(), Some(&(2, "NOT_SPECIFIED".to_owned())));
        assert_eq!(all.last(), Some(&(128, "MAX".to_owned())));
        // The old fixture has one pair left symbolic: it is skipped, the rest kept.
        let old_all = old.symbolic_values("reason");
        assert_eq!(old_all.len(), 12);
        assert!(old_all.iter().all(|(_, n)| n != "MAX"));
    }

    #[test]
    fn send_reset_reason_and_states() {
        let f = parse(SEND_RESET);
        let reasons = f.symbolic_values("reason");
        assert_eq!(reasons.len(), 26);
        assert_eq!(reasons[0], (0, "NOT_SPECIFIED".to_owned()));
        assert!(reasons.contains(&(11, "TCP_ABORT_ON_CLOSE".to_owned())));
        assert!(reasons.contains(&(17, "MPTCP_RST_EUNSPEC".to_owned())));
        // `state` is printed with symbolic enum names on this kernel: nothing numeric to report.
        assert!(f.symbolic_values("state").is_empty());
        assert_eq!(f.offset_of("reason", 4).ok(), Some(28));
    }

    #[test]
    fn symbolic_values_pick_the_right_field() {
        let f = parse(INET_SOCK_SET_STATE);
        let new = f.symbolic_values("newstate");
        assert_eq!(new.len(), 12);
        assert_eq!(new[0], (1, "TCP_ESTABLISHED".to_owned()));
        assert_eq!(new[11], (12, "TCP_NEW_SYN_RECV".to_owned()));
        assert_eq!(f.symbolic_values("oldstate"), new);
        assert_eq!(
            f.symbolic_values("protocol"),
            vec![
                (6, "IPPROTO_TCP".to_owned()),
                (132, "IPPROTO_SCTP".to_owned()),
                (262, "IPPROTO_MPTCP".to_owned())
            ]
        );
        assert_eq!(
            f.symbolic_values("family"),
            vec![(2, "AF_INET".to_owned()), (10, "AF_INET6".to_owned())]
        );
        // A field that is not printed symbolically, and a prefix of a real field name.
        assert!(f.symbolic_values("sport").is_empty());
        assert!(f.symbolic_values("state").is_empty());
        assert!(f.symbolic_values("newstat").is_empty());
    }

    #[test]
    fn symbolic_values_survive_awkward_print_fmts() {
        let text = r#"name: weird
ID: 7
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:int code;	offset:8;	size:4;	signed:1;

print fmt: "fake __print_symbolic(REC->code, { 99, \"NO\" }) {(\"", (REC->flags & 1) ? __print_symbolic((int)REC->code, { -1, "MINUS_ONE" }, { 0x10, "HEX, with comma" }, { (-2), "PAREN" }, { 3U, "SUFFIXED" }, { FOO(1, 2), "MACRO" }, { 010, "OCTAL" }, { 4, "QUOTE\"D" }) : "x", __print_symbolic(REC->other_code, { 5, "OTHER" }), __print_symbolic(REC->code, { -1, "MINUS_ONE" }, { 7, "SECOND" })
"#;
        let f = parse(text);
        assert_eq!(
            f.symbolic_values("code"),
            vec![
                (-1, "MINUS_ONE".to_owned()),
                (16, "HEX, with comma".to_owned()),
                (-2, "PAREN".to_owned()),
                (3, "SUFFIXED".to_owned()),
                (8, "OCTAL".to_owned()),
                (4, "QUOTE\"D".to_owned()),
                (7, "SECOND".to_owned()),
            ]
        );
        assert_eq!(
            f.symbolic_values("other_code"),
            vec![(5, "OTHER".to_owned())]
        );
        // Unterminated call: no panic, nothing found.
        let mut broken = f.clone();
        broken.print_fmt = "\"%s\", __print_symbolic(REC->code, { 1, \"A\" }".into();
        assert!(broken.symbolic_values("code").is_empty());
    }

    #[test]
    fn malformed_files_give_clear_errors() {
        let err = parse_format(MALFORMED).err();
        assert!(
            matches!(
                &err,
                Some(FormatError::Malformed {
                    line: 7,
                    reason: "bad offset",
                    ..
                })
            ),
            "{err:?}"
        );
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("line 7: bad offset"), "{msg}");
        assert!(msg.contains("skaddr"), "{msg}");

        assert!(matches!(
            parse_format("ID: 3\nformat:\n\tfield:int a;\toffset:0;\tsize:4;\tsigned:1;\n"),
            Err(FormatError::MissingHeader { header: "name:" })
        ));
        assert!(matches!(
            parse_format("name: x\nformat:\n\tfield:int a;\toffset:0;\tsize:4;\tsigned:1;\n"),
            Err(FormatError::MissingHeader { header: "ID:" })
        ));
        assert!(matches!(
            parse_format("name: x\nID: nine\n"),
            Err(FormatError::Malformed {
                line: 2,
                reason: "bad ID",
                ..
            })
        ));
        assert!(matches!(
            parse_format("name: x\nID: 9\nformat:\n\nprint fmt: \"\"\n"),
            Err(FormatError::Malformed {
                line: 0,
                reason: "no `field:` lines",
                ..
            })
        ));
        assert!(matches!(
            parse_format("name: x\nID: 9\n\tfield:int a;\toffset:0;\n"),
            Err(FormatError::Malformed {
                line: 3,
                reason: "no size",
                ..
            })
        ));
        assert!(matches!(
            parse_format("name: x\nID: 9\n\tfield:;\toffset:0;\tsize:4;\n"),
            Err(FormatError::Malformed {
                line: 3,
                reason: "no field name in declaration",
                ..
            })
        ));
        assert!(parse_format("").is_err());
    }

    #[test]
    fn field_names_from_declarations() {
        assert_eq!(field_name("__u8 saddr_v6[16]"), Some("saddr_v6"));
        assert_eq!(field_name("const void * skbaddr"), Some("skbaddr"));
        assert_eq!(field_name("void *skbaddr"), Some("skbaddr"));
        assert_eq!(field_name("__data_loc char[] name"), Some("name"));
        assert_eq!(field_name("char comm[TASK_COMM_LEN]"), Some("comm"));
        assert_eq!(field_name("int m[2][3]"), Some("m"));
        assert_eq!(field_name("int"), Some("int"));
        assert_eq!(field_name("int x[3"), None);
        assert_eq!(field_name(""), None);
    }

    #[test]
    fn offsets_beyond_u16_are_refused() {
        let f = parse("name: big\nID: 1\n\tfield:int far;\toffset:70000;\tsize:4;\tsigned:1;\n");
        assert!(matches!(
            f.offset_of("far", 4),
            Err(FormatError::OffsetTooLarge { offset: 70000, .. })
        ));
    }

    #[test]
    fn the_read_span_ends_at_the_last_field_read_and_fits_the_buffer() {
        let f = parse(RETRANSMIT_SKB);
        // `err` (offset 76, 4 bytes) is the last field read; absent names are ignored.
        assert_eq!(
            f.read_span(&["skaddr", "err", "no_such_field"]).ok(),
            Some(80)
        );
        assert_eq!(f.read_span(&["skaddr"]).ok(), Some(24));
        let big =
            parse("name: big\nID: 1\n\tfield:char blob[64];\toffset:240;\tsize:64;\tsigned:0;\n");
        assert!(matches!(
            big.read_span(&["blob"]),
            Err(FormatError::RecordTooLarge {
                end: 304,
                max: RECORD_MAX,
                ..
            })
        ));
    }

    #[test]
    fn tracefs_reads_a_directory_tree() {
        let root =
            std::env::temp_dir().join(format!("observer-tracefs-test-{}", std::process::id()));
        let dir = root.join("events/tcp/tcp_retransmit_skb");
        std::fs::create_dir_all(&dir).expect("create temp tracefs tree");
        std::fs::write(dir.join("format"), RETRANSMIT_SKB).expect("write format");
        let tracefs = TraceFs::at(&root);
        assert_eq!(tracefs.root(), root.as_path());
        assert!(tracefs.has_event("tcp", "tcp_retransmit_skb"));
        assert!(!tracefs.has_event("tcp", "tcp_nope"));
        assert!(!tracefs.has_event("..", "tcp"));
        assert_eq!(
            tracefs
                .format("tcp", "tcp_retransmit_skb")
                .ok()
                .map(|f| f.id),
            Some(2281)
        );
        assert!(matches!(
            tracefs.format("tcp", "tcp_nope"),
            Err(TraceFsError::FileError { path, .. }) if path.ends_with("events/tcp/tcp_nope/format")
        ));
        assert!(matches!(
            tracefs.format("tcp/../..", "x"),
            Err(TraceFsError::InvalidName { .. })
        ));
        std::fs::write(dir.join("format"), MALFORMED).expect("write format");
        assert!(matches!(
            tracefs.format("tcp", "tcp_retransmit_skb"),
            Err(TraceFsError::FormatError { .. })
        ));
        std::fs::remove_dir_all(&root).expect("remove temp tracefs tree");
    }

    /// On the real system: the running kernel's formats parse and give usable layouts.
    #[test]
    fn live_tracefs_if_mounted() {
        let tracefs = [TRACEFS_PATH, DEBUGFS_TRACING_PATH]
            .into_iter()
            .map(TraceFs::at)
            .find(|t| t.root().join("events").is_dir());
        let Some(tracefs) = tracefs else {
            eprintln!("skipped: no tracefs mounted");
            return;
        };
        if !tracefs.has_event("tcp", "tcp_retransmit_skb") {
            eprintln!("skipped: no tcp:tcp_retransmit_skb tracepoint");
            return;
        }
        let f = tracefs.format("tcp", "tcp_retransmit_skb");
        assert!(
            f.as_ref().is_ok_and(|f| retransmit_skb_layout(f).is_ok()),
            "{f:?}"
        );
        let f = tracefs.format("tcp", "tcp_retransmit_synack");
        assert!(
            f.as_ref()
                .is_ok_and(|f| retransmit_synack_layout(f).is_ok()),
            "{f:?}"
        );
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    fn format(text: &str) -> EventFormat {
        parse_format(text).expect("fixture parses")
    }

    #[test]
    fn send_reset_uses_sockaddr_copies_on_this_kernel() {
        let layout = send_reset_layout(&format(include_str!("fixtures/tcp_send_reset.format")))
            .expect("layout");
        assert_eq!(layout.style, SEND_RESET_SOCKADDR);
        assert_eq!(
            (layout.saddr, layout.daddr, layout.reason, layout.state),
            (32, 60, 28, 24)
        );
    }

    #[test]
    fn kfree_skb_layout_follows_the_file() {
        let new =
            kfree_skb_layout(&format(include_str!("fixtures/kfree_skb.format"))).expect("new");
        assert_eq!((new.reason, new.rx_sk), (36, 24));
        let old =
            kfree_skb_layout(&format(include_str!("fixtures/kfree_skb_5.17.format"))).expect("old");
        assert_eq!(old.rx_sk, FIELD_ABSENT);
        assert_ne!(old.reason, new.reason);
    }

    #[test]
    fn set_state_and_receive_reset_layouts() {
        let st = set_state_layout(&format(include_str!("fixtures/inet_sock_set_state.format")))
            .expect("set_state");
        assert_eq!(
            (st.oldstate, st.newstate, st.protocol, st.saddr_v6),
            (16, 20, 30, 40)
        );
        let rr = receive_reset_layout(&format(include_str!("fixtures/tcp_receive_reset.format")))
            .expect("receive_reset");
        assert_eq!((rr.sport, rr.saddr_v6, rr.skaddr), (16, 30, 8));
    }
}

#[cfg(test)]
mod proptests;
