//! The accepted files of one batch, handed from the decision to the file streams.
//!
//! Destinations are reserved after the decisions are sent: for ten thousand files that is
//! tens of milliseconds (a folder made per folder, a name booked per file) the sender
//! would otherwise wait for before its first byte. The reservation publishes its plans
//! a chunk at a time, in the manifest's order (the order the sender sends in), so the
//! first bundle is stored as soon as its own names are booked, while the rest are still
//! being booked. A stream that names a file not yet published waits for it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::FileOffer;
use super::reserve::Reservation;

/// An accepted file: where it goes, what it must hash to, and whether it resumes.
pub(super) struct Plan {
    pub(super) offer: FileOffer,
    /// Its destination, or why none could be had. A file without one was accepted
    /// before that was known: it fails when it arrives, before anything of it is written.
    pub(super) reservation: Result<Reservation, String>,
    pub(super) resume: bool,
}

impl Plan {
    /// Where the file goes, or why it cannot be stored.
    pub(super) fn dest(&self) -> Result<&Path, String> {
        match &self.reservation {
            Ok(reservation) => Ok(reservation.dest()),
            Err(e) => Err(format!("cannot store it: {e}")),
        }
    }
}

/// Accepted files not yet seen on any stream, published as their destinations are
/// reserved.
#[derive(Default)]
pub(super) struct Plans {
    map: Mutex<HashMap<u32, Plan>>,
    /// More plans may still be published.
    reserving: AtomicBool,
    published: Notify,
    /// Run once between `take`'s two looks (the flag, the map): where a race would be.
    #[cfg(test)]
    between_looks: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Plans {
    /// Plans to come: [`Publishing::publish`] them, then drop the handle (which a
    /// reservation that panics does too: the streams are never left waiting).
    pub(super) fn reserving(self: &std::sync::Arc<Self>) -> Publishing {
        self.reserving.store(true, Ordering::SeqCst);
        Publishing(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Plan>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plans may still be published.
    pub(super) fn publishing(&self) -> bool {
        self.reserving.load(Ordering::SeqCst)
    }

    /// Every plan has been published and taken.
    pub(super) fn none_left(&self) -> bool {
        // In this order: a plan published before the flag falls is in the map.
        !self.reserving.load(Ordering::SeqCst) && self.lock().is_empty()
    }

    /// The plan for `id`, waiting while it may still be published. `None`: not accepted,
    /// or already taken. Cancel-safe: a plan is removed only when it is returned.
    pub(super) async fn take(&self, id: u32) -> Option<Plan> {
        loop {
            // Registered before looking, so a publication in between is not missed.
            let published = self.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            // The flag first: a plan published before it fell is in the map by then (the
            // other order could miss one published, and the flag lowered, in between).
            let more = self.reserving.load(Ordering::SeqCst);
            #[cfg(test)]
            if let Some(between) = self.between_looks.lock().unwrap().take() {
                between();
            }
            if let Some(plan) = self.lock().remove(&id) {
                return Some(plan);
            }
            if !more {
                return None;
            }
            published.await;
        }
    }

    /// Give back a plan taken for a stream that could not carry it.
    pub(super) fn put_back(&self, plan: Plan) {
        self.lock().insert(plan.offer.id, plan);
    }

    /// Wait until every plan is published (cancel-safe).
    pub(super) async fn all_published(&self) {
        loop {
            let published = self.published.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            if !self.reserving.load(Ordering::SeqCst) {
                return;
            }
            published.await;
        }
    }

    /// Take every plan left, once all are published.
    pub(super) async fn drain(&self) -> Vec<Plan> {
        self.all_published().await;
        self.lock().drain().map(|(_, plan)| plan).collect()
    }
}

/// The reservation's handle on [`Plans`]; publishing ends when it is dropped.
pub(super) struct Publishing(std::sync::Arc<Plans>);

impl Publishing {
    /// Make `plans` available to the streams. They are made before, not while the map is
    /// locked: a stream looking for its plan never waits for the disk.
    pub(super) fn publish(&self, plans: Vec<Plan>) {
        self.0
            .lock()
            .extend(plans.into_iter().map(|plan| (plan.offer.id, plan)));
        self.0.published.notify_waiters();
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        self.0.reserving.store(false, Ordering::SeqCst);
        self.0.published.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn plan(id: u32) -> Plan {
        Plan {
            offer: FileOffer {
                id,
                ..FileOffer::default()
            },
            reservation: Err("test".into()),
            resume: false,
        }
    }

    #[tokio::test]
    async fn a_stream_waits_for_its_plan_and_learns_when_none_will_come() {
        let plans = Arc::new(Plans::default());
        let publishing = plans.reserving();
        assert!(!plans.none_left(), "more may come");
        let waiting = {
            let plans = plans.clone();
            tokio::spawn(async move { plans.take(7).await.map(|p| p.offer.id) })
        };
        let stranger = {
            let plans = plans.clone();
            tokio::spawn(async move { plans.take(99).await.map(|p| p.offer.id) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished() && !stranger.is_finished());
        publishing.publish(vec![plan(1), plan(7)]);
        assert_eq!(waiting.await.unwrap(), Some(7));
        assert!(!stranger.is_finished(), "99 may still be published");
        assert!(!plans.none_left());
        drop(publishing);
        assert_eq!(stranger.await.unwrap(), None);
        assert!(!plans.none_left(), "1 is left");
        assert_eq!(plans.take(1).await.map(|p| p.offer.id), Some(1));
        assert!(plans.none_left());
        assert_eq!(plans.take(1).await.map(|p| p.offer.id), None, "taken once");
    }

    #[tokio::test]
    async fn drain_waits_for_the_last_publication() {
        let plans = Arc::new(Plans::default());
        let publishing = plans.reserving();
        publishing.publish(vec![plan(1)]);
        let draining = {
            let plans = plans.clone();
            tokio::spawn(async move { plans.drain().await.len() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!draining.is_finished(), "more may come");
        std::thread::spawn(move || {
            publishing.publish(vec![plan(2), plan(3)]);
        })
        .join()
        .unwrap();
        assert_eq!(draining.await.unwrap(), 3);
    }

    /// The last plan is published, and publishing ends, while a stream is looking for
    /// it (between its two looks): the stream still gets it.
    #[tokio::test]
    async fn a_plan_published_last_is_never_missed() {
        let plans = Arc::new(Plans::default());
        let publishing = plans.reserving();
        *plans.between_looks.lock().unwrap() = Some(Box::new(move || {
            publishing.publish(vec![plan(1)]);
            drop(publishing);
        }));
        assert_eq!(plans.take(1).await.map(|p| p.offer.id), Some(1));
        assert!(plans.none_left());
    }
}
