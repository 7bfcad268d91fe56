//! The training examples' allocator: mimalloc, keeping the memory it frees.
//!
//! Burn's CPU backend frees and allocates tensors of tens of megabytes in
//! every training step. glibc serves allocations that large with
//! mmap/munmap, a page fault per page each time (a key-value student's
//! steps took 1.7× as long). mimalloc reuses freed memory, but still
//! returns ("purges") memory that stayed free for a while to the kernel
//! (1 s in mimalloc v3, 10 ms in v2), and where the kernel backs fresh
//! memory with transparent huge pages, each fault zero-fills 2 MiB: with
//! both, a quarter of the default student's training time went to the
//! kernel's page clearing under `perf`. [`keep_freed_memory`] turns purging
//! and transparent huge pages off for the process (alternated 40-step runs
//! of the default student: 441 ms a step with neither, 362 with both); the
//! process keeps its peak footprint until it exits.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v2 and v3 put it at 15;
/// libmimalloc-sys names no constant for it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The option's defaults in milliseconds (mimalloc v2, v3), which identify
/// it; another value was set through `MIMALLOC_PURGE_DELAY` and is kept.
const DEFAULT_PURGE_DELAYS: [std::ffi::c_long; 2] = [10, 1000];

/// Stops mimalloc from returning freed memory to the kernel and (Linux)
/// the kernel from backing this process's memory with transparent huge
/// pages. Call first in `main`, before any thread starts. Returns false
/// (the purge delay unchanged) when the linked mimalloc's option 15 does
/// not hold a default purge delay (another mimalloc, or the environment
/// chose a delay).
pub fn keep_freed_memory() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integer arguments only and
    // changes nothing but this process's page policy; a failure (an old
    // kernel) leaves the default in place.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    // SAFETY: mimalloc's option accessors are not synchronised; this runs
    // before the program starts any thread, and 15 is checked to be the
    // purge delay (a default value) before it is set.
    unsafe {
        if !DEFAULT_PURGE_DELAYS.contains(&libmimalloc_sys::mi_option_get(PURGE_DELAY)) {
            return false;
        }
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
    true
}
