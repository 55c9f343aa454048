//! How many guesses at its codes a receiver gives away: at most [`MAX_GUESSES`] in any
//! [`WINDOW`], however many addresses the guessers use.
//!
//! Every pairing on a code hands the joiner the receiver's sealed hello, which it can try
//! to open under its one guess of the words, offline. So a pairing that does not end with
//! the joiner's own hello opening under our keys (it did not know the code) is a guess
//! given away, whatever else happens to it: a wrong code, a peer that gives up, a peer that
//! vanishes. A rendezvous cannot bound this (a guesser has many addresses, and thousands of
//! honest users share one behind a carrier-grade NAT), so the receiver does: once the
//! budget is spent it opens no new code until the oldest guess leaves the window, and says
//! so. With the words' 16 bits that is a chance of at most 5 in 65,536 an hour: about a
//! year of continuous guessing for even odds (ln 2 x 65,536 / 5 = ~9,100 hours).
//!
//! Sans-IO: time comes in as `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Guesses a receiver gives away in any [`WINDOW`].
pub const MAX_GUESSES: usize = 5;
/// The sliding window of [`MAX_GUESSES`].
pub const WINDOW: Duration = Duration::from_secs(3600);

/// The guesses given away in the last [`WINDOW`].
#[derive(Debug, Clone)]
pub struct GuessBudget {
    max: usize,
    window: Duration,
    spent: VecDeque<Instant>,
}

impl Default for GuessBudget {
    fn default() -> Self {
        GuessBudget::new(MAX_GUESSES, WINDOW)
    }
}

impl GuessBudget {
    /// At most `max` guesses in any `window`.
    pub fn new(max: usize, window: Duration) -> Self {
        GuessBudget {
            max,
            window,
            spent: VecDeque::with_capacity(max),
        }
    }

    /// A guess was given away at `now`.
    pub fn spend(&mut self, now: Instant) {
        self.forget(now);
        self.spent.push_back(now);
    }

    /// How long to wait from `now` before another code may be opened (`None`: at once).
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.forget(now);
        if self.spent.len() < self.max {
            return None;
        }
        let oldest = *self.spent.front()?;
        Some((oldest + self.window).saturating_duration_since(now))
    }

    /// Guesses given away in the window ending at `now`.
    pub fn spent(&mut self, now: Instant) -> usize {
        self.forget(now);
        self.spent.len()
    }

    fn forget(&mut self, now: Instant) {
        while self
            .spent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            self.spent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_guesses_then_a_wait_until_the_oldest_leaves_the_window() {
        let t0 = Instant::now();
        let mut budget = GuessBudget::default();
        for i in 0..MAX_GUESSES as u64 {
            assert_eq!(budget.wait(t0 + Duration::from_secs(i * 60)), None);
            budget.spend(t0 + Duration::from_secs(i * 60));
        }
        let now = t0 + Duration::from_secs(300);
        assert_eq!(budget.wait(now), Some(WINDOW - Duration::from_secs(300)));
        // The first guess leaves the window: one more code, then wait for the second.
        let later = t0 + WINDOW;
        assert_eq!(budget.wait(later), None);
        budget.spend(later);
        assert_eq!(budget.wait(later), Some(Duration::from_secs(60)));
        assert_eq!(budget.spent(later), MAX_GUESSES);
    }

    #[test]
    fn the_bound_holds_in_every_window() {
        // Open a code whenever allowed, and lose every one of them at once: never more than
        // MAX_GUESSES in any hour, over a simulated day.
        let t0 = Instant::now();
        let mut budget = GuessBudget::default();
        let mut now = t0;
        let mut given = Vec::new();
        while now < t0 + Duration::from_secs(24 * 3600) {
            match budget.wait(now) {
                None => {
                    budget.spend(now);
                    given.push(now);
                    now += Duration::from_secs(1);
                }
                Some(wait) => now += wait,
            }
        }
        for (i, &start) in given.iter().enumerate() {
            let in_window = given[i..]
                .iter()
                .take_while(|&&t| t < start + WINDOW)
                .count();
            assert!(
                in_window <= MAX_GUESSES,
                "{in_window} guesses within an hour"
            );
        }
        assert_eq!(
            given.len(),
            24 * MAX_GUESSES,
            "and the budget is used, not lost"
        );
    }
}
