//! Giving freed memory back to the operating system.
//!
//! A large upload passes through many buffers of a few hundred KiB (request body pieces, parts
//! for the object store). glibc's allocator keeps what they leave free in its per-thread arenas,
//! so after a push the process stayed at its peak — twice its idle size on the scale-out
//! deployment — through the pulls and manifest requests that followed. Asking glibc to trim
//! returns those pages; it runs off the async workers once large writes have stopped for a second.
//! (A fixed, low `mmap` threshold would return them at once, but cost a map and an unmap per
//! buffer: 0.18 CPU-s per GB pushed, measured.)

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

/// How long no large write may have run before the trim: a registry under a steady push load
/// never trims (trimming between pushes cost 0.04–0.06 CPU-s per GB pushed, measured, for
/// pages the next push faulted in again); one that went quiet does, a second later.
const QUIET: Duration = Duration::from_secs(1);

static SCHEDULED: AtomicBool = AtomicBool::new(false);
static WRITING: AtomicUsize = AtomicUsize::new(0);
static LAST_END_MS: AtomicI64 = AtomicI64::new(0);

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A large write in progress; when the last one ends and none follows for a second, freed memory
/// goes back to the OS.
pub struct LargeWrite(());

impl LargeWrite {
    /// Notes a large write starting.
    pub fn start() -> Self {
        WRITING.fetch_add(1, Ordering::AcqRel);
        LargeWrite(())
    }
}

impl Drop for LargeWrite {
    fn drop(&mut self) {
        LAST_END_MS.store(now_ms(), Ordering::Release);
        WRITING.fetch_sub(1, Ordering::AcqRel);
        if SCHEDULED.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            SCHEDULED.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(async {
            loop {
                tokio::time::sleep(QUIET).await;
                let quiet_ms = now_ms() - LAST_END_MS.load(Ordering::Acquire);
                if WRITING.load(Ordering::Acquire) == 0 && quiet_ms >= QUIET.as_millis() as i64 {
                    break;
                }
            }
            SCHEDULED.store(false, Ordering::Release);
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only walks the allocator's own structures under its locks.
                unsafe { libc::malloc_trim(0) };
            })
            .await;
        });
    }
}
