//! What a client reads of a configuration: `[orchestrator]`, never the
//! service tables. Parsing 10,000 `[services.NAME]` sections took a client
//! about 20 ms before it could even connect to its daemon.

use std::ops::Range;

use toml_parser::Source;
use toml_parser::lexer::TokenKind;

/// `text` with every table under `services` blanked, from its header to the
/// next header: each byte but the newlines becomes a space, so what is left
/// has the same lines, columns and offsets, and a problem in `[orchestrator]`
/// is located exactly as in the whole file. `None` when there is no such
/// table. Headers are found with TOML's own lexer: a `[` inside a string, or
/// at the start of a line of a multi-line array, is never taken for one.
pub(super) fn blank_service_tables(text: &str) -> Option<String> {
    let regions = service_tables(text);
    if regions.is_empty() {
        return None;
    }
    let mut bytes = text.as_bytes().to_vec();
    for region in regions {
        for byte in &mut bytes[region] {
            if *byte != b'\n' {
                *byte = b' ';
            }
        }
    }
    // Each region starts at a `[` and ends at one (or at the end): whole
    // characters only, so this cannot fail; if it did, the caller parses
    // the whole text.
    String::from_utf8(bytes).ok()
}

/// The byte ranges of the tables whose header's first key is `services`.
fn service_tables(text: &str) -> Vec<Range<usize>> {
    let source = Source::new(text);
    let mut tokens = source.lex();
    let mut regions = Vec::new();
    let mut open: Option<usize> = None;
    // Brackets and braces of values: a header is a `[` at the start of a
    // line outside any value.
    let mut depth = 0usize;
    let mut line_start = true;
    while let Some(token) = tokens.next() {
        match token.kind() {
            TokenKind::Newline => line_start = true,
            TokenKind::Whitespace | TokenKind::Comment => {}
            TokenKind::Eof => break,
            TokenKind::LeftSquareBracket if depth == 0 && line_start => {
                let start = token.span().start();
                if let Some(from) = open.take() {
                    regions.push(from..start);
                }
                // `[` or `[[`, then the first key of the header.
                let first = tokens.by_ref().find(|token| {
                    !matches!(
                        token.kind(),
                        TokenKind::LeftSquareBracket | TokenKind::Whitespace
                    )
                });
                let is_services = first.is_some_and(|key| {
                    let raw = &text[key.span().start()..key.span().end()];
                    match key.kind() {
                        TokenKind::Atom => raw == "services",
                        TokenKind::BasicString | TokenKind::LiteralString => {
                            raw.len() >= 2 && &raw[1..raw.len() - 1] == "services"
                        }
                        _ => false,
                    }
                });
                if is_services {
                    open = Some(start);
                }
                line_start = false;
            }
            TokenKind::LeftSquareBracket | TokenKind::LeftCurlyBracket => {
                depth += 1;
                line_start = false;
            }
            TokenKind::RightSquareBracket | TokenKind::RightCurlyBracket => {
                depth = depth.saturating_sub(1);
                line_start = false;
            }
            _ => line_start = false,
        }
    }
    if let Some(from) = open {
        regions.push(from..text.len());
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blanked(text: &str) -> String {
        blank_service_tables(text).unwrap_or_else(|| text.to_owned())
    }

    #[test]
    fn service_tables_become_blank_lines_of_the_same_shape() {
        let text = "[orchestrator]\ndata_dir = \"x\"\n[services.api]\ncommand = [\"a\"]\n\
                    [services.\"web\"]\nport = 1\n[orchestrator.extra]\nk = 1\n";
        let out = blanked(text);
        assert_eq!(out.len(), text.len());
        assert_eq!(out.lines().count(), text.lines().count());
        assert!(out.starts_with("[orchestrator]\ndata_dir = \"x\"\n"));
        assert!(out.ends_with("[orchestrator.extra]\nk = 1\n"));
        assert!(!out.contains("services") && !out.contains("command"));
        for (a, b) in out.lines().zip(text.lines()) {
            assert_eq!(a.len(), b.len());
        }
    }

    #[test]
    fn brackets_in_strings_and_multiline_arrays_are_not_headers() {
        let text = "[services.api]\nargs = [\n[\"nested\"],\n]\nnote = \"\"\"\n[orchestrator]\n\"\"\"\n\
                    [orchestrator]\nshutdown_timeout = \"3s\"\n";
        let out = blanked(text);
        assert!(
            out.trim_start()
                .starts_with("[orchestrator]\nshutdown_timeout"),
            "{out:?}"
        );
        assert_eq!(out.matches("[orchestrator]").count(), 1);
        // A `[[services.x]]` array header and quoted keys count too; a key
        // only starting with services does not.
        let text = "[[services.job]]\na = 1\n['services'.b]\nc = 2\n[servicesx]\nd = 3\n";
        assert_eq!(blanked(text).trim(), "[servicesx]\nd = 3");
    }

    #[test]
    fn a_file_without_service_tables_is_left_alone() {
        assert!(blank_service_tables("[orchestrator]\nservices_dir = \"s\"\n").is_none());
        assert!(blank_service_tables("").is_none());
        // Multi-byte characters inside a blanked table leave valid text.
        let out = blanked("[services.é]\nx = \"ünïcode ✓\"\n[orchestrator]\n");
        assert!(out.ends_with("[orchestrator]\n"));
    }
}
