//! Token buckets for answering strangers: how many probe replies a source (and everyone
//! together) may get per second.
//!
//! A listening peer answers every valid probe, and probes are unauthenticated UDP: the
//! source address can be forged. Padding already keeps a reply from being larger than its
//! probe (no amplification), but without a limit a peer would still reflect traffic 1:1 at a
//! victim, on the QUIC driver's thread. So each source gets a small bucket, and a global
//! bucket caps the total whatever the number of sources.
//!
//! Sans-IO like the rest of the punch layer: the caller passes `now`, nothing here reads a
//! clock or touches a socket. Memory is bounded: at most [`RateConfig::max_sources`] buckets
//! are tracked; when that many sources are active at once, newcomers share one overflow
//! bucket (a flood of forged sources then competes only with itself and the global cap).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits for one [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Replies one source may get in a burst.
    pub per_source_burst: u32,
    /// Replies per second one source earns back.
    pub per_source_rate: f64,
    /// Replies everyone together may get in a burst.
    pub global_burst: u32,
    /// Replies per second for everyone together.
    pub global_rate: f64,
    /// Most sources tracked at once (bounds memory: a bucket is a few dozen bytes).
    pub max_sources: usize,
}

impl Default for RateConfig {
    /// A punching peer sends about a dozen probes in ten seconds and nat-check a handful, so
    /// 32 at once and 16 per second leave honest traffic untouched while a flood from one
    /// source is cut to 16 replies a second.
    fn default() -> Self {
        RateConfig {
            per_source_burst: 32,
            per_source_rate: 16.0,
            global_burst: 2048,
            global_rate: 2048.0,
            max_sources: 4096,
        }
    }
}

/// One token bucket: `tokens` refills at `rate` per second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(burst),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: u32) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.updated = now;
    }

    fn take(&mut self, now: Instant, rate: f64, burst: u32) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full by `now`: its source has been quiet long enough
    /// that forgetting it changes nothing.
    fn idle(&self, now: Instant, rate: f64, burst: u32) -> bool {
        let missing = f64::from(burst) - self.tokens;
        now.saturating_duration_since(self.updated) >= Duration::from_secs_f64(missing / rate)
    }
}

/// Per-source and global token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    sources: HashMap<IpAddr, Bucket>,
    /// IPv6 /48s: one site may hold 65,536 /64s, each of them a source, so a site together
    /// gets [`SITE_SHARE`] sources' worth; without it one site could drain the global
    /// budget for everyone.
    sites: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
    global: Bucket,
}

/// How many sources' worth of tokens one IPv6 /48 gets in all.
pub const SITE_SHARE: u32 = 8;

/// The IPv6 /48 of `ip`, if it is IPv6 (an IPv4 address is its own source: thousands of
/// users may share one behind a carrier-grade NAT, so nothing wider is grouped).
fn site_key(ip: IpAddr) -> Option<IpAddr> {
    let ip = ip.to_canonical();
    ip.is_ipv6().then(|| prefix(ip, 48))
}

impl RateLimiter {
    /// A limiter with full buckets at `now`.
    pub fn new(config: RateConfig, now: Instant) -> Self {
        RateLimiter {
            config,
            sources: HashMap::new(),
            sites: HashMap::new(),
            overflow: Bucket::full(config.per_source_burst, now),
            global: Bucket::full(config.global_burst, now),
        }
    }

    /// Whether `source` may get one more reply at `now`; takes a token when it may.
    ///
    /// Sources are keyed by IP address, not port (a port is free to change), and IPv6
    /// sources by their /64, the unit one host usually owns.
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        let c = self.config;
        // The global cap is checked first but only spent when the source may go too, so
        // a flooding source cannot drain it on behalf of everyone else.
        self.global.refill(now, c.global_rate, c.global_burst);
        if self.global.tokens < 1.0 {
            return false;
        }
        let (site_burst, site_rate) = (
            c.per_source_burst.saturating_mul(SITE_SHARE),
            c.per_source_rate * f64::from(SITE_SHARE),
        );
        let site = site_key(source);
        if let Some(site) = site {
            if !self.sites.contains_key(&site) && self.sites.len() >= c.max_sources {
                self.sites
                    .retain(|_, b| !b.idle(now, site_rate, site_burst));
            }
            // A site that cannot be tracked (the table is full of active sites) is held by
            // its sources' buckets and the global one only.
            if let Some(bucket) = self.sites.get_mut(&site) {
                bucket.refill(now, site_rate, site_burst);
                if bucket.tokens < 1.0 {
                    return false;
                }
            }
        }
        let key = source_key(source);
        if !self.sources.contains_key(&key) && self.sources.len() >= c.max_sources {
            self.forget_idle(now);
        }
        let bucket = if self.sources.len() < c.max_sources || self.sources.contains_key(&key) {
            self.sources
                .entry(key)
                .or_insert_with(|| Bucket::full(c.per_source_burst, now))
        } else {
            &mut self.overflow
        };
        if !bucket.take(now, c.per_source_rate, c.per_source_burst) {
            return false;
        }
        if let Some(site) = site
            && (self.sites.len() < c.max_sources || self.sites.contains_key(&site))
        {
            let bucket = self
                .sites
                .entry(site)
                .or_insert_with(|| Bucket::full(site_burst, now));
            bucket.tokens -= 1.0;
        }
        self.global.tokens -= 1.0;
        true
    }

    /// Sources currently tracked (for tests and stats).
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    fn forget_idle(&mut self, now: Instant) {
        let (rate, burst) = (self.config.per_source_rate, self.config.per_source_burst);
        self.sources.retain(|_, b| !b.idle(now, rate, burst));
    }
}

/// The identity a budget is kept for: the IPv4 address, or the IPv6 /64 (shared with
/// [`crate::server`]'s per-source connection limit).
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    let ip = ip.to_canonical();
    if ip.is_ipv6() { prefix(ip, 64) } else { ip }
}

/// `ip` with only its first `bits` bits kept (IPv4-mapped IPv6 counts as IPv4): the
/// network a budget or a comparison is kept for.
pub(crate) fn prefix(ip: IpAddr, bits: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(bits.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(bits.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn count(l: &mut RateLimiter, now: Instant, src: &str, n: usize) -> usize {
        (0..n).filter(|_| l.allow(now, ip(src))).count()
    }

    #[test]
    fn prefixes_keep_their_leading_bits() {
        assert_eq!(prefix(ip("198.51.100.77"), 24), ip("198.51.100.0"));
        assert_eq!(prefix(ip("::ffff:198.51.100.77"), 24), ip("198.51.100.0"));
        assert_eq!(prefix(ip("2001:db8:1:2:3::9"), 48), ip("2001:db8:1::"));
        assert_eq!(prefix(ip("2001:db8:1:2ff::9"), 56), ip("2001:db8:1:200::"));
        assert_eq!(prefix(ip("2001:db8::1"), 0), ip("::"));
        assert_eq!(prefix(ip("192.0.2.1"), 32), ip("192.0.2.1"));
        assert_eq!(source_key(ip("2001:db8:1:2:3::9")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(RateConfig::default(), t0);
        assert_eq!(count(&mut l, t0, "192.0.2.1", 1000), 32);
        // Half a second earns 8 more, not a fresh burst.
        assert_eq!(
            count(&mut l, t0 + Duration::from_millis(500), "192.0.2.1", 1000),
            8
        );
        // Another source is untouched by the first one's flood.
        assert_eq!(count(&mut l, t0, "192.0.2.2", 5), 5);
    }

    #[test]
    fn ipv6_sources_share_their_64_and_mapped_ipv4_is_ipv4() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(RateConfig::default(), t0);
        assert_eq!(count(&mut l, t0, "2001:db8:1:2::1", 20), 20);
        assert_eq!(count(&mut l, t0, "2001:db8:1:2:ffff::9", 20), 12);
        assert_eq!(count(&mut l, t0, "2001:db8:1:3::1", 1), 1);
        assert_eq!(count(&mut l, t0, "192.0.2.7", 30), 30);
        assert_eq!(count(&mut l, t0, "::ffff:192.0.2.7", 30), 2);
    }

    #[test]
    fn one_ipv6_site_gets_a_few_sources_worth_whatever_its_64s() {
        let t0 = Instant::now();
        let config = RateConfig {
            global_burst: 1_000_000,
            ..RateConfig::default()
        };
        let mut l = RateLimiter::new(config, t0);
        // 1,000 /64s of one /48, each asking for its whole burst.
        let site: usize = (0..1000u16)
            .map(|n| count(&mut l, t0, &format!("2001:db8:7:{n:x}::1"), 32))
            .sum();
        assert_eq!(site, 32 * SITE_SHARE as usize);
        // Its own /64s are cut off; another /48 and IPv4 are not.
        assert_eq!(count(&mut l, t0, "2001:db8:7:ffff::1", 1), 0);
        assert_eq!(count(&mut l, t0, "2001:db8:8::1", 32), 32);
        assert_eq!(count(&mut l, t0, "192.0.2.1", 32), 32);
        // It earns back at the site's rate.
        let later = t0 + Duration::from_secs(1);
        let back: usize = (0..100u16)
            .map(|n| count(&mut l, later, &format!("2001:db8:7:{n:x}::2"), 32))
            .sum();
        assert_eq!(back, 16 * SITE_SHARE as usize);
    }

    #[test]
    fn global_cap_holds_across_many_sources() {
        let t0 = Instant::now();
        let config = RateConfig {
            global_burst: 100,
            global_rate: 10.0,
            ..RateConfig::default()
        };
        let mut l = RateLimiter::new(config, t0);
        let allowed: usize = (0..50)
            .map(|i| count(&mut l, t0, &format!("198.51.100.{i}"), 10))
            .sum();
        assert_eq!(allowed, 100);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(count(&mut l, later, "203.0.113.1", 100), 10);
    }

    #[test]
    fn a_flooding_source_does_not_spend_the_global_budget() {
        let t0 = Instant::now();
        let config = RateConfig {
            global_burst: 40,
            ..RateConfig::default()
        };
        let mut l = RateLimiter::new(config, t0);
        assert_eq!(count(&mut l, t0, "192.0.2.1", 10_000), 32);
        assert_eq!(count(&mut l, t0, "192.0.2.2", 8), 8);
    }

    #[test]
    fn tracked_sources_are_bounded_and_idle_ones_forgotten() {
        let t0 = Instant::now();
        let config = RateConfig {
            max_sources: 10,
            global_burst: 1_000_000,
            ..RateConfig::default()
        };
        let mut l = RateLimiter::new(config, t0);
        let first: usize = (0..100)
            .map(|i| count(&mut l, t0, &format!("10.0.0.{i}"), 1))
            .sum();
        // Ten sources got buckets of their own; the other ninety shared one burst of 32.
        assert_eq!(first, 10 + 32);
        assert_eq!(l.tracked(), 10);
        assert_eq!(
            count(&mut l, t0, "10.0.1.1", 5),
            0,
            "overflow bucket is empty"
        );
        // Once the tracked ones have been quiet long enough, newcomers get buckets again.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(count(&mut l, later, "10.0.2.1", 32), 32);
        assert!(l.tracked() <= 10);
    }
}
