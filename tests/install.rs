//! What installing `qpunch` as a tool relies on: `--version` names the protocol versions
//! (from the library's constants), and completion scripts and manual pages are generated
//! from the command line's own definitions.

mod common;

use std::process::{Command, Output};

use common::*;

/// Every command of `qpunch`, as typed.
const COMMANDS: &[&str] = &[
    "receive",
    "send",
    "id",
    "demo",
    "rendezvous",
    "nat-check",
    "completions",
    "man",
];

/// Run `qpunch ARGS...` to its end (these commands touch no network and no home).
fn qpunch(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("QPUNCH_HOME", Home::new().path())
        .output()
        .expect("run qpunch")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout.clone()).expect("UTF-8")
}

/// The number after the last `/` of an ALPN.
fn alpn_number(alpn: &[u8]) -> &str {
    std::str::from_utf8(alpn)
        .unwrap()
        .rsplit_once('/')
        .unwrap()
        .1
}

#[test]
fn version_names_the_protocol_versions() {
    let expected = format!(
        "protocols: probe {}, files {}, meet {}, rendezvous {}",
        qpunch::wire::VERSION,
        alpn_number(qpunch::transfer::ALPN),
        qpunch::meet::pake::VERSION,
        qpunch::rendezvous::VERSION,
    );
    let long = stdout(&qpunch(&["--version"]));
    assert!(
        long.starts_with(&format!("qpunch {}\n", env!("CARGO_PKG_VERSION"))),
        "{long}"
    );
    assert!(long.lines().any(|l| l == expected), "{long}");
    for alpn in [
        qpunch::transfer::ALPN,
        qpunch::meet::lan::ALPN,
        qpunch::rendezvous::ALPN,
        qpunch::tcp::ALPN,
    ] {
        let alpn = std::str::from_utf8(alpn).unwrap();
        assert!(long.contains(alpn), "{alpn} in {long}");
    }
    let short = stdout(&qpunch(&["-V"]));
    assert_eq!(short.lines().count(), 1, "{short}");
    assert!(short.contains(&format!("({expected})")), "{short}");
}

#[test]
fn completions_cover_every_command_in_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout(&qpunch(&["completions", shell]));
        for command in COMMANDS {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
        // Options of a command, too (fish writes them `-l punch-timeout`).
        assert!(script.contains("punch-timeout"), "{shell}");
    }
    let bash = stdout(&qpunch(&["completions", "bash"]));
    assert!(bash.contains("complete -F _qpunch"), "{bash}");
    let unknown = qpunch(&["completions", "tcsh"]);
    assert!(!unknown.status.success(), "{unknown:?}");
}

#[test]
fn man_prints_a_roff_page_of_every_command() {
    let page = stdout(&qpunch(&["man"]));
    assert!(page.contains("\n.TH qpunch 1 "), "{page}");
    assert!(page.contains("\n.SH NAME\n"), "{page}");
    // roff escapes dashes: `qpunch\-nat\-check(1)`.
    for command in COMMANDS {
        let reference = format!("qpunch\\-{}", command.replace('-', "\\-"));
        assert!(page.contains(&reference), "{reference} in {page}");
    }
}

#[test]
fn man_out_writes_one_page_per_command() {
    let dir = tempdir();
    let out = dir.path().join("man1");
    stdout(&qpunch(&["man", "--out", s(&out)]));
    let mut expected = names(&["qpunch.1"]);
    expected.extend(COMMANDS.iter().map(|c| format!("qpunch-{c}.1")));
    assert_eq!(list_dir(&out), expected);
    let send = std::fs::read_to_string(out.join("qpunch-send.1")).unwrap();
    assert!(send.contains("\n.TH qpunch-send 1 "), "{send}");
    assert!(send.contains("\\-\\-punch\\-timeout"), "{send}");
}
