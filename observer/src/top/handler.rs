//! Keys: what each does to the state. Pure: no terminal, no I/O.
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::{App, Popup};

/// Rows a page key moves.
const PAGE: usize = 10;

/// Applies one key press to the state.
pub fn handle_key(app: &mut App, key: KeyEvent) {
    // Esc followed quickly by a key reaches us as Alt+key (the terminal cannot tell them
    // apart): take it as the two keys.
    if key.modifiers.contains(KeyModifiers::ALT)
        && let KeyCode::Char(_) = key.code
    {
        handle_key(app, KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
        handle_key(
            app,
            KeyEvent::new(key.code, key.modifiers.difference(KeyModifiers::ALT)),
        );
        return;
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('C')) {
        app.ui.quit = true;
        return;
    }
    if let Some(input) = &mut app.ui.filter_input {
        match key.code {
            KeyCode::Enter => {
                let filter = input.trim().to_owned();
                app.ui.filter_input = None;
                app.set_filter(filter);
            }
            KeyCode::Esc => app.ui.filter_input = None,
            KeyCode::Backspace => {
                input.pop();
            }
            KeyCode::Char('u') if ctrl => input.clear(),
            KeyCode::Char(c) if !ctrl && input.len() < 128 => input.push(c),
            _ => {}
        }
        return;
    }
    if app.ui.popup.is_some() {
        match key.code {
            KeyCode::Esc | KeyCode::Enter | KeyCode::Char('?') => {
                app.ui.popup = None;
                return;
            }
            KeyCode::Char('q') => {
                app.ui.quit = true;
                return;
            }
            // Moving the selection under the details window updates it; the rest waits.
            KeyCode::Up | KeyCode::Down | KeyCode::Char('j') | KeyCode::Char('k')
                if app.ui.popup == Some(Popup::Details) => {}
            _ => return,
        }
    }
    let selected = app.ui.table.selected().unwrap_or(0);
    match key.code {
        KeyCode::Char('q') => app.ui.quit = true,
        KeyCode::Down | KeyCode::Char('j') => app.select_by_user(selected.saturating_add(1)),
        KeyCode::Up | KeyCode::Char('k') => app.select_by_user(selected.saturating_sub(1)),
        KeyCode::PageDown => app.select_by_user(selected.saturating_add(PAGE)),
        KeyCode::PageUp => app.select_by_user(selected.saturating_sub(PAGE)),
        KeyCode::Home | KeyCode::Char('g') => app.select_by_user(0),
        KeyCode::End | KeyCode::Char('G') => app.select_by_user(usize::MAX),
        KeyCode::Tab => app.set_tab(app.ui.tab.next()),
        KeyCode::BackTab => app.set_tab(app.ui.tab.previous()),
        KeyCode::Char('s') => app.cycle_sort(false),
        KeyCode::Char('S') => app.cycle_sort(true),
        KeyCode::Char('/') => app.ui.filter_input = Some(app.ui.filter.clone()),
        KeyCode::Esc if !app.ui.filter.is_empty() => app.set_filter(String::new()),
        KeyCode::Char('p') | KeyCode::Char(' ') => {
            app.ui.paused = !app.ui.paused;
            if !app.ui.paused {
                app.refresh();
            }
        }
        KeyCode::Enter if app.has_selection() => app.ui.popup = Some(Popup::Details),
        KeyCode::Char('?') | KeyCode::Char('h') | KeyCode::F(1) => {
            app.ui.popup = Some(Popup::Help);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::RowKey,
        top::app::{
            SortColumn, Tab,
            tests::{app_with, flow},
        },
    };

    fn press(app: &mut App, code: KeyCode) {
        handle_key(app, KeyEvent::new(code, KeyModifiers::NONE));
    }

    fn type_text(app: &mut App, text: &str) {
        for c in text.chars() {
            press(app, KeyCode::Char(c));
        }
    }

    #[test]
    fn arrows_and_vi_keys_move_within_the_rows() {
        let mut app = app_with(5);
        assert_eq!(app.ui.table.selected(), Some(0));
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Char('j'));
        assert_eq!(app.ui.table.selected(), Some(2));
        press(&mut app, KeyCode::Char('k'));
        assert_eq!(app.ui.table.selected(), Some(1));
        press(&mut app, KeyCode::End);
        assert_eq!(app.ui.table.selected(), Some(4));
        press(&mut app, KeyCode::Down);
        assert_eq!(app.ui.table.selected(), Some(4), "clamped at the last row");
        press(&mut app, KeyCode::PageUp);
        assert_eq!(app.ui.table.selected(), Some(0));
        press(&mut app, KeyCode::Up);
        assert_eq!(app.ui.table.selected(), Some(0));
        assert_eq!(
            app.ui.selected_key,
            app.view.rows.first().map(|r| r.key.clone())
        );
    }

    #[test]
    fn keys_on_an_empty_table_do_not_panic() {
        let mut app =
            App::new(0, None, "test", crate::aggregate::EngineConfig::default()).expect("app");
        for code in [
            KeyCode::Down,
            KeyCode::Up,
            KeyCode::End,
            KeyCode::PageDown,
            KeyCode::Enter,
            KeyCode::Tab,
            KeyCode::Char('s'),
            KeyCode::Char('p'),
            KeyCode::Char('p'),
        ] {
            press(&mut app, code);
        }
        assert_eq!(app.ui.table.selected(), None);
        assert_eq!(app.ui.popup, None, "no details without a row");
    }

    #[test]
    fn tab_s_and_pause() {
        let mut app = app_with(2);
        press(&mut app, KeyCode::Tab);
        assert_eq!(app.ui.tab, Tab::Peers);
        press(&mut app, KeyCode::Tab);
        assert_eq!(app.ui.tab, Tab::Listeners);
        press(&mut app, KeyCode::BackTab);
        assert_eq!(app.ui.tab, Tab::Peers);
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.ui.sort, SortColumn::Retransmits);
        press(&mut app, KeyCode::Char('S'));
        assert_eq!(app.ui.sort, SortColumn::Severity);
        press(&mut app, KeyCode::Char('p'));
        assert!(app.ui.paused);
        press(&mut app, KeyCode::Char('p'));
        assert!(!app.ui.paused);
    }

    #[test]
    fn slash_edits_a_filter_that_enter_applies_and_esc_clears() {
        let mut app = app_with(4);
        press(&mut app, KeyCode::Char('/'));
        // While typing, q and s are text, not commands.
        type_text(&mut app, "q40003");
        assert!(!app.ui.quit);
        press(&mut app, KeyCode::Backspace);
        press(&mut app, KeyCode::Home);
        assert_eq!(app.ui.filter_input.as_deref(), Some("q4000"));
        for _ in 0..6 {
            press(&mut app, KeyCode::Backspace);
        }
        type_text(&mut app, "40003");
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.ui.filter, "40003");
        assert_eq!(app.ui.filter_input, None);
        assert_eq!(app.view.rows.len(), 1);
        assert_eq!(app.view.rows[0].key, RowKey::Flow(flow(3, false)));
        // Esc while typing keeps the applied filter; Esc after clears it.
        press(&mut app, KeyCode::Char('/'));
        type_text(&mut app, "zzz");
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.ui.filter, "40003");
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.ui.filter, "");
        assert_eq!(app.view.rows.len(), 4);
    }

    #[test]
    fn popups_open_and_close_and_q_or_ctrl_c_quit() {
        let mut app = app_with(2);
        press(&mut app, KeyCode::Char('?'));
        assert_eq!(app.ui.popup, Some(Popup::Help));
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.ui.sort, SortColumn::Severity, "keys wait under a popup");
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.ui.popup, None);
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.ui.popup, Some(Popup::Details));
        press(&mut app, KeyCode::Down);
        assert_eq!(
            app.ui.table.selected(),
            Some(1),
            "details follow the selection"
        );
        press(&mut app, KeyCode::Enter);
        assert_eq!(app.ui.popup, None);
        press(&mut app, KeyCode::Char('q'));
        assert!(app.ui.quit);
        // Esc and p typed together arrive as Alt+p: the window closes, the display pauses.
        let mut app = app_with(2);
        press(&mut app, KeyCode::Char('?'));
        handle_key(
            &mut app,
            KeyEvent::new(KeyCode::Char('p'), KeyModifiers::ALT),
        );
        assert_eq!(app.ui.popup, None);
        assert!(app.ui.paused);
        let mut app = app_with(1);
        press(&mut app, KeyCode::Char('/'));
        handle_key(
            &mut app,
            KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
        );
        assert!(app.ui.quit, "Ctrl-C quits even while typing a filter");
    }
}
