//! The binary's allocator and how it gives memory back. mimalloc keeps what a thread frees in
//! that thread's pages and returns empty pages to the system only on that thread's later
//! allocations, after a delay (1 s, ten times that in its arenas). A worker that answered a
//! large review and then went idle kept it all: RSS stayed at the peak of a burst. So purging
//! is immediate, and each worker collects its own heap when it runs out of work.
//! `MIMALLOC_PURGE_DELAY` (milliseconds) restores a delay, and then no worker collects.
//! Figures: bench-results/HISTORY.md (`BENCH_ONLY=memory`).

use std::sync::atomic::{AtomicBool, Ordering};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's option list (the binding leaves it unnamed).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

static COLLECT: AtomicBool = AtomicBool::new(false);

/// Makes freed memory go back to the system without delay, unless `MIMALLOC_PURGE_DELAY` says
/// otherwise. Call before the runtime starts (options are not thread-safe).
pub(crate) fn purge_immediately() {
    // SAFETY: sets and reads option values; no memory is involved.
    let delay = unsafe {
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_get(PURGE_DELAY)
    };
    COLLECT.store(delay == 0, Ordering::Relaxed);
}

/// For tokio's `on_thread_park`: the parking worker hands its empty pages back.
pub(crate) fn collect_on_park() {
    if COLLECT.load(Ordering::Relaxed) {
        // SAFETY: collects the calling thread's own heap; no pointers are involved.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}
