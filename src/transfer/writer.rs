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
//! Memory: each batch is one contiguous buffer of its own (the network side copies what
//! it reads into it), so what is queued is exactly what is counted: at most [`QUEUED`]
//! bytes per stream, and [`super::store::DISK_QUEUE`] for the whole receiver.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::store::{Disk, Part};

/// Bytes one stream may have queued for the disk.
pub(crate) const QUEUED: usize = 4 << 20;

/// Bytes one run of the job writes at most before it queues itself again behind other
/// disk jobs; it gives its slot back sooner when another job waits for one.
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
    queue: VecDeque<(Bytes, OwnedSemaphorePermit)>,
    /// Bytes in `queue`.
    queued: usize,
    /// Bytes in the partial file.
    written: u64,
    /// The part while no job holds it.
    part: Option<Part>,
    /// A background sync is running.
    syncing: bool,
    /// The first write or sync error; nothing is written after it.
    failed: Option<io::Error>,
    /// A written batch's buffer, for the network side's next batch: a fresh buffer of a
    /// few hundred KiB per batch costs the allocator fresh pages to fault in and zero
    /// (0.03 s of a 0.45 s 256 MiB transfer, measured).
    spare: Option<BytesMut>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing is left half-updated under this lock: every change is a few fields.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand the part back (no job holds it any more) and wake the network side.
    fn put_back(&self, mut state: MutexGuard<'_, State>, part: Part) {
        state.part = Some(part);
        drop(state);
        self.changed.notify_waiters();
    }
}

impl State {
    /// Drop what is queued and not written yet, giving its room back.
    fn drop_queue(&mut self) {
        self.queue.clear();
        self.queued = 0;
    }

    /// Record the first error and drop what is queued: nothing is written after it.
    fn fail(&mut self, e: io::Error) {
        self.failed.get_or_insert(e);
        self.drop_queue();
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
                    written: part.offset(),
                    part: Some(part),
                    syncing: false,
                    failed: None,
                    spare: None,
                }),
                changed: Notify::new(),
                runtime: tokio::runtime::Handle::current(),
            }),
            disk,
        }
    }

    /// An empty buffer of at least `capacity` bytes for the next batch: a written one
    /// back from the disk when there is one.
    pub(crate) fn buffer(&self, capacity: usize) -> BytesMut {
        match self.shared.lock().spare.take() {
            Some(mut spare) if spare.capacity() >= capacity => {
                spare.clear();
                spare
            }
            _ => BytesMut::with_capacity(capacity),
        }
    }

    /// Bytes in the partial file so far (what is queued is not there yet).
    pub(crate) fn written(&self) -> u64 {
        self.shared.lock().written
    }

    /// Queue `batch` for the disk, waiting while this stream's queue has no room for it
    /// ([`QUEUED`]) or the receiver's disk queue is full. An earlier write or sync
    /// failed: its error, and `batch` is dropped.
    ///
    /// Cancel-safe: dropped while waiting, it queues nothing, and what was queued before
    /// is still written.
    pub(crate) async fn push(&mut self, batch: Bytes) -> io::Result<()> {
        loop {
            // Registered before the check, so a change in between is not missed.
            let changed = self.shared.changed.notified();
            {
                let mut state = self.shared.lock();
                if let Some(e) = state.failed.take() {
                    return Err(e);
                }
                if state.queued == 0 || state.queued + batch.len() <= QUEUED {
                    break;
                }
            }
            changed.await;
        }
        let room = self.disk.queue_room(batch.len()).await;
        let mut state = self.shared.lock();
        if let Some(e) = state.failed.take() {
            return Err(e);
        }
        state.queued += batch.len();
        state.queue.push_back((batch, room));
        if let Some(part) = state.part.take() {
            drop(state);
            start(self.shared.clone(), self.disk.clone(), part);
        }
        Ok(())
    }

    /// Drop what is queued and not written yet (the transfer is being given up in a
    /// hurry, e.g. to a takeover); [`finish`](Self::finish) then waits only for the
    /// batch being written.
    pub(crate) fn abandon(&self) {
        self.shared.lock().drop_queue();
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
    let holding = Holding {
        shared,
        part: Some(part),
    };
    let next = disk.clone();
    drop(disk.spawn(move || drain(holding, next)));
}

/// The part, held by a run of the job. Dropped still holding it (the job panicked, or
/// the runtime dropped a run that never started), it hands the part back with an error,
/// so that nobody waits for it forever.
struct Holding {
    shared: Arc<Shared>,
    part: Option<Part>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(part) = self.part.take() {
            let mut state = self.shared.lock();
            state.fail(io::Error::other("the disk job ended early"));
            self.shared.put_back(state, part);
        }
    }
}

/// The job: write what is queued, in order, until the queue is empty, an error, or the
/// end of its run; then hand the part back (or queue the next run).
fn drain(mut holding: Holding, disk: Disk) {
    let shared = holding.shared.clone();
    let mut ran = 0;
    loop {
        let (batch, room) = {
            let mut state = shared.lock();
            if state.queue.is_empty() || state.failed.is_some() {
                state.drop_queue();
                // An idle stream holds no spare buffer.
                state.spare = None;
                let part = holding.part.take().expect("held");
                shared.put_back(state, part);
                return;
            }
            if ran >= RUN || (ran > 0 && disk.others_waiting()) {
                drop(state);
                let part = holding.part.take().expect("held");
                start(shared.clone(), disk, part);
                return;
            }
            let (batch, room) = state.queue.pop_front().expect("not empty");
            state.queued -= batch.len();
            (batch, room)
        };
        let part = holding.part.as_mut().expect("held");
        let written = part.write(&batch);
        ran += batch.len();
        // The batch's room in the receiver's queue is given back once it is written.
        drop(room);
        let mut state = shared.lock();
        if state.spare.is_none() {
            state.spare = batch.try_into_mut().ok();
        }
        state.written = part.offset();
        let (failed, due) = match written {
            Ok(()) if state.syncing => (None, None),
            Ok(()) => match part.sync_due() {
                Some(Ok(file)) => {
                    state.syncing = true;
                    (None, Some(file))
                }
                Some(Err(e)) => (Some(e), None),
                None => (None, None),
            },
            Err(e) => (Some(e), None),
        };
        if let Some(e) = failed {
            state.fail(e);
            let part = holding.part.take().expect("held");
            shared.put_back(state, part);
            return;
        }
        let wake = state.queued <= QUEUED / 2;
        // Started without the lock: a runtime shutting down drops the job at once, and
        // its guard takes the lock.
        drop(state);
        if let Some(file) = due {
            sync(shared.clone(), &disk, file);
        }
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
    // Ends the sync in the state however the job ends, even if it never runs.
    let syncing = Syncing {
        shared,
        result: Err(io::Error::other("the background sync never ran")),
    };
    drop(disk.spawn(move || {
        let mut syncing = syncing;
        syncing.result = file.sync_data();
    }));
}

/// A background sync; dropped, it records its result and wakes the network side.
struct Syncing {
    shared: Arc<Shared>,
    result: io::Result<()>,
}

impl Drop for Syncing {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.syncing = false;
        if let Err(e) = std::mem::replace(&mut self.result, Ok(())) {
            state.fail(e);
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }
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

    /// What `wait` gives at once (within [`HELD`]): it must not wait.
    async fn now<T>(wait: impl Future<Output = T>) -> T {
        tokio::time::timeout(HELD, wait)
            .await
            .expect("waited with nothing to wait for")
    }

    /// Whether `wait` is still waiting after [`HELD`] (it is dropped then).
    async fn held<T>(wait: impl Future<Output = T>) -> bool {
        tokio::time::timeout(HELD, wait).await.is_err()
    }

    /// What `wait` gives once let go; `never` is the failure when it does not end.
    async fn soon<T>(wait: impl Future<Output = T>, never: &str) -> T {
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect(never)
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    /// `data` cut into batches of uneven sizes, as the network side hands them over.
    fn batches(data: &[u8]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut n = 0;
        while at < data.len() {
            let len = (100_000 + n * 7919 % 300_000).min(data.len() - at);
            n += 1;
            out.push(Bytes::copy_from_slice(&data[at..at + len]));
            at += len;
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
        // A background sync (every 32 MiB) and three runs (16 MiB each).
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
            now(writer.push(batch.clone())).await.unwrap();
        }
        assert!(
            held(writer.push(batch.clone())).await,
            "a full queue took one more batch"
        );
        drop(slots);
        soon(writer.push(batch.clone()), "the queue never drained")
            .await
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
            now(first.push(batch.clone())).await.unwrap();
        }
        assert!(
            held(second.push(batch.clone())).await,
            "the shared queue took more than its budget"
        );
        drop(slots);
        soon(second.push(batch.clone()), "the budget never came back")
            .await
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
    /// A write error while the network side waits for room wakes it with the error,
    /// and what was queued behind the error is dropped, not written.
    #[tokio::test]
    async fn a_write_error_wakes_a_waiting_push() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let good = data(24 * GROUP as usize, 6);
        let tree = Arc::new(Tree::from_data(&good));
        let path = dir.join("resumed.part");
        std::fs::write(&path, b"").unwrap();
        let disk = Disk::default();
        let slots = disk.hold_every_slot().await;
        let mut writer = Writer::new(Part::resume(&path, tree).unwrap(), disk);
        let mut bad = good.clone();
        bad[100] ^= 1;
        let mut pieces = bad.chunks(GROUP as usize).map(Bytes::copy_from_slice);
        let blocked = loop {
            let piece = pieces.next().expect("the queue never filled");
            if held(writer.push(piece.clone())).await {
                break piece;
            }
        };
        drop(slots);
        let pushed = soon(
            writer.push(blocked),
            "the error never woke the waiting push",
        )
        .await;
        let e = pushed.expect_err("a push after the error was taken");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let (part, _) = writer.finish().await;
        assert_eq!(part.offset(), 0, "bytes after the bad group were written");
    }

    /// Abandoned (a takeover), a writer drops what is queued at once: nothing of it is
    /// written, and its room in the receiver's queue comes back.
    #[tokio::test]
    async fn an_abandoned_queue_is_dropped_and_its_room_returned() {
        let out = tempfile::tempdir().unwrap();
        let dir = partial_dir(out.path()).unwrap();
        let disk = Disk::with_queue(2 << 20);
        let slots = disk.hold_every_slot().await;
        let mut writer = Writer::new(Part::create(&dir, "abc").unwrap(), disk.clone());
        let batch = Bytes::from(data(512 << 10, 7));
        for _ in 0..4 {
            now(writer.push(batch.clone())).await.unwrap();
        }
        writer.abandon();
        let room = disk.queue_room(2 << 20);
        assert!(!held(room).await, "the abandoned batches kept their room");
        drop(slots);
        let (part, written) = writer.finish().await;
        written.unwrap();
        assert_eq!(part.offset(), 0, "abandoned batches were written");
    }
}
