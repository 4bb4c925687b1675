//! A section's keys as one table: each key's name, what it is for, and how
//! its value is read into the model. The walk, the list of valid keys and
//! the "did you mean" suggestion all come from that table, so a new key is
//! one row.

use std::path::Path;

use toml::de::DeTable;

use super::cx::{Cx, TomlKey, Value};

/// Reads a key's value and sets it into the section's model `M`, reporting
/// any problem on `cx`.
pub(super) type Read<M> = fn(&mut Cx<'_>, &Field<'_, '_>, &mut M);

/// One key of a section.
pub(super) struct Key<M: 'static> {
    pub(super) name: &'static str,
    /// What the key is for, said when a typo looks like it.
    pub(super) doc: &'static str,
    pub(super) read: Read<M>,
}

impl<M> Key<M> {
    pub(super) const fn new(name: &'static str, doc: &'static str, read: Read<M>) -> Self {
        Key { name, doc, read }
    }
}

/// A key found in the file, as a reader sees it.
pub(super) struct Field<'a, 'i> {
    /// Dotted key path, e.g. `services.api.stop_timeout`.
    pub(super) path: String,
    pub(super) key: &'a TomlKey<'i>,
    pub(super) value: &'a Value<'i>,
    /// Relative paths resolve against it.
    pub(super) base_dir: &'a Path,
}

impl Cx<'_> {
    /// Walks `table`, the section at `prefix`, through `keys`: every key is
    /// read, and every unknown one reported with a suggestion. `place` says
    /// where the section is ("in [orchestrator]").
    pub(super) fn section<M>(
        &mut self,
        table: &DeTable<'_>,
        prefix: &str,
        place: &str,
        keys: &[Key<M>],
        base_dir: &Path,
        out: &mut M,
    ) {
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let field = Field {
                path: join_key(prefix, name),
                key,
                value,
                base_dir,
            };
            self.locate(&field.path, value.span());
            match keys.iter().find(|known| known.name == name) {
                Some(known) => (known.read)(self, &field, out),
                None => self.unknown(&field, place, keys),
            }
        }
    }

    fn unknown<M>(&mut self, field: &Field<'_, '_>, place: &str, keys: &[Key<M>]) {
        let name: &str = field.key.get_ref();
        let mut message = format!("unknown key {:?} {place}; ", shorten(name));
        if let Some(close) = closest(name, keys) {
            message.push_str(&format!("did you mean {:?}? ({}); ", close.name, close.doc));
        }
        message.push_str("valid keys: ");
        let names: Vec<&str> = keys.iter().map(|key| key.name).collect();
        message.push_str(&names.join(", "));
        self.report(field.key.span(), &field.path, message);
    }
}

/// Dotted key path, quoting segments TOML would not accept bare (so a service
/// named "a.b" stays distinguishable from a nested key).
pub(super) fn join_key(prefix: &str, segment: &str) -> String {
    let bare = !segment.is_empty()
        && segment
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    // Built by hand, not with format!: every key of every section is
    // joined at each load, and formatting was a tenth of a reload.
    let mut key = String::with_capacity(prefix.len() + segment.len() + 3);
    if !prefix.is_empty() {
        key.push_str(prefix);
        key.push('.');
    }
    if bare {
        key.push_str(segment);
    } else {
        use std::fmt::Write;
        let _ = write!(key, "{segment:?}");
    }
    key
}

/// How much of a key name a message repeats.
const MAX_SHOWN: usize = 64;

/// `name`, cut to its first `MAX_SHOWN` characters when longer.
fn shorten(name: &str) -> String {
    match name.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("{}… ({} bytes)", &name[..cut], name.len()),
        None => name.to_owned(),
    }
}

/// A likely intended key for a typo: at most two edits away, and not merely
/// because both are short.
fn closest<'k, M>(name: &str, valid: &'k [Key<M>]) -> Option<&'k Key<M>> {
    // Two edits from a key name is never this long, and the edit distance
    // costs length × length: a megabyte-long key would take seconds.
    if name.len() > MAX_SHOWN {
        return None;
    }
    valid
        .iter()
        .map(|key| (strsim::levenshtein(name, key.name), key))
        .filter(|&(distance, key)| distance <= 2 && distance < key.name.len())
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, key)| key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::test_support::*;

    #[test]
    fn key_paths_quote_odd_segments() {
        assert_eq!(join_key("", "services"), "services");
        assert_eq!(join_key("services", "a.b"), "services.\"a.b\"");
        assert_eq!(join_key("services", "api"), "services.api");
    }
    #[test]
    fn unknown_keys_are_reported_at_their_line() {
        let message = one_problem("\n\nfoo = 1\n", 3, "foo");
        assert!(
            message.contains("unknown key \"foo\" at the top level"),
            "{message}"
        );
        assert!(
            message.contains("valid keys: orchestrator, services"),
            "{message}"
        );

        let message = one_problem(
            "[orchestrator]\nlog_levle = \"info\"\n",
            2,
            "orchestrator.log_levle",
        );
        assert!(message.contains("in [orchestrator]"), "{message}");
        assert!(message.contains("did you mean \"log_level\"?"), "{message}");
        assert!(
            message.contains("(the daemon's verbosity: error, warn, info, debug or trace)"),
            "the suggestion says what the key is for: {message}"
        );

        let message = one_problem(
            "[services.api]\nenabled = true\n\nfoo = \"bar\"\n",
            4,
            "services.api.foo",
        );
        assert!(
            message.contains("unknown key \"foo\" in [services.api]"),
            "{message}"
        );
        assert!(
            message.contains("valid keys: enabled, binary_path"),
            "{message}"
        );

        let message = one_problem(
            "[services.api]\nbackoff = { initial = \"1s\", jitter = 3 }\n",
            2,
            "services.api.backoff.jitter",
        );
        assert!(
            message.contains("valid keys: initial, max, reset_after"),
            "{message}"
        );
    }

    #[test]
    fn a_huge_unknown_key_is_cut_short_and_not_compared() {
        let key = "x".repeat(1_000_000);
        let message = one_problem(&format!("{key} = 1\n"), 1, &key);
        assert!(message.len() < 300, "{}", &message[..300]);
        assert!(message.contains("… (1000000 bytes)"), "{message}");
    }

    #[test]
    fn every_table_names_each_key_once_and_says_what_it_is_for() {
        fn check<M>(section: &str, keys: &[Key<M>]) {
            let mut names: Vec<&str> = keys.iter().map(|key| key.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), keys.len(), "a key twice in {section}");
            for key in keys {
                assert!(!key.doc.is_empty(), "{section}.{} has no doc", key.name);
            }
        }
        check("top level", crate::config::load::TOP_KEYS);
        check("orchestrator", super::super::orchestrator_section::KEYS);
        check("service", super::super::service_section::KEYS);
        check("backoff", super::super::service_section::BACKOFF_KEYS);
        check("rlimits", super::super::service_section::RLIMIT_KEYS);
        check(
            "start_limit",
            super::super::service_section::START_LIMIT_KEYS,
        );
        check("health", super::super::health_section::HEALTH_KEYS);
    }

    #[test]
    fn rlimits_has_a_row_for_each_resource_under_its_name() {
        let names: Vec<&str> = super::super::service_section::RLIMIT_KEYS
            .iter()
            .map(|key| key.name)
            .collect();
        let resources: Vec<&str> = Rlimit::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, resources);
        // And each row sets its own resource, not a neighbour's.
        for resource in Rlimit::ALL {
            let name = resource.as_str();
            let svc = service(&format!("[services.api]\nrlimits = {{ {name} = 7 }}\n"));
            assert_eq!(
                svc.rlimits.into_iter().collect::<Vec<_>>(),
                [(resource, RlimitValue::Limited(7))],
                "{name}"
            );
        }
    }
}
