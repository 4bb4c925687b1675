//! Service names, checked once where they enter (the config file, the
//! services directory, the API) so that everything past that point can take
//! a name's validity for granted.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

/// The longest name accepted; also keeps log file names and cgroup paths short.
pub const MAX_NAME_LEN: usize = 64;

/// The rule, as told to whoever wrote a bad name.
const RULE: &str =
    "use 1 to 64 of the characters A-Z, a-z, 0-9, '.', '_', '-', not starting with '.' or '-'";

/// How much of a bad name an error quotes: enough to find it, not so much
/// that a 5000-character name floods a log line or an API reply.
const QUOTED_CHARS: usize = 40;

/// A valid service name: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or
/// `-`, so it is always a safe single path component and never looks like a
/// flag; optionally followed by `@INDEX` (a decimal 0–999 without leading
/// zeros), which names one instance of a section with `instances = N`.
/// [`ServiceName::parse`] (any name, e.g. from the API) and
/// [`ServiceName::section`] (no instance suffix: a config section or a
/// services directory entry) are the only ways to make one.
///
/// Maps keyed by it can be looked up by `&str` (it borrows as `str`, and
/// orders and hashes exactly like one).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(Arc<str>);

/// Why a string is not a service name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("empty service name; {RULE}")]
    Empty,
    #[error("invalid service name {quoted}: {bad:?} (character {position}) is not allowed; {RULE}")]
    Character {
        quoted: String,
        bad: char,
        position: usize,
    },
    #[error(
        "invalid service name {quoted}: it is {length} characters long; use at most {MAX_NAME_LEN}"
    )]
    TooLong { quoted: String, length: usize },
    #[error(
        "invalid service name {quoted}: it must not start with '.' or '-'; start it with a letter, digit or '_'"
    )]
    Start { quoted: String },
    #[error(
        "invalid service name {quoted}: the instance index after '@' must be a number from 0 to {max} without leading zeros, e.g. web@0"
    , max = MAX_INSTANCES - 1)]
    Index { quoted: String },
    #[error(
        "invalid service name {quoted}: '@' names one instance and cannot be part of a section's name; name the section {base:?} and set instances = N to run {base}@0 … {base}@N-1"
    )]
    InstanceSection { quoted: String, base: String },
}

/// The most instances one section may run (`instances = N`).
pub const MAX_INSTANCES: u32 = 1000;

impl ServiceName {
    /// A name as services are addressed: a section's name, or one of its
    /// instances (`web@2`).
    pub fn parse(name: &str) -> Result<ServiceName, InvalidName> {
        let Some((base, index)) = name.split_once('@') else {
            return Self::section(name);
        };
        Self::check_base(base)?;
        if parse_index(index).is_none() {
            return Err(InvalidName::Index {
                quoted: quote(name),
            });
        }
        Ok(ServiceName(name.into()))
    }

    /// A name without an instance suffix: what a `[services.NAME]` section
    /// or a services directory entry may be called.
    pub fn section(name: &str) -> Result<ServiceName, InvalidName> {
        if let Some((base, _)) = name.split_once('@')
            && Self::check_base(base).is_ok()
        {
            return Err(InvalidName::InstanceSection {
                quoted: quote(name),
                base: base.to_owned(),
            });
        }
        Self::check_base(name)?;
        Ok(ServiceName(name.into()))
    }

    /// Instance `index` of this (section) name: `NAME@INDEX`.
    pub fn instance(&self, index: u32) -> ServiceName {
        debug_assert!(self.instance_of().is_none() && index < MAX_INSTANCES);
        ServiceName(format!("{}@{index}", self.0).into())
    }

    /// The section name and index, when this names an instance.
    pub fn instance_of(&self) -> Option<(&str, u32)> {
        let (base, index) = self.0.split_once('@')?;
        Some((base, parse_index(index)?))
    }

    /// The section's name: the name itself, or what is before `@`.
    pub fn base(&self) -> &str {
        self.instance_of().map_or(&self.0, |(base, _)| base)
    }

    fn check_base(name: &str) -> Result<(), InvalidName> {
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if let Some((index, bad)) = name
            .chars()
            .enumerate()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidName::Character {
                quoted: quote(name),
                bad,
                position: index + 1,
            });
        }
        // Every character is ASCII by now, so bytes are characters.
        if name.len() > MAX_NAME_LEN {
            return Err(InvalidName::TooLong {
                quoted: quote(name),
                length: name.len(),
            });
        }
        if name.starts_with(['.', '-']) {
            return Err(InvalidName::Start {
                quoted: quote(name),
            });
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An instance index as written after `@`: canonical decimal, so that
/// `web@1` has one spelling (not also `web@01`).
fn parse_index(text: &str) -> Option<u32> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    let index: u32 = text.parse().ok().filter(|_| canonical)?;
    (index < MAX_INSTANCES).then_some(index)
}

/// `name` in quotes, cut to its first characters with an ellipsis when long.
fn quote(name: &str) -> String {
    match name.char_indices().nth(QUOTED_CHARS) {
        None => format!("{name:?}"),
        Some((cut, _)) => format!("{:?}", format!("{}…", &name[..cut])),
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write_str: tables print names with `{:width$}`.
        f.pad(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Deref for ServiceName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// A name is always one safe path component (no `/`, never `.` or `..`),
/// so joining it onto a directory stays inside that directory.
impl AsRef<std::path::Path> for ServiceName {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&*self.0)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = InvalidName;

    fn from_str(name: &str) -> Result<Self, InvalidName> {
        ServiceName::parse(name)
    }
}

impl TryFrom<&str> for ServiceName {
    type Error = InvalidName;

    fn try_from(name: &str) -> Result<Self, InvalidName> {
        ServiceName::parse(name)
    }
}

impl TryFrom<String> for ServiceName {
    type Error = InvalidName;

    fn try_from(name: String) -> Result<Self, InvalidName> {
        ServiceName::parse(&name)
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> String {
        name.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for ServiceName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for ServiceName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for ServiceName {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<ServiceName> for str {
    fn eq(&self, other: &ServiceName) -> bool {
        self == &*other.0
    }
}

impl PartialEq<ServiceName> for &str {
    fn eq(&self, other: &ServiceName) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<ServiceName> for String {
    fn eq(&self, other: &ServiceName) -> bool {
        **self == *other.0
    }
}

impl serde::Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ServiceName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Borrowed when the format allows it, owned otherwise (escapes, readers).
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ServiceName::parse(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn valid_names() {
        for name in ["a", "api", "A-b_c.d", "9", "_x", "a..b", &"x".repeat(64)] {
            let parsed = ServiceName::parse(name).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(parsed.as_str(), name);
            assert_eq!(parsed, name);
        }
    }

    #[test]
    fn invalid_names_say_why_and_what_to_do() {
        for name in [
            "",
            ".",
            "..",
            ".x",
            "-x",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
        ] {
            let message = ServiceName::parse(name).expect_err(name).to_string();
            assert!(message.contains("service name"), "{name}: {message}");
            assert!(
                message.contains("use ") || message.contains("start it with"),
                "{name}: {message}"
            );
        }
        let message = ServiceName::parse("a/b").unwrap_err().to_string();
        assert!(message.contains("'/' (character 2)"), "{message}");
        assert!(
            message.contains("not starting with '.' or '-'"),
            "{message}"
        );
        let message = ServiceName::parse(&"x".repeat(65)).unwrap_err().to_string();
        assert!(message.contains("65 characters"), "{message}");
    }

    #[test]
    fn instance_names() {
        for name in ["web@0", "web@1", "web@999", "a.b-c_d@10"] {
            let parsed = ServiceName::parse(name).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(parsed, name);
        }
        let web = ServiceName::section("web").unwrap();
        let third = web.instance(2);
        assert_eq!(third, "web@2");
        assert_eq!(third.instance_of(), Some(("web", 2)));
        assert_eq!(third.base(), "web");
        assert_eq!(web.base(), "web");
        assert_eq!(web.instance_of(), None);
        for name in [
            "web@", "web@01", "web@1000", "web@x", "web@-1", "web@1@2", "web@+1",
        ] {
            let message = ServiceName::parse(name).expect_err(name).to_string();
            assert!(message.contains("instance index"), "{name}: {message}");
        }
        for name in ["@0", ".web@0", "a/b@1"] {
            assert!(ServiceName::parse(name).is_err(), "{name}");
        }
        // A section (or a services_dir entry) never names an instance.
        let message = ServiceName::section("web@1").unwrap_err().to_string();
        assert!(
            message.contains("name the section \"web\" and set instances = N"),
            "{message}"
        );
        assert!(ServiceName::section("web@x").is_err());
        assert!(
            ServiceName::section("a/b@1")
                .unwrap_err()
                .to_string()
                .contains("'/'")
        );
    }

    #[test]
    fn a_huge_bad_name_is_quoted_short() {
        let huge = format!("{}/", "y".repeat(5000));
        let message = ServiceName::parse(&huge).unwrap_err().to_string();
        assert!(message.len() < 300, "{} bytes: {message}", message.len());
        assert!(
            message.contains(&format!("\"{}…\"", "y".repeat(40))),
            "{message}"
        );
        assert!(message.contains("(character 5001)"), "{message}");
        // Cut on a character boundary, whatever the characters are.
        let wide = "é".repeat(100);
        let message = ServiceName::parse(&wide).unwrap_err().to_string();
        assert!(message.contains(&format!("\"{}…\"", "é".repeat(40))));
    }

    #[test]
    fn looked_up_and_shown_like_a_str() {
        let api = ServiceName::parse("api").unwrap();
        let map = BTreeMap::from([(api.clone(), 1)]);
        assert_eq!(map.get("api"), Some(&1));
        assert!(map.contains_key("api"));
        assert_eq!(format!("[{api:5}]"), "[api  ]");
        assert_eq!(format!("{api:?}"), "\"api\"");
        assert_eq!(api.len(), 3);
        assert_eq!(String::from(api), "api");
    }

    #[test]
    fn serde_round_trip_validates() {
        let api: ServiceName = serde_json::from_str("\"api\"").unwrap();
        assert_eq!(serde_json::to_string(&api).unwrap(), "\"api\"");
        let err = serde_json::from_str::<ServiceName>("\".env\"").unwrap_err();
        assert!(err.to_string().contains("must not start with"), "{err}");
        assert!(serde_json::from_str::<ServiceName>("\"a\\/b\"").is_err());
    }
}
