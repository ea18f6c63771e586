//! How upload bodies reach disk on the filesystem backend.
//!
//! The request's task copies each piece of the body as it arrives into a staging buffer (the
//! body is hashed beside it, `registry::hashing`); full buffers are written by blocking tasks,
//! two at a time, while the next one fills. So the only hand-offs between threads are one per
//! buffer (one per 2 MiB), not one per network read — on a virtual machine each wake-up of
//! another thread is expensive.
//!
//! Large bodies are written with `O_DIRECT`, past the page cache: a buffered write costs the
//! kernel about as much CPU as hashing the bytes (page allocation, the copy, dirty tracking and
//! later reclaim), and with `fsync` on — the default — the push waits for the device anyway.
//! `O_DIRECT` needs buffers, lengths and offsets aligned to the device's block size (4 KiB covers
//! common devices): a write that resumes inside a block first reads that block's head back, and
//! the last block is padded — the file is truncated to the bytes written at the end.
//! docs/benchmarks.md has the measurements behind the sizes below.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memmap2::MmapMut;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{FsOptions, Hold};

/// Alignment of buffers, lengths and offsets for direct I/O.
const ALIGN: u64 = 4096;
/// Size of a staging buffer: one disk write. 2 MiB writes push as fast as 4 MiB ones (measured,
/// docs/benchmarks.md), and the three buffers of a push are most of its memory.
const BUFFER: usize = 2 << 20;
/// Disk writes in flight per upload while the next buffer fills.
const IN_FLIGHT: usize = 2;
/// Writes announced smaller than this go through the page cache: for them a synchronous device
/// write costs more than the copy it saves.
const DIRECT_MIN: u64 = 1 << 20;
/// Full-size buffers kept for the next write, and how long one may sit unused.
const POOLED: usize = IN_FLIGHT + 1;
const POOL_IDLE: Duration = Duration::from_secs(1);
/// The most disk reserved ahead for one write, whatever the client announces.
const MAX_PREALLOCATION: u64 = 64 << 30;

/// A body being written into an upload file from some offset.
pub(super) struct UploadWriter {
    file: Arc<File>,
    /// The same file opened for direct I/O, when it is used.
    direct: Option<Arc<File>>,
    /// Where the body started, and how many bytes of it were taken.
    offset: u64,
    written: u64,
    /// The buffer being filled, how much of it is, and the file offset of its first byte.
    buf: Option<MmapMut>,
    filled: usize,
    at: u64,
    /// Writes handed to blocking tasks, oldest first; each gives its buffer back.
    in_flight: VecDeque<JoinHandle<io::Result<MmapMut>>>,
    buffer_len: usize,
    pool: Arc<BufferPool>,
    hold: Hold,
}

impl UploadWriter {
    /// Opens `path` to write from `offset`: bytes past `offset` (from an earlier, failed write)
    /// are cut off and the announced `size_hint` is reserved on disk. `hold` stays held by every
    /// disk write, so a request dropped midway keeps it until its last write has landed.
    ///
    /// # Errors
    /// I/O errors (`NotFound` when the file is missing).
    pub(super) async fn open(
        path: &Path,
        offset: u64,
        size_hint: Option<u64>,
        options: FsOptions,
        pool: &Arc<BufferPool>,
        hold: Hold,
    ) -> io::Result<Self> {
        let path = path.to_path_buf();
        let use_direct = options.direct_io && size_hint.is_none_or(|n| n >= DIRECT_MIN);
        let (file, direct, head) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            file.set_len(offset)?;
            if let Some(len) = size_hint.filter(|n| *n > 0) {
                preallocate(&file, offset, len.min(MAX_PREALLOCATION));
            }
            let direct = if use_direct { open_direct(&path)? } else { None };
            // Direct writes start at a block boundary: the block's bytes before `offset` are
            // written again.
            let head_len = if direct.is_some() { offset % ALIGN } else { 0 };
            let mut head = vec![0u8; head_len as usize];
            file.read_exact_at(&mut head, offset - head_len)?;
            Ok((Arc::new(file), direct.map(Arc::new), head))
        })
        .await
        .map_err(io::Error::other)??;
        // Small bodies need no full-sized buffer (whole blocks, for the padded last write).
        let buffer_len = size_hint
            .and_then(|n| usize::try_from((n + ALIGN).div_ceil(ALIGN) * ALIGN).ok())
            .map_or(BUFFER, |n| n.min(BUFFER));
        let mut writer = UploadWriter {
            file,
            direct,
            offset,
            written: 0,
            buf: None,
            filled: 0,
            at: offset - head.len() as u64,
            in_flight: VecDeque::new(),
            buffer_len,
            pool: pool.clone(),
            hold,
        };
        writer.stage(&head).await?;
        Ok(writer)
    }

    /// Appends `data`.
    ///
    /// # Errors
    /// The first failed disk write.
    pub(super) async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        self.stage(data).await
    }

    async fn stage(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.buf.is_none() {
                self.buf = Some(self.next_buffer().await?);
            }
            let buf = self.buf.as_mut().ok_or_else(|| io::Error::other("no staging buffer"))?;
            let n = data.len().min(buf.len() - self.filled);
            buf[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == buf.len() {
                self.submit();
            }
        }
        Ok(())
    }

    /// A free buffer: a new or pooled one while fewer than allowed are in flight, else the
    /// oldest write's.
    async fn next_buffer(&mut self) -> io::Result<MmapMut> {
        if self.in_flight.len() >= IN_FLIGHT
            && let Some(oldest) = self.in_flight.pop_front()
        {
            return oldest.await.map_err(io::Error::other)?;
        }
        if self.buffer_len == BUFFER
            && let Some(buf) = self.pool.take()
        {
            return Ok(buf);
        }
        let buf = MmapMut::map_anon(self.buffer_len)?;
        if self.buffer_len >= 2 << 20 {
            // Huge pages make pinning the buffer for each direct write cheaper.
            let _ = buf.advise(memmap2::Advice::HugePage);
        }
        Ok(buf)
    }

    /// Hands the filled part of the buffer to a blocking task.
    fn submit(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let filled = std::mem::take(&mut self.filled);
        if filled == 0 {
            return;
        }
        let at = self.at;
        let (file, len) = match &self.direct {
            // The last block is padded; the file is cut back to size at the end.
            Some(direct) => (direct.clone(), (filled as u64).div_ceil(ALIGN) * ALIGN),
            None => (self.file.clone(), filled as u64),
        };
        self.at += filled as u64;
        let hold = self.hold.clone();
        self.in_flight.push_back(tokio::task::spawn_blocking(move || {
            let _hold = hold;
            file.write_all_at(&buf[..len as usize], at)?;
            Ok(buf)
        }));
    }

    /// Writes what is buffered, waits for every disk write and cuts the file to the bytes taken.
    /// Returns their number.
    ///
    /// # Errors
    /// The first failed disk write.
    pub(super) async fn finish(mut self) -> io::Result<u64> {
        self.submit();
        let mut result = Ok(());
        while let Some(write) = self.in_flight.pop_front() {
            match write.await.map_err(io::Error::other).and_then(|r| r) {
                Ok(buf) => self.pool.give(buf),
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
        let (file, end) = (self.file.clone(), self.offset + self.written);
        tokio::task::spawn_blocking(move || file.set_len(end)).await.map_err(io::Error::other)??;
        result.map(|()| self.written)
    }
}

/// Full-size staging buffers between writes. Fresh memory is zeroed by the kernel when first
/// touched — for a push in 16 MiB chunks that was ~5 % of its CPU — so a few buffers are kept
/// for the next write, and released after a second or two unused: an idle registry holds none.
#[derive(Default)]
pub(super) struct BufferPool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: Vec<(Instant, MmapMut)>,
    /// Whether a task is on its way to release idle buffers.
    sweeping: bool,
}

impl BufferPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> Option<MmapMut> {
        self.lock().free.pop().map(|(_, buf)| buf)
    }

    fn give(self: &Arc<Self>, buf: MmapMut) {
        if buf.len() != BUFFER {
            return;
        }
        let mut state = self.lock();
        if state.free.len() < POOLED {
            state.free.push((Instant::now(), buf));
        }
        if !state.sweeping {
            state.sweeping = true;
            tokio::spawn(self.clone().sweep());
        }
    }

    /// Releases buffers unused for `POOL_IDLE`, until none is left.
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(POOL_IDLE).await;
            let mut state = self.lock();
            state.free.retain(|(since, _)| since.elapsed() < POOL_IDLE);
            if state.free.is_empty() {
                state.sweeping = false;
                return;
            }
        }
    }

    #[cfg(test)]
    pub(super) fn pooled(&self) -> usize {
        self.lock().free.len()
    }
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool").field("pooled", &self.lock().free.len()).finish()
    }
}

/// The file opened for direct I/O, or `None` where the filesystem has none (tmpfs, some network
/// filesystems): those writes go through the page cache.
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reserves `len` bytes of disk from `offset` (a hint: failure is ignored). Writing into
/// reserved space spares the filesystem its per-page allocation work.
fn preallocate(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for writing
    // and owned by `file` for the duration of the call.
    let _ = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
}
