//! tracefs `format` files (their layout moves between kernels, and RT or vendor kernels add
//! fields): arbitrary text and mutated copies of real format files parse to a format or an
//! error, and every layout and print-format lookup on the result answers without a panic.
use proptest::prelude::*;

use super::*;
use crate::prop_support::{self, assert_bounded};

const FIXTURES: &[&str] = &[
    include_str!("../fixtures/tcp_retransmit_skb.format"),
    include_str!("../fixtures/tcp_retransmit_skb_rt.format"),
    include_str!("../fixtures/tcp_retransmit_skb_old.format"),
    include_str!("../fixtures/tcp_retransmit_synack.format"),
    include_str!("../fixtures/tcp_send_reset.format"),
    include_str!("../fixtures/tcp_receive_reset.format"),
    include_str!("../fixtures/inet_sock_set_state.format"),
    include_str!("../fixtures/kfree_skb.format"),
    include_str!("../fixtures/kfree_skb_5.17.format"),
    include_str!("../fixtures/malformed.format"),
];

fn check(text: &str) -> Result<(), TestCaseError> {
    // Names, fields and symbolic pairs are copies of parts of the text.
    assert_bounded(text.len(), 64, 16 * 1024, || {
        let Ok(format) = parse_format(text) else {
            return;
        };
        let _ = retransmit_skb_layout(&format);
        let _ = retransmit_synack_layout(&format);
        let _ = receive_reset_layout(&format);
        let _ = send_reset_layout(&format);
        let _ = kfree_skb_layout(&format);
        let _ = set_state_layout(&format);
        for field in ["reason", "newstate", "oldstate", "state", "protocol"] {
            let _ = format.symbolic_values(field);
        }
        let _ = format.offset_of("skaddr", 8);
        let _ = format.optional_offset_of("rx_sk", 8);
        let _ = format.read_span(&["saddr", "daddr", "sport", "dport"]);
    })?;
    Ok(())
}

/// Found by these properties: a multi-byte character before a field's name sliced the
/// declaration inside that character (a panic).
#[test]
fn names_after_multibyte_characters() {
    assert_eq!(field_name("int\u{fffd}common_pid"), Some("common_pid"));
    assert_eq!(field_name("unsigned char x\u{fffd}"), None);
    let text = "name: x\nID: 1\nformat:\n\tfield:int\u{fffd}pid;\toffset:0;\tsize:4;\tsigned:1;\n";
    let format = parse_format(text).expect("parses");
    assert_eq!(format.offset_of("pid", 4).ok(), Some(0));
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        check(&text)?;
    }

    #[test]
    fn format_shaped_text_never_panics(
        text in "(name: [a-z_]{0,8}\n|ID: -?[0-9]{0,12}\n|\tfield:[a-z_ *\\[\\]0-9]{0,24};\toffset:-?[0-9]{0,11};\tsize:-?[0-9]{0,11};\tsigned:[0-9]{0,2};\n|print fmt: \"[a-z%]{0,8}\", __print_symbolic\\(REC->[a-z]{0,6}, \\{ -?[0-9x]{0,20}, \"[A-Z_]{0,6}\" \\}[,)\"{ ]{0,4}\n){0,12}",
    ) {
        check(&text)?;
    }

    #[test]
    fn mutated_formats_never_panic(text in prop_support::mutated_text(FIXTURES)) {
        check(&text)?;
    }
}
