//! The configuration file (hand-edited, possibly for another version): arbitrary text and
//! mutated copies of the shipped example load to settings or a clear error, never a panic, and
//! every error names a line and column inside the text.
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::prop_support::{self, assert_bounded};

const SHIPPED: &str = include_str!("../../../packaging/observer.toml");

fn check(text: &str) -> Result<(), TestCaseError> {
    let parsed = assert_bounded(text.len(), 128, 64 * 1024, || {
        Config::parse(text, Path::new("fuzzed.toml"))
    })?;
    match parsed {
        Ok(config) => {
            if let Ok(settings) = Settings::resolve(&config) {
                let _ = settings.load_options();
                let _ = settings.changed_keys(&settings);
            }
            let _ = Config::default().overlay(&config);
        }
        Err(error) => {
            let message = error.to_string();
            prop_assert!(!message.is_empty());
        }
    }
    for offset in [0, text.len() / 2, text.len(), text.len() + 5] {
        let _ = line_column(text, offset);
    }
    Ok(())
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
        check(&text)?;
    }

    #[test]
    fn toml_shaped_text_never_panics(
        text in r#"((\[[a-z_.]{0,16}\]|[a-z_]{1,16} = (-?[0-9]{1,22}|-?[0-9]\.[0-9]{0,3}(e[0-9]{1,3})?|"[a-z0-9:.,\[\] -]{0,20}"|true|\[\]|\{\})|# .{0,8})\n){0,12}"#,
    ) {
        check(&text)?;
    }

    #[test]
    fn mutated_examples_never_panic(text in prop_support::mutated_text(&[SHIPPED])) {
        check(&text)?;
    }

    #[test]
    fn option_strings_never_panic(spec in "(?s).{0,40}", n in any::<u32>()) {
        let _ = export_kinds_mask(&spec);
        let _ = parse_metrics_addr(&spec);
        let _ = check_perf_pages(n as usize);
        let _ = check_wakeup_events(n, n as usize);
        let _ = check_max_flows(n);
        let _ = check_keep(n);
    }
}
