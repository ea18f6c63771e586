//! Giving freed memory back to the operating system.
//!
//! A large upload passes through many buffers of a few hundred KiB (request body pieces, parts
//! for the object store). glibc's allocator keeps what they leave free in its per-thread arenas,
//! so after a push the process stayed at its peak — twice its idle size on the scale-out
//! deployment — through the pulls and manifest requests that followed. Asking glibc to trim after
//! large writes returns those pages; it costs a walk over the arenas, so it runs a second after a
//! large write, once for all the writes of that second, off the async workers. (A fixed, low `mmap` threshold would return them at once, but
//! cost a map and an unmap per buffer: 0.18 CPU-s per GB pushed, measured.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long after a large write the trim runs; writes meanwhile share it.
const DELAY: Duration = Duration::from_secs(1);

static SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Returns freed memory to the OS a second from now (one trim for all writes until then).
pub fn release_freed() {
    if SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(DELAY).await;
        SCHEDULED.store(false, Ordering::Release);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only walks the allocator's own structures under its locks.
            unsafe { libc::malloc_trim(0) };
        })
        .await;
    });
}
