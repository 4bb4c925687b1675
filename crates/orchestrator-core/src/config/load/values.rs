//! Reading one value: the types and units the config file shares across
//! sections (booleans, paths, argv, environments, signals, durations, ranges).
//! Each reader reports its own problem and returns `None`, so the walk goes on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use toml::de::DeValue;

use super::cx::{Cx, Value};
use super::keys::join_key;

/// Anything longer is surely a typo, and capping it keeps `Instant + Duration`
/// arithmetic elsewhere from overflowing.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
const DURATION_HINT: &str =
    r#"use an integer number of seconds or a string like "500ms", "30s", "2m", "1h""#;

/// Keeps the read value, or the default already in `slot` when it was invalid.
pub(super) fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

impl Cx<'_> {
    pub(super) fn boolean(&mut self, path: &str, value: &Value<'_>) -> Option<bool> {
        let flag = value.get_ref().as_bool();
        if flag.is_none() {
            self.mismatch(path, value, "a boolean (true or false)");
        }
        flag
    }

    pub(super) fn string<'v>(&mut self, path: &str, value: &'v Value<'_>) -> Option<&'v str> {
        let text = value.get_ref().as_str();
        if text.is_none() {
            self.mismatch(path, value, "a string");
        }
        text
    }

    pub(super) fn integer(&mut self, path: &str, value: &Value<'_>) -> Option<i64> {
        let Some(integer) = value.get_ref().as_integer() else {
            self.mismatch(path, value, "an integer");
            return None;
        };
        let parsed = i64::from_str_radix(integer.as_str(), integer.radix()).ok();
        if parsed.is_none() {
            self.report(
                value.span(),
                path,
                format!("integer {integer} is too large; use a smaller number"),
            );
        }
        parsed
    }

    pub(super) fn integer_in(
        &mut self,
        path: &str,
        value: &Value<'_>,
        min: i64,
        max: i64,
        expected: &str,
    ) -> Option<i64> {
        let integer = self.integer(path, value)?;
        if (min..=max).contains(&integer) {
            Some(integer)
        } else {
            self.report(
                value.span(),
                path,
                format!("{integer} is out of range; use {expected}"),
            );
            None
        }
    }

    /// An integer or a float, as f64 (`2` and `2.0` alike). NaN and the
    /// infinities are passed on: what they mean is the caller's to say.
    pub(super) fn number(&mut self, path: &str, value: &Value<'_>, expected: &str) -> Option<f64> {
        match value.get_ref() {
            // Exact up to 2^53, far beyond any range a caller accepts.
            DeValue::Integer(_) => self.integer(path, value).map(|integer| integer as f64),
            DeValue::Float(float) => {
                // The parser hands over Rust's float syntax ("1.5", "1e3",
                // "nan", "-inf"), so this only fails on what it already refused.
                let parsed = float.as_str().parse::<f64>().ok();
                if parsed.is_none() {
                    self.report(
                        value.span(),
                        path,
                        format!("cannot read {float} as a number; use {expected}"),
                    );
                }
                parsed
            }
            _ => {
                self.mismatch(path, value, expected);
                None
            }
        }
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        path: &str,
        value: &Value<'_>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(path, value)?;
        let found = options
            .iter()
            .find(|(name, _)| *name == text)
            .map(|&(_, choice)| choice);
        if found.is_none() {
            let names: Vec<&str> = options.iter().map(|&(name, _)| name).collect();
            self.report(
                value.span(),
                path,
                format!("invalid value {text:?}; use one of {}", names.join(", ")),
            );
        }
        found
    }

    pub(super) fn path(
        &mut self,
        path: &str,
        value: &Value<'_>,
        base_dir: &Path,
    ) -> Option<PathBuf> {
        let text = self.string(path, value)?;
        if text.is_empty() {
            self.report(
                value.span(),
                path,
                "empty path; write a path, or remove the key to use the default",
            );
            return None;
        }
        if text.contains('\0') {
            self.report(
                value.span(),
                path,
                "the path contains a NUL character; remove it",
            );
            return None;
        }
        Some(normalize(&base_dir.join(text)))
    }

    /// An array of strings none of which has a NUL, which no argv can carry.
    pub(super) fn strings(&mut self, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
        let Some(items) = value.get_ref().as_array() else {
            self.mismatch(path, value, "an array of strings");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            match self.string(&item_path, item) {
                Some(text) if text.contains('\0') => {
                    self.report(
                        item.span(),
                        &item_path,
                        "contains a NUL character; remove it",
                    );
                    ok = false;
                }
                Some(text) => out.push(text.to_owned()),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    pub(super) fn command(&mut self, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
        let argv = self.strings(path, value)?;
        match argv.first() {
            None => {
                self.report(
                    value.span(),
                    path,
                    "empty command; give the program and its arguments, e.g. [\"python3\", \"-m\", \"http.server\"]",
                );
                None
            }
            Some(program) if program.is_empty() => {
                self.report(
                    value.span(),
                    path,
                    "the program (first element of command) is empty; name the program to run",
                );
                None
            }
            Some(_) => Some(argv),
        }
    }

    pub(super) fn environment(
        &mut self,
        path: &str,
        value: &Value<'_>,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(table) = value.get_ref().as_table() else {
            self.mismatch(
                path,
                value,
                "a table of strings, e.g. { API_MODE = \"prod\" }",
            );
            return out;
        };
        for (key, item) in table.iter() {
            let name: &str = key.get_ref();
            let item_path = join_key(path, name);
            self.locate(&item_path, item.span());
            let problem = if name.is_empty() {
                Some("empty environment variable name; give it a name")
            } else if name.contains('=') {
                Some("an environment variable name cannot contain '='; rename it")
            } else if name.contains('\0') {
                Some("an environment variable name cannot contain a NUL character; rename it")
            } else {
                None
            };
            if let Some(message) = problem {
                self.report(key.span(), &item_path, message);
            }
            let text = match item.get_ref() {
                DeValue::String(text) => text,
                DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_) => {
                    let found = item.get_ref().type_str();
                    self.report(
                        item.span(),
                        &item_path,
                        format!("expected a string, found {found}; quote the value, e.g. PORT = \"8080\""),
                    );
                    continue;
                }
                _ => {
                    self.mismatch(&item_path, item, "a string");
                    continue;
                }
            };
            if text.contains('\0') {
                self.report(
                    item.span(),
                    &item_path,
                    "the value contains a NUL character; remove it",
                );
                continue;
            }
            if problem.is_none() {
                out.insert(name.to_owned(), text.to_string());
            }
        }
        out
    }

    pub(super) fn signal(&mut self, path: &str, value: &Value<'_>) -> Option<Signal> {
        let Some(text) = value.get_ref().as_str() else {
            self.mismatch(path, value, "a signal name like \"SIGTERM\"");
            return None;
        };
        let signal = parse_signal(text);
        if signal.is_none() {
            self.report(
                value.span(),
                path,
                format!(
                    "unknown signal {text:?}; use a signal name like \"SIGTERM\", \"SIGINT\", \"SIGQUIT\" or \"SIGHUP\""
                ),
            );
        }
        signal
    }

    pub(super) fn duration(&mut self, path: &str, value: &Value<'_>) -> Option<Duration> {
        let result = match value.get_ref() {
            DeValue::Integer(_) => {
                let seconds = self.integer(path, value)?;
                match u64::try_from(seconds) {
                    Err(_) => Err(format!(
                        "negative duration {seconds}; durations cannot be negative, {DURATION_HINT}"
                    )),
                    Ok(seconds) if seconds > MAX_DURATION.as_secs() => Err(format!(
                        "duration of {seconds} seconds is longer than 100 years; {DURATION_HINT}"
                    )),
                    Ok(seconds) => Ok(Duration::from_secs(seconds)),
                }
            }
            DeValue::Float(float) => Err(format!(
                "expected a duration, found float {float}; write seconds as an integer or a string like \"1.5s\""
            )),
            DeValue::String(text) => parse_duration(text)
                .map_err(|reason| format!("invalid duration {text:?} ({reason}); {DURATION_HINT}")),
            other => Err(format!(
                "expected a duration, found {}; {DURATION_HINT}",
                other.type_str()
            )),
        };
        match result {
            Ok(duration) => Some(duration),
            Err(message) => {
                self.report(value.span(), path, message);
                None
            }
        }
    }

    /// A duration that must not be zero (a deadline, a period): `zero`
    /// says what 0 would do, `example` is a sensible value instead.
    pub(super) fn positive_duration(
        &mut self,
        path: &str,
        value: &Value<'_>,
        zero: &str,
        example: &str,
    ) -> Option<Duration> {
        let duration = self.duration(path, value)?;
        if duration.is_zero() {
            self.report(
                value.span(),
                path,
                format!("0 {zero}; use a positive duration, e.g. {example:?}"),
            );
            return None;
        }
        Some(duration)
    }
}

/// Accepts "SIGTERM", "TERM" and "term": people write all three.
fn parse_signal(text: &str) -> Option<Signal> {
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).ok()
}

/// Units humantime knows whose length varies: "5M" (months) is too easily
/// meant as minutes, and no timeout here is measured in months or years.
const VAGUE_UNITS: &[&str] = &["M", "month", "months", "y", "yr", "yrs", "year", "years"];

/// Longest duration text accepted (see `parse_duration` for why).
const MAX_DURATION_TEXT: usize = 64;
/// Most digits accepted before a decimal point in one number.
const MAX_DURATION_DIGITS: usize = 12;

/// The lengths of the digit runs in `text` that are not fractions (not
/// right after a '.').
fn integer_digit_runs(text: &str) -> impl Iterator<Item = usize> + '_ {
    let bytes = text.as_bytes();
    let mut index = 0;
    std::iter::from_fn(move || {
        while index < bytes.len() {
            if !bytes[index].is_ascii_digit() {
                index += 1;
                continue;
            }
            let start = index;
            while index < bytes.len() && bytes[index].is_ascii_digit() {
                index += 1;
            }
            if start > 0 && bytes[start - 1] == b'.' {
                continue;
            }
            return Some(index - start);
        }
        None
    })
}

/// A duration string in humantime's grammar: `NUMBER UNIT` parts, optionally
/// spaced ("1m30s", "1h 30m"), NUMBER may have a fraction ("1.5s"). Err is
/// the reason, worded for whoever wrote the file.
fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim_start().starts_with('-') {
        return Err("durations cannot be negative".to_owned());
    }
    if let Some(unit) = text
        .split(|c: char| !c.is_alphabetic())
        .find(|word| VAGUE_UNITS.contains(word))
    {
        return Err(format!(
            "{unit:?} (months or years) has no fixed length; use d, h, m, s or ms"
        ));
    }
    // humantime 2.4 panics when the parts add up to exactly u64::MAX
    // seconds. With at most 12 digits before any point and 64 characters in
    // all, no sum comes near that (four parts of 999999999999w at most), so
    // a config file can never reach the panic.
    if text.len() > MAX_DURATION_TEXT {
        return Err(format!(
            "{} characters is too long for a duration; write it in fewer than {MAX_DURATION_TEXT}",
            text.len()
        ));
    }
    if integer_digit_runs(text).any(|digits| digits > MAX_DURATION_DIGITS) {
        return Err(format!(
            "a number of more than {MAX_DURATION_DIGITS} digits is longer than 100 years in any unit but ns or us; use a larger unit"
        ));
    }
    let parsed = humantime::parse_duration(text);
    let duration = parsed.map_err(|err| duration_reason(text, err))?;
    if duration > MAX_DURATION {
        return Err("longer than 100 years".to_owned());
    }
    Ok(duration)
}

/// humantime's error, said with the offending part of `text` rather than a
/// byte offset.
fn duration_reason(text: &str, err: humantime::DurationError) -> String {
    use humantime::DurationError as E;
    let at = |offset: usize| {
        let rest = text.get(offset..).unwrap_or_default();
        let end = rest
            .char_indices()
            .nth(20)
            .map_or(rest.len(), |(end, _)| end);
        &rest[..end]
    };
    match err {
        E::Empty => "it is empty".to_owned(),
        E::NumberExpected(offset) => format!("expected a number at {:?}", at(offset)),
        E::InvalidCharacter(offset) => match at(offset).chars().next() {
            Some(bad) => format!("{bad:?} is not part of a number or a unit"),
            None => "it ends in the middle of a number".to_owned(),
        },
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("no unit after {value}")
        }
        E::UnknownUnit { unit, .. } => {
            format!("unknown unit {unit:?}, use d, h, m, s, ms, us or ns")
        }
        E::NumberOverflow => {
            "a number is too large (longer than 100 years) or finer than a nanosecond".to_owned()
        }
    }
}

/// Drops `.` segments and doubled slashes; `..` stays, since resolving it
/// lexically would be wrong across symlinks.
pub(super) fn normalize(path: &Path) -> PathBuf {
    path.components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::test_support::*;

    /// Each (file text, key, part of the message) yields exactly that one problem.
    fn each_is_one_problem(cases: &[(&str, &str, &str)]) {
        for &(text, key, expected) in cases {
            let found = problems(text);
            assert_eq!(found.len(), 1, "{text}: {found:#?}");
            assert_eq!(found[0].key, key, "{text}");
            assert!(
                found[0].message.contains(expected),
                "{text}: {}",
                found[0].message
            );
        }
    }

    #[test]
    fn signal_names() {
        for (text, signal) in [
            ("SIGTERM", Signal::SIGTERM),
            ("TERM", Signal::SIGTERM),
            ("term", Signal::SIGTERM),
            ("sigusr1", Signal::SIGUSR1),
            ("SIGKILL", Signal::SIGKILL),
        ] {
            assert_eq!(parse_signal(text), Some(signal), "{text}");
        }
        for text in ["", "SIG", "15", "SIGFOO", " SIGTERM"] {
            assert_eq!(parse_signal(text), None, "{text}");
        }
    }

    #[test]
    fn durations_table() {
        let good: &[(&str, Duration)] = &[
            ("0s", Duration::ZERO),
            ("200ms", Duration::from_millis(200)),
            ("1.5s", Duration::from_millis(1500)),
            ("30s", Duration::from_secs(30)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0.5ms", Duration::from_micros(500)),
            ("876000h", Duration::from_secs(876_000 * 3600)),
            // humantime's grammar, wider than the hand-written one was.
            ("0", Duration::ZERO),
            ("5 s", Duration::from_secs(5)),
            ("1h 30m", Duration::from_secs(5400)),
            ("1d", Duration::from_secs(86_400)),
            ("2min 30sec", Duration::from_secs(150)),
            ("250us", Duration::from_micros(250)),
        ];
        for &(text, expected) in good {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("-1s", "negative"),
            ("30", "no unit"),
            ("1m30", "no unit"),
            ("5x", "unknown unit \"x\""),
            ("5S", "unknown unit"),
            ("s", "expected a number at \"s\""),
            (".25s", "expected a number"),
            ("1..5s", "'.' is not part of a number or a unit"),
            (".s", "expected a number"),
            ("1.2.3s", "not part of a number"),
            ("1.s", "not part of a number"),
            ("5M", "no fixed length"),
            ("1 year", "no fixed length"),
            ("876001h", "longer than 100 years"),
            (
                "99999999999999999999999999999999999999999h",
                "use a larger unit",
            ),
            ("1000000000000s", "use a larger unit"),
            (
                "1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s 1s",
                "too long for a duration",
            ),
            ("1.000000000000000000009s", "finer than a nanosecond"),
            // Exactly u64::MAX seconds: humantime panics on it; refused
            // before it gets there.
            ("18446744073709551615s 500ms 500ms", "use a larger unit"),
        ];
        for &(text, reason) in bad {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn duration_values_in_the_file() {
        let config =
            ok("[orchestrator]\nshutdown_timeout = 0\n[services.api]\nstop_timeout = \"1.5s\"\n");
        assert_eq!(config.orchestrator.shutdown_timeout, Duration::ZERO);
        assert_eq!(
            config.services["api"].stop_timeout,
            Some(Duration::from_millis(1500))
        );
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = \"5x\"\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(
            message.starts_with("invalid duration \"5x\"")
                && message.ends_with(r#"use an integer number of seconds or a string like "500ms", "30s", "2m", "1h""#),
            "{message}"
        );
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = -5\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(message.contains("negative"), "{message}");
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = 4000000000\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(message.contains("longer than 100 years"), "{message}");
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = 99999999999999999999\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(message.contains("too large"), "{message}");
    }

    #[test]
    fn hex_integers_are_understood() {
        let config = ok("[orchestrator]\nlog_max_bytes = 0x400\nshutdown_timeout = 0o10\n");
        assert_eq!(config.orchestrator.log_max_bytes, 1024);
        assert_eq!(config.orchestrator.shutdown_timeout, Duration::from_secs(8));
    }

    #[test]
    fn wrong_types() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "orchestrator = 1",
                "orchestrator",
                "expected a table [orchestrator], found integer",
            ),
            ("services = []", "services", "found array"),
            (
                "[services]\napi = 1",
                "services.api",
                "expected a table [services.api], found integer",
            ),
            (
                "[orchestrator]\nauto_restart = \"yes\"",
                "orchestrator.auto_restart",
                "expected a boolean (true or false), found string",
            ),
            (
                "[orchestrator]\nservices_dir = 5",
                "orchestrator.services_dir",
                "expected a string, found integer",
            ),
            (
                "[orchestrator]\nlog_max_files = \"3\"",
                "orchestrator.log_max_files",
                "expected an integer, found string",
            ),
            (
                "[services.api]\nargs = \"--x\"",
                "services.api.args",
                "expected an array of strings, found string",
            ),
            (
                "[services.api]\nargs = [\"a\", 1]",
                "services.api.args[1]",
                "expected a string, found integer",
            ),
            (
                "[services.api]\nenvironment = [\"A=B\"]",
                "services.api.environment",
                "found array",
            ),
            (
                "[services.api]\nenvironment = { PORT = 8080 }",
                "services.api.environment.PORT",
                "quote the value",
            ),
            (
                "[services.api]\nstop_signal = 15",
                "services.api.stop_signal",
                "found integer",
            ),
            (
                "[services.api]\nbackoff = \"1s\"",
                "services.api.backoff",
                "found string",
            ),
            (
                "[services.api]\nstop_timeout = true",
                "services.api.stop_timeout",
                "expected a duration, found boolean",
            ),
            (
                "[services.api]\nstop_timeout = 1.5",
                "services.api.stop_timeout",
                "write seconds as an integer or a string like \"1.5s\"",
            ),
        ];
        each_is_one_problem(cases);
    }

    #[test]
    fn bad_values() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[orchestrator]\nlog_level = \"verbose\"",
                "orchestrator.log_level",
                "invalid value \"verbose\"; use one of error, warn, info, debug, trace",
            ),
            (
                "[orchestrator]\nlog_format = \"xml\"",
                "orchestrator.log_format",
                "use one of text, keyvalue, json",
            ),
            (
                "[orchestrator]\nlog_max_bytes = 0",
                "orchestrator.log_max_bytes",
                "0 is out of range; use a positive number of bytes",
            ),
            (
                "[orchestrator]\nlog_max_files = 1001",
                "orchestrator.log_max_files",
                "out of range",
            ),
            (
                "[orchestrator]\nlog_max_files = -1",
                "orchestrator.log_max_files",
                "out of range",
            ),
            (
                "[orchestrator]\ndata_dir = \"\"",
                "orchestrator.data_dir",
                "empty path",
            ),
            (
                "[services.api]\nrestart = \"sometimes\"",
                "services.api.restart",
                "use one of always, on-failure, never",
            ),
            (
                "[services.api]\nstop_signal = \"SIGFOO\"",
                "services.api.stop_signal",
                "unknown signal \"SIGFOO\"",
            ),
            (
                "[services.api]\nstop_signal = \"\"",
                "services.api.stop_signal",
                "unknown signal",
            ),
            (
                "[services.api]\nmemory_limit = 0",
                "services.api.memory_limit",
                "positive number of MiB",
            ),
            (
                "[services.api]\nmemory_limit = 9223372036854775807",
                "services.api.memory_limit",
                "out of range",
            ),
            (
                "[services.api]\nmax_restarts = -1",
                "services.api.max_restarts",
                "out of range",
            ),
            (
                "[services.api]\nmax_restarts = 4294967296",
                "services.api.max_restarts",
                "out of range",
            ),
            (
                "[services.api]\ncommand = []",
                "services.api.command",
                "empty command",
            ),
            (
                "[services.api]\ncommand = [\"\", \"x\"]",
                "services.api.command",
                "first element",
            ),
            (
                "[services.api]\nargs = [\"a\\u0000b\"]",
                "services.api.args[0]",
                "NUL",
            ),
            (
                "[services.api]\nenvironment = { \"A=B\" = \"x\" }",
                "services.api.environment.\"A=B\"",
                "cannot contain '='",
            ),
            (
                "[services.api]\nenvironment = { \"\" = \"x\" }",
                "services.api.environment.\"\"",
                "empty environment variable name",
            ),
            (
                "[services.api]\nenvironment = { A = \"x\\u0000\" }",
                "services.api.environment.A",
                "NUL",
            ),
        ];
        each_is_one_problem(cases);
    }
}
