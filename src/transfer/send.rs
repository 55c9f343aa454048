//! The sending side: hash, offer, stream, and wait for the receiver's verdicts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{
    Decision, Decisions, FileHeader, FileOffer, FileReport, FileResult, Manifest, Observer,
    Outcome, TransferError, read_frame, stream_error, write_frame,
};

/// Bytes read from disk per chunk handed to QUIC.
const CHUNK: usize = 1 << 20;
/// Files streamed at the same time on one connection.
const PARALLEL_FILES: usize = 8;
/// Chunks read ahead of the network: bounds the sender's memory per file.
const READ_AHEAD: usize = 4;

/// A file to send and the name to offer for it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The name offered to the receiver (which may still refuse or rename it).
    pub name: String,
    /// Where the bytes are read from.
    pub path: PathBuf,
}

impl Outgoing {
    /// Offer `path` under its own file name.
    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self, TransferError> {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| TransferError::File {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            })?;
        Ok(Outgoing { name, path })
    }
}

/// BLAKE3 of a whole file, memory-mapped and hashed on all cores (so hashing a large
/// file before offering it costs a fraction of sending it).
pub async fn hash_file(path: &Path) -> Result<(u64, String), TransferError> {
    let path = path.to_path_buf();
    let file_error = |path: &Path, source| TransferError::File {
        path: path.display().to_string(),
        source,
    };
    tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&path).map_err(|e| file_error(&path, e))?;
        if !meta.is_file() {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(file_error(&path, e));
        }
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap_rayon(&path)
            .map_err(|e| file_error(&path, e))?;
        Ok((meta.len(), hasher.finalize().to_hex().to_string()))
    })
    .await
    .expect("hashing task panicked")
}

/// Offer `files` on `connection` and stream those the receiver accepts, in parallel.
///
/// Returns one report per file, in order; a file counts as sent only when the receiver
/// confirmed its hash. Connection-level failures (refused sender, lost connection) are
/// errors.
pub async fn send_files(
    connection: &quinn::Connection,
    files: Vec<Outgoing>,
    observer: Arc<dyn Observer>,
) -> Result<Vec<FileReport>, TransferError> {
    if files.len() > super::MAX_FILES {
        return Err(TransferError::protocol(format!(
            "at most {} files per send",
            super::MAX_FILES
        )));
    }
    let hashing = std::time::Instant::now();
    let mut offers = Vec::with_capacity(files.len());
    for (id, file) in files.iter().enumerate() {
        let size = std::fs::metadata(&file.path).map_or(0, |m| m.len());
        observer.hashing(id as u32, &file.name, size);
        let (size, blake3) = hash_file(&file.path).await?;
        offers.push(FileOffer {
            id: id as u32,
            name: file.name.clone(),
            size,
            blake3,
        });
    }

    tracing::debug!(elapsed = ?hashing.elapsed(), files = offers.len(), "hashed");
    let (mut control_send, mut control_recv) = connection.open_bi().await.map_err(stream_error)?;
    write_frame(
        &mut control_send,
        &Manifest {
            files: offers.clone(),
        },
    )
    .await?;
    let Decisions { decisions } = read_frame(&mut control_recv).await?;
    if decisions.len() != offers.len() {
        return Err(TransferError::protocol(
            "receiver answered for a different number of files",
        ));
    }

    let mut reports: Vec<Option<FileReport>> = vec![None; offers.len()];
    let mut tasks = tokio::task::JoinSet::new();
    // A few files at a time: enough to overlap one file's tail with the next one's
    // start, without thousands of open files and read-ahead buffers at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL_FILES));
    for (offer, decision) in offers.into_iter().zip(decisions) {
        match decision {
            Decision::Accept { id, offset } if id == offer.id && offset <= offer.size => {
                let connection = connection.clone();
                let path = files[id as usize].path.clone();
                let observer = observer.clone();
                let slots = slots.clone();
                tasks.spawn(async move {
                    let _slot = slots
                        .acquire_owned()
                        .await
                        .expect("semaphore is never closed");
                    let result = send_one(&connection, &path, &offer, offset, &*observer).await;
                    (offer, result)
                });
            }
            Decision::Decline { id, reason } if id == offer.id => {
                let reason = crate::text::peer(&reason);
                let report = FileReport::new(&offer, None, Outcome::Declined(reason));
                observer.finished(&report);
                reports[offer.id as usize] = Some(report);
            }
            other => {
                return Err(TransferError::protocol(format!(
                    "unexpected decision {other:?} for file {}",
                    offer.id
                )));
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        let (offer, result) = joined.expect("send task panicked");
        let report = match result {
            // Everything in a verdict is the receiver's text: escaped before anyone sees it.
            Ok(result) if result.verified && result.blake3 == offer.blake3 => {
                let saved_as = result.saved_as.as_deref().map(crate::text::peer);
                FileReport::new(&offer, saved_as, Outcome::Verified)
            }
            Ok(result) => {
                let why = result.error.as_deref().map_or_else(
                    || "receiver could not verify the file".into(),
                    crate::text::peer,
                );
                FileReport::new(&offer, None, Outcome::Failed(why))
            }
            // Losing the connection fails every file still in flight: report it once, as
            // the connection error, rather than as many per-file failures.
            Err(TransferError::Connection(e)) => return Err(TransferError::Connection(e)),
            Err(TransferError::NotAllowed(e)) => return Err(TransferError::NotAllowed(e)),
            Err(e) => FileReport::new(&offer, None, Outcome::Failed(e.to_string())),
        };
        observer.finished(&report);
        reports[offer.id as usize] = Some(report);
    }
    // Tell the receiver this batch is over; it may be serving more.
    let _ = control_send.finish();
    Ok(reports
        .into_iter()
        .map(|r| r.expect("every file reported"))
        .collect())
}

/// Stream one accepted file from `offset` and read the receiver's verdict.
async fn send_one(
    connection: &quinn::Connection,
    path: &Path,
    offer: &FileOffer,
    offset: u64,
    observer: &dyn Observer,
) -> Result<FileResult, TransferError> {
    let file = std::fs::File::open(path).map_err(|source| TransferError::File {
        path: path.display().to_string(),
        source,
    })?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(stream_error)?;
    write_frame(
        &mut send,
        &FileHeader {
            id: offer.id,
            offset,
        },
    )
    .await?;
    observer.started(offer.id, &offer.name, offer.size);

    // Disk reads run on a blocking thread, a few chunks ahead, so the QUIC thread only
    // packetizes and encrypts.
    let (chunks, mut next) = tokio::sync::mpsc::channel(READ_AHEAD);
    let length = offer.size - offset;
    tokio::task::spawn_blocking(move || read_chunks(file, offset, length, chunks));
    while let Some(chunk) = next.recv().await {
        let chunk = chunk.map_err(|source| TransferError::File {
            path: path.display().to_string(),
            source,
        })?;
        let n = chunk.len() as u64;
        send.write_chunk(chunk).await.map_err(stream_error)?;
        observer.progress(offer.id, n);
    }
    send.finish()
        .map_err(|e| TransferError::protocol(e.to_string()))?;
    let result: FileResult = read_frame(&mut recv).await?;
    if result.id != offer.id {
        return Err(TransferError::protocol("verdict for a different file"));
    }
    Ok(result)
}

/// Blocking: read `length` bytes from `offset` in [`CHUNK`]s into `out`. A file that
/// ends early (it shrank since it was hashed) is an error: the receiver would reject it.
fn read_chunks(
    mut file: std::fs::File,
    offset: u64,
    length: u64,
    out: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    use std::io::{Read, Seek};
    let mut remaining = length;
    let result = (|| {
        file.seek(std::io::SeekFrom::Start(offset))?;
        while remaining > 0 {
            let want = CHUNK.min(remaining as usize);
            let mut buf = Vec::with_capacity(want);
            let n = (&mut file).take(want as u64).read_to_end(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file changed while sending",
                ));
            }
            remaining -= n as u64;
            if out.blocking_send(Ok(Bytes::from(buf))).is_err() {
                return Ok(()); // the sending side gave up
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = out.blocking_send(Err(e));
    }
}
