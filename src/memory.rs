//! Giving freed memory back to the operating system.
//!
//! A large upload passes through many buffers of a few hundred KiB (request body pieces, parts
//! for the object store). glibc's allocator keeps what they leave free in its per-thread arenas,
//! so after a push the process stayed at its peak — twice its idle size on the scale-out
//! deployment — through the pulls and manifest requests that followed. Asking glibc to trim
//! returns those pages; it runs off the async workers once large writes have stopped for three
//! seconds.
//! (A fixed, low `mmap` threshold would return them at once, but cost a map and an unmap per
//! buffer: 0.18 CPU-s per GB pushed, measured.)
//!
//! While writes run, the allocator should do the opposite: keep what it freed. By default glibc
//! serves buffers of a MiB or more with fresh `mmap`s until its adaptive threshold catches up,
//! and hands the top of a heap back as soon as 2 MiB of it are free — so hyper's read buffers
//! (then 1 MiB) landed on freshly faulted pages (230,000 page faults per 2 GiB pushed, 7 % of the
//! CPU). [`tune_allocator`] fixes both thresholds for `berth serve` (2 MiB and 4 MiB): pushes
//! then fault 40 % as often and cost 0.96–0.99 instead of 1.03–1.09 CPU-s per GB (embedded,
//! four 512 MiB pushes back to back), and the process is back at 19–20 MiB once they stop
//! (17 MiB untuned). A higher trim threshold saves more CPU (8 MiB: 0.88) but leaves that much
//! free at the top of each busy thread's heap, which `malloc_trim` does not return for arenas
//! other than the main one (28 MiB after the same pushes).
//!
//! The number of heaps is left to glibc (one per busy thread, up to eight per core). One heap
//! (`MALLOC_ARENA_MAX=1` in the environment) lowers a push's peak by 4–6 MiB but costs a fifth
//! of the embedded deployment's manifest request rate: the async workers and SQLite's connection
//! threads then queue for its lock (measured; docs/benchmarks.md).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

/// Buffers below this come from the heap, not from `mmap`: hyper's read buffers (up to 512 KiB)
/// are reused. (The direct-I/O staging buffers are mapped and pooled by their writer.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 2 << 20;

/// Free memory at the top of a heap kept for reuse before glibc gives it back by itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 4 << 20;

/// Sets the allocator up for a server: reuse freed buffers while busy (see the module's note).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called before the server starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// How long no large write may have run before the trim: a registry under a steady push load
/// never trims (trimming between pushes cost 0.04–0.06 CPU-s per GB pushed, measured, for
/// pages the next push faulted in again); one that went quiet does, three seconds later (after
/// the filesystem's staging buffers, pooled for one to two seconds, have been freed).
const QUIET: Duration = Duration::from_secs(3);

static SCHEDULED: AtomicBool = AtomicBool::new(false);
static WRITING: AtomicUsize = AtomicUsize::new(0);
static LAST_END_MS: AtomicI64 = AtomicI64::new(0);

fn now_ms() -> i64 {
    crate::time::system_now_ms()
}

/// A large write in progress; when the last one ends and none follows for [`QUIET`], freed memory
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
            // Cleared however the task ends (a runtime shut down drops it mid-sleep).
            let _scheduled = Scheduled;
            loop {
                tokio::time::sleep(QUIET).await;
                let quiet_ms = now_ms() - LAST_END_MS.load(Ordering::Acquire);
                if WRITING.load(Ordering::Acquire) == 0 && quiet_ms >= QUIET.as_millis() as i64 {
                    break;
                }
            }
            drop(_scheduled);
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only walks the allocator's own structures under its locks.
                unsafe { libc::malloc_trim(0) };
            })
            .await;
        });
    }
}

/// The trim task's mark in [`SCHEDULED`], cleared when it goes.
struct Scheduled;

impl Drop for Scheduled {
    fn drop(&mut self) {
        SCHEDULED.store(false, Ordering::Release);
    }
}
