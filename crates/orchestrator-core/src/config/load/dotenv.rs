//! `env_file`: dotenv files as docker-compose and systemd's EnvironmentFile
//! read them, and `${VAR}` expansion in args, command and environment.

/// A line of a dotenv file that is not `KEY=VALUE`: 1-based line, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadLine {
    pub(super) line: usize,
    pub(super) message: String,
}

/// The variables of a dotenv file, in the order written (a later one of
/// the same name wins when they are collected into a map).
///
/// `KEY=VALUE` per line, with an optional `export ` prefix; blank lines and
/// `#` lines are skipped. A single-quoted value is literal; a double-quoted
/// one takes the escapes `\n \" \\ \$`; an unquoted one is trimmed and
/// ends at ` #` (an inline comment). Values are never expanded: `$` is
/// only special in the service's own args, command and environment.
pub(super) fn parse(text: &str) -> Result<Vec<(String, String)>, BadLine> {
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let bad = |message: String| BadLine {
            line: index + 1,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('\0') {
            return Err(bad(
                "the line contains a NUL character, which no environment can carry; remove it"
                    .to_owned(),
            ));
        }
        let line = line
            .strip_prefix("export")
            .filter(|rest| rest.starts_with([' ', '\t']))
            .map_or(line, str::trim_start);
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(format!(
                "expected KEY=VALUE, found {:?}; write the variable as KEY=VALUE or comment the \
                 line out with #",
                shorten(line)
            )));
        };
        let key = key.trim_end();
        if !is_name(key) {
            return Err(bad(format!(
                "invalid variable name {:?}; use letters, digits and '_', not starting with a \
                 digit",
                shorten(key)
            )));
        }
        let value = value.trim_start();
        let value = match value.chars().next() {
            Some('\'') => quoted(&value[1..], '\'').map_err(bad)?,
            Some('"') => quoted(&value[1..], '"').map_err(bad)?,
            _ => {
                let end = value.find(" #").or_else(|| value.find("\t#"));
                value[..end.unwrap_or(value.len())].trim_end().to_owned()
            }
        };
        vars.push((key.to_owned(), value));
    }
    Ok(vars)
}

/// The value inside quotes (`rest` is what follows the opening quote),
/// which must close on the same line; only a comment may follow it.
fn quoted(rest: &str, quote: char) -> Result<String, String> {
    let mut value = String::new();
    let mut chars = rest.char_indices();
    let end = loop {
        let Some((at, c)) = chars.next() else {
            return Err(format!(
                "the value's {quote} is not closed on this line; close it (values cannot span \
                 lines)"
            ));
        };
        match c {
            c if c == quote => break at + 1,
            '\\' if quote == '"' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, escaped @ ('"' | '\\' | '$'))) => value.push(escaped),
                Some((_, other)) => {
                    return Err(format!(
                        "unknown escape \\{other} in a double-quoted value; use \\n, \\\", \\\\ \
                         or \\$, or single quotes for a literal value"
                    ));
                }
                None => return Err("the value ends in a lone \\; write \\\\".to_owned()),
            },
            c => value.push(c),
        }
    };
    let after = rest[end..].trim_start();
    if !after.is_empty() && !after.starts_with('#') {
        return Err(format!(
            "unexpected {:?} after the quoted value; remove it or start a comment with #",
            shorten(after)
        ));
    }
    Ok(value)
}

/// A portable environment variable name.
fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Why a `${...}` could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ExpandError {
    /// `${NAME}` names a variable set nowhere.
    Undefined(String),
    /// `${` without its `}`, or not a variable name inside.
    Malformed(String),
}

/// `text` with `${VAR}` and `${VAR:-default}` replaced by `lookup(VAR)`
/// (the default when it is unset or empty, as the shell does) and `$$` by
/// `$`; any other `$` stays as it is. Defaults are taken literally: no
/// nested expansion.
pub(super) fn expand(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = after.strip_prefix('{') {
            let Some(close) = inner.find('}') else {
                return Err(ExpandError::Malformed(format!(
                    "\"${{\" without a closing \"}}\" in {:?}; close it, or write $$ for a \
                     literal $",
                    shorten(text)
                )));
            };
            let (name, default) = match inner[..close].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&inner[..close], None),
            };
            if !is_name(name) {
                return Err(ExpandError::Malformed(format!(
                    "\"${{{}}}\" is not a variable; write ${{NAME}} or ${{NAME:-default}} with \
                     NAME of letters, digits and '_', or $$ for a literal $",
                    shorten(&inner[..close])
                )));
            }
            match (lookup(name).filter(|value| !value.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                // Set but empty, without a default: empty, as in the shell.
                (None, None) if lookup(name).is_some() => {}
                (None, None) => return Err(ExpandError::Undefined(name.to_owned())),
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap_or_else(|bad| panic!("line {}: {}", bad.line, bad.message))
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn dotenv_syntax() {
        let text = "\
# a comment
   # an indented comment

PLAIN=value
SPACED =   padded value   
export EXPORTED=yes
export\tTABBED=1
exporter=not-a-prefix
EMPTY=
SINGLE='literal $HOME \\n # not a comment'
DOUBLE=\"a\\nb \\\"q\\\" \\\\ \\$X # in quotes\"
AFTER=\"x\"   # a comment after quotes
INLINE=value # a comment
HASH=a#b
URL=http://h/p?a=b=c
_under_1=ok
";
        assert_eq!(
            vars(text),
            pairs(&[
                ("PLAIN", "value"),
                ("SPACED", "padded value"),
                ("EXPORTED", "yes"),
                ("TABBED", "1"),
                ("exporter", "not-a-prefix"),
                ("EMPTY", ""),
                ("SINGLE", "literal $HOME \\n # not a comment"),
                ("DOUBLE", "a\nb \"q\" \\ $X # in quotes"),
                ("AFTER", "x"),
                ("INLINE", "value"),
                ("HASH", "a#b"),
                ("URL", "http://h/p?a=b=c"),
                ("_under_1", "ok"),
            ])
        );
        // Order kept, repeats kept (the later wins when collected).
        assert_eq!(
            vars("A=1\nB=2\nA=3\n"),
            pairs(&[("A", "1"), ("B", "2"), ("A", "3")])
        );
        assert_eq!(vars("\r\nA=1\r\n"), pairs(&[("A", "1")]));
    }

    #[test]
    fn dotenv_errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("A=1\nnot a variable\n", 2, "expected KEY=VALUE"),
            ("\n\n1A=x\n", 3, "invalid variable name \"1A\""),
            ("A B=x\n", 1, "invalid variable name \"A B\""),
            ("=x\n", 1, "invalid variable name \"\""),
            ("export A\n", 1, "expected KEY=VALUE"),
            ("A='open\nB=2'\n", 1, "' is not closed on this line"),
            ("A=\"open\n", 1, "\" is not closed on this line"),
            ("A=\"x\" y\n", 1, "unexpected \"y\" after the quoted value"),
            ("A=\"\\t\"\n", 1, "unknown escape \\t"),
            ("A=1\nB=x\0y\n", 2, "NUL character"),
        ];
        for (text, line, needle) in cases {
            let bad = parse(text).expect_err(text);
            assert_eq!(bad.line, *line, "{text:?}: {bad:?}");
            assert!(bad.message.contains(needle), "{text:?}: {}", bad.message);
        }
    }

    fn lookup(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.local".to_owned()),
            "PORT" => Some("5432".to_owned()),
            "EMPTY" => Some(String::new()),
            "DOLLAR" => Some("${HOST}".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn expansion() {
        let ok = |text: &str| expand(text, &lookup).unwrap();
        assert_eq!(ok("plain"), "plain");
        assert_eq!(ok("${HOST}:${PORT}"), "db.local:5432");
        assert_eq!(ok("--url=pg://${HOST}/x"), "--url=pg://db.local/x");
        assert_eq!(ok("${MISSING:-fallback}"), "fallback");
        assert_eq!(ok("${HOST:-fallback}"), "db.local");
        assert_eq!(ok("${EMPTY:-used}"), "used");
        assert_eq!(ok("[${EMPTY}]"), "[]");
        assert_eq!(ok("${MISSING:-}"), "");
        assert_eq!(ok("$$HOST $${HOST} $$$$"), "$HOST ${HOST} $$");
        assert_eq!(ok("cost $5, $HOST, a$"), "cost $5, $HOST, a$");
        // A value is not expanded again, nor a default at all.
        assert_eq!(ok("${DOLLAR}"), "${HOST}");
        assert_eq!(ok("${MISSING:-${HOST}}"), "${HOST}");
        assert_eq!(ok("é${HOST}é"), "édb.localé");

        assert_eq!(
            expand("a ${NOPE} b", &lookup),
            Err(ExpandError::Undefined("NOPE".to_owned()))
        );
        for bad in ["${HOST", "${}", "${1X}", "${A B}", "${A:x}"] {
            assert!(
                matches!(expand(bad, &lookup), Err(ExpandError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
