//! Which firewall rule dropped packets.
//!
//! When `skb:kfree_skb` reports `NETFILTER_DROP`, the kernel does not say which rule decided.
//! The rule counters do: take a [`snapshot`] of every rule's packet counter before and after the
//! drops, and [`attribute`] the drops to the dropping rules whose counters grew by the dropped
//! count.
//!
//! - [`parse_nft_json`]: `nft -j list ruleset` (native nftables and iptables-nft rules alike).
//! - [`parse_iptables_save`]: `iptables-save -c`, the fallback when `nft` is not installed.
//! - Chain policies have no rule counter in nft's output. A base chain whose policy is drop is
//!   kept as a pseudo-rule ([`RuleCounter::is_chain_policy`], handle [`POLICY_HANDLE`]) so that
//!   [`attribute`] can name it when no rule explains the drops. iptables-nft does count policy
//!   hits per base chain (`iptables-save -c` prints them as `:INPUT DROP [2:120]`); [`snapshot`]
//!   copies those counts onto the pseudo-rules.
//!
//! Counters are per network namespace: [`snapshot`] reads the namespace of the calling thread.
//!
//! Not covered: verdict maps (`vmap`) are not treated as dropping rules, named counter objects
//! (`counter name "x"`) carry no inline count, and rules loaded with iptables-legacy are
//! invisible to `nft` (use [`snapshot_iptables_save`] with a legacy `iptables-save`).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::Serialize;
use serde_json::{Map, Value};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// The text handed to [`parse_nft_json`] is not JSON.
    #[error("`nft -j` output is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON, but not shaped like `nft -j list ruleset` output.
    #[error("unexpected `nft -j` output: {0}")]
    NftShape(String),
    /// A line of `iptables-save -c` output that cannot be read.
    #[error("`iptables-save` line {line}: {reason}: `{text}`")]
    IptablesSave {
        /// 1-based line number.
        line: usize,
        reason: &'static str,
        text: String,
    },
    /// None of the tools is installed.
    #[error(
        "cannot read firewall rule counters: none of {tools} is installed \
         (searched PATH and /usr/sbin, /sbin, /usr/local/sbin); install nftables or iptables"
    )]
    NoTool { tools: &'static str },
    /// The tool could not be started.
    #[error("cannot run `{command}`: {io_error}")]
    Spawn {
        command: String,
        #[source]
        io_error: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Handle of the pseudo-rule standing for a chain's drop policy. The kernel never gives a rule
/// handle 0 (handles start at 1), and [`parse_iptables_save`] numbers rules from 1.
pub const POLICY_HANDLE: u64 = 0;

/// One firewall rule and its counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleCounter {
    /// nftables family: `ip`, `ip6`, `inet`, `arp`, `bridge`, `netdev`.
    pub family: String,
    pub table: String,
    pub chain: String,
    /// nftables rule handle; for `iptables-save` input, the rule's 1-based position in its
    /// chain (as `iptables -L --line-numbers` shows); [`POLICY_HANDLE`] for a chain policy.
    pub handle: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The rule's final verdict: `drop`, `reject`, `accept`, `return`, `continue`, `queue`,
    /// `jump X`, `goto X`; `None` when the rule has none (e.g. only `counter` or `log`).
    pub verdict: Option<String>,
    /// A readable rendering, close to `nft list ruleset` without the counter values (e.g.
    /// `ip protocol tcp tcp dport 5001 tcp flags syn counter drop`), or the `-A CHAIN ...` line
    /// for `iptables-save` input, or `policy drop`.
    pub text: String,
    pub comment: Option<String>,
}

impl RuleCounter {
    /// True when a packet hitting this rule is dropped (verdict `drop` or `reject`).
    pub fn drops(&self) -> bool {
        self.verdict
            .as_deref()
            .is_some_and(|v| v == "drop" || v.starts_with("reject"))
    }

    /// True for the pseudo-rule standing for a chain's drop policy.
    pub fn is_chain_policy(&self) -> bool {
        self.handle == POLICY_HANDLE
    }

    fn same_chain(&self, other: &RuleCounter) -> bool {
        self.family == other.family && self.table == other.table && self.chain == other.chain
    }

    fn policy(family: &str, table: &str, chain: &str, packets: u64, bytes: u64) -> Self {
        Self {
            family: family.to_owned(),
            table: table.to_owned(),
            chain: chain.to_owned(),
            handle: POLICY_HANDLE,
            packets,
            bytes,
            verdict: Some("drop".to_owned()),
            text: "policy drop".to_owned(),
            comment: None,
        }
    }
}

/// A rule and how much its packet counter grew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleDelta {
    /// The rule as in the later snapshot.
    pub rule: RuleCounter,
    pub delta: u64,
}

/// The rules that explain a number of netfilter drops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// The dropping rule whose counter grew by exactly the dropped count (several if more than
    /// one did: each alone explains them), or else the unique smallest set of dropping rules
    /// whose growths sum to it. Empty when nothing adds up.
    pub exact: Vec<RuleDelta>,
    /// Every dropping rule whose counter grew, largest growth first. When no rule explains the
    /// drops, chain drop policies without a counter follow, each with the unexplained count
    /// (dropped minus the growth of the dropping rules) as its delta: an inference, not a count.
    pub candidates: Vec<RuleDelta>,
}

// ---------------------------------------------------------------------------------------------
// nft -j list ruleset

/// Parses `nft -j list ruleset`: every rule with an inline counter, plus a pseudo-rule for each
/// base chain whose policy is drop. Dropping rules come first, then drop policies, then the
/// rest, each group in ruleset order.
pub fn parse_nft_json(json: &str) -> Result<Vec<RuleCounter>, NetfilterError> {
    let root: Value = serde_json::from_str(json)?;
    let items = root
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| NetfilterError::NftShape("no top-level `nftables` array".to_owned()))?;
    let mut rules = Vec::new();
    for item in items {
        if let Some(chain) = item.get("chain") {
            if chain.get("policy").and_then(Value::as_str) == Some("drop") {
                rules.push(RuleCounter::policy(
                    str_field(chain, "family", "chain")?,
                    str_field(chain, "table", "chain")?,
                    str_field(chain, "name", "chain")?,
                    0,
                    0,
                ));
            }
        } else if let Some(rule) = item.get("rule")
            && let Some(rule) = parse_nft_rule(rule)?
        {
            rules.push(rule);
        }
    }
    sort_dropping_first(&mut rules);
    Ok(rules)
}

fn str_field<'a>(obj: &'a Value, key: &str, what: &str) -> Result<&'a str, NetfilterError> {
    obj.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| NetfilterError::NftShape(format!("{what} without a string `{key}`: {obj}")))
}

/// One `{"rule": ...}` object; `None` when it has no inline counter.
fn parse_nft_rule(rule: &Value) -> Result<Option<RuleCounter>, NetfilterError> {
    let family = str_field(rule, "family", "rule")?;
    let table = str_field(rule, "table", "rule")?;
    let chain = str_field(rule, "chain", "rule")?;
    let handle = rule.get("handle").and_then(Value::as_u64).ok_or_else(|| {
        NetfilterError::NftShape(format!("rule without a numeric `handle`: {rule}"))
    })?;
    let exprs = match rule.get("expr") {
        Some(Value::Array(exprs)) => exprs.as_slice(),
        None => &[],
        Some(other) => {
            return Err(NetfilterError::NftShape(format!(
                "rule `expr` is not an array: {other}"
            )));
        }
    };
    let mut counter = None;
    let mut verdict = None;
    let mut text = Vec::with_capacity(exprs.len());
    for stmt in exprs {
        let Some((key, val)) = single_entry(stmt) else {
            text.push(stmt.to_string());
            continue;
        };
        if key == "counter"
            && let (Some(packets), Some(bytes)) = (
                val.get("packets").and_then(Value::as_u64),
                val.get("bytes").and_then(Value::as_u64),
            )
        {
            counter = Some((packets, bytes));
        }
        if let Some(v) = stmt_verdict(key, val) {
            verdict = Some(v);
        }
        text.push(render_stmt(key, val));
    }
    let Some((packets, bytes)) = counter else {
        return Ok(None);
    };
    Ok(Some(RuleCounter {
        family: family.to_owned(),
        table: table.to_owned(),
        chain: chain.to_owned(),
        handle,
        packets,
        bytes,
        verdict,
        text: text.join(" "),
        comment: rule
            .get("comment")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }))
}

/// The only key and value of a one-key object (nft JSON's shape for statements and
/// expressions).
fn single_entry(v: &Value) -> Option<(&str, &Value)> {
    let obj = v.as_object()?;
    let mut entries = obj.iter();
    let (key, val) = entries.next()?;
    entries.next().is_none().then_some((key.as_str(), val))
}

fn target(val: &Value) -> &str {
    val.get("target").and_then(Value::as_str).unwrap_or("?")
}

/// The verdict a statement sets, if it is a verdict.
fn stmt_verdict(key: &str, val: &Value) -> Option<String> {
    match key {
        "accept" | "drop" | "continue" | "return" | "queue" | "reject" => Some(key.to_owned()),
        "jump" | "goto" => Some(format!("{key} {}", target(val))),
        // iptables-nft targets without a native translation, e.g. `-j REJECT`.
        "xt" if val.get("type").and_then(Value::as_str) == Some("target") => {
            match val.get("name").and_then(Value::as_str)? {
                "REJECT" => Some("reject".to_owned()),
                "DROP" => Some("drop".to_owned()),
                "ACCEPT" => Some("accept".to_owned()),
                "RETURN" => Some("return".to_owned()),
                "NFQUEUE" | "QUEUE" => Some("queue".to_owned()),
                _ => None,
            }
        }
        _ => None,
    }
}

fn render_stmt(key: &str, val: &Value) -> String {
    match key {
        "match" => render_match(val),
        // The numbers change; the text identifies the rule.
        "counter" => "counter".to_owned(),
        "jump" | "goto" => format!("{key} {}", target(val)),
        "reject" => {
            let kind = val.get("type").and_then(Value::as_str);
            let what = val.get("expr").map(render_expr);
            match (kind, what) {
                (Some(kind), Some(what)) => format!("reject with {kind} {what}"),
                (Some(kind), None) => format!("reject with {kind}"),
                _ => "reject".to_owned(),
            }
        }
        "log" => match val.get("prefix").and_then(Value::as_str) {
            Some(prefix) => format!("log prefix {prefix:?}"),
            None => "log".to_owned(),
        },
        "limit" => {
            let over = if val.get("inv").and_then(Value::as_bool) == Some(true) {
                "over "
            } else {
                ""
            };
            let rate = val.get("rate").map(render_expr).unwrap_or_default();
            let unit = val
                .get("rate_unit")
                .and_then(Value::as_str)
                .filter(|u| *u != "packets")
                .map(|u| format!(" {u}"))
                .unwrap_or_default();
            let per = val.get("per").and_then(Value::as_str).unwrap_or("second");
            format!("limit rate {over}{rate}{unit}/{per}")
        }
        "xt" => match (
            val.get("type").and_then(Value::as_str),
            val.get("name").and_then(Value::as_str),
        ) {
            (Some(kind), Some(name)) => format!("xt {kind} {name}"),
            _ => "xt".to_owned(),
        },
        "mangle" => format!(
            "{} set {}",
            val.get("key").map(render_expr).unwrap_or_default(),
            val.get("value").map(render_expr).unwrap_or_default()
        ),
        "vmap" => format!(
            "{} vmap {}",
            val.get("key").map(render_expr).unwrap_or_default(),
            val.get("data").map(render_expr).unwrap_or_default()
        ),
        "snat" | "dnat" => {
            let addr = val.get("addr").map(render_expr);
            let port = val.get("port").map(render_expr);
            match (addr, port) {
                (Some(addr), Some(port)) => format!("{key} to {addr}:{port}"),
                (Some(addr), None) => format!("{key} to {addr}"),
                (None, Some(port)) => format!("{key} to :{port}"),
                (None, None) => key.to_owned(),
            }
        }
        "queue" => match val.get("num") {
            Some(num) => format!("queue num {}", render_expr(num)),
            None => "queue".to_owned(),
        },
        // accept, drop, continue, return, masquerade, notrack, ... and anything unknown.
        _ => key.to_owned(),
    }
}

fn render_match(val: &Value) -> String {
    let op = val.get("op").and_then(Value::as_str).unwrap_or("==");
    let right = val.get("right").map(render_expr).unwrap_or_default();
    let Some(left) = val.get("left") else {
        return right;
    };
    // iptables' `--tcp-flags MASK COMP` / nft's `tcp flags syn / fin,syn,rst,ack`.
    if op == "=="
        && let Some(("&", Value::Array(operands))) = single_entry(left)
        && let [field, mask] = operands.as_slice()
    {
        return format!("{} {right} / {}", render_expr(field), render_expr(mask));
    }
    let left = render_expr(left);
    match op {
        "==" | "in" => format!("{left} {right}"),
        _ => format!("{left} {op} {right}"),
    }
}

fn render_expr(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.is_empty() || s.contains(char::is_whitespace) => format!("{s:?}"),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(render_expr).collect::<Vec<_>>().join(","),
        Value::Object(obj) => match single_entry(v) {
            Some((key, val)) => render_expr_object(key, val),
            None => render_fields(obj),
        },
    }
}

fn render_fields(obj: &Map<String, Value>) -> String {
    obj.values().map(render_expr).collect::<Vec<_>>().join(" ")
}

fn field<'a>(val: &'a Value, key: &str) -> &'a str {
    val.get(key).and_then(Value::as_str).unwrap_or("?")
}

fn render_expr_object(key: &str, val: &Value) -> String {
    match key {
        "payload" => match val.get("protocol").and_then(Value::as_str) {
            Some(proto) => format!("{proto} {}", field(val, "field")),
            None => format!(
                "@{},{},{}",
                field(val, "base"),
                val.get("offset").map(render_expr).unwrap_or_default(),
                val.get("len").map(render_expr).unwrap_or_default()
            ),
        },
        "meta" => {
            let meta = field(val, "key");
            // nft prints these without `meta`.
            if matches!(
                meta,
                "iif" | "oif" | "iifname" | "oifname" | "iiftype" | "oiftype"
            ) {
                meta.to_owned()
            } else {
                format!("meta {meta}")
            }
        }
        "ct" => match val.get("dir").and_then(Value::as_str) {
            Some(dir) => format!("ct {dir} {}", field(val, "key")),
            None => format!("ct {}", field(val, "key")),
        },
        "prefix" => format!(
            "{}/{}",
            val.get("addr").map(render_expr).unwrap_or_default(),
            val.get("len").map(render_expr).unwrap_or_default()
        ),
        "range" => match val.as_array().map(Vec::as_slice) {
            Some([lo, hi]) => format!("{}-{}", render_expr(lo), render_expr(hi)),
            _ => "range".to_owned(),
        },
        "set" => {
            let elems: Vec<String> = match val {
                Value::Array(items) => items
                    .iter()
                    .map(|item| match item.as_array().map(Vec::as_slice) {
                        // A map element: [key, value].
                        Some([k, v]) => format!("{} : {}", render_expr(k), render_expr(v)),
                        _ => render_expr(item),
                    })
                    .collect(),
                other => vec![render_expr(other)],
            };
            format!("{{ {} }}", elems.join(", "))
        }
        "&" | "|" | "^" | "<<" | ">>" => match val.as_array() {
            Some(operands) => operands
                .iter()
                .map(render_expr)
                .collect::<Vec<_>>()
                .join(&format!(" {key} ")),
            None => key.to_owned(),
        },
        "concat" => match val.as_array() {
            Some(parts) => parts
                .iter()
                .map(render_expr)
                .collect::<Vec<_>>()
                .join(" . "),
            None => key.to_owned(),
        },
        "fib" => {
            let flags = val.get("flags").map(render_expr).unwrap_or_default();
            format!("fib {} {}", flags.replace(',', " . "), field(val, "result"))
        }
        "elem" => val.get("val").map(render_expr).unwrap_or_default(),
        "map" => format!(
            "{} map {}",
            val.get("key").map(render_expr).unwrap_or_default(),
            val.get("data").map(render_expr).unwrap_or_default()
        ),
        "exthdr" | "tcp option" | "sctp chunk" => {
            format!("{key} {} {}", field(val, "name"), field(val, "field"))
        }
        "jump" | "goto" => format!("{key} {}", target(val)),
        // Verdicts inside verdict maps, `{"accept": null}`, and anything unknown.
        _ => match val.get("key").and_then(Value::as_str) {
            Some(sub) => format!("{key} {sub}"),
            None => key.to_owned(),
        },
    }
}

/// Dropping rules first, then drop policies, then the rest; stable.
fn sort_dropping_first(rules: &mut [RuleCounter]) {
    rules.sort_by_key(|r| match (r.is_chain_policy(), r.drops()) {
        (false, true) => 0,
        (true, _) => 1,
        (false, false) => 2,
    });
}

// ---------------------------------------------------------------------------------------------
// iptables-save -c

/// Parses `iptables-save -c` (or `ip6tables-save -c`) output: `*table` sections, chain lines
/// `:CHAIN POLICY [packets:bytes]` (a DROP policy becomes a pseudo-rule with those counts),
/// rule lines `[packets:bytes] -A CHAIN ...`. `family` is `ip` for iptables, `ip6` for
/// ip6tables. Rule lines without counters (plain `iptables-save`) are skipped.
pub fn parse_iptables_save(text: &str, family: &str) -> Result<Vec<RuleCounter>, NetfilterError> {
    let mut rules = Vec::new();
    let mut table: Option<&str> = None;
    // Chains of the current table, with the number of rules seen so far.
    let mut chains: Vec<(&str, u64)> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |reason| NetfilterError::IptablesSave {
            line: index + 1,
            reason,
            text: raw.to_owned(),
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name.trim());
            chains.clear();
        } else if line == "COMMIT" {
            table = None;
        } else if let Some(decl) = line.strip_prefix(':') {
            let table = table.ok_or_else(|| err("chain outside a `*table` section"))?;
            let mut parts = decl.split_whitespace();
            let (Some(chain), Some(policy)) = (parts.next(), parts.next()) else {
                return Err(err("chain line without a policy"));
            };
            chains.push((chain, 0));
            if policy == "DROP" {
                let (packets, bytes) = match parts.next() {
                    Some(counts) => parse_counts(counts).ok_or_else(|| err("bad counters"))?,
                    None => (0, 0),
                };
                rules.push(RuleCounter::policy(family, table, chain, packets, bytes));
            }
        } else if let Some(rest) = line.strip_prefix('[') {
            let table = table.ok_or_else(|| err("rule outside a `*table` section"))?;
            let (counts, rule) = rest.split_once(']').ok_or_else(|| err("unclosed `[`"))?;
            let (packets, bytes) =
                parse_counts(&format!("[{counts}]")).ok_or_else(|| err("bad counters"))?;
            let rule = rule.trim();
            let words = split_words(rule);
            let chain = match words.as_slice() {
                [append, chain, ..] if append == "-A" => chain.as_str(),
                _ => return Err(err("rule without `-A CHAIN`")),
            };
            let position = match chains.iter_mut().find(|(name, _)| *name == chain) {
                Some((_, count)) => {
                    *count += 1;
                    *count
                }
                None => return Err(err("rule in an undeclared chain")),
            };
            let verdict = iptables_verdict(&words, &chains);
            let comment = words
                .iter()
                .position(|w| w == "--comment")
                .and_then(|i| words.get(i + 1))
                .cloned();
            rules.push(RuleCounter {
                family: family.to_owned(),
                table: table.to_owned(),
                chain: chain.to_owned(),
                handle: position,
                packets,
                bytes,
                verdict,
                text: rule.to_owned(),
                comment,
            });
        }
        // Anything else (a rule line without counters, future syntax) carries no counter.
    }
    sort_dropping_first(&mut rules);
    Ok(rules)
}

/// `[packets:bytes]`.
fn parse_counts(s: &str) -> Option<(u64, u64)> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let (packets, bytes) = inner.split_once(':')?;
    Some((packets.parse().ok()?, bytes.parse().ok()?))
}

/// Splits an iptables-save rule into words, honouring double quotes and backslash escapes
/// (`--comment "block \"5001\""`).
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

fn iptables_verdict(words: &[String], chains: &[(&str, u64)]) -> Option<String> {
    // The last -j/-g wins (there is at most one).
    let i = words
        .iter()
        .rposition(|w| w == "-j" || w == "-g" || w == "--jump" || w == "--goto")?;
    let target = words.get(i + 1)?;
    let goto = words[i] == "-g" || words[i] == "--goto";
    Some(match target.as_str() {
        "DROP" => "drop".to_owned(),
        "REJECT" => "reject".to_owned(),
        "ACCEPT" => "accept".to_owned(),
        "RETURN" => "return".to_owned(),
        "QUEUE" | "NFQUEUE" => "queue".to_owned(),
        chain if goto => format!("goto {chain}"),
        chain if chains.iter().any(|(name, _)| *name == chain) => format!("jump {chain}"),
        // Extension targets (LOG, MARK, DNAT, ...): not a drop/accept decision we can name.
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Attribution

/// The rules whose packet counters grew between `before` and `after`, against `dropped`
/// netfilter drops (see [`Attribution`]). Rules are matched by (family, table, chain, handle)
/// with the same text, else by (family, table, chain, text) when that is unique (positions from
/// `iptables-save` shift when rules are inserted); a rule only in `after` was added in between
/// and counts from zero; a rule only in `before` was deleted and is ignored. A counter that went
/// down (reset) counts as no growth. Only dropping rules (verdict drop or reject) are
/// candidates: an accept or jump rule that grew did not drop anything.
pub fn attribute(before: &[RuleCounter], after: &[RuleCounter], dropped: u64) -> Attribution {
    let mut candidates: Vec<RuleDelta> = after
        .iter()
        .filter(|r| r.drops())
        .filter_map(|rule| {
            let base = previous(before, rule).map_or(0, |p| p.packets);
            let delta = rule.packets.saturating_sub(base);
            (delta > 0).then(|| RuleDelta {
                rule: rule.clone(),
                delta,
            })
        })
        .collect();
    // Stable: equal growths stay in ruleset order.
    candidates.sort_by_key(|c| std::cmp::Reverse(c.delta));
    let exact = exact_set(&candidates, dropped);
    if exact.is_empty() {
        let explained: u64 = candidates
            .iter()
            .fold(0, |sum, c| sum.saturating_add(c.delta));
        let unexplained = dropped.saturating_sub(explained);
        if unexplained > 0 {
            // A drop policy with no counter (nft's JSON shows none) may have dropped them.
            candidates.extend(
                after
                    .iter()
                    .filter(|r| r.is_chain_policy() && r.drops() && r.packets == 0)
                    .map(|rule| RuleDelta {
                        rule: rule.clone(),
                        delta: unexplained,
                    }),
            );
        }
    }
    Attribution { exact, candidates }
}

fn previous<'a>(before: &'a [RuleCounter], rule: &RuleCounter) -> Option<&'a RuleCounter> {
    if let Some(same) = before
        .iter()
        .find(|b| b.handle == rule.handle && b.same_chain(rule) && b.text == rule.text)
    {
        return Some(same);
    }
    let mut by_text = before
        .iter()
        .filter(|b| !b.is_chain_policy() && b.same_chain(rule) && b.text == rule.text);
    match (by_text.next(), by_text.next()) {
        (Some(only), None) if !rule.is_chain_policy() => Some(only),
        _ => None,
    }
}

/// Largest candidate set searched exhaustively for a sum (2^16 subsets).
const MAX_SUBSET_SEARCH: usize = 16;

fn exact_set(candidates: &[RuleDelta], dropped: u64) -> Vec<RuleDelta> {
    if dropped == 0 {
        return Vec::new();
    }
    let singles: Vec<RuleDelta> = candidates
        .iter()
        .filter(|c| c.delta == dropped)
        .cloned()
        .collect();
    if !singles.is_empty() {
        return singles;
    }
    if candidates.len() > MAX_SUBSET_SEARCH {
        let total: u128 = candidates.iter().map(|c| u128::from(c.delta)).sum();
        return if total == u128::from(dropped) {
            candidates.to_vec()
        } else {
            Vec::new()
        };
    }
    // The smallest subsets (of two or more) that sum to `dropped`; keep one only if unique.
    let mut best: Option<(u32, u32)> = None; // (size, mask)
    let mut ties = 0;
    for mask in 1u32..(1 << candidates.len()) {
        let size = mask.count_ones();
        if size < 2 || best.is_some_and(|(best_size, _)| size > best_size) {
            continue;
        }
        let sum: u128 = candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, c)| u128::from(c.delta))
            .sum();
        if sum != u128::from(dropped) {
            continue;
        }
        match best {
            Some((best_size, _)) if best_size == size => ties += 1,
            _ => {
                best = Some((size, mask));
                ties = 0;
            }
        }
    }
    match best {
        Some((_, mask)) if ties == 0 => candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, c)| c.clone())
            .collect(),
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Running the tools

/// Every rule counter of the calling thread's network namespace (a child process inherits the
/// network namespace of the thread that starts it, so call this from a thread that has
/// `setns`ed into the namespace of interest).
///
/// Uses `nft -j list ruleset`, with iptables-nft policy counts from `iptables-save -c` /
/// `ip6tables-save -c` copied onto the drop-policy pseudo-rules when those tools are present;
/// falls back to [`snapshot_iptables_save`] when `nft` is not installed.
pub fn snapshot() -> Result<Vec<RuleCounter>, NetfilterError> {
    let mut rules = match snapshot_nft() {
        Err(NetfilterError::NoTool { .. }) => return snapshot_iptables_save(),
        other => other?,
    };
    for (family, tool) in [("ip", "iptables-save"), ("ip6", "ip6tables-save")] {
        if !rules
            .iter()
            .any(|r| r.is_chain_policy() && r.family == family)
        {
            continue;
        }
        let Some(path) = find_tool(tool) else {
            continue;
        };
        // Best effort: iptables-save refuses tables it did not create; the policy then just
        // stays without a count.
        if let Ok(policies) = run(&path, &["-c"]).and_then(|out| parse_iptables_save(&out, family))
        {
            merge_policy_counters(&mut rules, &policies);
        }
    }
    Ok(rules)
}

/// `nft -j list ruleset`, parsed.
pub fn snapshot_nft() -> Result<Vec<RuleCounter>, NetfilterError> {
    let nft = find_tool("nft").ok_or(NetfilterError::NoTool { tools: "`nft`" })?;
    parse_nft_json(&run(&nft, &["-j", "list", "ruleset"])?)
}

/// `iptables-save -c` and `ip6tables-save -c` (whichever are installed), parsed.
pub fn snapshot_iptables_save() -> Result<Vec<RuleCounter>, NetfilterError> {
    let mut rules = Vec::new();
    let mut found = false;
    for (family, tool) in [("ip", "iptables-save"), ("ip6", "ip6tables-save")] {
        let Some(path) = find_tool(tool) else {
            continue;
        };
        found = true;
        rules.extend(parse_iptables_save(&run(&path, &["-c"])?, family)?);
    }
    if !found {
        return Err(NetfilterError::NoTool {
            tools: "`nft`, `iptables-save`, `ip6tables-save`",
        });
    }
    sort_dropping_first(&mut rules);
    Ok(rules)
}

/// Copies the counts of `from`'s policy pseudo-rules onto the same chains' in `rules`.
fn merge_policy_counters(rules: &mut [RuleCounter], from: &[RuleCounter]) {
    for rule in rules.iter_mut().filter(|r| r.is_chain_policy()) {
        if let Some(counted) = from
            .iter()
            .find(|f| f.is_chain_policy() && f.same_chain(rule))
        {
            rule.packets = counted.packets;
            rule.bytes = counted.bytes;
        }
    }
}

/// Directories searched after PATH: the daemon may run with a PATH without the sbin dirs.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"];

fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn run(tool: &Path, args: &[&str]) -> Result<String, NetfilterError> {
    let command = format!("{} {}", tool.display(), args.join(" "));
    let output = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|io_error| NetfilterError::Spawn {
            command: command.clone(),
            io_error,
        })?;
    if !output.status.success() {
        return Err(NetfilterError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPT_BEFORE: &str = include_str!("fixtures/nft_iptables_before.json");
    const IPT_AFTER: &str = include_str!("fixtures/nft_iptables_after.json");
    const IPT_DELETED: &str = include_str!("fixtures/nft_iptables_deleted.json");
    const POLICY_BEFORE: &str = include_str!("fixtures/nft_policy_before.json");
    const POLICY_AFTER: &str = include_str!("fixtures/nft_policy_after.json");

    fn parse(json: &str) -> Vec<RuleCounter> {
        parse_nft_json(json).expect("fixture parses")
    }

    fn find<'a>(rules: &'a [RuleCounter], text: &str) -> &'a RuleCounter {
        rules
            .iter()
            .find(|r| r.text == text)
            .unwrap_or_else(|| panic!("no rule `{text}` in {rules:#?}"))
    }

    fn texts(deltas: &[RuleDelta]) -> Vec<(&str, u64)> {
        deltas
            .iter()
            .map(|d| (d.rule.text.as_str(), d.delta))
            .collect()
    }

    const SYN_5001: &str =
        "tcp flags syn / fin,syn,rst,ack tcp dport 5001 xt match comment counter drop";
    const DROP_5002: &str = "tcp dport 5002 counter drop";

    #[test]
    fn iptables_nft_rules_are_rendered() {
        let rules = parse(IPT_AFTER);
        let syn = find(&rules, SYN_5001);
        assert_eq!(
            (
                syn.family.as_str(),
                syn.table.as_str(),
                syn.chain.as_str(),
                syn.handle
            ),
            ("ip", "filter", "INPUT", 2)
        );
        assert_eq!((syn.packets, syn.bytes), (3, 180));
        assert_eq!(syn.verdict.as_deref(), Some("drop"));
        assert_eq!(syn.comment, None);

        let reject = find(&rules, "tcp dport 5004 counter xt target REJECT");
        assert_eq!(reject.verdict.as_deref(), Some("reject"));
        assert!(reject.drops());
        let accept = find(&rules, "iifname lo tcp dport 5003 counter accept");
        assert_eq!(accept.verdict.as_deref(), Some("accept"));
        assert!(!accept.drops());
        assert_eq!(accept.packets, 1);
        let jump = find(&rules, "ip saddr 10.0.0.0/8 counter jump SSH");
        assert_eq!(jump.verdict.as_deref(), Some("jump SSH"));
        find(&rules, "meta l4proto udp xt match statistic counter drop");
        let v6 = find(&rules, "tcp dport 80 counter drop");
        assert_eq!(v6.family, "ip6");
        // `iptables -P FORWARD DROP`.
        let policy = rules
            .iter()
            .find(|r| r.is_chain_policy())
            .expect("FORWARD policy");
        assert_eq!(
            (policy.chain.as_str(), policy.text.as_str()),
            ("FORWARD", "policy drop")
        );
        assert!(policy.drops());
    }

    #[test]
    fn dropping_rules_come_first() {
        let rules = parse(IPT_AFTER);
        let first_other = rules
            .iter()
            .position(|r| !r.drops())
            .expect("some rule does not drop");
        assert!(
            rules[first_other..].iter().all(|r| !r.drops()),
            "{rules:#?}"
        );
        let first_policy = rules
            .iter()
            .position(RuleCounter::is_chain_policy)
            .expect("a policy");
        assert!(
            rules[..first_policy]
                .iter()
                .all(|r| r.drops() && !r.is_chain_policy())
        );
    }

    #[test]
    fn native_nft_rules_are_rendered() {
        let rules = parse(POLICY_BEFORE);
        let syn = find(
            &rules,
            "ip protocol tcp tcp dport 5001 tcp flags syn counter drop",
        );
        assert_eq!(syn.comment.as_deref(), Some("no 5001"));
        assert_eq!(syn.family, "inet");
        let reject = find(
            &rules,
            "meta l4proto tcp ip saddr { 192.0.2.1, 192.0.2.7 } counter reject with tcp reset",
        );
        assert_eq!(reject.verdict.as_deref(), Some("reject"));
        find(
            &rules,
            "ip daddr 10.0.0.0/8 tcp dport != 22 counter log prefix \"x \" drop",
        );
        let limited = find(
            &rules,
            "meta l4proto udp limit rate 10/second counter accept",
        );
        assert!(!limited.drops());
        find(
            &rules,
            "tcp dport 1000-2000 counter reject with icmpx port-unreachable",
        );
        // `ct state established,related accept` has no counter.
        assert!(
            !rules.iter().any(|r| r.text.contains("ct state")),
            "{rules:#?}"
        );
        // Only `in` has a drop policy.
        let policies: Vec<_> = rules.iter().filter(|r| r.is_chain_policy()).collect();
        assert_eq!(policies.len(), 1);
        assert_eq!(
            (policies[0].table.as_str(), policies[0].chain.as_str()),
            ("filt", "in")
        );
    }

    #[test]
    fn only_the_rule_that_grew_is_named() {
        // Three SYNs to 5001 were dropped; 5002's drop rule did not grow; the accept rule for
        // 5003 grew but accepts.
        let attribution = attribute(&parse(IPT_BEFORE), &parse(IPT_AFTER), 3);
        assert_eq!(texts(&attribution.exact), [(SYN_5001, 3)]);
        assert_eq!(texts(&attribution.candidates), [(SYN_5001, 3)]);
        assert_eq!(attribution.exact[0].rule.handle, 2);
    }

    #[test]
    fn a_count_that_does_not_match_leaves_candidates_only() {
        let attribution = attribute(&parse(IPT_BEFORE), &parse(IPT_AFTER), 5);
        assert!(attribution.exact.is_empty());
        // The FORWARD policy has no counter: it may have dropped the unexplained 2.
        assert_eq!(
            texts(&attribution.candidates),
            [(SYN_5001, 3), ("policy drop", 2)]
        );
        let attribution = attribute(&parse(IPT_BEFORE), &parse(IPT_AFTER), 2);
        assert!(attribution.exact.is_empty());
        assert_eq!(texts(&attribution.candidates), [(SYN_5001, 3)]);
    }

    #[test]
    fn no_growth_no_rule() {
        let before = parse(IPT_BEFORE);
        let attribution = attribute(&before, &before, 0);
        assert_eq!(attribution, Attribution::default());
        let after = parse(IPT_AFTER);
        assert_eq!(attribute(&after, &after, 0), Attribution::default());
    }

    #[test]
    fn a_rule_deleted_between_snapshots_is_ignored() {
        let before = parse(IPT_BEFORE);
        let deleted = parse(IPT_DELETED);
        assert!(before.iter().any(|r| r.text == DROP_5002));
        assert!(!deleted.iter().any(|r| r.text == DROP_5002));
        let attribution = attribute(&before, &deleted, 3);
        assert_eq!(texts(&attribution.exact), [(SYN_5001, 3)]);
        assert_eq!(texts(&attribution.candidates), [(SYN_5001, 3)]);
    }

    #[test]
    fn a_rule_added_between_snapshots_counts_from_zero() {
        let mut before = parse(IPT_BEFORE);
        before.retain(|r| r.text != SYN_5001);
        let attribution = attribute(&before, &parse(IPT_AFTER), 3);
        assert_eq!(texts(&attribution.exact), [(SYN_5001, 3)]);
    }

    #[test]
    fn a_drop_policy_explains_what_no_rule_does() {
        // Two SYNs to 5005 fell through to `policy drop`; the accept rule for 5003 grew.
        let before = parse(POLICY_BEFORE);
        let after = parse(POLICY_AFTER);
        assert_eq!(
            find(&after, "iifname lo tcp dport 5003 counter accept").packets,
            1
        );
        let attribution = attribute(&before, &after, 2);
        assert!(attribution.exact.is_empty());
        assert_eq!(attribution.candidates.len(), 1);
        let policy = &attribution.candidates[0];
        assert!(policy.rule.is_chain_policy());
        assert_eq!(
            (
                policy.rule.family.as_str(),
                policy.rule.table.as_str(),
                policy.rule.chain.as_str()
            ),
            ("inet", "filt", "in")
        );
        assert_eq!(policy.delta, 2);
    }

    #[test]
    fn a_counted_drop_policy_is_an_ordinary_rule() {
        // iptables-nft policy counts, merged in from iptables-save.
        let mut before = parse(IPT_BEFORE);
        let mut after = parse(IPT_AFTER);
        let policy =
            |packets| RuleCounter::policy("ip", "filter", "FORWARD", packets, packets * 60);
        merge_policy_counters(&mut before, &[policy(4)]);
        merge_policy_counters(&mut after, &[policy(6)]);
        let attribution = attribute(&before, &after, 5);
        assert_eq!(
            texts(&attribution.exact),
            [(SYN_5001, 3), ("policy drop", 2)]
        );
        assert_eq!(
            texts(&attribution.candidates),
            [(SYN_5001, 3), ("policy drop", 2)]
        );
        // A policy with a counter that did not grow is not guessed at.
        let attribution = attribute(&after, &after, 2);
        assert_eq!(attribution, Attribution::default());
    }

    fn rule(chain: &str, handle: u64, packets: u64, verdict: &str) -> RuleCounter {
        RuleCounter {
            family: "ip".to_owned(),
            table: "filter".to_owned(),
            chain: chain.to_owned(),
            handle,
            packets,
            bytes: packets * 60,
            verdict: Some(verdict.to_owned()),
            text: format!("rule {handle} counter {verdict}"),
            comment: None,
        }
    }

    #[test]
    fn drops_split_over_rules_sum_up() {
        let before = [
            rule("INPUT", 1, 0, "drop"),
            rule("INPUT", 2, 0, "drop"),
            rule("INPUT", 3, 0, "reject"),
        ];
        let after = [
            rule("INPUT", 1, 4, "drop"),
            rule("INPUT", 2, 1, "drop"),
            rule("INPUT", 3, 2, "reject"),
        ];
        // 4 + 2 (the unique pair).
        let attribution = attribute(&before, &after, 6);
        assert_eq!(
            texts(&attribution.exact),
            [("rule 1 counter drop", 4), ("rule 3 counter reject", 2)]
        );
        assert_eq!(attribution.candidates.len(), 3);
        // All three.
        let attribution = attribute(&before, &after, 7);
        assert_eq!(attribution.exact.len(), 3);
        // 5 = 4 + 1 only.
        assert_eq!(attribute(&before, &after, 5).exact.len(), 2);
        // No rule grew by 3: the pair 2 + 1, listed largest first.
        assert_eq!(
            texts(&attribute(&before, &after, 3).exact),
            [("rule 3 counter reject", 2), ("rule 2 counter drop", 1)]
        );
    }

    #[test]
    fn ambiguous_sums_are_not_exact() {
        let before = [
            rule("A", 1, 0, "drop"),
            rule("A", 2, 0, "drop"),
            rule("A", 3, 0, "drop"),
            rule("A", 4, 0, "drop"),
        ];
        let after = [
            rule("A", 1, 3, "drop"),
            rule("A", 2, 2, "drop"),
            rule("A", 3, 2, "drop"),
            rule("A", 4, 1, "drop"),
        ];
        // 4 = 3 + 1 = 2 + 2: two pairs.
        let attribution = attribute(&before, &after, 4);
        assert!(attribution.exact.is_empty());
        assert_eq!(attribution.candidates.len(), 4);
        // Two single rules grew by 2: both are named.
        assert_eq!(attribute(&before, &after, 2).exact.len(), 2);
    }

    #[test]
    fn counter_reset_is_no_growth() {
        let attribution = attribute(&[rule("A", 1, 10, "drop")], &[rule("A", 1, 2, "drop")], 2);
        assert_eq!(attribution, Attribution::default());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            parse_nft_json("not json"),
            Err(NetfilterError::Json(_))
        ));
        assert!(matches!(
            parse_nft_json("{\"x\": 1}"),
            Err(NetfilterError::NftShape(_))
        ));
        assert!(matches!(
            parse_nft_json(r#"{"nftables": [{"rule": {"family": "ip"}}]}"#),
            Err(NetfilterError::NftShape(_))
        ));
        // An empty ruleset.
        let empty =
            r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]}"#;
        assert_eq!(parse_nft_json(empty).expect("parses"), []);
    }

    const IPTABLES_SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 03:49:32 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [7:420]
:OUTPUT ACCEPT [0:0]
:SSH - [0:0]
[3:180] -A INPUT -p tcp -m tcp --dport 5001 --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment "block \"5001\"" -j DROP
[1:60] -A INPUT -i lo -p tcp -m tcp --dport 5003 -j ACCEPT
[0:0] -A INPUT -p tcp -m tcp --dport 5004 -j REJECT --reject-with icmp-port-unreachable
[0:0] -A INPUT -s 10.0.0.0/8 -j SSH
[2:120] -A SSH -p tcp -m tcp --dport 22 -j LOG
[0:0] -A SSH -g OUTPUT
COMMIT
# Completed on Sun Nov 22 03:49:32 2026
*raw
:PREROUTING ACCEPT [10:600]
[5:300] -A PREROUTING -p udp -j DROP
COMMIT
"#;

    #[test]
    fn iptables_save_is_parsed() {
        let rules = parse_iptables_save(IPTABLES_SAVE, "ip").expect("parses");
        let syn = &rules[0];
        assert_eq!(
            (
                syn.table.as_str(),
                syn.chain.as_str(),
                syn.handle,
                syn.packets,
                syn.bytes
            ),
            ("filter", "INPUT", 1, 3, 180)
        );
        assert_eq!(syn.verdict.as_deref(), Some("drop"));
        assert_eq!(syn.comment.as_deref(), Some("block \"5001\""));
        assert!(syn.text.starts_with("-A INPUT -p tcp -m tcp --dport 5001"));
        let verdicts: Vec<_> = rules
            .iter()
            .map(|r| {
                (
                    r.table.as_str(),
                    r.chain.as_str(),
                    r.handle,
                    r.verdict.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            verdicts,
            [
                ("filter", "INPUT", 1, Some("drop")),
                ("filter", "INPUT", 3, Some("reject")),
                ("raw", "PREROUTING", 1, Some("drop")),
                ("filter", "FORWARD", 0, Some("drop")),
                ("filter", "INPUT", 2, Some("accept")),
                ("filter", "INPUT", 4, Some("jump SSH")),
                ("filter", "SSH", 1, None),
                ("filter", "SSH", 2, Some("goto OUTPUT")),
            ]
        );
        let policy = &rules[3];
        assert!(policy.is_chain_policy());
        assert_eq!((policy.packets, policy.bytes), (7, 420));
        assert!(rules.iter().all(|r| r.family == "ip"));
    }

    #[test]
    fn iptables_save_attribution_survives_inserted_rules() {
        let before = parse_iptables_save(IPTABLES_SAVE, "ip").expect("parses");
        // A rule inserted at the top of INPUT shifts every position.
        let after_text = IPTABLES_SAVE.replace(
            "[3:180] -A INPUT",
            "[0:0] -A INPUT -p icmp -j ACCEPT\n[5:300] -A INPUT",
        );
        let after = parse_iptables_save(&after_text, "ip").expect("parses");
        let attribution = attribute(&before, &after, 2);
        assert_eq!(attribution.exact.len(), 1);
        assert_eq!(attribution.exact[0].rule.handle, 2);
        assert!(attribution.exact[0].rule.text.contains("--dport 5001"));
    }

    #[test]
    fn bad_iptables_save_lines_are_errors() {
        for bad in [
            "[1:2] -A INPUT -j DROP",
            "*filter\n[1:2 -A INPUT -j DROP",
            "*filter\n[x:2] -A INPUT -j DROP",
            "*filter\n:INPUT ACCEPT [0:0]\n[1:2] -I INPUT -j DROP",
            "*filter\n[1:2] -A NOPE -j DROP",
        ] {
            assert!(
                matches!(
                    parse_iptables_save(bad, "ip"),
                    Err(NetfilterError::IptablesSave { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn quoted_words_are_split() {
        assert_eq!(
            split_words(r#"-m comment --comment "a \"b\" c" -j DROP"#),
            ["-m", "comment", "--comment", "a \"b\" c", "-j", "DROP"]
        );
    }
}

#[cfg(test)]
mod proptests;
