//! The library's rooms import one way: each top-level module of `src/` sits on a layer,
//! and may only name modules on lower layers (see the layer list in `src/lib.rs`). A new
//! module must be given a layer here, and an import that runs up (or sideways, between two
//! rooms of one layer) fails this test with the file that does it.
//!
//! Imports are read the way `rustc` resolves them for our purposes: `crate::`, `super::`
//! and `self::` paths in code, doc comments and unit tests excluded (a doc link or a test
//! may look anywhere).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bottom up. Rooms on one line must not import each other.
const LAYERS: &[&[&str]] = &[
    &[
        "addr",
        "text",
        "wire",
        "durable",
        "home",
        "ratelimit",
        "bbr",
        "close_gate",
        "nat",
    ],
    &[
        "punch",
        "frame",
        "identity",
        "congestion",
        "stun",
        "portmap",
    ],
    &["traverse", "socket", "tls", "known_peers"],
    &["path"],
    &["driver", "tcp", "stun_client", "turn"],
    &["node"],
    &["server"],
    &["transfer", "rendezvous"],
    &["natcheck"],
    &["meet"],
    &["trust"],
    &["share"],
    &["version"],
];

/// The binary's own modules (`src/main.rs`, `src/cli/`) sit above every library room.
const BINARY: &[&str] = &["cli", "main"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file below `src/`: `src/meet/lan/mdns.rs` is `meet::lan::mdns`,
/// `src/meet/mod.rs` is `meet`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        parts.clear();
    }
    parts
}

/// The code of a file without comments and without its unit tests.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a file names through `crate::`, `super::` or `self::` paths.
fn imports(module: &[String], code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for keyword in ["crate", "super", "self"] {
        let pattern = format!("{keyword}::");
        for (at, _) in code.match_indices(&pattern) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[at + pattern.len()..];
            let mut base: Vec<String> = match keyword {
                "crate" => Vec::new(),
                "self" => module.to_vec(),
                _ => module[..module.len().saturating_sub(1)].to_vec(),
            };
            let mut segments = rest.split("::").map(|s| {
                s.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            });
            let mut next = segments.next();
            while next.as_deref() == Some("super") {
                base.pop();
                next = segments.next();
            }
            let first = base.first().cloned().or(next);
            if let Some(first) = first.filter(|f| !f.is_empty()) {
                found.push(first);
            }
        }
    }
    found
}

#[test]
fn imports_run_down_the_layers_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unplaced = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(top) = module.first() else { continue };
        if BINARY.contains(&top.as_str()) {
            continue;
        }
        let Some(own) = rank(top) else {
            unplaced.push(top.clone());
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for target in imports(&module, &code) {
            if &target == top {
                continue;
            }
            match rank(&target) {
                Some(r) if r < own => {}
                _ => wrong
                    .entry(file.strip_prefix(&src).unwrap().display().to_string())
                    .or_default()
                    .push(target),
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(
        unplaced.is_empty(),
        "modules with no layer in tests/layers.rs: {unplaced:?}"
    );
    for targets in wrong.values_mut() {
        targets.sort();
        targets.dedup();
    }
    assert!(
        wrong.is_empty(),
        "imports that run up or sideways: {wrong:#?}"
    );
}

#[test]
fn the_reader_sees_crate_super_and_self_paths() {
    let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let code =
        "use crate::node::Node;\nlet x = super::super::wire::TxId; self::inner::f(); acrate::x";
    let mut got = imports(&m("meet::lan::mdns"), code);
    got.sort();
    assert_eq!(got, ["meet", "meet", "node"]);
    assert_eq!(imports(&m("socket"), "use super::wire::Message;"), ["wire"]);
    assert_eq!(
        code_of("use crate::a; // crate::b\n#[cfg(test)]\nmod tests { crate::c }"),
        "use crate::a; "
    );
}
