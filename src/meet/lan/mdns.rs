//! Finding the receiver on the LAN: the mDNS announcement (what is announced, and the
//! strict reader of what others announce), the sightings a sender collects, and the mDNS
//! daemon. Nothing here touches a QUIC connection; proving the code is [`super::prove`]'s.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::time::Instant;

use super::*;
use crate::meet::candidates::Interface;
use crate::meet::code::Nameplate;
use crate::meet::pake;

// ---------------------------------------------------------------------------------------
// Announcements (sans-IO)
// ---------------------------------------------------------------------------------------

/// One receiver's announcement, as a sender read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The DNS-SD instance's full name (peer-chosen text: escape before showing).
    pub instance: String,
    /// The nameplate it announces.
    pub nameplate: Nameplate,
    /// The receiver's addresses, usable ones only, our own networks first.
    pub addrs: Vec<SocketAddr>,
}

/// Why an announcement is ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnnouncement {
    /// No `v`, or not the version we speak.
    #[error("meet protocol version {0:?}")]
    Version(Option<String>),
    /// No `np`, or not a nameplate.
    #[error("no valid nameplate")]
    Nameplate,
    /// Port 0.
    #[error("no port")]
    Port,
    /// No address we could connect to.
    #[error("no usable address")]
    NoAddress,
}

/// The TXT properties of an announcement for `nameplate`.
pub fn txt(nameplate: &Nameplate) -> Vec<(&'static str, String)> {
    vec![
        (TXT_VERSION, pake::VERSION.to_string()),
        (TXT_NAMEPLATE, nameplate.to_string()),
    ]
}

/// Read an announcement: its instance name, port, addresses, and the raw values of its
/// `v` and `np` TXT properties (`None` when absent). Strict: anything off is refused.
/// Addresses keep their order; [`Sightings`] ranks them.
pub fn read_announcement(
    instance: &str,
    port: u16,
    ips: impl IntoIterator<Item = IpAddr>,
    version: Option<&[u8]>,
    nameplate: Option<&[u8]>,
) -> Result<Announced, BadAnnouncement> {
    fn text(bytes: Option<&[u8]>) -> Option<&str> {
        std::str::from_utf8(bytes?).ok()
    }
    if text(version) != Some(pake::VERSION.to_string().as_str()) {
        let shown = version.map(|v| crate::text::peer_bytes(&v[..v.len().min(16)]));
        return Err(BadAnnouncement::Version(shown));
    }
    let nameplate: Nameplate = text(nameplate)
        .and_then(|np| np.parse().ok())
        .ok_or(BadAnnouncement::Nameplate)?;
    if port == 0 {
        return Err(BadAnnouncement::Port);
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for ip in ips {
        let addr = SocketAddr::new(ip.to_canonical(), port);
        if usable(addr.ip()) && !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(BadAnnouncement::NoAddress);
    }
    Ok(Announced {
        instance: instance.to_string(),
        nameplate,
        addrs,
    })
}

/// An address a sender can connect to without more context: not unspecified, multicast or
/// broadcast, and not IPv6 link-local (which needs an interface scope the announcement
/// does not carry in a form a socket address can use portably).
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Our own networks first (the path the announcement itself came over), then IPv4, then
/// the rest; loopback last.
fn rank(addrs: &mut [SocketAddr], ours: &[Interface]) {
    addrs.sort_by_key(|a| {
        let lan = crate::meet::candidates::kind_of(*a, ours) == crate::traverse::Kind::Lan;
        (a.ip().is_loopback(), !lan, a.is_ipv6())
    });
}

/// What a sender has seen while browsing for one nameplate: every matching announcement
/// (merged by instance; a second receiver makes them [ambiguous](Sightings::ambiguous)),
/// and counts of the rest.
#[derive(Debug, Clone)]
pub struct Sightings {
    wanted: Nameplate,
    ours: Vec<Interface>,
    found: Vec<Announced>,
    first: Option<Instant>,
    /// Matching announcements from more than one receiver (distinct instances, or one
    /// instance on another port): how many, and when the second was seen.
    rivals: Option<(usize, Instant)>,
    /// Announcements for other nameplates.
    pub others: u64,
    /// Announcements refused by [`read_announcement`].
    pub ignored: u64,
}

impl Sightings {
    /// Looking for `wanted` from a machine with interfaces `ours` (which rank addresses:
    /// see [`crate::meet::candidates::interfaces`]).
    pub fn new(wanted: Nameplate, ours: Vec<Interface>) -> Self {
        Sightings {
            wanted,
            ours,
            found: Vec::new(),
            first: None,
            rivals: None,
            others: 0,
            ignored: 0,
        }
    }

    /// One announcement read at `now`.
    pub fn see(&mut self, now: Instant, read: Result<Announced, BadAnnouncement>) {
        match read {
            Err(bad) => {
                self.ignored += 1;
                tracing::debug!("ignored a LAN announcement: {bad}");
            }
            Ok(seen) if seen.nameplate != self.wanted => self.others += 1,
            Ok(mut seen) => {
                self.first.get_or_insert(now);
                let same = |a: &Announced| {
                    a.instance == seen.instance
                        && a.addrs.first().map(|x| x.port()) == seen.addrs.first().map(|x| x.port())
                };
                let known = self.found.iter().position(same);
                let stored = self.found.len();
                match known {
                    // An update (mDNS sends addresses as it learns them): merge.
                    Some(i) => {
                        let known = &mut self.found[i];
                        for addr in seen.addrs {
                            if !known.addrs.contains(&addr) && known.addrs.len() < MAX_ADDRESSES {
                                known.addrs.push(addr);
                            }
                        }
                        rank(&mut known.addrs, &self.ours);
                    }
                    // A second receiver for the nameplate: ambiguous, whatever comes next,
                    // and judged before anything is dropped, so a flood of impostors cannot
                    // push the real receiver out of what we try. Counted, not stored.
                    None if stored > 0 => {
                        let (count, since) = self.rivals.unwrap_or((1, now));
                        self.rivals = Some((count + 1, since));
                    }
                    None => {
                        seen.addrs.truncate(MAX_ADDRESSES);
                        rank(&mut seen.addrs, &self.ours);
                        self.found.push(seen);
                    }
                }
            }
        }
    }

    /// How many receivers announced the nameplate, when more than one did (two receivers
    /// chose it, or someone impersonates the receiver): the sender must then refuse before
    /// connecting to any of them.
    pub fn ambiguous(&self) -> Option<usize> {
        self.rivals.map(|(count, _)| count)
    }

    /// When to stop browsing: `deadline`, or [`SETTLE`] after the first match (time for a
    /// rival to show itself).
    /// An ambiguity ends it at once: nothing that arrives later can resolve it.
    pub fn until(&self, deadline: Instant) -> Instant {
        if let Some((_, since)) = self.rivals {
            return since.min(deadline);
        }
        self.first
            .map_or(deadline, |first| (first + SETTLE).min(deadline))
    }

    /// The matching announcements.
    pub fn found(&self) -> &[Announced] {
        &self.found
    }

    /// Every address of every matching announcement, at most [`MAX_ADDRESSES`], each
    /// announcement's best first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = Vec::new();
        let longest = self.found.iter().map(|a| a.addrs.len()).max().unwrap_or(0);
        for i in 0..longest {
            for announced in &self.found {
                if let Some(&addr) = announced.addrs.get(i)
                    && !all.contains(&addr)
                {
                    all.push(addr);
                }
            }
        }
        all.truncate(MAX_ADDRESSES);
        all
    }
}

// ---------------------------------------------------------------------------------------
// mDNS: announcing and browsing
// ---------------------------------------------------------------------------------------

/// The mDNS responder and browser: a [`ServiceDaemon`] (its own thread and sockets, port
/// 5353 on every interface, shared with any other responder on the machine). Create it in
/// the network namespace it should serve; it stops when dropped.
pub struct Lan {
    daemon: ServiceDaemon,
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan").finish_non_exhaustive()
    }
}

impl Lan {
    /// Start the responder. Its sockets join the mDNS groups on every interface at once:
    /// do not start it where no multicast may be sent.
    pub fn start() -> Result<Lan, LanError> {
        let daemon = ServiceDaemon::new()?;
        // The responder reports trouble (an interface it cannot send on, a renamed
        // instance) only through its monitor channel: log it. The thread ends with it.
        let monitor = daemon.monitor()?;
        std::thread::Builder::new()
            .name("mdns-monitor".into())
            .spawn(move || {
                while let Ok(event) = monitor.recv() {
                    tracing::debug!("mDNS: {event:?}");
                }
            })
            .map_err(|e| LanError::Mdns(format!("cannot start its monitor: {e}")))?;
        Ok(Lan { daemon })
    }

    /// Announce `nameplate` for a node bound to `local` until the [`Announcement`] is
    /// dropped or withdrawn. A wildcard `local` is announced with the addresses of every
    /// interface (IPv4 only for `0.0.0.0`), each interface telling its own; a specific
    /// one with just that address, on its interface only.
    pub fn announce(
        &self,
        nameplate: &Nameplate,
        local: SocketAddr,
    ) -> Result<Announcement, LanError> {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 4]>());
        let instance = format!("qpunch-{nameplate}-{token}");
        // A random host name: the machine's own is nobody's business, and another
        // responder on this machine may already own it.
        let host = format!("qpunch-{token}.local.");
        let properties = txt(nameplate);
        let info = if local.ip().is_unspecified() {
            let mut info = ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                (),
                local.port(),
                &properties[..],
            )?
            .enable_addr_auto();
            if local.is_ipv4() {
                info.set_interfaces(vec![IfKind::IPv4]);
            }
            info
        } else {
            let mut info = ServiceInfo::new(
                SERVICE_TYPE,
                &instance,
                &host,
                local.ip(),
                local.port(),
                &properties[..],
            )?;
            info.set_interfaces(vec![IfKind::Addr(local.ip())]);
            info
        };
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        tracing::debug!(%fullname, %local, "announcing on the LAN");
        Ok(Announcement {
            daemon: self.daemon.clone(),
            fullname: Some(fullname),
        })
    }

    /// Browse for `nameplate` for up to `timeout`; once one announcement is seen, wait
    /// [`SETTLE`] more for rivals. Returns what was seen; fails with
    /// [`LanError::NotFound`] when no announcement matched.
    pub async fn find(
        &self,
        nameplate: &Nameplate,
        timeout: Duration,
    ) -> Result<Sightings, LanError> {
        let events = self.daemon.browse(SERVICE_TYPE)?;
        let deadline = Instant::now() + timeout;
        let mut sightings =
            Sightings::new(nameplate.clone(), crate::meet::candidates::interfaces());
        loop {
            // Cancel-safe: flume's receive future takes a message only when it returns it.
            let event = tokio::time::timeout_at(sightings.until(deadline), events.recv_async());
            match event.await {
                Err(_) => break,
                Ok(Err(_)) => {
                    let _ = self.daemon.stop_browse(SERVICE_TYPE);
                    return Err(LanError::Mdns("the mDNS responder stopped".into()));
                }
                Ok(Ok(ServiceEvent::ServiceResolved(resolved))) => {
                    let read = read_announcement(
                        &resolved.fullname,
                        resolved.port,
                        resolved.addresses.iter().map(|ip| ip.to_ip_addr()),
                        resolved.get_property_val(TXT_VERSION).flatten(),
                        resolved.get_property_val(TXT_NAMEPLATE).flatten(),
                    );
                    sightings.see(Instant::now(), read);
                }
                Ok(Ok(_)) => {}
            }
        }
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        if let Some(receivers) = sightings.ambiguous() {
            return Err(LanError::Ambiguous {
                nameplate: nameplate.clone(),
                identities: receivers,
            });
        }
        if sightings.found().is_empty() {
            return Err(LanError::NotFound {
                nameplate: nameplate.clone(),
                waited: timeout,
            });
        }
        Ok(sightings)
    }

    /// Stop the responder, saying goodbye for whatever is still announced (waits up to a
    /// second for the goodbyes to go out).
    pub async fn shutdown(&self) {
        if let Ok(status) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Without this the daemon thread (which holds its own command sender) runs on.
        let _ = self.daemon.shutdown();
    }
}

/// A live announcement; withdrawn (with mDNS goodbyes) when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: Option<String>,
}

impl std::fmt::Debug for Announcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcement")
            .field("fullname", &self.fullname)
            .finish_non_exhaustive()
    }
}

impl Announcement {
    /// The instance's full name.
    pub fn fullname(&self) -> &str {
        self.fullname.as_deref().unwrap_or_default()
    }

    /// Withdraw now and wait (up to a second) until the goodbyes are sent.
    pub async fn withdraw(mut self) {
        if let Some(fullname) = self.fullname.take()
            && let Ok(done) = self.daemon.unregister(&fullname)
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
        }
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        if let Some(fullname) = self.fullname.take() {
            let _ = self.daemon.unregister(&fullname);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The meet protocol version an announcement carries today.
    const CURRENT: &[u8] = b"2";
    const _: () = assert!(pake::VERSION == 2, "update CURRENT");

    fn np(s: &str) -> Nameplate {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn announced(
        instance: &str,
        nameplate: &str,
        ips: &[&str],
    ) -> Result<Announced, BadAnnouncement> {
        read_announcement(
            instance,
            9199,
            ips.iter().map(|s| ip(s)),
            Some(CURRENT),
            Some(nameplate.as_bytes()),
        )
    }

    #[test]
    fn txt_round_trips_through_the_reader() {
        let props = txt(&np("42"));
        let get = |key| {
            props
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_bytes())
        };
        let read = read_announcement(
            "qpunch-42-abcd._qpunch._udp.local.",
            9199,
            [ip("198.51.100.7")],
            get(TXT_VERSION),
            get(TXT_NAMEPLATE),
        )
        .unwrap();
        assert_eq!(read.nameplate, np("42"));
        assert_eq!(read.addrs, vec!["198.51.100.7:9199".parse().unwrap()]);
    }

    #[test]
    fn announcements_are_read_strictly() {
        let one = |v: Option<&[u8]>, n: Option<&[u8]>, port, ips: &[&str]| {
            read_announcement("x", port, ips.iter().map(|s| ip(s)), v, n)
        };
        let good = ["198.51.100.7"];
        assert_eq!(
            one(None, Some(b"7"), 1, &good),
            Err(BadAnnouncement::Version(None))
        );
        assert!(matches!(
            one(Some(b"1"), Some(b"7"), 1, &good),
            Err(BadAnnouncement::Version(Some(_)))
        ));
        // The version shown is escaped and short.
        let Err(BadAnnouncement::Version(Some(shown))) = one(
            Some(b"\x1b[2J\x1b]0;pwned\x07 and much more text"),
            Some(b"7"),
            1,
            &good,
        ) else {
            panic!("refused")
        };
        assert!(!shown.chars().any(crate::text::is_unsafe), "{shown:?}");
        assert!(shown.len() < 40, "{shown:?}");
        for bad in [&b""[..], b"7-x", b"\xff", b"seven eight", &[b'1'; 40]] {
            assert_eq!(
                one(Some(CURRENT), Some(bad), 1, &good),
                Err(BadAnnouncement::Nameplate),
                "{bad:?}"
            );
        }
        assert_eq!(
            one(Some(CURRENT), None, 1, &good),
            Err(BadAnnouncement::Nameplate)
        );
        assert_eq!(
            one(Some(CURRENT), Some(b"7"), 0, &good),
            Err(BadAnnouncement::Port)
        );
        let useless = [
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "fe80::1",
            "::",
            "ff02::fb",
        ];
        assert_eq!(
            one(Some(CURRENT), Some(b"7"), 1, &useless),
            Err(BadAnnouncement::NoAddress)
        );
        // Mixed: only the usable ones stay, IPv4-mapped shown as IPv4, no duplicates.
        let read = one(
            Some(CURRENT),
            Some(b"Seven7"),
            5,
            &[
                "fe80::1",
                "::ffff:198.51.100.7",
                "198.51.100.7",
                "2001:db8::7",
            ],
        )
        .unwrap();
        assert_eq!(read.nameplate, np("seven7"));
        assert_eq!(
            read.addrs,
            vec![
                "198.51.100.7:5".parse().unwrap(),
                "[2001:db8::7]:5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn sightings_merge_updates_and_settle_after_the_first_match() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(5);
        let mut seen = Sightings::new(np("7"), Vec::new());
        assert_eq!(seen.until(deadline), deadline);
        seen.see(t0, announced("other", "8", &["198.51.100.8"]));
        seen.see(t0, Err(BadAnnouncement::Port));
        assert_eq!(seen.until(deadline), deadline, "only a match settles");
        let t1 = t0 + Duration::from_millis(100);
        seen.see(t1, announced("a", "7", &["198.51.100.7"]));
        assert_eq!(seen.until(deadline), t1 + SETTLE);
        seen.see(t1, announced("a", "7", &["2001:db8::7", "198.51.100.7"]));
        assert_eq!(
            seen.ambiguous(),
            None,
            "an update of the same receiver is no rival"
        );
        assert_eq!(
            seen.until(deadline),
            t1 + SETTLE,
            "the first match sets the pace"
        );
        assert_eq!((seen.others, seen.ignored), (1, 1));
        // Its best address first, then the next ones.
        let addrs: Vec<String> = seen.addrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["198.51.100.7:9199", "[2001:db8::7]:9199"]);
        // A second receiver for the nameplate ends the browsing at once, ambiguous.
        let t2 = t1 + SETTLE / 2;
        seen.see(t2, announced("b", "7", &["198.51.100.9"]));
        assert_eq!(seen.ambiguous(), Some(2));
        assert_eq!(seen.until(deadline), t2);
        // Near the deadline, the deadline wins.
        let mut late = Sightings::new(np("7"), Vec::new());
        late.see(
            deadline - SETTLE / 3,
            announced("a", "7", &["198.51.100.7"]),
        );
        assert_eq!(late.until(deadline), deadline);
    }

    #[test]
    fn a_flood_of_announcements_is_ambiguous_before_anything_is_dropped() {
        // Twenty impostor announcements, then the real receiver's: the flood cannot push
        // the receiver out of what is tried, because nothing is tried at all.
        let mut seen = Sightings::new(np("7"), Vec::new());
        for i in 0..20 {
            let addr = format!("198.51.100.{i}");
            seen.see(Instant::now(), announced(&format!("i{i}"), "7", &[&addr]));
        }
        seen.see(Instant::now(), announced("real", "7", &["10.0.1.9"]));
        assert_eq!(seen.ambiguous(), Some(21));
        assert_eq!(seen.found().len(), 1, "rivals are counted, not stored");
        // One instance announced again on another port is a second receiver too.
        let mut ports = Sightings::new(np("7"), Vec::new());
        ports.see(Instant::now(), announced("a", "7", &["198.51.100.7"]));
        let moved = read_announcement("a", 9200, [ip("198.51.100.8")], Some(CURRENT), Some(b"7"));
        ports.see(Instant::now(), moved);
        assert_eq!(ports.ambiguous(), Some(2));
        // One announcement with many addresses keeps the first few.
        let many: Vec<String> = (0..40).map(|i| format!("198.51.100.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut one = Sightings::new(np("7"), Vec::new());
        one.see(Instant::now(), announced("a", "7", &many));
        one.see(Instant::now(), announced("a", "7", &["203.0.113.1"]));
        assert_eq!(one.found()[0].addrs.len(), MAX_ADDRESSES);
        assert_eq!(one.ambiguous(), None);
    }

    #[test]
    fn addresses_on_our_networks_come_first_and_loopback_last() {
        let ours = vec![Interface {
            ip: ip("10.0.1.2"),
            prefix: 24,
        }];
        let mut seen = Sightings::new(np("7"), ours);
        seen.see(
            Instant::now(),
            announced(
                "a",
                "7",
                &["127.0.0.1", "2001:db8::7", "198.51.100.7", "10.0.1.9"],
            ),
        );
        let addrs: Vec<String> = seen.addrs().iter().map(|a| a.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "10.0.1.9:9199",
                "198.51.100.7:9199",
                "[2001:db8::7]:9199",
                "127.0.0.1:9199"
            ]
        );
    }
}
