//! CRC32 over sections: fused copy-and-checksum, and checksums of many sections at once.
//!
//! Large jobs are split into pieces and spread over the available cores
//! (`std::thread::scope`); the per-piece CRCs are joined with
//! [`crc32fast::Hasher::combine`], so the result is the same as one serial pass.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Jobs smaller than this run on the calling thread: spawning costs more than it saves.
pub const PARALLEL_MIN_BYTES: usize = 8 << 20;

/// Chunk of a fused copy: small enough that the CRC pass reads it back from L2.
const FUSED_CHUNK: usize = 128 << 10;

/// Fused copies of jobs at least this large use streaming (non-temporal) stores:
/// the destination would not stay in cache anyway, and skipping the read for
/// ownership of each destination line made copies of 64–256 MiB into shared
/// memory about 20% faster (11–12 → 14 GB/s on the bench machine). Smaller
/// messages keep ordinary stores, which leave them in cache for a reader nearby.
pub const STREAMING_MIN_BYTES: usize = 8 << 20;

/// Copy `src` into `dst` (same length) and return the CRC32 of the bytes, in one pass
/// over memory: each chunk is checksummed while it is still in cache.
pub fn copy_with_crc(dst: &mut [u8], src: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    copy_with_hasher(dst, src, &mut h, src.len() >= STREAMING_MIN_BYTES);
    h.finalize()
}

/// The fused copy. With `streaming`, the destination is written with streaming
/// stores (fenced before returning) and the CRC is taken over the source, which
/// holds the same bytes and was just read into cache.
fn copy_with_hasher(dst: &mut [u8], src: &[u8], h: &mut crc32fast::Hasher, streaming: bool) {
    assert_eq!(dst.len(), src.len(), "copy_with_crc: length mismatch");
    for (d, s) in dst.chunks_mut(FUSED_CHUNK).zip(src.chunks(FUSED_CHUNK)) {
        if streaming {
            crate::streaming::copy(d, s);
            h.update(s);
        } else {
            d.copy_from_slice(s);
            h.update(d);
        }
    }
    if streaming {
        crate::streaming::fence();
    }
}

/// 0 = use every available core (up to 8).
static MAX_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Cap the threads used for checksums and fused copies (process-wide). `0` (the
/// default) uses every available core, up to 8; `1` keeps all work on the caller's thread.
pub fn set_max_threads(n: usize) {
    MAX_THREADS.store(n, Ordering::Relaxed);
}

/// Cores available to this process, read once (`available_parallelism` reads
/// cgroup files on every call: tens of microseconds).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(NonZeroUsize::get)
            .unwrap_or(1)
    })
}

/// The process-wide cap set by [`set_max_threads`] (0: none set).
pub fn max_threads() -> usize {
    MAX_THREADS.load(Ordering::Relaxed)
}

/// Number of worker threads for `bytes` of checksum work under `cap` (0: the
/// process-wide setting).
fn workers(bytes: usize, cap: usize) -> usize {
    if bytes < PARALLEL_MIN_BYTES {
        return 1;
    }
    let cores = cores().min(8);
    let cap = match cap {
        0 => MAX_THREADS.load(Ordering::Relaxed),
        n => n,
    };
    match cap {
        0 => cores,
        n => n.min(cores),
    }
}

/// A piece of one section: which section, and the byte range within it.
struct Piece {
    section: usize,
    start: usize,
    end: usize,
}

/// Split sections of the given lengths into pieces and deal them into `n` groups of
/// about equal bytes, keeping pieces in order.
fn split(lens: &[usize], n: usize) -> Vec<Vec<Piece>> {
    let total: usize = lens.iter().sum();
    let target = total.div_ceil(n).max(1);
    let mut groups: Vec<Vec<Piece>> = (0..n).map(|_| Vec::new()).collect();
    let (mut g, mut filled) = (0usize, 0usize);
    for (section, &len) in lens.iter().enumerate() {
        let mut start = 0;
        while start < len {
            let room = if g + 1 == n {
                usize::MAX
            } else {
                target - filled
            };
            let end = len.min(start.saturating_add(room));
            groups[g].push(Piece {
                section,
                start,
                end,
            });
            filled += end - start;
            start = end;
            if filled >= target && g + 1 < n {
                g += 1;
                filled = 0;
            }
        }
    }
    groups
}

/// Join per-piece hashers back into one CRC per section.
fn join(count: usize, results: Vec<Vec<(usize, crc32fast::Hasher)>>) -> Vec<u32> {
    let mut out: Vec<Option<crc32fast::Hasher>> = (0..count).map(|_| None).collect();
    for (section, h) in results.into_iter().flatten() {
        match &mut out[section] {
            Some(acc) => acc.combine(&h),
            slot @ None => *slot = Some(h),
        }
    }
    out.into_iter()
        .map(|h| h.map_or(0, crc32fast::Hasher::finalize))
        .collect()
}

/// CRC32 of each slice, using several threads when the total is large.
pub fn crc_many(slices: &[&[u8]]) -> Vec<u32> {
    crc_many_capped(slices, 0)
}

/// [`crc_many`] on at most `cap` threads (0: the process-wide setting).
pub fn crc_many_capped(slices: &[&[u8]], cap: usize) -> Vec<u32> {
    let lens: Vec<usize> = slices.iter().map(|s| s.len()).collect();
    let n = workers(lens.iter().sum(), cap);
    if n == 1 {
        return slices.iter().map(|s| crc32fast::hash(s)).collect();
    }
    let groups = split(&lens, n);
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|group| {
                scope.spawn(move || {
                    group
                        .into_iter()
                        .map(|p| {
                            let mut h = crc32fast::Hasher::new();
                            h.update(&slices[p.section][p.start..p.end]);
                            (p.section, h)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("crc worker panicked"))
            .collect::<Vec<_>>()
    });
    join(slices.len(), results)
}

/// A piece of a fused copy: section index, destination, source.
type CopyPiece<'d, 's> = (usize, &'d mut [u8], &'s [u8]);

/// Copy each `srcs[i]` into `dsts[i]` and return each CRC32, using several threads
/// when the total is large. Lengths must match pairwise.
pub fn copy_many_with_crc(dsts: Vec<&mut [u8]>, srcs: &[&[u8]]) -> Vec<u32> {
    copy_many_with_crc_capped(dsts, srcs, 0)
}

/// [`copy_many_with_crc`] on at most `cap` threads (0: the process-wide setting).
pub fn copy_many_with_crc_capped(dsts: Vec<&mut [u8]>, srcs: &[&[u8]], cap: usize) -> Vec<u32> {
    assert_eq!(dsts.len(), srcs.len(), "copy_many_with_crc: count mismatch");
    let lens: Vec<usize> = srcs.iter().map(|s| s.len()).collect();
    let total: usize = lens.iter().sum();
    let streaming = total >= STREAMING_MIN_BYTES;
    let n = workers(total, cap);
    if n == 1 {
        return dsts
            .into_iter()
            .zip(srcs)
            .map(|(d, s)| {
                let mut h = crc32fast::Hasher::new();
                copy_with_hasher(d, s, &mut h, streaming);
                h.finalize()
            })
            .collect();
    }
    // Cut every destination into the pieces `split` chose, so each thread owns its pieces.
    let groups = split(&lens, n);
    let mut remaining: Vec<&mut [u8]> = dsts;
    let mut cut_groups: Vec<Vec<CopyPiece<'_, '_>>> = Vec::with_capacity(n);
    for group in &groups {
        let mut cut = Vec::with_capacity(group.len());
        for p in group {
            let rest = std::mem::take(&mut remaining[p.section]);
            let (head, tail) = rest.split_at_mut(p.end - p.start);
            remaining[p.section] = tail;
            cut.push((p.section, head, &srcs[p.section][p.start..p.end]));
        }
        cut_groups.push(cut);
    }
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = cut_groups
            .into_iter()
            .map(|group| {
                scope.spawn(move || {
                    group
                        .into_iter()
                        .map(|(section, d, s)| {
                            let mut h = crc32fast::Hasher::new();
                            copy_with_hasher(d, s, &mut h, streaming);
                            (section, h)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("copy worker panicked"))
            .collect::<Vec<_>>()
    });
    join(srcs.len(), results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn parallel_crc_equals_serial() {
        let a = data(PARALLEL_MIN_BYTES + 12345, 1);
        let b = data(777, 2);
        let c = data(0, 3);
        let d = data(3 << 20, 4);
        let slices = [&a[..], &b[..], &c[..], &d[..]];
        let got = crc_many(&slices);
        let want: Vec<u32> = slices.iter().map(|s| crc32fast::hash(s)).collect();
        assert_eq!(got, want);
        for cap in [1, 2, 3, 64] {
            assert_eq!(crc_many_capped(&slices, cap), want, "cap {cap}");
        }
        assert_eq!(
            workers(PARALLEL_MIN_BYTES, 1),
            1,
            "a cap of 1 keeps the caller's thread"
        );
        assert!(workers(PARALLEL_MIN_BYTES, 64) <= cores().min(8));
        assert_eq!(
            workers(PARALLEL_MIN_BYTES - 1, 64),
            1,
            "small work stays serial"
        );
    }

    #[test]
    fn parallel_copy_equals_serial() {
        let srcs_owned = [data(5 << 20, 9), data(1, 8), data(6 << 20, 7), data(0, 1)];
        let srcs: Vec<&[u8]> = srcs_owned.iter().map(|v| &v[..]).collect();
        let mut dst_owned: Vec<Vec<u8>> = srcs.iter().map(|s| vec![0u8; s.len()]).collect();
        let dsts: Vec<&mut [u8]> = dst_owned.iter_mut().map(|v| &mut v[..]).collect();
        let crcs = copy_many_with_crc(dsts, &srcs);
        for i in 0..srcs.len() {
            assert_eq!(dst_owned[i], srcs_owned[i]);
            assert_eq!(crcs[i], crc32fast::hash(srcs[i]));
        }
        let mut capped: Vec<Vec<u8>> = srcs.iter().map(|s| vec![0u8; s.len()]).collect();
        let dsts: Vec<&mut [u8]> = capped.iter_mut().map(|v| &mut v[..]).collect();
        assert_eq!(copy_many_with_crc_capped(dsts, &srcs, 1), crcs);
        assert_eq!(capped, dst_owned);
    }

    #[test]
    fn a_large_copy_streams_and_keeps_every_byte() {
        let src = data(STREAMING_MIN_BYTES + 13, 5);
        let mut dst = vec![0u8; src.len() + 3];
        let crc = copy_with_crc(&mut dst[3..], &src);
        assert_eq!(crc, crc32fast::hash(&src));
        assert!(dst[3..] == src[..], "the streamed copy differs");
        assert_eq!(&dst[..3], &[0, 0, 0]);
    }

    #[test]
    fn split_covers_everything_in_order() {
        let lens = [10, 0, 7, 33, 1];
        for n in 1..5 {
            let groups = split(&lens, n);
            assert_eq!(groups.len(), n);
            let mut next = vec![0usize; lens.len()];
            for p in groups.iter().flatten() {
                assert_eq!(p.start, next[p.section]);
                assert!(p.end > p.start);
                next[p.section] = p.end;
            }
            let want: Vec<usize> = lens.to_vec();
            assert_eq!(next, want);
        }
    }
}
