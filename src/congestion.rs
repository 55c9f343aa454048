//! The choice of congestion controller, beside the controller of our own ([`crate::bbr`]).
//!
//! A node takes one [`Congestion`] for all its connections; the command line's `--cc` parses
//! into it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The congestion controller of a node's connections: how fast a sender may send.
///
/// Only the *sending* side's controller matters for a transfer: it decides how much data
/// is in flight; the receiver's only paces its acknowledgements and verdicts.
///
/// The default is [`Congestion::Bbr`], [`crate::bbr`]'s delivery-rate BBR: of the four it
/// is the fastest on a long lossy path and the only one that does not overfill the
/// bottleneck. The loss-based controllers take random loss for congestion and collapse, as
/// kernel TCP cubic does; quinn's BBR keeps the link busy but several bandwidth-delay
/// products in flight, and loses much of what it sends. The measurements (and how to repeat
/// them, `benches/path.rs`) are in `docs/performance.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Congestion {
    /// BBR as in [`crate::bbr`]: models the bottleneck rate (from delivery rates) and RTT,
    /// keeps about one bandwidth-delay product in flight, and does not back off on random
    /// loss.
    #[default]
    Bbr,
    /// quinn's own BBR (a port of BBRv1, "experimental" upstream), for comparison: it
    /// overfills the bottleneck (see [`crate::bbr`] for why).
    QuinnBbr,
    /// CUBIC (quinn's own default): loss-based, cuts its window on every loss episode.
    Cubic,
    /// NewReno: the classic loss-based controller (halves its window on loss).
    NewReno,
}

impl Congestion {
    /// Every controller, in the order tools list them.
    pub const ALL: [Congestion; 4] = [
        Congestion::Bbr,
        Congestion::QuinnBbr,
        Congestion::Cubic,
        Congestion::NewReno,
    ];

    /// The name used on the command line: `bbr`, `cubic` or `newreno`.
    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Bbr => "bbr",
            Congestion::QuinnBbr => "quinn-bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        }
    }

    /// A quinn factory building this controller for each new connection.
    pub(crate) fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            Congestion::Bbr => Arc::new(crate::bbr::BbrConfig),
            Congestion::QuinnBbr => Arc::new(BbrConfig::default()),
            Congestion::Cubic => Arc::new(CubicConfig::default()),
            Congestion::NewReno => Arc::new(NewRenoConfig::default()),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`Congestion::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown congestion controller {0:?}: expected bbr, quinn-bbr, cubic or newreno")]
pub struct UnknownCongestion(pub String);

impl FromStr for Congestion {
    type Err = UnknownCongestion;

    /// `bbr`, `quinn-bbr`, `cubic`, `newreno` (also `new-reno` and `reno`), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "quinn-bbr" | "quinnbbr" => Ok(Congestion::QuinnBbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            _ => Err(UnknownCongestion(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_and_aliases_are_accepted() {
        for cc in Congestion::ALL {
            assert_eq!(cc.as_str().parse::<Congestion>(), Ok(cc));
            assert_eq!(cc.to_string().to_uppercase().parse::<Congestion>(), Ok(cc));
        }
        assert_eq!("reno".parse::<Congestion>(), Ok(Congestion::NewReno));
        let err = "vegas".parse::<Congestion>().unwrap_err();
        assert!(err.to_string().contains("\"vegas\""), "{err}");
    }
}
