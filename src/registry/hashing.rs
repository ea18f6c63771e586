//! Hashing an upload beside its write.
//!
//! Receiving and storing a body takes one core; hashing it takes about as much again. Done in
//! turn, a push runs at the speed of both added up; done side by side — the hash on a thread of
//! its own — at the speed of the slower one. The pieces are shared with the write, not copied.
//!
//! The hashing runs on a dedicated OS thread per large write, not on a tokio task (a woken task
//! is run on the waking worker first, so the hash and the write took turns on one core) and not
//! on tokio's blocking pool (a write waiting for its file operations there, while every blocking
//! thread is taken by hashes waiting for that write's bytes, would deadlock). At most
//! [`MAX_THREADS`] run at once; a write beyond them, and a write shorter than a batch, hashes its
//! pieces as they pass.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tokio::sync::{mpsc, oneshot};

use crate::oci::UploadHasher;

/// Bytes handed to a hashing thread at once: one wake-up per batch, not per piece (a piece is
/// often a few KiB, and waking another core for each cost about 0.2 CPU-s per GB). Small enough
/// that the pieces waiting to be hashed (at most `QUEUE + 1` batches) add little memory.
const BATCH: usize = 256 * 1024;

/// Batches a body may run ahead of its hashing: two keep the hashing thread busy (four were no
/// faster, measured) and pin less of the connection's read buffers.
const QUEUE: usize = 2;

/// Hashing threads at most, across all writes.
const MAX_THREADS: usize = 64;

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The hash of a body, once the body has been read to its end: `None` when it was not (the
/// write failed, and its hash does not count).
pub(super) type Hashed = oneshot::Receiver<UploadHasher>;

/// `body`, its pieces also fed to `hasher` — beside the write when it is announced as at least a
/// batch long (or not announced), else in passing.
pub(super) fn hash_alongside<S, E>(
    body: S,
    hasher: UploadHasher,
    size_hint: Option<u64>,
) -> (impl Stream<Item = Result<Bytes, E>>, Hashed)
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let large = size_hint.is_none_or(|n| n >= BATCH as u64);
    let (sink, hashed) = match large.then(ThreadSlot::take).flatten() {
        Some(slot) => Sink::beside(hasher, slot),
        None => Sink::in_passing(hasher),
    };
    let body =
        futures_util::stream::unfold((Box::pin(body), Some(sink)), |(mut body, mut sink)| async move {
            match body.next().await {
                Some(Ok(bytes)) => {
                    if let Some(sink) = &mut sink {
                        sink.feed(&bytes).await;
                    }
                    Some((Ok(bytes), (body, sink)))
                }
                Some(Err(e)) => Some((Err(e), (body, sink))),
                None => {
                    if let Some(sink) = sink.take() {
                        sink.finish().await;
                    }
                    None
                }
            }
        });
    // Fused: a writer polling again after the end gets the end again.
    (body.fuse(), hashed)
}

/// Where a body's pieces go to be hashed.
enum Sink {
    /// To a thread of their own, in batches.
    Beside { queue: mpsc::Sender<ToThread>, batch: Vec<Bytes>, batched: usize },
    /// Through the hasher as they pass.
    InPassing { hasher: UploadHasher, done: oneshot::Sender<UploadHasher> },
}

/// What a hashing thread is sent. Only `End` makes it hand its hasher over: a body dropped
/// before its end has no hash.
enum ToThread {
    Batch(Vec<Bytes>),
    End,
}

impl Sink {
    fn in_passing(hasher: UploadHasher) -> (Self, Hashed) {
        let (done, hashed) = oneshot::channel();
        (Sink::InPassing { hasher, done }, hashed)
    }

    fn beside(hasher: UploadHasher, slot: ThreadSlot) -> (Self, Hashed) {
        let (done, hashed) = oneshot::channel();
        let (queue, mut received) = mpsc::channel(QUEUE);
        let mut on_thread = hasher.clone();
        let spawned = std::thread::Builder::new().name("berth-hash".into()).spawn(move || {
            let _slot = slot;
            while let Some(message) = received.blocking_recv() {
                match message {
                    ToThread::Batch(batch) => batch.iter().for_each(|piece| on_thread.update(piece)),
                    ToThread::End => {
                        let _ = done.send(on_thread);
                        return;
                    }
                }
            }
        });
        match spawned {
            Ok(_) => (Sink::Beside { queue, batch: Vec::new(), batched: 0 }, hashed),
            Err(e) => {
                tracing::warn!(error = %e, "could not start a hashing thread; hashing in passing");
                Sink::in_passing(hasher)
            }
        }
    }

    async fn feed(&mut self, bytes: &Bytes) {
        match self {
            Sink::Beside { queue, batch, batched } => {
                *batched += bytes.len();
                batch.push(bytes.clone());
                if *batched >= BATCH {
                    // Fails only if the thread is gone, which `Hashed` reports.
                    let _ = queue.send(ToThread::Batch(std::mem::take(batch))).await;
                    *batched = 0;
                }
            }
            Sink::InPassing { hasher, .. } => hasher.update(bytes),
        }
    }

    async fn finish(self) {
        match self {
            Sink::Beside { queue, batch, .. } => {
                if !batch.is_empty() {
                    let _ = queue.send(ToThread::Batch(batch)).await;
                }
                let _ = queue.send(ToThread::End).await;
            }
            Sink::InPassing { hasher, done } => {
                let _ = done.send(hasher);
            }
        }
    }
}

/// One of the [`MAX_THREADS`] hashing threads, given back when dropped.
struct ThreadSlot;

impl ThreadSlot {
    fn take() -> Option<Self> {
        THREADS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_THREADS).then_some(n + 1))
            .ok()
            .map(|_| ThreadSlot)
    }
}

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        THREADS.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces_of(data: &[u8]) -> Vec<Result<Bytes, std::io::Error>> {
        let mut pieces = Vec::new();
        let mut at = 0;
        for size in [1usize, 7, 300_000, 65_521, BATCH + 3, 1_000_000].iter().cycle() {
            if at >= data.len() {
                break;
            }
            let end = (at + size).min(data.len());
            pieces.push(Ok(Bytes::copy_from_slice(&data[at..end])));
            at = end;
        }
        pieces
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashing_beside_or_in_passing_sees_every_piece_in_order() {
        let data: Vec<u8> = (0..9_000_017u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let mut resumed = UploadHasher::default();
        resumed.update(b"earlier chunk ");
        let mut expected = resumed.clone();
        expected.update(&data);
        // Unannounced and long (a thread), and announced short (in passing).
        for hint in [None, Some(100)] {
            let (body, hashed) =
                hash_alongside(futures_util::stream::iter(pieces_of(&data)), resumed.clone(), hint);
            let received: Vec<u8> = body.map(|p| p.unwrap().to_vec()).concat().await;
            assert_eq!(received, data, "the body passes through unchanged");
            assert_eq!(hashed.await.unwrap().digest(), expected.digest(), "{hint:?}");
        }
        assert_eq!(THREADS.load(Ordering::Acquire), 0, "the thread gave its slot back");
    }

    #[tokio::test]
    async fn a_body_not_read_to_its_end_has_no_hash() {
        let data = vec![7u8; 3 * BATCH];
        for hint in [None, Some(10)] {
            let (body, hashed) =
                hash_alongside(futures_util::stream::iter(pieces_of(&data)), UploadHasher::default(), hint);
            let mut body = Box::pin(body);
            body.next().await.unwrap().unwrap();
            drop(body);
            assert!(hashed.await.is_err(), "{hint:?}");
        }
    }
}
