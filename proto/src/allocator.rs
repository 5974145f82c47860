//! The process allocator (glibc's malloc on Linux): how many arenas it keeps, and handing
//! free memory back to the system after a large structure was replaced.
//!
//! glibc keeps freed memory inside its heaps: after a catalog is rebuilt, the pages the old
//! copy and the decoding buffers used stay resident until something reuses them, so a
//! process's resident size is its peak, not what it holds. `malloc_trim` returns every
//! whole free page (anywhere in every arena, not only at the top). By default glibc also
//! gives each thread that allocates concurrently an arena of its own (up to eight per
//! core), each with its own free pages; a program with few threads and little allocation
//! on its data path gains nothing from them.
//!
//! On other platforms (and C libraries) both are no-ops.

#![allow(unsafe_code)]

/// The environment variable through which glibc itself reads the arena limit: when set, it
/// is the operator's choice and [`limit_arenas`] leaves it.
pub const ARENA_MAX_ENV: &str = "MALLOC_ARENA_MAX";

/// Limits the allocator to `n` arenas (at least 1), unless the operator set
/// `MALLOC_ARENA_MAX`. Call it before the program starts threads.
pub fn limit_arenas(n: usize) {
    if std::env::var_os(ARENA_MAX_ENV).is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = libc::c_int::try_from(n.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator; M_ARENA_MAX takes any
        // positive count and affects arenas created from now on.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, n);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = n;
}

/// Hands the allocator's free pages back to the system. It walks the free lists of every
/// arena (milliseconds for a heap of hundreds of MB), so call it after a large structure
/// was replaced or a large transient one dropped, not per request.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' locks itself and only releases pages that hold
    // no allocation; a pad of 0 keeps nothing spare at the top of the heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freed pages are returned: the resident size after a large buffer is freed and the
    /// heap trimmed is below what it was while the buffer lived.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn release_returns_freed_pages_to_the_system() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        }
        // Many small allocations (below the mmap threshold, so they live in the heap), with
        // every other one kept: what is freed is in the middle of the heap, where only a
        // trim returns it.
        let mut kept = Vec::new();
        let mut freed = Vec::new();
        for i in 0..20_000 {
            let b = vec![i as u8; 1000];
            if i % 50 == 0 {
                kept.push(b);
            } else {
                freed.push(b);
            }
        }
        let with = rss_kib();
        drop(freed);
        release_free_memory();
        let after = rss_kib();
        assert!(
            after + 10_000 < with,
            "RssAnon {with} KiB with the buffers, {after} KiB after freeing and trimming"
        );
        assert_eq!(kept.len(), 400);
    }

    #[test]
    fn limit_arenas_accepts_any_count() {
        limit_arenas(0);
        limit_arenas(usize::MAX);
    }
}
