use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a configuration, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file, when there is one.
    pub file: Option<PathBuf>,
    /// 1-based line and column of the offending key or value, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `services.api.backoff.initial`; empty for the whole file.
    pub key: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => write!(f, "<defaults>")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a configuration, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "{count} configuration problem{}",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

/// Where each key of a loaded file is: dotted key path (as in
/// `ConfigProblem::key`) to 1-based line and column. Kept beside the
/// `Config` rather than in it, so that problems found after loading (a
/// binary that is missing, a services_dir that is a file) point at the line
/// that caused them like the problems of the schema do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locations {
    file: Option<PathBuf>,
    keys: HashMap<String, (usize, usize)>,
}

impl Locations {
    pub(crate) fn new(file: Option<PathBuf>) -> Self {
        Locations {
            file,
            keys: HashMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, key: String, line: usize, column: usize) {
        self.keys.insert(key, (line, column));
    }

    /// Every key under `from` (a section's dotted key) also under `to`:
    /// an instance of a section is located where its section is.
    pub(crate) fn alias(&mut self, from: &str, to: &str) {
        let aliased: Vec<(String, (usize, usize))> = self
            .keys
            .iter()
            .filter_map(|(key, &at)| {
                let rest = key.strip_prefix(from)?;
                (rest.is_empty() || rest.starts_with(['.', '[']))
                    .then(|| (format!("{to}{rest}"), at))
            })
            .collect();
        self.keys.extend(aliased);
    }

    /// Line and column of `key`, when the file set it.
    pub fn get(&self, key: &str) -> Option<(usize, usize)> {
        self.keys.get(key).copied()
    }

    /// A problem about `key`, placed at the first of `keys` the file set
    /// (e.g. `binary_path`, else the service's section), or at the file
    /// alone when it set none of them.
    pub fn problem(&self, key: &str, at: &[&str], message: String) -> ConfigProblem {
        let position = at.iter().find_map(|candidate| self.get(candidate));
        ConfigProblem {
            file: self.file.clone(),
            line: position.map(|(line, _)| line),
            column: position.map(|(_, column)| column),
            key: key.to_owned(),
            message,
        }
    }
}
