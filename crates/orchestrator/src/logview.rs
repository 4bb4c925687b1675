//! How `logs` shows several services at once: their recent lines merged in
//! time order, each prefixed with its service's name (aligned, and coloured
//! on a terminal), and the `--since` and `--grep` filters.

use std::time::SystemTime;

use orchestrator_core::events::rfc3339;
use orchestrator_core::wire::Stream;

/// One line of one service, as the daemon sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The service's place in the order the user named them (or the
    /// daemon listed them, for `--all`): ties in time go by it.
    pub service: usize,
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds: the daemon writes them fixed-width, so
    /// their text order is their time order.
    pub time: String,
    pub stream: Stream,
    pub text: String,
}

/// The last `lines` of the services' lines in all (as `journalctl -n`),
/// oldest first: by time, then by service, then by line number.
pub fn merge(per_service: Vec<Vec<Entry>>, lines: usize) -> Vec<Entry> {
    let mut all: Vec<Entry> = per_service.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        (a.time.as_str(), a.service, a.seq).cmp(&(b.time.as_str(), b.service, b.seq))
    });
    let skip = all.len().saturating_sub(lines);
    all.drain(..skip);
    all
}

/// `--since`: a duration back from `now` (`90s`, `10m`, `2h`, `1h30m`) or a
/// UTC RFC 3339 time (`2026-01-02T03:04:05Z`, fractions allowed).
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(back) = humantime::parse_duration(text) {
        // Before 1970 is no time the daemon can have a line of.
        return Ok(now
            .checked_sub(back)
            .filter(|since| *since >= SystemTime::UNIX_EPOCH)
            .unwrap_or(SystemTime::UNIX_EPOCH));
    }
    parse_time(text).map_err(|_| {
        format!(
            "--since {text:?} is neither a duration back from now (90s, 10m, 2h) \
             nor an RFC 3339 time in UTC (2026-01-02T03:04:05Z)"
        )
    })
}

/// An RFC 3339 time in UTC (`Z`, or no zone), as the API's `since=` takes it.
pub fn parse_time(text: &str) -> Result<SystemTime, humantime::TimestampError> {
    humantime::parse_rfc3339_weak(text.strip_suffix('Z').unwrap_or(text))
}

/// `since` as the API's `since=` parameter: the daemon's own format.
pub fn since_param(since: SystemTime) -> String {
    rfc3339(since)
}

/// Whether output gets colours: only on a terminal, and never when
/// `NO_COLOR` is set to anything but the empty string (no-color.org).
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Colours for names: red is left out, it marks stderr.
const PALETTE: [&str; 6] = ["32", "33", "34", "35", "36", "92"];

/// A service's colour, the same in every run and on every machine (FNV-1a of
/// its name: the standard hasher's output may change between Rust releases).
pub fn colour_of(name: &str) -> &'static str {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    PALETTE[(hash % PALETTE.len() as u64) as usize]
}

/// The `name | ` in front of every line when several services are shown.
#[derive(Debug, Clone)]
pub struct Prefixer {
    names: Vec<String>,
    width: usize,
    colour: bool,
}

impl Prefixer {
    /// `None` when lines go unprefixed (one service, named alone).
    pub fn new(names: &[String], prefixed: bool, colour: bool) -> Option<Prefixer> {
        prefixed.then(|| Prefixer {
            names: names.to_vec(),
            width: names.iter().map(|n| n.chars().count()).max().unwrap_or(0),
            colour,
        })
    }

    /// `name | ` padded to the longest name; on a terminal the name in its
    /// colour, and the bar red for a line of stderr.
    pub fn prefix(&self, service: usize, stream: Stream) -> String {
        let name = self.names.get(service).map_or("?", String::as_str);
        let width = self.width;
        if !self.colour {
            return format!("{name:width$} | ");
        }
        let bar = match stream {
            Stream::Stdout => "|".to_owned(),
            Stream::Stderr => "\u{1b}[31m|\u{1b}[0m".to_owned(),
        };
        format!("\u{1b}[{}m{name:width$}\u{1b}[0m {bar} ", colour_of(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(service: usize, seq: u64, time: &str) -> Entry {
        Entry {
            service,
            seq,
            time: format!("2026-01-01T00:00:{time}Z"),
            stream: Stream::Stdout,
            text: format!("{service}-{seq}"),
        }
    }

    fn texts(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.text.as_str()).collect()
    }

    #[test]
    fn lines_of_several_services_merge_by_time() {
        let a = vec![entry(0, 1, "01.000"), entry(0, 2, "03.000")];
        let b = vec![entry(1, 7, "02.000"), entry(1, 8, "04.000")];
        let merged = merge(vec![a, b], 10);
        assert_eq!(texts(&merged), ["0-1", "1-7", "0-2", "1-8"]);
    }

    #[test]
    fn ties_go_by_service_order_then_line_number() {
        let a = vec![entry(1, 5, "01.000"), entry(1, 6, "01.000")];
        let b = vec![entry(0, 9, "01.000")];
        let merged = merge(vec![a, b], 10);
        assert_eq!(texts(&merged), ["0-9", "1-5", "1-6"]);
    }

    #[test]
    fn n_counts_lines_in_all_and_keeps_the_newest() {
        let a = vec![
            entry(0, 1, "01.000"),
            entry(0, 2, "02.000"),
            entry(0, 3, "05.000"),
        ];
        let b = vec![entry(1, 1, "03.000"), entry(1, 2, "04.000")];
        let merged = merge(vec![a, b], 3);
        assert_eq!(texts(&merged), ["1-1", "1-2", "0-3"]);
        assert!(merge(vec![vec![entry(0, 1, "01.000")]], 0).is_empty());
    }

    #[test]
    fn since_takes_a_duration_or_a_utc_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(parse_since("90s", now), Ok(at(10_000 - 90)));
        assert_eq!(parse_since("10m", now), Ok(at(10_000 - 600)));
        assert_eq!(parse_since("2h", now), Ok(at(10_000 - 7200)));
        assert_eq!(parse_since("1h30m", now), Ok(at(10_000 - 5400)));
        assert_eq!(parse_since("9999h", now), Ok(SystemTime::UNIX_EPOCH));
        assert_eq!(parse_since("1970-01-01T01:00:00Z", now), Ok(at(3600)));
        assert_eq!(
            parse_since("1970-01-01T01:00:00.500Z", now),
            Ok(at(3600) + Duration::from_millis(500))
        );
        for bad in ["", "yesterday", "10", "-5m", "1970-01-01T01:00:00+02:00"] {
            let error = parse_since(bad, now).unwrap_err();
            assert!(error.contains("RFC 3339"), "{bad:?}: {error}");
        }
        let param = since_param(at(3600));
        assert_eq!(param, "1970-01-01T01:00:00.000Z");
        assert_eq!(parse_time(&param), Ok(at(3600)));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))), "empty means unset");
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn prefixes_align_and_colour_is_stable_per_name() {
        let names = vec!["a".to_owned(), "web@10".to_owned()];
        assert!(Prefixer::new(&names[..1], false, false).is_none());
        let plain = Prefixer::new(&names, true, false).unwrap();
        assert_eq!(plain.prefix(0, Stream::Stdout), "a      | ");
        assert_eq!(plain.prefix(1, Stream::Stderr), "web@10 | ");
        let coloured = Prefixer::new(&names, true, true).unwrap();
        let colour = colour_of("a");
        assert_eq!(colour, colour_of("a"));
        assert_eq!(
            coloured.prefix(0, Stream::Stdout),
            format!("\u{1b}[{colour}ma     \u{1b}[0m | ")
        );
        assert_eq!(
            coloured.prefix(0, Stream::Stderr),
            format!("\u{1b}[{colour}ma     \u{1b}[0m \u{1b}[31m|\u{1b}[0m ")
        );
        // Not all one colour.
        let colours: std::collections::BTreeSet<&str> = ["api", "db", "web", "worker", "cron"]
            .into_iter()
            .map(colour_of)
            .collect();
        assert!(colours.len() > 1, "{colours:?}");
    }
}
