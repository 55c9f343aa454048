//! `qpunch demo`: the whole flow on loopback, in one process, with nothing to set up.
//!
//! A receiver and a sender, each with a fresh in-memory identity, exchange a generated
//! file over 127.0.0.1: probe and reply, hand-over of the same socket to QUIC, mutual TLS
//! with pinned keys (the receiver's allow list acts as the ticket), streaming, BLAKE3
//! verification, and the final rename.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Args;
use indicatif::HumanBytes;
use qpunch::identity::Identity;
use qpunch::node::{self, Congestion, Node, NodeConfig};
use qpunch::punch::PunchConfig;
use qpunch::transfer::{self, Outgoing, Policy, ReceiveOptions, Receiver};

use super::common::{report_connected, report_punched};
use super::ui::{FileProgress, Side, Ui};
use super::{congestion_parser, parse_size};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the generated file in bytes (suffixes k, M, G in powers of 1024).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Congestion controller of both ends (the sender's is the one that matters).
    #[arg(long = "cc", default_value_t = Congestion::default(), value_parser = congestion_parser())]
    congestion: Congestion,
}

pub async fn run(args: DemoArgs, ui: Arc<Ui>) -> anyhow::Result<bool> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (src_dir, out_dir) = (dir.path().join("outbox"), dir.path().join("inbox"));
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&out_dir)?;
    let source = src_dir.join("demo.bin");
    ui.say(&format!(
        "generating {} of random data ...",
        HumanBytes(args.size)
    ));
    generate(&source, args.size)?;

    let (receiver_id, sender_id) = (Identity::generate()?, Identity::generate()?);
    let receiver_fp = receiver_id.fingerprint();
    let receiver = Receiver::new(ReceiveOptions::new(
        &out_dir,
        Policy::Allow(vec![sender_id.fingerprint()]),
    ))?;
    let socket = qpunch::socket::bind("127.0.0.1:0".parse()?)?;
    let receiving = Node::new(
        socket,
        NodeConfig {
            congestion: args.congestion,
            ..NodeConfig::new(receiver_id, transfer::ALPN, true)
        },
    )?;
    let target = receiving.local_addr()?;
    ui.say(&format!("receiver listening on {target} as {receiver_fp}"));

    let receiver_task = tokio::spawn(async move {
        let peer = receiving.accept().await.context("no sender")??;
        let reports = receiver.handle(&peer, Arc::new(transfer::Quiet)).await?;
        let _ = peer.connection.closed().await;
        anyhow::Ok((reports, receiving.socket_stats()))
    });

    let started = Instant::now();
    let config = NodeConfig {
        congestion: args.congestion,
        ..NodeConfig::new(sender_id, transfer::ALPN, false)
    };
    let node::HandOver {
        node: sending,
        punched,
        punched_from: local,
    } = node::punch_and_hand_over(target, config, PunchConfig::default()).await?;
    report_punched(&ui, &punched, local);
    let peer = sending.connect(punched.peer, Some(receiver_fp)).await?;
    report_connected(
        &ui,
        super::common::canonical(peer.connection.remote_address()),
        peer.fingerprint,
        "direct",
        sending.local_addr()?,
        false,
    );
    let progress = FileProgress::new(ui.clone(), Side::Sending);
    let reports = transfer::send_files(
        &peer.connection,
        vec![Outgoing::from_path(&source)?],
        progress,
    )
    .await?;
    peer.close(transfer::codes::DONE, b"done");
    sending.close(node::QUICK_LINGER).await;
    let elapsed = started.elapsed();
    let (received, stats) = receiver_task.await.context("receiver crashed")??;

    let report = reports.first().context("no report")?;
    if !report.is_verified() || !received.iter().all(|r| r.is_verified()) {
        bail!("the demo transfer did not verify: {:?}", report.outcome);
    }
    let saved = out_dir.join(report.saved_as.as_deref().unwrap_or_default());
    let (size, hash) = transfer::hash_file(&saved).await?;
    ensure!(
        size == args.size && hash == report.blake3,
        "stored file differs from the source"
    );
    ensure!(
        local.port() == sending.local_addr()?.port(),
        "port changed at hand-over"
    );
    ensure!(
        stats.probes_answered >= 1,
        "the receiver never answered a probe"
    );
    let rate = args.size as f64 / elapsed.as_secs_f64();
    ui.say(&format!(
        "demo complete: {} in {:.2} s ({}/s), BLAKE3 {} verified on both sides",
        HumanBytes(args.size),
        elapsed.as_secs_f64(),
        HumanBytes(rate as u64),
        &hash[..16],
    ));
    Ok(true)
}

/// Write `size` pseudo-random bytes (BLAKE3 in XOF mode: fast and incompressible).
fn generate(path: &std::path::Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut xof = blake3::Hasher::new()
        .update(&rand::random::<[u8; 32]>())
        .finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cli::parse_size;

    #[test]
    fn sizes_use_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("12x").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_size("4KiB"), Ok(4 << 10));
        assert_eq!(parse_size("64 kb"), Ok(64 << 10));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("4KiBs").is_err());
    }
}
