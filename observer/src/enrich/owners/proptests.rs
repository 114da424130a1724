//! What a scan reads from `/proc/PID` (descriptor links, `comm`, `cmdline`): any bytes give a
//! value, never a panic, and `cmdline` stays within [`CMDLINE_MAX`].
use proptest::prelude::*;

use super::*;
use crate::prop_support;

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_proc_bytes_never_panic(bytes in prop_support::bytes(400)) {
        let cmdline = parse_cmdline(&bytes);
        // Invalid UTF-8 becomes U+FFFD (3 bytes for 1).
        prop_assert!(cmdline.len() <= 3 * CMDLINE_MAX);
        let _ = parse_comm(&bytes);
        let _ = parse_socket_link(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn link_shaped_text_never_panics(link in r"(socket|pipe|anon_inode):\[[0-9a-z-]{0,25}\]?") {
        let _ = parse_socket_link(&link);
    }
}
