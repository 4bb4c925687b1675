//! `orchestrator --help` and `orchestrator VERB --help` for every verb, kept
//! under tests/snapshots/help/: a change to a help text shows as a diff in
//! review. `UPDATE_SNAPSHOTS=1` writes them anew.

use std::path::{Path, PathBuf};
use std::process::Command;

use orchestrator_e2e::orchestrator_bin;

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/help")
}

fn help(args: &[&str]) -> String {
    let output = Command::new(orchestrator_bin())
        .args(args)
        .env_remove("ORCHESTRATOR_CONFIG")
        .env_remove("ORCHESTRATOR_SOCKET")
        .output()
        .expect("run the orchestrator binary");
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// The verbs `orchestrator --help` lists (hidden ones are not listed).
fn verbs(top: &str) -> Vec<String> {
    top.lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|verb| *verb != "help")
        .map(str::to_owned)
        .collect()
}

/// Lines only in `kept` as `-`, only in `now` as `+`, through their
/// longest common subsequence (help texts are short).
fn diff(kept: &str, now: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (kept.lines().collect(), now.lines().collect());
    let mut common = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            common[i][j] = if a[i] == b[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || common[i][j + 1] >= common[i + 1][j]) {
            out.push_str(&format!("+{}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("-{}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[test]
fn help_texts_match_their_snapshots() {
    let top = help(&["--help"]);
    let verbs = verbs(&top);
    for expected in ["run", "check", "status", "logs", "events", "completions"] {
        assert!(
            verbs.iter().any(|verb| verb == expected),
            "{expected} not found in the verbs {verbs:?} of\n{top}"
        );
    }
    let mut texts = vec![("orchestrator".to_owned(), top)];
    for verb in &verbs {
        texts.push((verb.clone(), help(&[verb, "--help"])));
    }
    let dir = snapshot_dir();
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    if update {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut problems = Vec::new();
    for (name, text) in &texts {
        let file = dir.join(format!("{name}.txt"));
        if update {
            std::fs::write(&file, text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&file) {
            Ok(kept) if &kept == text => {}
            Ok(kept) => problems.push(format!(
                "{} differs (- kept, + now):\n{}",
                file.display(),
                diff(&kept, text)
            )),
            Err(error) => problems.push(format!("{}: {error}", file.display())),
        }
    }
    // A snapshot of a verb that is gone.
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        if !texts.iter().any(|(verb, _)| *verb == name) {
            if update {
                std::fs::remove_file(&path).unwrap();
            } else {
                problems.push(format!("{}: no such verb any more", path.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nIf the change is intended, regenerate the snapshots with\n  \
         UPDATE_SNAPSHOTS=1 cargo test -p orchestrator --test help_snapshots\nand commit them.",
        problems.join("\n\n")
    );
}

#[test]
fn every_verb_has_examples_and_documented_arguments() {
    let top = help(&["--help"]);
    for verb in verbs(&top) {
        let text = help(&[&verb, "--help"]);
        assert!(
            text.contains("\nExamples:\n"),
            "{verb} has no examples:\n{text}"
        );
        // Each argument line (`  -x, --long <V>` or `  <NAME>`) is followed
        // by its description.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let is_argument = line.starts_with("  ")
                && !line.starts_with("   ")
                && (trimmed.starts_with('-')
                    || trimmed.starts_with('[')
                    || trimmed.starts_with('<'));
            if is_argument {
                // Beside it (short help), or on the next line (long help).
                let beside = trimmed
                    .split_once("  ")
                    .is_some_and(|(_, text)| !text.trim().is_empty());
                let below = lines
                    .get(i + 1)
                    .is_some_and(|next| next.starts_with("          ") && !next.trim().is_empty());
                assert!(
                    beside || below,
                    "{verb}: {line:?} has no description:\n{text}"
                );
            }
        }
    }
    assert!(top.contains("\nExamples:\n"), "{top}");
}

#[test]
fn the_diff_shows_what_changed() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "+x\n-b\n");
    assert_eq!(diff("a\n", "a\n"), "");
}
