//! Where the default gateway is: the router a port mapping is asked of.
//!
//! PCP and NAT-PMP are spoken to the default gateway only (RFC 6887 §8.1, RFC 6886 §3):
//! a port mapping from any other box would not be on the path to the internet. UPnP finds
//! its device by multicast instead, but on the same network.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

/// The IPv4 default gateway of this host, from the kernel's routing table (Linux).
pub fn default_gateway_v4() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&table)
}

/// Our own address toward `gateway`: the one the gateway sees, which PCP must name and a
/// UPnP mapping must point at. Connecting a UDP socket sends nothing; it asks the kernel
/// which source address it would use.
pub fn local_toward(gateway: IpAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match gateway {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect((gateway, crab_nat::GATEWAY_PORT)).ok()?;
    let local = socket.local_addr().ok()?.ip();
    (!local.is_unspecified()).then_some(local)
}

/// The gateway of the default route with the lowest metric in `/proc/net/route`'s format:
/// a header line, then `Iface Destination Gateway Flags RefCnt Use Metric Mask ...` with
/// addresses as little-endian hex. Malformed lines are skipped.
pub fn parse_route_table(table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(fields.get(i)?, 16).ok();
            let (destination, gateway, flags) = (hex(1)?, hex(2)?, hex(3)?);
            let metric: u32 = fields.get(6)?.parse().ok()?;
            let mask = hex(7)?;
            let default = destination == 0 && mask == 0;
            let usable = flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
            // The table holds the address in network order read as a host-order word.
            let gateway = Ipv4Addr::from(gateway.swap_bytes());
            (default && usable && !gateway.is_unspecified()).then_some((metric, gateway))
        })
        .min_by_key(|&(metric, _)| metric)
        .map(|(_, gateway)| gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = format!(
            "{HEADER}\
             eth0\t00000000\t0101000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
             wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
             eth0\t0001000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
        );
        assert_eq!(parse_route_table(&table), Some(Ipv4Addr::new(10, 0, 1, 1)));
    }

    #[test]
    fn no_usable_default_route_is_none() {
        // Only a link route, a default route that is down, and garbage.
        let table = format!(
            "{HEADER}\
             eth0\t0001000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
             eth0\t00000000\t0101000A\t0002\t0\t0\t100\t00000000\t0\t0\t0\n\
             what\tever\n\
             eth0\t00000000\tZZZZ\t0003\t0\t0\t1\t00000000\t0\t0\t0\n"
        );
        assert_eq!(parse_route_table(&table), None);
        assert_eq!(parse_route_table(""), None);
    }
}
