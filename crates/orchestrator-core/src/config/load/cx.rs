//! Where problems are collected while the document is walked, each located
//! by line and column (counted in characters, as editors do).

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeString, DeValue};

use crate::config::error::{ConfigErrors, ConfigProblem, Locations};

pub(super) type Value<'i> = Spanned<DeValue<'i>>;
pub(super) type TomlKey<'i> = Spanned<DeString<'i>>;

pub(super) struct Cx<'t> {
    text: &'t str,
    /// Byte offset of the start of every line, for offset → line/column.
    line_starts: Vec<usize>,
    pub(super) file: Option<PathBuf>,
    pub(super) problems: Vec<ConfigProblem>,
    /// Where each key was found, for problems found after loading (a
    /// missing binary, a services_dir that is a file).
    pub(super) locations: Locations,
    /// The daemon's environment, for `${VAR}` (after the env files).
    pub(super) host_var: &'t dyn Fn(&str) -> Option<String>,
    /// Whether `[services.*]` is read, or skipped as a client does.
    pub(super) scope: super::Scope,
}

impl<'t> Cx<'t> {
    pub(super) fn new(
        text: &'t str,
        file: Option<&Path>,
        host_var: &'t dyn Fn(&str) -> Option<String>,
    ) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Cx {
            text,
            line_starts,
            file: file.map(Path::to_path_buf),
            problems: Vec::new(),
            locations: Locations::new(file.map(Path::to_path_buf)),
            host_var,
            scope: super::Scope::Everything,
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

    /// Remember where `key` (a dotted path) is: `span` is its value, or the
    /// name of a section.
    pub(super) fn locate(&mut self, key: &str, span: Range<usize>) {
        let (line, column) = self.position(span.start);
        self.locations.insert(key.to_owned(), line, column);
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

    /// A problem at where `located` was found (else the file alone).
    pub(super) fn report_at(&mut self, located: &str, key: &str, message: impl Into<String>) {
        let problem = self.locations.problem(key, &[located], message.into());
        self.problems.push(problem);
    }

    pub(super) fn syntax_error(&mut self, err: &toml::de::Error) {
        let mut message = format!("invalid TOML: {}", err.message().trim_end());
        if message == "invalid TOML: duplicate key"
            && let Some(span) = err.span()
        {
            message = format!("invalid TOML: {}", self.duplicate(span.start));
        }
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

    /// What a duplicate key at `offset` duplicates, and where the first one
    /// is: the parser says only "duplicate key" and keeps the first span to
    /// itself, so both are found again in the text.
    fn duplicate(&self, offset: usize) -> String {
        let (line, _) = self.position(offset);
        let lines: Vec<&str> = self.text.lines().collect();
        let here = lines.get(line - 1).copied().unwrap_or("");
        if let Some(table) = header(here) {
            return match (1..line).find(|&n| header(lines[n - 1]).as_deref() == Some(&table)) {
                Some(first) => format!(
                    "duplicate key: the table [{table}] is defined twice, at lines {first} and \
                     {line}; merge them into one section"
                ),
                None => format!(
                    "duplicate key: the table [{table}] at line {line} is already defined above \
                     (by a dotted key or an inline table); define it in one place"
                ),
            };
        }
        let key = bare_key(here).unwrap_or_default();
        // The section the key is in: the last header above it.
        let start = (1..line)
            .rev()
            .find(|&n| header(lines[n - 1]).is_some())
            .unwrap_or(0);
        let place = match start {
            0 => "at the top level".to_owned(),
            n => format!("in [{}]", header(lines[n - 1]).unwrap_or_default()),
        };
        let first = (start.max(1)..line).find(|&n| bare_key(lines[n - 1]).as_deref() == Some(&key));
        match first {
            Some(first) => format!(
                "duplicate key {key:?} {place}, at lines {first} and {line}; keep one of them"
            ),
            None => format!("duplicate key {key:?} {place} at line {line}; keep only one"),
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
}

/// The table a `[header]` or `[[header]]` line names, spaces removed.
fn header(line: &str) -> Option<String> {
    let line = line.trim_start();
    let inner = line.strip_prefix("[[").or_else(|| line.strip_prefix('['))?;
    let end = inner.find(']')?;
    Some(
        inner[..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    )
}

/// The (dotted) key a `key = value` line sets, spaces removed.
fn bare_key(line: &str) -> Option<String> {
    let line = line.trim_start();
    if line.starts_with('[') || line.starts_with('#') {
        return None;
    }
    let end = line.find('=')?;
    Some(line[..end].chars().filter(|c| !c.is_whitespace()).collect())
}
