//! A file-sharing app over `qpunch::share`, the API of `qpunch send` and `qpunch receive`:
//! `receive DIR [IP:PORT]` asks before taking files (it prints a LAN code, or its address
//! and fingerprint when bound to one); `send FILE CODE` or `send FILE IP:PORT [FINGERPRINT]`
//! sends a file or folder. Run it with `cargo run --example share -- ARGS`.

use std::io::{BufRead, Write};

use qpunch::identity::Identity;
use qpunch::share::consent::Summary;
use qpunch::share::{Event, FileEvent, ReceiveConfig, SendConfig, Share, Target};
use qpunch::transfer::Outcome;

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let share = Share::new(Identity::generate()?, show);
    let ok = match args[..] {
        ["receive", dir, ref bind @ ..] => receive(&share, dir, bind.first()).await?,
        ["send", file, to, ref peer @ ..] => send(&share, file, to, peer.first()).await?,
        _ => return Err("usage: receive DIR [IP:PORT] | send FILE TO [FINGERPRINT]".into()),
    };
    std::process::exit(if ok { 0 } else { 1 });
}

/// Receive one batch into `dir`, asking on stdin.
async fn receive(share: &Share, dir: &str, bind: Option<&&str>) -> Result<bool, Error> {
    let mut config = ReceiveConfig::new(dir);
    config.bind = bind.map(|b| b.parse()).transpose()?;
    config.once = true;
    config.accept = config.accept.ask_with(|sender, files| {
        let offer = Summary::new(sender, files); // sizes are the sender's claim: saturating
        print!(
            "{sender}: {} file(s), {} bytes. Take? [y/N] ",
            offer.files, offer.bytes
        );
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        vec![line.trim().eq_ignore_ascii_case("y"); files.len()]
    });
    Ok(share.receive(config, ctrl_c()).await?)
}

/// Send `file` to `to` (a code or an address), pinned to `peer` when given.
async fn send(share: &Share, file: &str, to: &str, peer: Option<&&str>) -> Result<bool, Error> {
    let config = SendConfig {
        peer: peer.map(|p| p.parse()).transpose()?,
        ..SendConfig::default()
    };
    let files = qpunch::transfer::select(&[file.into()])?;
    let to = Target::parse(to)?;
    let sent = share.send(&to, files, &config, ctrl_c()).await?;
    Ok(sent.reports.iter().all(|r| r.is_verified()))
}

/// Stop (cleanly: a sender's partial files are kept for a resume) on Ctrl-C.
async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// The events this app cares about, one line each.
fn show(event: Event) {
    match event {
        Event::Listening {
            local, fingerprint, ..
        } => println!("listening on {local} as {fingerprint}"),
        Event::Code { code, .. } => println!("code: {code}"),
        Event::Connected {
            peer, fingerprint, ..
        } => println!("connected to {peer} ({fingerprint})"),
        Event::File {
            event: FileEvent::Finished(report),
            ..
        } => match report.outcome {
            Outcome::Verified => println!("verified {} ({} bytes)", report.name, report.size),
            other => println!("{}: {other:?}", report.name),
        },
        Event::Warning(message) | Event::Error(message) => eprintln!("{message}"),
        _ => {}
    }
}
