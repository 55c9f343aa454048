//! The README and `docs/` promise that every link and every command in them works. These
//! tests hold them to it, cheaply (no network, no transfer: a few `qpunch --help` runs):
//!
//! - every relative link leads to an existing file or folder, and every `#anchor` to a
//!   heading of the linked page (GitHub's anchor rules);
//! - every `cargo bench --bench X`, `cargo test --test X`, `cargo run --example X` and
//!   `cargo fuzz run X` names a bench, test, example or fuzz target that exists, and a test
//!   name filter after `--` matches a test function of that file;
//! - every `qpunch SUBCOMMAND ...` shown uses only flags that subcommand's `--help` lists,
//!   and every flag named alone in prose is a flag of some subcommand;
//! - the README still opens with the two commands a newcomer runs first (`.ci/run` runs
//!   the second).
//!
//! A file that moves (a test renamed, a module split) makes these fail and name the
//! document and line to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const SUBCOMMANDS: [&str; 8] = [
    "receive",
    "send",
    "rendezvous",
    "nat-check",
    "id",
    "demo",
    "completions",
    "man",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One markdown document of the repository.
struct Doc {
    path: PathBuf,
    text: String,
}

impl Doc {
    fn name(&self) -> String {
        self.path
            .strip_prefix(root())
            .unwrap_or(&self.path)
            .display()
            .to_string()
    }
}

/// The README, `certs/README.md` and every page of `docs/`.
fn documents() -> Vec<Doc> {
    let root = root();
    let mut paths = vec![root.join("README.md"), root.join("certs/README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("readable docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    paths.extend(pages);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            Doc { path, text }
        })
        .collect()
}

/// A line of a document: its number, its text, and whether it is inside a fenced code
/// block.
struct Line<'a> {
    number: usize,
    text: &'a str,
    code: bool,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, text) in text.lines().enumerate() {
        let trimmed = text.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            continue;
        }
        out.push(Line {
            number: i + 1,
            text,
            code: fenced,
        });
    }
    out
}

/// The inline code spans of a prose line.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// A prose line with its code spans blanked, so `](` inside code is not a link.
fn without_code(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

/// The targets of the inline links `[text](target)` of a prose line.
fn link_targets(line: &str) -> Vec<String> {
    let prose = without_code(line);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let mut depth = 0usize;
        let end = rest
            .char_indices()
            .find(|&(_, c)| match c {
                '(' => {
                    depth += 1;
                    false
                }
                ')' if depth == 0 => true,
                ')' => {
                    depth -= 1;
                    false
                }
                _ => false,
            })
            .map_or(rest.len(), |(i, _)| i);
        let target = rest[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
        rest = &rest[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor a page offers, numbered as GitHub numbers repeated headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in lines(text).iter().filter(|l| !l.code) {
        let Some(heading) = line.text.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = slug(heading);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn slugs_follow_githubs_rules() {
    assert_eq!(
        slug(" Output: terminal, `--json`, logs, exit status"),
        "output-terminal---json-logs-exit-status"
    );
    assert_eq!(
        slug("Is this network punchable? `qpunch nat-check`"),
        "is-this-network-punchable-qpunch-nat-check"
    );
    let page = "# A\n## Usage\n```\n# Usage\n```\n### Usage\n#hashtag\n";
    let found: Vec<_> = anchors(page).into_iter().collect();
    assert_eq!(found, ["a", "usage", "usage-1"]);
}

#[test]
fn links_are_found_outside_code_only() {
    assert_eq!(
        link_targets("see [`tree`](src/transfer/tree.rs) and [x](a.md#b) but `[no](c.md)`"),
        ["src/transfer/tree.rs", "a.md#b"]
    );
}

/// The other checks read a document line by line: a code span broken across two lines
/// would hide the command in it from them.
#[test]
fn no_code_span_crosses_a_line() {
    let mut broken = Vec::new();
    for doc in documents() {
        for line in lines(&doc.text).iter().filter(|l| !l.code) {
            if line.text.matches('`').count() % 2 == 1 {
                broken.push(format!("{}:{}: {}", doc.name(), line.number, line.text));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "code spans across lines (rewrap them):\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    for doc in documents() {
        for line in lines(&doc.text).iter().filter(|l| !l.code) {
            for target in link_targets(line.text) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
                let path = if file.is_empty() {
                    doc.path.clone()
                } else {
                    doc.path
                        .parent()
                        .expect("a document has a folder")
                        .join(file)
                };
                let why = if !path.exists() {
                    Some("no such file".to_string())
                } else if anchor.is_empty() {
                    None
                } else if path.extension().is_none_or(|e| e != "md") {
                    Some("an anchor into a file that is not markdown".to_string())
                } else {
                    let page = std::fs::read_to_string(&path).expect("readable page");
                    (!anchors(&page).contains(anchor)).then(|| "no such heading".to_string())
                };
                if let Some(why) = why {
                    broken.push(format!("{}:{}: ({target}): {why}", doc.name(), line.number));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The commands a document shows: every inline code span of its prose, and every line of
/// its code blocks (without a trailing `# comment`), split into words, with leading
/// `VAR=value` assignments dropped.
fn commands(doc: &Doc) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    for line in lines(&doc.text) {
        let texts: Vec<&str> = if line.code {
            vec![line.text.split(" #").next().unwrap_or("")]
        } else {
            code_spans(line.text)
        };
        for text in texts {
            let words: Vec<String> = text
                .split_whitespace()
                .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                .map(str::to_string)
                .collect();
            if !words.is_empty() {
                out.push((line.number, words));
            }
        }
    }
    out
}

/// The word after `flag` in `words`.
fn after<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    let at = words.iter().position(|w| w == flag)?;
    words.get(at + 1).map(String::as_str)
}

/// Names a test file defines: its functions, and the names given to a macro
/// (`name: ...` lines, as the meet lab's matrix is written).
fn test_names(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if let Some(at) = line.find("fn ") {
            names.push(ident(&line[at + 3..]));
        }
        let name = ident(line);
        if !name.is_empty() && line[name.len()..].starts_with(':') {
            names.push(name);
        }
    }
    names
}

/// Cited by name: the word before the name, a word the command must also hold, the
/// folder of the name's `.rs` file, and what it is.
const CITED: [(&str, &str, &str, &str); 3] = [
    ("--bench", "bench", "benches", "bench"),
    ("--example", "run", "examples", "example"),
    ("run", "fuzz", "fuzz/fuzz_targets", "fuzz target"),
];

#[test]
fn every_cited_bench_test_example_and_fuzz_target_exists() {
    let root = root();
    let mut broken = Vec::new();
    for doc in documents() {
        for (number, words) in commands(&doc) {
            let mut missing = |what: &str| broken.push(format!("{}:{number}: {what}", doc.name()));
            if words.first().map(String::as_str) != Some("cargo") {
                continue;
            }
            let has = |w: &str| words.iter().any(|x| x == w);
            for (before, with, folder, what) in CITED {
                if let Some(name) = after(&words, before).filter(|_| has(with))
                    && !root.join(folder).join(format!("{name}.rs")).exists()
                {
                    missing(&format!("no {what} {name:?} in {folder}/"));
                }
            }
            if let Some(test) = after(&words, "--test").filter(|_| has("test")) {
                let file = root.join("tests").join(format!("{test}.rs"));
                if !file.exists() {
                    missing(&format!("no test file tests/{test}.rs"));
                    continue;
                }
                let names = test_names(&file);
                let filters = words
                    .iter()
                    .skip_while(|w| *w != "--")
                    .skip(1)
                    .filter(|w| !w.starts_with('-'));
                for filter in filters {
                    if !names.iter().any(|n| n.contains(filter.as_str())) {
                        missing(&format!("no test in tests/{test}.rs matches {filter:?}"));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "commands citing what does not exist:\n{}",
        broken.join("\n")
    );
}

/// The long and short flags `qpunch SUBCOMMAND --help` lists.
fn flags_of(subcommand: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_qpunch"))
        .args([subcommand, "--help"])
        .output()
        .expect("qpunch runs");
    assert!(output.status.success(), "qpunch {subcommand} --help failed");
    String::from_utf8_lossy(&output.stdout)
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with('-'))
        .map(|w| w.trim_end_matches("...").to_string())
        .collect()
}

/// A word of a shown command line as a flag (`[--yes` is `--yes`, `--size=1G` is
/// `--size`), if it is one.
fn as_flag(word: &str) -> Option<&str> {
    let word = word.trim_start_matches('[');
    let word = word.split('=').next().unwrap_or(word);
    let word = word.trim_end_matches(|c: char| !c.is_alphanumeric());
    (word.starts_with('-') && word.len() > 1 && word != "--").then_some(word)
}

#[test]
fn every_qpunch_command_shown_uses_real_flags() {
    let help: BTreeMap<&str, BTreeSet<String>> =
        SUBCOMMANDS.iter().map(|&s| (s, flags_of(s))).collect();
    let every_flag: BTreeSet<&String> = help.values().flatten().collect();
    let mut broken = Vec::new();
    for doc in documents() {
        for (number, words) in commands(&doc) {
            // `qpunch SUB ...`, or `cargo run [--release] -- SUB ...`.
            let rest = match words.iter().position(|w| w == "qpunch") {
                Some(0) => &words[1..],
                _ if words.starts_with(&["cargo".into(), "run".into()]) => {
                    match words.iter().position(|w| w == "--") {
                        Some(at) if !words.iter().any(|w| w == "--example") => &words[at + 1..],
                        _ => continue,
                    }
                }
                _ => {
                    // A flag named alone in prose: it must exist somewhere.
                    if let Some(flag) = words.first().and_then(|w| as_flag(w))
                        && words[0].starts_with("--")
                        && !every_flag.contains(&flag.to_string())
                    {
                        broken.push(format!("{}:{number}: no command has {flag}", doc.name()));
                    }
                    continue;
                }
            };
            let Some(flags) = rest.first().and_then(|s| help.get(s.as_str())) else {
                continue;
            };
            for flag in rest[1..].iter().filter_map(|w| as_flag(w)) {
                if !flags.contains(flag) {
                    broken.push(format!(
                        "{}:{number}: qpunch {} has no {flag}",
                        doc.name(),
                        rest[0]
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "commands with unknown flags:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_readme_opens_with_the_demo_and_the_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let first_block: Vec<&str> = lines(&readme)
        .into_iter()
        .skip_while(|l| !l.code)
        .take_while(|l| l.code)
        .map(|l| l.text.split(" #").next().unwrap_or("").trim())
        .collect();
    assert_eq!(first_block, ["cargo run --release -- demo", "cargo test"]);
}
