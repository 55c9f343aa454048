//! `qpunch rendezvous`, `receive --via` and `send --to CODE` as a user runs them, over
//! loopback: codes chosen by a script, a new code after each use, codes that expire, and a
//! code-made connection that leaves nothing in known_peers.

mod common;

use std::time::Duration;

use common::*;

fn send_code(home: &Home, file: &std::path::Path, code: &str, via: &str) -> Finished {
    Proc::spawn(
        "sender",
        home.path(),
        &["send", s(file), "--to", code, "--via", via, "--json"],
    )
    .finish(LONG)
}

#[test]
fn script_chosen_codes_then_new_codes_and_no_known_peers() {
    let (rvhome, rhome, shome) = (Home::new(), Home::new(), Home::new());
    let (_rv, _, via) = rendezvous_anywhere(&rvhome);
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("coded.bin");
    random_file(&file, 100_000, 11);

    let chosen = "4242-crossover-clockwork";
    let (mut receiver, first) =
        receive_by_code(&rhome, out.path(), &via, &["--yes", "--code", chosen]);
    assert_eq!(
        first, "4242-clockwork-crossover",
        "canonical form of the chosen code"
    );
    let sent = send_code(&shome, &file, chosen, &via);
    sent.assert_success();
    assert_eq!(sent.one("sent")["name"], "coded.bin");
    let connected = sent.one("connected");
    assert_eq!(connected["path"], "lan", "loopback: {connected}");
    assert_eq!(
        sent.one("punched")["method"],
        "lan",
        "{:#?}",
        sent.all("punched")
    );
    // Codes are one-time: a receiver without --once prints a fresh one after each use.
    let second = next_code(&mut receiver);
    assert_ne!(second, first);
    assert!(!second.starts_with("4242-"), "a new nameplate: {second}");
    // The used code is gone.
    let again = send_code(&shome, &file, chosen, &via);
    again.assert_failure();
    let message = again.messages();
    assert!(message.contains("no receiver is waiting"), "{message}");
    // The second code works for the next sender.
    let sent = send_code(&shome, &file, &second, &via);
    sent.assert_success();
    assert_eq!(list_dir(out.path()), names(&["coded.bin", "coded (1).bin"]));
    // A code pins the receiver once: nothing is remembered for next time.
    assert!(
        !shome.path().join("known_peers").exists(),
        "a code-made connection must not write known_peers"
    );
    receiver.interrupt(SHORT);
}

#[test]
fn an_expired_code_is_replaced() {
    let (rvhome, rhome) = (Home::new(), Home::new());
    let (_rv, _, via) = rendezvous_anywhere(&rvhome);
    let out = tempdir();
    let (mut receiver, first) =
        receive_by_code(&rhome, out.path(), &via, &["--yes", "--code-ttl", "1s"]);
    let started = std::time::Instant::now();
    let second = next_code(&mut receiver);
    assert_ne!(first, second);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let finished = receiver.interrupt(SHORT);
    assert!(
        !finished.all("code_expired").is_empty(),
        "the receiver says why: {finished:#?}"
    );
}

#[test]
fn a_receiver_without_a_terminal_admits_code_holders_only() {
    let (rvhome, rhome, shome, stranger) = (Home::new(), Home::new(), Home::new(), Home::new());
    let (_rv, _, via) = rendezvous_anywhere(&rvhome);
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("ticket.txt");
    random_file(&file, 1000, 12);
    // No --yes, no --allow, no terminal: with a rendezvous, codes are the tickets.
    let (receiver, code) = receive_by_code(&rhome, out.path(), &via, &[]);
    let listening = receiver
        .events
        .iter()
        .find(|e| e["event"] == "listening")
        .unwrap()
        .clone();
    let port: u16 = listening["port"].as_u64().unwrap() as u16;
    let fingerprint = listening["fingerprint"].as_str().unwrap().to_string();
    // A stranger dialing the address directly is refused.
    let direct = send(
        stranger.path(),
        &[&file],
        port,
        &["--peer", &fingerprint],
        LONG,
    );
    direct.assert_failure();
    assert!(direct.messages().contains("does not accept"), "{direct:#?}");
    // The code holder gets in without being asked.
    let sent = send_code(&shome, &file, &code, &via);
    sent.assert_success();
    assert_eq!(list_dir(out.path()), names(&["ticket.txt"]));
    receiver.interrupt(SHORT);
}

/// A wrong code (the right nameplate, one word off) is refused on both sides with "the
/// code did not match", and it burns the code: the right code no longer finds anyone,
/// and the receiver offers a new code, which works.
#[test]
fn a_wrong_code_is_refused_on_both_sides_and_burns_the_code() {
    let (rvhome, rhome, shome) = (Home::new(), Home::new(), Home::new());
    let (_rv, _, via) = rendezvous_anywhere(&rvhome);
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("coded.bin");
    random_file(&file, 1000, 13);
    // A chosen code with a nameplate no random one has (those stay below 100 here), so the
    // old code cannot name the receiver's next registration by chance.
    let chosen = "4343-crossover-clockwork";
    let (mut receiver, code) =
        receive_by_code(&rhome, out.path(), &via, &["--yes", "--code", chosen]);
    let wrong = wrong_code(&code.parse().expect("the receiver's code")).to_string();
    assert_ne!(wrong, code);

    let guessed = send_code(&shome, &file, &wrong, &via);
    guessed.assert_failure();
    // Each side finds the code wrong itself (not "the other side gave up: ...").
    let wrong_code_said = "the code did not match: it was mistyped";
    let said = guessed.one("error")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(said.contains(wrong_code_said), "sender: {said}");
    let error = receiver.wait_event("error", SHORT);
    let said = error["message"].as_str().unwrap();
    assert!(said.contains(wrong_code_said), "receiver: {said}");
    // The receiver withdrew the code and offers another.
    let second = next_code(&mut receiver);
    assert!(!second.starts_with("4343-"), "a new nameplate: {second}");
    // The right code is no use now.
    let late = send_code(&shome, &file, &code, &via);
    late.assert_failure();
    let message = late.messages();
    assert!(message.contains("no receiver is waiting"), "{message}");
    // The new one is.
    let sent = send_code(&shome, &file, &second, &via);
    sent.assert_success();
    assert_eq!(list_dir(out.path()), names(&["coded.bin"]));
    receiver.interrupt(SHORT);
}

/// However many wrong codes come, a receiver gives away at most five guesses an hour: after
/// the fifth sender that paired without knowing the code it opens no new code, says for
/// how long, and has left the rendezvous (nothing waits there for a sixth guess).
#[test]
fn five_wrong_codes_pause_the_receiver_for_the_hour() {
    let (rvhome, rhome, shome) = (Home::new(), Home::new(), Home::new());
    let (_rv, _, via) = rendezvous_anywhere(&rvhome);
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("guess.bin");
    random_file(&file, 1000, 17);
    let (mut receiver, mut code) = receive_by_code(&rhome, out.path(), &via, &[]);
    for guess in 1..=5 {
        let wrong = wrong_code(&code.parse().expect("the receiver's code")).to_string();
        send_code(&shome, &file, &wrong, &via).assert_failure();
        receiver.wait_event("error", SHORT);
        if guess < 5 {
            code = next_code(&mut receiver);
        }
    }
    let paused = receiver.wait_event("codes_paused", SHORT);
    assert_eq!(paused["guesses"], 5, "{paused}");
    assert_eq!(paused["window_secs"], 3600, "{paused}");
    let resume = paused["resume_in_secs"].as_u64().unwrap();
    assert!((3500..=3600).contains(&resume), "{paused}");
    assert!(list_dir(out.path()).is_empty());
    let finished = receiver.interrupt(SHORT);
    let codes: Vec<_> = (finished.all("listening").into_iter())
        .filter_map(|l| l["code"].as_str())
        .collect();
    assert_eq!(codes.len(), 5, "no sixth code: {codes:?}");
}

/// A fixed code used again from the same home is warned about (guesses at it add up across
/// runs); a fresh one is not.
#[test]
fn a_fixed_code_used_again_is_warned_about() {
    let (rvhome, rhome) = (Home::new(), Home::new());
    let (_rv, _, via) = rendezvous_anywhere(&rvhome);
    let out = tempdir();
    let chosen = "4545-crossover-clockwork";
    let reused = "used before on this machine";
    let warned = |finished: &Finished| {
        finished
            .all("warning")
            .iter()
            .any(|w| w["message"].as_str().unwrap_or_default().contains(reused))
    };
    let (first, _) = receive_by_code(&rhome, out.path(), &via, &["--yes", "--code", chosen]);
    let first = first.interrupt(SHORT);
    assert!(!warned(&first), "a first use is not warned about");
    let (second, _) = receive_by_code(&rhome, out.path(), &via, &["--yes", "--code", chosen]);
    let second = second.interrupt(SHORT);
    assert!(
        warned(&second),
        "the second use is warned about: {:?}",
        second.events
    );
}

/// A rendezvous that restarts while a receiver waits on a code loses nothing that matters:
/// the receiver reconnects and registers the same code again, and the code the user already
/// passed on still works.
#[test]
fn a_waiting_code_survives_a_rendezvous_restart() {
    let (rvhome, rhome, shome) = (Home::new(), Home::new(), Home::new());
    let (first, port, via) = rendezvous_anywhere(&rvhome);
    let (src, out) = (tempdir(), tempdir());
    let file = src.path().join("restart.bin");
    random_file(&file, 5000, 19);
    let (mut receiver, code) = receive_by_code(&rhome, out.path(), &via, &[]);
    first.interrupt(SHORT);
    let _second = rendezvous(&rvhome, port);
    let again = next_code(&mut receiver);
    assert_eq!(again, code, "the same code, registered again");
    let sent = send_code(&shome, &file, &code, &via);
    sent.assert_success();
    assert_eq!(list_dir(out.path()), names(&["restart.bin"]));
    receiver.interrupt(SHORT);
}
