//! What installing `qpunch` as a tool relies on: `--version` names the protocol versions
//! (from the library's constants).

mod common;

use std::process::{Command, Output};

use common::*;

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
