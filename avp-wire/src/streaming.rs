//! Copies with non-temporal ("streaming") stores, for destinations too large to
//! stay in cache: the stores skip the cache hierarchy, so no destination line is
//! read for ownership first and nothing useful is evicted. On other targets
//! these are plain copies.

/// Copy `src` into `dst` (same length) with streaming stores where the target
/// has them. Call [`fence`] before anything that publishes the bytes to another
/// thread or process: streaming stores are weakly ordered.
pub(crate) fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "streaming copy: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        // Plain copies up to the first 16-byte aligned destination byte and for
        // the tail that does not fill a 64-byte block.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let (dst_head, dst) = dst.split_at_mut(head);
        let (src_head, src) = src.split_at(head);
        dst_head.copy_from_slice(src_head);
        let body = dst.len() / 64 * 64;
        let (dst_body, dst_tail) = dst.split_at_mut(body);
        let (src_body, src_tail) = src.split_at(body);
        for (d, s) in dst_body.chunks_exact_mut(64).zip(src_body.chunks_exact(64)) {
            let (d, s) = (d.as_mut_ptr() as *mut __m128i, s.as_ptr() as *const __m128i);
            for k in 0..4 {
                // SAFETY: `d` and `s` are 64-byte blocks of the two slices, so
                // each 16-byte lane is in bounds; `d` is 16-byte aligned (the body
                // starts aligned and advances by 64), as `_mm_stream_si128`
                // requires; `_mm_loadu_si128` accepts any alignment. SSE2 is part
                // of x86-64.
                unsafe { _mm_stream_si128(d.add(k), _mm_loadu_si128(s.add(k))) };
            }
        }
        dst_tail.copy_from_slice(src_tail);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Order this thread's streaming stores before its later stores (a release or a
/// publish): `sfence` on x86-64, nothing elsewhere.
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions (SSE is part of x86-64).
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_at_every_alignment() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; 4096 + 64];
        for offset in 0..64 {
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 200, 1000, 4000] {
                dst.fill(0xAA);
                copy(&mut dst[offset..offset + len], &src[..len]);
                fence();
                assert_eq!(
                    &dst[offset..offset + len],
                    &src[..len],
                    "offset {offset} len {len}"
                );
                assert!(
                    dst[..offset].iter().all(|&b| b == 0xAA),
                    "before, offset {offset}"
                );
                assert!(
                    dst[offset + len..].iter().all(|&b| b == 0xAA),
                    "after, offset {offset} len {len}"
                );
            }
        }
    }
}
