//! Throughput and CPU cost of the NAT lab's user-space delay element
//! (`tests/nat_lab/delay.rs`): a site with 10 ms one-way delay, no rate limit, and
//!
//! - UDP at fixed offered loads of 1472-byte datagrams (1514-byte frames), each way:
//!   what gets through, what is lost, and the CPU time of the forwarder thread of that
//!   direction (percent of one core) next to the whole machine's busy share;
//! - one TCP connection each way for a few seconds (RTT 20 ms): goodput and CPU.
//!
//! Target: at least 100 Mbit/s of 1500-byte frames at modest CPU. Needs root (the lab
//! builds namespaces); without it this prints SKIPPED. `cargo bench --bench nat_lab_delay`.

#[path = "../tests/nat_lab/lab.rs"]
mod lab;

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lab::{DirectionStats, Nat, PUBLIC_V4, Site, SiteSpec, Topology};

const PAYLOAD: usize = 1472;
const FRAME: usize = PAYLOAD + 42; // UDP 8 + IPv4 20 + Ethernet 14
const RUN: Duration = Duration::from_secs(3);

/// What one run measured.
struct Sample {
    mbit_frames: f64,
    loss: f64,
    /// Share of the sent frames that passed the delay element (the rest were lost
    /// before it).
    through_element: f64,
    forwarder_cpu: f64,
    machine_cpu: f64,
}

/// Run `work` while watching the forwarder direction `pick` of `site` and the machine.
fn measure(
    site: &Site,
    pick: fn(&lab::DelayStats) -> DirectionStats,
    work: impl FnOnce(),
) -> (DirectionStats, f64, f64) {
    let before = pick(&site.delay_stats().unwrap());
    let (busy0, total0) = common::machine_cpu();
    let start = Instant::now();
    work();
    let wall = start.elapsed();
    let after = pick(&site.delay_stats().unwrap());
    let (busy1, total1) = common::machine_cpu();
    let delta = DirectionStats {
        frames: after.frames - before.frames,
        bytes: after.bytes - before.bytes,
        overflow: after.overflow - before.overflow,
        refused: after.refused - before.refused,
        cpu: after.cpu - before.cpu,
    };
    let forwarder = delta.cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
    let machine = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * 100.0;
    (delta, forwarder, machine)
}

/// Send `mbit` Mbit/s of frames from `tx` to `to` for [`RUN`] (paced every millisecond);
/// count what `rx` receives.
fn udp_load(
    site: &Site,
    upload: bool,
    tx: &UdpSocket,
    rx: UdpSocket,
    to: SocketAddr,
    mbit: f64,
) -> Sample {
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0u64;
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let frames_per_ms = mbit * 1e6 / 8.0 / FRAME as f64 / 1000.0;
    let payload = [0xa5u8; PAYLOAD];
    let mut sent = 0u64;
    let pick = if upload {
        |s: &lab::DelayStats| s.a_to_b
    } else {
        |s: &lab::DelayStats| s.b_to_a
    };
    let (delta, forwarder, machine) = measure(site, pick, || {
        let start = Instant::now();
        let mut tick = 0u32;
        while start.elapsed() < RUN {
            tick += 1;
            let due = (frames_per_ms * f64::from(tick)) as u64;
            while sent < due {
                if tx.send_to(&payload, to).is_ok() {
                    sent += 1;
                }
            }
            if let Some(left) =
                (start + Duration::from_millis(tick.into())).checked_duration_since(Instant::now())
            {
                std::thread::sleep(left);
            }
        }
        std::thread::sleep(Duration::from_millis(50)); // let the last frames out
    });
    let got = counter.join().unwrap();
    Sample {
        mbit_frames: got as f64 * FRAME as f64 * 8.0 / RUN.as_secs_f64() / 1e6,
        loss: (sent - got.min(sent)) as f64 / sent.max(1) as f64 * 100.0,
        through_element: delta.frames as f64 / sent.max(1) as f64 * 100.0,
        forwarder_cpu: forwarder,
        machine_cpu: machine,
    }
}

/// One TCP connection for [`RUN`]: goodput in Mbit/s.
fn tcp(site: &Site, upload: bool, client: &lab::Host, public: &lab::Host) -> Sample {
    let listener = public.run(|| TcpListener::bind(SocketAddr::new(PUBLIC_V4.into(), 0)).unwrap());
    let to = listener.local_addr().unwrap();
    let connecting = client.run(|| TcpStream::connect(to)).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let (mut tx, mut rx) = if upload {
        (connecting, accepted)
    } else {
        (accepted, connecting)
    };
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut bytes = 0u64;
        while let Ok(n @ 1..) = rx.read(&mut buf) {
            bytes += n as u64;
        }
        bytes
    });
    let pick = if upload {
        |s: &lab::DelayStats| s.a_to_b
    } else {
        |s: &lab::DelayStats| s.b_to_a
    };
    let chunk = vec![0x5au8; 1 << 16];
    let mut elapsed = Duration::ZERO;
    let (_, forwarder, machine) = measure(site, pick, || {
        let start = Instant::now();
        while start.elapsed() < RUN {
            tx.write_all(&chunk).unwrap();
        }
        tx.shutdown(std::net::Shutdown::Write).unwrap();
        elapsed = start.elapsed();
    });
    let bytes = reader.join().unwrap();
    Sample {
        mbit_frames: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
        loss: 0.0,
        through_element: 100.0,
        forwarder_cpu: forwarder,
        machine_cpu: machine,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !lab::require("nat_lab_delay bench", &[]) {
        return;
    }
    let one_way = Duration::from_millis(10);
    let topo = Topology::new("bd", &[SiteSpec::new(Nat::Open).delay(one_way)]);
    let (site, client, public) = (topo.site(0), topo.site(0).client(0), topo.public());
    println!(
        "delay element, {one_way:?} one way (RTT 20 ms to the public host), 1514-byte frames, {RUN:?} per run"
    );
    println!(
        "{:<34} {:>9} {:>8} {:>14} {:>16} {:>10}",
        "run", "Mbit/s", "loss %", "via element %", "forwarder CPU %", "machine %"
    );
    let show = |name: &str, s: &Sample| {
        println!(
            "{name:<34} {:>9.1} {:>8.2} {:>14.2} {:>16.1} {:>10.1}",
            s.mbit_frames, s.loss, s.through_element, s.forwarder_cpu, s.machine_cpu
        );
    };
    // The site is Open: the public host reaches the client at the site's WAN address.
    let client_rx_port = 9000;
    // Warm the ARP caches first: while the first ARP round trip (20 ms) is under way, the
    // router queues only a few frames and drops the rest, which is not the element's loss.
    let (ping, pong) = (client.udp4(0), public.udp4(0));
    pong.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    ping.send_to(b"warm-up", pong.local_addr().unwrap())
        .unwrap();
    let (_, from) = pong.recv_from(&mut [0u8; 16]).expect("warm-up datagram");
    pong.send_to(b"warm-up", from).unwrap();
    for mbit in [100.0, 200.0, 400.0] {
        let tx = client.udp4(0);
        let rx = public.udp4(0);
        let to = rx.local_addr().unwrap();
        let s = udp_load(site, true, &tx, rx, to, mbit);
        show(&format!("UDP up, offered {mbit} Mbit/s"), &s);
        let tx = public.udp4(0);
        let rx = client.udp4(client_rx_port);
        let s = udp_load(
            site,
            false,
            &tx,
            rx,
            SocketAddr::new(site.wan_v4.into(), client_rx_port),
            mbit,
        );
        show(&format!("UDP down, offered {mbit} Mbit/s"), &s);
    }
    show(
        "TCP up, one connection (goodput)",
        &tcp(site, true, client, public),
    );
    show(
        "TCP down, one connection (goodput)",
        &tcp(site, false, client, public),
    );
    let stats = site.delay_stats().unwrap();
    println!("totals: {stats:?}");
    drop(topo);

    // The path benchmark's setting: two sites, 10 ms and 100 Mbit/s per link, 40 ms RTT.
    let link = |nat| {
        SiteSpec::new(nat)
            .delay(one_way)
            .rate(lab::Rate::mbit(100.0))
    };
    let topo = Topology::new("bp", &[link(Nat::Cone), link(Nat::Open)]);
    let (a, b) = (topo.site(0), topo.site(1));
    // B is Open: A's client connects to B's WAN address and reaches B's client.
    let listener = b
        .client(0)
        .run(|| TcpListener::bind("0.0.0.0:9100").unwrap());
    let to = SocketAddr::new(b.wan_v4.into(), 9100);
    let mut tx = a.client(0).run(|| TcpStream::connect(to)).unwrap();
    let (mut rx, _) = listener.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut bytes = 0u64;
        while let Ok(n @ 1..) = rx.read(&mut buf) {
            bytes += n as u64;
        }
        bytes
    });
    let chunk = vec![0x5au8; 1 << 16];
    let long = 3 * RUN;
    let mut elapsed = Duration::ZERO;
    let (_, forwarder, machine) = measure(
        a,
        |s| s.a_to_b,
        || {
            let start = Instant::now();
            while start.elapsed() < long {
                tx.write_all(&chunk).unwrap();
            }
            tx.shutdown(std::net::Shutdown::Write).unwrap();
            elapsed = start.elapsed();
        },
    );
    let bytes = reader.join().unwrap();
    let s = Sample {
        mbit_frames: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
        loss: 0.0,
        through_element: 100.0,
        forwarder_cpu: forwarder,
        machine_cpu: machine,
    };
    println!(
        "\ntwo sites, 10 ms + 100 Mbit/s per link (RTT 40 ms), {long:?}, kernel default congestion control"
    );
    show("TCP site A -> site B (goodput)", &s);
}
