//! How a meeting looks for its path, chosen from both sides' NAT mapping behaviour.
//!
//! Pure: [`choose`] maps our mapping, the peer's (from its sealed hello) and the
//! [`MeetConfig`] to a [`Strategy`]; [`super::session`] runs it. Ordinary simultaneous
//! punching always runs; what changes with the NATs:
//!
//! | ours  | theirs | birthday on our side                       | patience                |
//! |-------|--------|--------------------------------------------|-------------------------|
//! | easy  | easy   | none                                       | the punch's own timeout |
//! | easy  | hard   | [`BirthdayRole::Hunt`]: probe random ports | the punch's own timeout |
//! | hard  | easy   | [`BirthdayRole::Hold`]: many sockets       | the punch's own timeout |
//! | hard  | hard   | none (nobody can predict a port)           | `hard_pair_timeout`     |
//!
//! "Hard" is [`Mapping::is_hard`]: a new public address per destination, so the peer
//! cannot learn ours from the rendezvous. An unknown mapping is tried as easy.

use std::time::Duration;

use crate::nat::Mapping;
use crate::traverse::TraverseConfig;

/// How a meeting punches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeetConfig {
    /// The simultaneous punch (pacing, backoff, and its 12 s deadline).
    pub traverse: TraverseConfig,
    /// Sockets the hard side holds open toward the easy side in birthday mode.
    pub birthday_sockets: usize,
    /// How long two hard NATs keep trying ordinary punching before giving up (they
    /// almost never meet; a port-preserving "symmetric" NAT sometimes does).
    pub hard_pair_timeout: Duration,
    /// How long a confirmed sender may take to connect (its ticket's lifetime).
    pub ticket_ttl: Duration,
    /// How the connection's paths are probed and chosen.
    pub paths: crate::path::PathConfig,
}

impl Default for MeetConfig {
    fn default() -> Self {
        MeetConfig {
            traverse: TraverseConfig::default(),
            birthday_sockets: 256,
            hard_pair_timeout: Duration::from_secs(5),
            ticket_ttl: Duration::from_secs(60),
            paths: crate::path::PathConfig::default(),
        }
    }
}

/// This side's part in the birthday technique, when exactly one NAT is hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthdayRole {
    /// We are easy, they are hard: hunt for one of their mappings by probing random
    /// ports of their public address.
    Hunt,
    /// We are hard, they are easy: hold this many mappings (sockets) open toward them.
    Hold {
        /// Sockets to open.
        sockets: usize,
    },
}

/// What one side does after the hellos are swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    /// The birthday technique alongside ordinary punching, or `None`.
    pub birthday: Option<BirthdayRole>,
    /// How long to wait for the first path (and again for the other technique, when one
    /// gave up early).
    pub patience: Duration,
}

/// The strategy for our NAT mapping `ours` against the peer's `theirs`.
pub fn choose(ours: Mapping, theirs: Mapping, config: &MeetConfig) -> Strategy {
    let birthday = match (ours.is_hard(), theirs.is_hard()) {
        (false, true) => Some(BirthdayRole::Hunt),
        (true, false) => Some(BirthdayRole::Hold {
            sockets: config.birthday_sockets,
        }),
        _ => None,
    };
    let patience = if ours.is_hard() && theirs.is_hard() {
        config.hard_pair_timeout
    } else {
        config.traverse.timeout
    };
    Strategy { birthday, patience }
}

/// [`choose`], knowing whether either side offered a port its router forwards: a mapped
/// port takes probes from anyone, so ordinary punching toward it works whatever both NATs
/// do, and neither side needs the birthday technique or the hard pair's short patience.
pub fn choose_with(ours: Mapping, theirs: Mapping, mapped: bool, config: &MeetConfig) -> Strategy {
    if mapped {
        return Strategy {
            birthday: None,
            patience: config.traverse.timeout,
        };
    }
    choose(ours, theirs, config)
}

/// What to tell the user when no path was found, by the two mappings.
pub fn advice(ours: Mapping, theirs: Mapping) -> &'static str {
    if ours.is_hard() && theirs.is_hard() {
        "Both NATs give every destination a new port, so neither side can predict the \
         other's: a relay is needed (this rendezvous does not relay; `qpunch rendezvous` \
         relays unless started with --no-relay)."
    } else {
        "Something between the peers drops the probes (a firewall, or UDP blocked): a relay \
         is needed (this rendezvous does not relay; `qpunch rendezvous` relays unless \
         started with --no-relay)."
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Mapping::*;

    #[test]
    fn the_nat_matrix() {
        let config = MeetConfig {
            birthday_sockets: 77,
            hard_pair_timeout: Duration::from_secs(3),
            ..MeetConfig::default()
        };
        let punch = config.traverse.timeout;
        let hard = config.hard_pair_timeout;
        assert_ne!(punch, hard, "the table must tell the two timeouts apart");
        let hold = Some(BirthdayRole::Hold { sockets: 77 });
        let hunt = Some(BirthdayRole::Hunt);
        let all = [
            None,
            EndpointIndependent,
            AddressDependent,
            AddressAndPortDependent,
            Unknown,
        ];
        // One row per (ours, theirs): the birthday role and the patience.
        #[rustfmt::skip]
        let table = [
            // ours: no NAT at all
            (None, None, Option::None, punch),
            (None, EndpointIndependent, Option::None, punch),
            (None, AddressDependent, hunt, punch),
            (None, AddressAndPortDependent, hunt, punch),
            (None, Unknown, Option::None, punch),
            // ours: endpoint-independent
            (EndpointIndependent, None, Option::None, punch),
            (EndpointIndependent, EndpointIndependent, Option::None, punch),
            (EndpointIndependent, AddressDependent, hunt, punch),
            (EndpointIndependent, AddressAndPortDependent, hunt, punch),
            (EndpointIndependent, Unknown, Option::None, punch),
            // ours: address-dependent (hard)
            (AddressDependent, None, hold, punch),
            (AddressDependent, EndpointIndependent, hold, punch),
            (AddressDependent, AddressDependent, Option::None, hard),
            (AddressDependent, AddressAndPortDependent, Option::None, hard),
            (AddressDependent, Unknown, hold, punch),
            // ours: symmetric (hard)
            (AddressAndPortDependent, None, hold, punch),
            (AddressAndPortDependent, EndpointIndependent, hold, punch),
            (AddressAndPortDependent, AddressDependent, Option::None, hard),
            (AddressAndPortDependent, AddressAndPortDependent, Option::None, hard),
            (AddressAndPortDependent, Unknown, hold, punch),
            // ours: unknown, tried as easy
            (Unknown, None, Option::None, punch),
            (Unknown, EndpointIndependent, Option::None, punch),
            (Unknown, AddressDependent, hunt, punch),
            (Unknown, AddressAndPortDependent, hunt, punch),
            (Unknown, Unknown, Option::None, punch),
        ];
        assert_eq!(table.len(), all.len() * all.len(), "every pair once");
        for (ours, theirs, birthday, patience) in table {
            assert_eq!(
                choose(ours, theirs, &config),
                Strategy { birthday, patience },
                "ours {ours:?}, theirs {theirs:?}"
            );
        }
        // The two sides of a pair agree: one hunts exactly when the other holds.
        for ours in all {
            for theirs in all {
                let (a, b) = (choose(ours, theirs, &config), choose(theirs, ours, &config));
                assert_eq!(a.patience, b.patience, "{ours:?} {theirs:?}");
                assert_eq!(
                    a.birthday == hunt,
                    b.birthday == hold,
                    "{ours:?} {theirs:?}"
                );
            }
        }
    }

    #[test]
    fn a_mapped_port_makes_every_pair_punch_plainly() {
        let config = MeetConfig::default();
        let all = [
            Mapping::None,
            EndpointIndependent,
            AddressDependent,
            AddressAndPortDependent,
            Unknown,
        ];
        for ours in all {
            for theirs in all {
                let plain = Strategy {
                    birthday: Option::None,
                    patience: config.traverse.timeout,
                };
                assert_eq!(choose_with(ours, theirs, true, &config), plain);
                assert_eq!(
                    choose_with(ours, theirs, false, &config),
                    choose(ours, theirs, &config)
                );
            }
        }
    }

    #[test]
    fn advice_names_the_cause() {
        assert!(advice(AddressAndPortDependent, AddressDependent).contains("Both NATs"));
        for (ours, theirs) in [
            (EndpointIndependent, AddressAndPortDependent),
            (AddressDependent, EndpointIndependent),
            (Unknown, Unknown),
        ] {
            assert!(
                advice(ours, theirs).contains("drops the probes"),
                "{ours:?} {theirs:?}"
            );
        }
    }
}
