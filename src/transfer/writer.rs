//! The disk side of one large file being received: the network side queues batches of
//! bytes, and one blocking job at a time appends them to the partial ([`Part::write`]
//! checks them on the way), draining the queue before it gives its disk slot back.
//!
//! Why not one disk job per batch, awaited before the next is handed over: every hand-off
//! between threads costs a wake-up, and on two cores kept busy by both ends of a transfer
//! a woken thread waits for a core: ~0.1 ms for a job to start and ~0.15 ms for its end
//! to be noticed, measured on loopback. A 256 MiB file arrives in 1,024 batches, so ~280
//! ms of a 0.5 s transfer went to those waits while the disk thread idled, and the sender
//! sat blocked on flow control with the receiver's 16 MiB window full. Here the job runs
//! as long as batches are queued, and the network side is woken only when half of its
//! queue ([`QUEUED`]) has been written, so a wake-up that takes a millisecond still finds
//! the disk busy.
//!
//! Background syncs ([`Part::sync_due`]) start from the job as the file grows, one at a
//! time, so the final fsync waits only for the last stretch.
//!
//! Memory: a stream queues at most [`QUEUED`] bytes (plus the batch being written), and
//! all streams of the receiver together at most [`super::store::DISK_QUEUE`].

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::store::{Disk, Part};

/// Bytes one stream queues for the disk before its network side waits.
pub(crate) const QUEUED: usize = 4 << 20;

/// Bytes one run of the job writes before it queues itself again behind other disk jobs,
/// so that a file whose network keeps its queue full cannot keep a disk slot to itself.
const RUN: usize = 16 << 20;

/// Appends queued batches to a [`Part`] on the blocking pool.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    disk: Disk,
}

struct Shared {
    state: Mutex<State>,
    /// Half the queue was written, the queue drained, a sync ended, or an error.
    changed: Notify,
    /// The runtime, for the job to start syncs and its next run from a blocking thread.
    runtime: tokio::runtime::Handle,
}

struct State {
    /// Batches in order, each with its room in the receiver's disk queue.
    queue: VecDeque<(Vec<Bytes>, OwnedSemaphorePermit)>,
    /// Bytes in `queue`.
    queued: usize,
    /// The part while no job holds it.
    part: Option<Part>,
    /// A background sync is running.
    syncing: bool,
    /// The first write or sync error; nothing is written after it.
    failed: Option<io::Error>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing is left half-updated under this lock: every change is a few fields.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Writer {
    /// A writer appending to `part`. Must be called within a tokio runtime.
    pub(crate) fn new(part: Part, disk: Disk) -> Self {
        Writer {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    queued: 0,
                    part: Some(part),
                    syncing: false,
                    failed: None,
                }),
                changed: Notify::new(),
                runtime: tokio::runtime::Handle::current(),
            }),
            disk,
        }
    }

    /// Queue `batch` for the disk, waiting while this stream has [`QUEUED`] bytes ahead
    /// of it or the receiver's disk queue is full. An earlier write or sync failed: its
    /// error, and `batch` is dropped.
    ///
    /// Cancel-safe: dropped while waiting, it queues nothing, and what was queued before
    /// is still written.
    pub(crate) async fn push(&mut self, batch: Vec<Bytes>) -> io::Result<()> {
        let len: usize = batch.iter().map(Bytes::len).sum();
        loop {
            // Registered before the check, so a change in between is not missed.
            let changed = self.shared.changed.notified();
            {
                let mut state = self.shared.lock();
                if let Some(e) = state.failed.take() {
                    return Err(e);
                }
                if state.queued < QUEUED {
                    break;
                }
            }
            changed.await;
        }
        let room = self.disk.queue_room(len).await;
        let mut state = self.shared.lock();
        if let Some(e) = state.failed.take() {
            return Err(e);
        }
        state.queue.push_back((batch, room));
        state.queued += len;
        if let Some(part) = state.part.take() {
            drop(state);
            start(self.shared.clone(), self.disk.clone(), part);
        }
        Ok(())
    }

    /// Wait until everything queued is written and no sync is running; the part back,
    /// with the first error seen (after which nothing more was written).
    pub(crate) async fn finish(self) -> (Part, io::Result<()>) {
        loop {
            let changed = self.shared.changed.notified();
            {
                let mut state = self.shared.lock();
                if state.part.is_some() && !state.syncing {
                    let part = state.part.take().expect("checked");
                    return (part, state.failed.take().map_or(Ok(()), Err));
                }
            }
            changed.await;
        }
    }
}

/// Start a run of the job (once a disk slot is free).
fn start(shared: Arc<Shared>, disk: Disk, part: Part) {
    let _runtime = shared.runtime.clone().enter();
    let next = disk.clone();
    drop(disk.spawn(move || drain(shared, next, part)));
}

/// The job: write what is queued, in order, until the queue is empty, an error, or
/// [`RUN`] bytes; then hand the part back (or queue the next run).
fn drain(shared: Arc<Shared>, disk: Disk, mut part: Part) {
    let mut ran = 0;
    loop {
        let (batch, room) = {
            let mut state = shared.lock();
            if state.queue.is_empty() {
                state.part = Some(part);
                drop(state);
                shared.changed.notify_waiters();
                return;
            }
            if ran >= RUN {
                drop(state);
                start(shared, disk, part);
                return;
            }
            state.queue.pop_front().expect("not empty")
        };
        let len: usize = batch.iter().map(Bytes::len).sum();
        // A panic would otherwise keep the part, and the network side waiting for it,
        // forever; the part's own state still says what it has verified and written.
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| part.write(&batch)))
            .unwrap_or_else(|_| Err(io::Error::other("the disk job panicked")));
        drop((batch, room));
        ran += len;
        let mut state = shared.lock();
        state.queued -= len;
        let failed = match written {
            Ok(()) if state.syncing => None,
            Ok(()) => match part.sync_due() {
                Some(Ok(file)) => {
                    state.syncing = true;
                    sync(shared.clone(), &disk, file);
                    None
                }
                Some(Err(e)) => Some(e),
                None => None,
            },
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            state.failed.get_or_insert(e);
            state.queue.clear();
            state.queued = 0;
            state.part = Some(part);
            drop(state);
            shared.changed.notify_waiters();
            return;
        }
        let wake = state.queued <= QUEUED / 2;
        drop(state);
        if wake {
            shared.changed.notify_waiters();
        }
    }
}

/// `fdatasync` a second handle on the partial in the background. Its error is never
/// dropped: the sync shares the file's open description, so an error it saw would not be
/// reported again by the final fsync.
fn sync(shared: Arc<Shared>, disk: &Disk, file: std::fs::File) {
    let _runtime = shared.runtime.clone().enter();
    drop(disk.spawn(move || {
        let synced = file.sync_data();
        let mut state = shared.lock();
        state.syncing = false;
        if let Err(e) = synced {
            state.failed.get_or_insert(e);
        }
        drop(state);
        shared.changed.notify_waiters();
    }));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::transfer::store::{Disk, Part, partial_dir};
    use crate::transfer::tree::{GROUP, Tree, verified_prefix};

    /// How long a push that should be held back is given to (wrongly) complete.
    const HELD: Duration = Duration::from_millis(200);

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    /// `data` cut into batches of uneven pieces, as the network hands them over.
    fn batches(data: &[u8]) -> Vec<Vec<Bytes>> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut n = 0;
        while at < data.len() {
            let mut batch = Vec::new();
            for _ in 0..16 {
                let len = (1000 + n * 7919 % 30_000).min(data.len() - at);
                n += 1;
                batch.push(Bytes::copy_from_slice(&data[at..at + len]));
                at += len;
                if at == data.len() {
                    break;
                }
            }
            out.push(batch);
        }
        out
    }

    /// Everything pushed arrives in order, across background syncs and across the runs
    /// a long file is written in, and the part's hash is the whole file's.
    #[tokio::test]
    async fn batches_are_written_in_order_across_syncs_and_runs() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let part = Part::create(&dir, "abc").unwrap();
        let path = part.path().to_path_buf();
        // More than one background sync (every 32 MiB) and two runs (16 MiB each).
        let whole = data(40 << 20, 3);
        let mut writer = Writer::new(part, Disk::default());
        for batch in batches(&whole) {
            writer.push(batch).await.unwrap();
        }
        let (part, written) = writer.finish().await;
        written.unwrap();
        assert_eq!(part.offset(), whole.len() as u64);
        let (hash, synced) = part.finish(false);
        synced.unwrap();
        assert_eq!(hash, blake3::hash(&whole).to_hex().as_str());
        assert!(
            std::fs::read(&path).unwrap() == whole,
            "the bytes on disk differ"
        );
    }

    /// A stream whose disk does not keep up waits once [`QUEUED`] bytes are queued, and
    /// goes on once they are written.
    #[tokio::test]
    async fn a_stream_waits_once_its_queue_is_full() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let disk = Disk::default();
        let slots = disk.hold_every_slot().await;
        let mut writer = Writer::new(Part::create(&dir, "abc").unwrap(), disk);
        let batch = Bytes::from(data(256 << 10, 1));
        for _ in 0..QUEUED / batch.len() {
            let push = writer.push(vec![batch.clone()]);
            tokio::time::timeout(HELD, push).await.unwrap().unwrap();
        }
        let push = writer.push(vec![batch.clone()]);
        assert!(
            tokio::time::timeout(HELD, push).await.is_err(),
            "a full queue took one more batch"
        );
        drop(slots);
        let push = writer.push(vec![batch.clone()]);
        tokio::time::timeout(Duration::from_secs(10), push)
            .await
            .expect("the queue never drained")
            .unwrap();
        let (part, written) = writer.finish().await;
        written.unwrap();
        assert_eq!(part.offset(), (QUEUED + batch.len()) as u64);
    }

    /// The receiver's disk queue is shared: a stream with nothing queued of its own
    /// still waits when other streams hold the whole budget.
    #[tokio::test]
    async fn streams_share_the_receivers_disk_queue() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let disk = Disk::with_queue(1 << 20);
        let slots = disk.hold_every_slot().await;
        let mut first = Writer::new(Part::create(&dir, "a").unwrap(), disk.clone());
        let mut second = Writer::new(Part::create(&dir, "b").unwrap(), disk.clone());
        let batch = Bytes::from(data(512 << 10, 2));
        for _ in 0..2 {
            let push = first.push(vec![batch.clone()]);
            tokio::time::timeout(HELD, push).await.unwrap().unwrap();
        }
        let push = second.push(vec![batch.clone()]);
        assert!(
            tokio::time::timeout(HELD, push).await.is_err(),
            "the shared queue took more than its budget"
        );
        drop(slots);
        let push = second.push(vec![batch.clone()]);
        tokio::time::timeout(Duration::from_secs(10), push)
            .await
            .expect("the budget never came back")
            .unwrap();
        for writer in [first, second] {
            let (_, written) = writer.finish().await;
            written.unwrap();
        }
    }

    /// A resumed file whose bytes do not match the sender's tree: the error comes back,
    /// nothing queued after it is written, and only the verified prefix is on disk.
    #[tokio::test]
    async fn a_bad_group_stops_the_writing_and_keeps_only_what_is_proven() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let good = data(4 * GROUP as usize, 4);
        let tree = Arc::new(Tree::from_data(&good));
        let path = dir.join("resumed.part");
        std::fs::write(&path, b"").unwrap();
        let part = Part::resume(&path, tree.clone()).unwrap();
        let mut writer = Writer::new(part, Disk::default());
        let mut bad = good.clone();
        bad[GROUP as usize + 100] ^= 1;
        let mut failed = None;
        for batch in batches(&bad) {
            if let Err(e) = writer.push(batch).await {
                failed = Some(e);
                break;
            }
        }
        let (part, written) = writer.finish().await;
        let e = failed
            .or(written.err())
            .expect("the bad group was not reported");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Bytes of the bad group that came before it was complete were written (nothing
        // knew them bad yet), nothing after it: a resume keeps only the proven group.
        let written = part.offset() as usize;
        assert!(
            written >= GROUP as usize && written < 2 * GROUP as usize,
            "{written}"
        );
        drop(part);
        assert!(std::fs::read(&path).unwrap() == bad[..written]);
        assert_eq!(verified_prefix(&tree, &path).unwrap(), GROUP);
    }
}
