//! Where each raw tracepoint program finds its arguments.
//!
//! A raw tracepoint program receives the tracepoint's `TP_PROTO` arguments as an array of u64,
//! in declaration order. That order is the kernel's to change (arguments have been added over
//! releases: `err` to `tcp_retransmit_skb`, `rx_sk` to `kfree_skb`), so positions are looked
//! up by name and type in the running kernel's BTF ([`super::btf::KernelBtf::tracepoint_params`])
//! and passed to the programs in [`RawArgs`]. This module is the pure part: matching the
//! parameters BTF lists against what each program needs.
use observer_common::{ARG_ABSENT, RawArgs};

use super::btf::TracepointParam;

/// An argument a program needs: its name in the kernel source and its type as
/// [`TracepointParam::ty`] spells it.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    pub name: &'static str,
    pub ty: &'static str,
    /// Without it the program still works (older kernels lack it).
    pub optional: bool,
}

const fn needs(name: &'static str, ty: &'static str) -> Wanted {
    Wanted {
        name,
        ty,
        optional: false,
    }
}

const fn may_use(name: &'static str, ty: &'static str) -> Wanted {
    Wanted {
        name,
        ty,
        optional: true,
    }
}

const SK: Wanted = needs("sk", "struct sock *");
const SKB: Wanted = needs("skb", "struct sk_buff *");

/// What the raw program on `event` reads, in the order of [`RawArgs`]' fields
/// `[sk, skb, reason, extra, extra2]` (None: that field is unused by the program).
pub fn wanted(event: &str) -> Option<[Option<Wanted>; 5]> {
    Some(match event {
        "tcp_retransmit_skb" => [Some(SK), Some(SKB), Some(may_use("err", "int")), None, None],
        "tcp_retransmit_synack" => [
            Some(SK),
            None,
            None,
            Some(needs("req", "struct request_sock *")),
            None,
        ],
        "tcp_send_reset" => [
            Some(SK),
            Some(SKB),
            Some(may_use("reason", "enum sk_rst_reason")),
            None,
            None,
        ],
        "tcp_receive_reset" => [Some(SK), None, None, None, None],
        "kfree_skb" => [
            None,
            Some(SKB),
            Some(needs("reason", "enum skb_drop_reason")),
            Some(needs("location", "void *")),
            Some(may_use("rx_sk", "struct sock *")),
        ],
        "inet_sock_set_state" => [
            Some(SK),
            None,
            None,
            Some(needs("oldstate", "int")),
            Some(needs("newstate", "int")),
        ],
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RawArgsError {
    #[error("observer has no raw tracepoint program for `{0}`")]
    UnknownEvent(String),
    #[error("argument `{name}: {ty}` not found among ({found})")]
    Missing {
        name: &'static str,
        ty: &'static str,
        found: String,
    },
    #[error("argument `{name}` is `{found}`, expected `{ty}`")]
    WrongType {
        name: &'static str,
        ty: &'static str,
        found: String,
    },
    #[error("unnamed arguments: more than one is `{ty}`, so `{name}` cannot be told apart")]
    Ambiguous {
        name: &'static str,
        ty: &'static str,
    },
    #[error(
        "argument `{name}` is at position {position}, but the program reads only the first {reads}"
    )]
    TooFar {
        name: &'static str,
        position: usize,
        reads: usize,
    },
}

/// Matches `params` (from BTF) against what the program on `event` needs.
///
/// A parameter matches by name (`skb__nullable` is `skb`: BTF keeps the kernel's annotation
/// suffixes) and must then have the expected type. Unnamed parameters match by type when exactly
/// one has it. The program reads the first `required + optional found` arguments, so every
/// position must lie below that count.
pub fn resolve(event: &str, params: &[TracepointParam]) -> Result<RawArgs, RawArgsError> {
    let wanted = wanted(event).ok_or_else(|| RawArgsError::UnknownEvent(event.to_owned()))?;
    let mut positions = [ARG_ABSENT; 5];
    let mut reads = 0;
    let mut found = Vec::new();
    for (slot, want) in wanted.iter().enumerate() {
        let Some(want) = want else { continue };
        match position(want, params)? {
            Some(p) => {
                positions[slot] = u8::try_from(p).unwrap_or(ARG_ABSENT);
                found.push((want.name, p));
                reads += 1;
            }
            None if want.optional => {}
            None => {
                return Err(RawArgsError::Missing {
                    name: want.name,
                    ty: want.ty,
                    found: describe(params),
                });
            }
        }
    }
    if let Some(&(name, position)) = found.iter().find(|&&(_, p)| p >= reads) {
        return Err(RawArgsError::TooFar {
            name,
            position,
            reads,
        });
    }
    let [sk, skb, reason, extra, extra2] = positions;
    Ok(RawArgs {
        sk,
        skb,
        reason,
        extra,
        extra2,
        _pad: [0; 3],
    })
}

/// The position of `want` among `params`, None when it is not there.
fn position(want: &Wanted, params: &[TracepointParam]) -> Result<Option<usize>, RawArgsError> {
    let by_name = params.iter().position(|p| {
        p.name.as_deref().is_some_and(|n| {
            n == want.name
                || n.strip_prefix(want.name)
                    .is_some_and(|rest| rest.starts_with("__"))
        })
    });
    if let Some(i) = by_name {
        return if params[i].ty == want.ty {
            Ok(Some(i))
        } else {
            Err(RawArgsError::WrongType {
                name: want.name,
                ty: want.ty,
                found: params[i].ty.clone(),
            })
        };
    }
    if params.iter().any(|p| p.name.is_some()) {
        return Ok(None);
    }
    let mut same_type = params.iter().enumerate().filter(|(_, p)| p.ty == want.ty);
    match (same_type.next(), same_type.next()) {
        (Some((i, _)), None) => Ok(Some(i)),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(RawArgsError::Ambiguous {
            name: want.name,
            ty: want.ty,
        }),
    }
}

fn describe(params: &[TracepointParam]) -> String {
    params
        .iter()
        .map(|p| match &p.name {
            Some(name) => format!("{name}: {}", p.ty),
            None => p.ty.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(list: &[(&str, &str)]) -> Vec<TracepointParam> {
        list.iter()
            .map(|&(name, ty)| TracepointParam {
                name: Some(name.to_owned()),
                ty: ty.to_owned(),
            })
            .collect()
    }

    fn unnamed(list: &[&str]) -> Vec<TracepointParam> {
        list.iter()
            .map(|&ty| TracepointParam {
                name: None,
                ty: ty.to_owned(),
            })
            .collect()
    }

    #[test]
    fn kfree_skb_of_this_kernel_generation() {
        // 6.12+: (skb, location, reason, rx_sk).
        let params = named(&[
            ("skb", "struct sk_buff *"),
            ("location", "void *"),
            ("reason", "enum skb_drop_reason"),
            ("rx_sk", "struct sock *"),
        ]);
        let args = resolve("kfree_skb", &params).expect("resolves");
        assert_eq!(
            (args.skb, args.extra, args.reason, args.extra2, args.sk),
            (0, 1, 2, 3, ARG_ABSENT)
        );
    }

    #[test]
    fn an_optional_argument_may_be_missing() {
        // Before 6.12 kfree_skb had no rx_sk; tcp_retransmit_skb no err.
        let args = resolve(
            "kfree_skb",
            &named(&[
                ("skb", "struct sk_buff *"),
                ("location", "void *"),
                ("reason", "enum skb_drop_reason"),
            ]),
        )
        .expect("resolves");
        assert_eq!(args.extra2, ARG_ABSENT);
        let args = resolve(
            "tcp_retransmit_skb",
            &named(&[("sk", "struct sock *"), ("skb", "struct sk_buff *")]),
        )
        .expect("resolves");
        assert_eq!((args.sk, args.skb, args.reason), (0, 1, ARG_ABSENT));
    }

    #[test]
    fn names_keep_their_annotation_suffixes() {
        let params = named(&[
            ("sk", "struct sock *"),
            ("skb__nullable", "struct sk_buff *"),
            ("reason", "enum sk_rst_reason"),
        ]);
        let args = resolve("tcp_send_reset", &params).expect("resolves");
        assert_eq!((args.sk, args.skb, args.reason), (0, 1, 2));
        // A different argument that merely starts with the name does not match.
        let params = named(&[("skbuff", "struct sk_buff *"), ("sk", "struct sock *")]);
        assert!(matches!(
            resolve("tcp_send_reset", &params),
            Err(RawArgsError::Missing { name: "skb", .. })
        ));
    }

    #[test]
    fn positions_follow_the_kernel_not_a_fixed_order() {
        let params = named(&[
            ("newstate", "int"),
            ("sk", "struct sock *"),
            ("oldstate", "int"),
        ]);
        let args = resolve("inet_sock_set_state", &params).expect("resolves");
        assert_eq!((args.sk, args.extra, args.extra2), (1, 2, 0));
    }

    #[test]
    fn a_changed_type_is_refused() {
        let params = named(&[
            ("sk", "struct sock *"),
            ("oldstate", "int"),
            ("newstate", "long"),
        ]);
        assert_eq!(
            resolve("inet_sock_set_state", &params),
            Err(RawArgsError::WrongType {
                name: "newstate",
                ty: "int",
                found: "long".to_owned()
            })
        );
    }

    #[test]
    fn unnamed_arguments_match_by_unique_type() {
        // Events defined from a shared class have no `__bpf_trace_<event>` of their own.
        let args = resolve("tcp_receive_reset", &unnamed(&["struct sock *"])).expect("resolves");
        assert_eq!(args.sk, 0);
        assert_eq!(
            resolve(
                "inet_sock_set_state",
                &unnamed(&["struct sock *", "int", "int"])
            ),
            Err(RawArgsError::Ambiguous {
                name: "oldstate",
                ty: "int"
            })
        );
    }

    #[test]
    fn an_argument_beyond_what_the_program_reads_is_refused() {
        // A new argument in front of an optional one that is absent: the program reads 2
        // arguments, but skb is third.
        let params = named(&[
            ("sk", "struct sock *"),
            ("flags", "int"),
            ("skb", "struct sk_buff *"),
        ]);
        assert_eq!(
            resolve("tcp_retransmit_skb", &params),
            Err(RawArgsError::TooFar {
                name: "skb",
                position: 2,
                reads: 2
            })
        );
    }

    #[test]
    fn unknown_events_and_missing_arguments_are_named() {
        assert!(matches!(
            resolve("tcp_probe", &[]),
            Err(RawArgsError::UnknownEvent(_))
        ));
        let err = resolve("tcp_receive_reset", &named(&[("skb", "struct sk_buff *")]))
            .expect_err("sk missing");
        assert_eq!(
            err.to_string(),
            "argument `sk: struct sock *` not found among (skb: struct sk_buff *)"
        );
    }
}
