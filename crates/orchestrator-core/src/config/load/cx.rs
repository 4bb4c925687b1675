//! Where problems are collected while the document is walked, each located
//! by line and column (counted in characters, as editors do).

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeString, DeValue};

use crate::config::error::{ConfigErrors, ConfigProblem};

pub(super) type Value<'i> = Spanned<DeValue<'i>>;
pub(super) type TomlKey<'i> = Spanned<DeString<'i>>;

pub(super) struct Cx<'t> {
    text: &'t str,
    /// Byte offset of the start of every line, for offset → line/column.
    line_starts: Vec<usize>,
    pub(super) file: Option<PathBuf>,
    pub(super) problems: Vec<ConfigProblem>,
}

impl<'t> Cx<'t> {
    pub(super) fn new(text: &'t str, file: Option<&Path>) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Cx {
            text,
            line_starts,
            file: file.map(Path::to_path_buf),
            problems: Vec::new(),
        }
    }

    pub(super) fn into_errors(mut self) -> ConfigErrors {
        // Stable, so problems on one line keep the order they were found in.
        self.problems
            .sort_by_key(|problem| (problem.line.unwrap_or(0), problem.column.unwrap_or(0)));
        ConfigErrors {
            problems: self.problems,
        }
    }

    /// 1-based line and column (in characters, as editors count) of a byte offset.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        // Never 0: the first line starts at offset 0.
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset.saturating_sub(start), |prefix| {
                prefix.chars().count()
            });
        (line, column + 1)
    }

    pub(super) fn report(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.problems.push(ConfigProblem {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            key: key.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn syntax_error(&mut self, err: &toml::de::Error) {
        let message = format!("invalid TOML: {}", err.message().trim_end());
        match err.span() {
            Some(span) => self.report(span, "", message),
            None => self.problems.push(ConfigProblem {
                file: self.file.clone(),
                line: None,
                column: None,
                key: String::new(),
                message,
            }),
        }
    }

    pub(super) fn mismatch(&mut self, path: &str, value: &Value<'_>, expected: &str) {
        let found = value.get_ref().type_str();
        self.report(
            value.span(),
            path,
            format!("expected {expected}, found {found}"),
        );
    }

    pub(super) fn not_yet(&mut self, path: &str, key: &TomlKey<'_>) {
        let name: &str = key.get_ref();
        self.report(
            key.span(),
            path,
            format!("{name:?} is not supported yet by this version; remove it"),
        );
    }
}
