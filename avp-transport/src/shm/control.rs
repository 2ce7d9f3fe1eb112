//! The control block at the start of a slot pool: two single-producer rings in
//! shared memory (published messages, released slots) and "I am about to sleep"
//! flags, so that the common path needs no system call.
//!
//! ```text
//! offset  field (each hot word on its own cache line)
//! 0       magic u64 | version u32 | slots u32 | slot_size u64 | ring u32
//! 64      head       u64  messages published   (sender writes)
//! 72      newest     u64  entry head - 1 (or the staged entry head), packed with a tag, or 0
//! 128     tail       u64  messages consumed    (receiver writes)
//! 192     rx_waiting u32  receiver blocks on the "published" eventfd
//! 256     rel_head   u64  slots released       (receiver writes)
//! 320     rel_tail   u64  releases collected   (sender writes)
//! 384     tx_waiting u32  sender blocks on the "released" eventfd
//! 448     producing  u64  number of the message being written + 1 (> head: writing)
//! 456     writing_slot u32 slot being written (u32::MAX: a dedicated segment)
//! 512     ring[64]     { slot u32, flags u32, len u64 }
//! 2048    rel_ring[64] { slot u32 }
//! 4096    slot 0, slot 1, ... (slot_size bytes each, page-aligned)
//! ```
//!
//! Everything read from the block is untrusted: indices and lengths are checked
//! against the pool's geometry before use.
//!
//! `newest` was padding in the first senders of this layout, which leave it 0:
//! a receiver then reads every entry from the ring, and an older receiver
//! ignores the word. Either way both ends work together.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes of the control block (one page).
pub(crate) const CONTROL_LEN: usize = 4096;
/// Entries per ring (and the most slots a pool may have).
pub(crate) const RING: u32 = 64;
/// `flags` of an entry whose message is in a dedicated segment sent on the socket.
pub(crate) const DEDICATED: u32 = 1;
/// `flags` of an entry whose sections are in the device pool's slot of the
/// same index (the slot itself holds the preamble and header). With
/// [`DEDICATED`]: in a dedicated device allocation sent on the socket.
pub(crate) const DEVICE: u32 = 2;
const MAGIC: u64 = 0x4156_5053_484d_0002; // "AVPSHM" v2
const VERSION: u32 = 2;
const HEAD: usize = 64;
const NEWEST: usize = 72;
const TAIL: usize = 128;
const RX_WAITING: usize = 192;
const REL_HEAD: usize = 256;
const REL_TAIL: usize = 320;
const TX_WAITING: usize = 384;
const PRODUCING: usize = 448;
const RING_AT: usize = 512;
const REL_RING_AT: usize = 2048;

/// A view of a control block.
#[derive(Clone, Copy)]
pub(crate) struct Control {
    base: *mut u8,
}

// SAFETY: the block is shared memory accessed only through atomics; which thread
// holds the view does not matter.
unsafe impl Send for Control {}
// SAFETY: as for Send: every access goes through atomics.
unsafe impl Sync for Control {}

/// A control block in private memory, for tests of the ring protocol.
#[cfg(test)]
pub(crate) struct PrivateBlock {
    page: Box<Page>,
}

/// One page of zeroed memory, page-aligned like a pool's control block.
#[cfg(test)]
#[repr(C, align(4096))]
struct Page(std::cell::UnsafeCell<[u8; CONTROL_LEN]>);

#[cfg(test)]
impl PrivateBlock {
    /// A fresh private block: an empty ring with room.
    pub(crate) fn new() -> PrivateBlock {
        PrivateBlock {
            page: Box::new(Page(std::cell::UnsafeCell::new([0; CONTROL_LEN]))),
        }
    }

    /// A view of the private block, valid while `self` is borrowed.
    pub(crate) fn control(&self) -> Control {
        // SAFETY: the page is CONTROL_LEN page-aligned bytes inside an
        // UnsafeCell (writes through a shared borrow are allowed), and every
        // caller uses the view only within this borrow of `self`.
        unsafe { Control::new(self.page.0.get().cast()) }
    }
}

/// One published message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Slot index (ignored for dedicated messages).
    pub(crate) slot: u32,
    /// [`DEDICATED`] or 0.
    pub(crate) flags: u32,
    /// Message length.
    pub(crate) len: u64,
}

/// The error of a head that no sender could have written.
#[cold]
fn inconsistent(head: u64, tail: u64) -> String {
    format!("ring head {head} is inconsistent with tail {tail}")
}

/// `newest` word: set when the rest holds an entry.
const PACKED: u64 = 1 << 63;
/// Bits of a packed entry's length.
const LEN_BITS: u32 = 40;
/// Bits of a packed entry's slot index.
const SLOT_BITS: u32 = 8;
/// Bits of a packed entry's tag (its message number, modulo).
const TAG_BITS: u32 = 15;

/// Pack entry number `number` into one word: the set bit, a tag of the number,
/// the slot and the length. Zero (no entry) when it does not fit: a dedicated
/// message, a slot index of 256 or more, a length of 1 TiB or more.
fn pack(number: u64, e: Entry) -> u64 {
    if e.flags != 0 || e.slot >= 1 << SLOT_BITS || e.len >= 1 << LEN_BITS {
        return 0;
    }
    let tag = number & ((1 << TAG_BITS) - 1);
    PACKED | tag << (LEN_BITS + SLOT_BITS) | (e.slot as u64) << LEN_BITS | e.len
}

/// The entry packed in `word` if it is entry number `number`'s. The tag tells
/// it apart from the entries around it: a sender is never more than a ring
/// (64) ahead of the receiver, far less than the tag's 32768 numbers.
fn unpack(word: u64, number: u64) -> Option<Entry> {
    let tag = (word >> (LEN_BITS + SLOT_BITS)) & ((1 << TAG_BITS) - 1);
    (word & PACKED != 0 && tag == number & ((1 << TAG_BITS) - 1)).then_some(Entry {
        slot: ((word >> LEN_BITS) & ((1 << SLOT_BITS) - 1)) as u32,
        flags: 0,
        len: word & ((1 << LEN_BITS) - 1),
    })
}

impl Control {
    /// View the control block at `base`.
    ///
    /// # Safety
    /// `base` must point to at least [`CONTROL_LEN`] bytes of page-aligned shared
    /// memory that stays mapped as long as the view is used.
    pub(crate) unsafe fn new(base: *mut u8) -> Control {
        Control { base }
    }

    #[inline]
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: off + 8 <= CONTROL_LEN, 8-aligned within a page-aligned block; atomics
        // make concurrent access from both processes well-defined.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    #[inline]
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as above, 4-aligned.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    /// Write the geometry (sender, before handing the pool over).
    pub(crate) fn init(&self, slots: u32, slot_size: u64) {
        self.u64_at(0).store(MAGIC, Ordering::Relaxed);
        self.u32_at(8).store(VERSION, Ordering::Relaxed);
        self.u32_at(12).store(slots, Ordering::Relaxed);
        self.u64_at(16).store(slot_size, Ordering::Relaxed);
        self.u32_at(24).store(RING, Ordering::Relaxed);
    }

    /// Check the geometry written by the sender.
    pub(crate) fn check(&self, slots: u32, slot_size: u64) -> bool {
        self.u64_at(0).load(Ordering::Relaxed) == MAGIC
            && self.u32_at(8).load(Ordering::Relaxed) == VERSION
            && self.u32_at(12).load(Ordering::Relaxed) == slots
            && self.u64_at(16).load(Ordering::Relaxed) == slot_size
            && self.u32_at(24).load(Ordering::Relaxed) == RING
    }

    #[inline]
    fn entry_at(&self, i: u64) -> usize {
        RING_AT + (i % RING as u64) as usize * 16
    }

    /// Sender: messages the receiver has consumed from the ring.
    #[inline]
    pub(crate) fn tail(&self) -> u64 {
        self.tail_atomic().load(Ordering::Acquire)
    }

    #[inline]
    fn tail_atomic(&self) -> &AtomicU64 {
        self.u64_at(TAIL)
    }

    /// Sender: publish entry number `head` (then `head + 1` is the new head).
    /// Returns whether the receiver is asleep and needs its doorbell rung.
    #[inline]
    pub(crate) fn publish(&self, head: u64, e: Entry) -> bool {
        self.stage(head, e);
        self.commit(head)
    }

    /// Sender: write entry number `head` where the receiver will read it (its
    /// ring slot and the `newest` word), without announcing it. Unseen until
    /// [`commit`](Self::commit): a receiver reads ring entries below the head
    /// only, and `newest` only when its tag names the entry it wants. The ring
    /// must have room for the entry (`head - tail < RING`).
    #[inline]
    pub(crate) fn stage(&self, head: u64, e: Entry) {
        let at = self.entry_at(head);
        self.u32_at(at).store(e.slot, Ordering::Relaxed);
        self.u32_at(at + 4).store(e.flags, Ordering::Relaxed);
        self.u64_at(at + 8).store(e.len, Ordering::Relaxed);
        // Release: a receiver that sees the staged entry also sees the message
        // bytes written before it (it may validate them ahead).
        self.u64_at(NEWEST).store(pack(head, e), Ordering::Release);
    }

    /// Sender: withdraw a staged entry (its message will not be sent), so that
    /// no receiver goes on reading its slot while it is written again. `newest`
    /// is optional: 0 sends a receiver to the ring.
    #[inline]
    pub(crate) fn unstage(&self) {
        self.u64_at(NEWEST).store(0, Ordering::Release);
    }

    /// Sender: announce the entry staged as number `head` (the head becomes
    /// `head + 1`). Returns whether the receiver is asleep and needs its
    /// doorbell rung.
    #[inline]
    pub(crate) fn commit(&self, head: u64) -> bool {
        self.u64_at(HEAD).store(head + 1, Ordering::SeqCst);
        self.u32_at(RX_WAITING).load(Ordering::SeqCst) != 0
    }

    /// Receiver: the entry at `tail` if one is published. `Err` if the head is
    /// impossible (more than a ring ahead, or behind).
    ///
    /// When it is the only new one, the entry is read from the `newest` word,
    /// which came with the head's cache line: one transfer from the sender's
    /// core instead of two in a row.
    #[cfg(test)]
    pub(crate) fn peek(&self, tail: u64) -> Result<Option<Entry>, String> {
        Ok(self.peek_traced(tail)?.map(|(e, _)| e))
    }

    /// [`peek`](Self::peek), also saying whether the entry came from the
    /// head's cache line (`newest`).
    #[inline]
    pub(crate) fn peek_traced(&self, tail: u64) -> Result<Option<(Entry, bool)>, String> {
        let head = self.u64_at(HEAD).load(Ordering::Acquire);
        if head == tail {
            return Ok(None);
        }
        if head < tail || head - tail > RING as u64 {
            return Err(inconsistent(head, tail));
        }
        if head == tail + 1
            && let Some(e) = unpack(self.u64_at(NEWEST).load(Ordering::Relaxed), tail)
        {
            return Ok(Some((e, true)));
        }
        Ok(Some((self.entry(tail), false)))
    }

    /// The ring entry at position `i`, published or not (untrusted).
    pub(crate) fn entry(&self, i: u64) -> Entry {
        let at = self.entry_at(i);
        Entry {
            slot: self.u32_at(at).load(Ordering::Relaxed),
            flags: self.u32_at(at + 4).load(Ordering::Relaxed),
            len: self.u64_at(at + 8).load(Ordering::Relaxed),
        }
    }

    /// Receiver: mark entries up to `tail` consumed.
    pub(crate) fn consume(&self, tail: u64) {
        self.tail_atomic().store(tail, Ordering::Release);
    }

    /// Receiver: announce sleeping (`true`) or awake. Re-check the ring after setting it.
    pub(crate) fn set_rx_waiting(&self, waiting: bool) {
        self.u32_at(RX_WAITING)
            .store(waiting as u32, Ordering::SeqCst);
    }

    /// Receiver: release a slot back to the sender. Returns whether the sender sleeps.
    pub(crate) fn release(&self, slot: u32) -> bool {
        let head = self.u64_at(REL_HEAD).load(Ordering::Relaxed);
        let at = REL_RING_AT + (head % RING as u64) as usize * 4;
        self.u32_at(at).store(slot, Ordering::Relaxed);
        self.u64_at(REL_HEAD).store(head + 1, Ordering::SeqCst);
        self.u32_at(TX_WAITING).load(Ordering::SeqCst) != 0
    }

    /// Sender: collect released slots into `out` (untrusted values are filtered by the caller).
    pub(crate) fn collect_releases(&self, out: &mut Vec<u32>) {
        let head = self.u64_at(REL_HEAD).load(Ordering::Acquire);
        let mut tail = self.u64_at(REL_TAIL).load(Ordering::Relaxed);
        let head = head.min(tail + RING as u64);
        while tail < head {
            let at = REL_RING_AT + (tail % RING as u64) as usize * 4;
            out.push(self.u32_at(at).load(Ordering::Relaxed));
            tail += 1;
        }
        self.u64_at(REL_TAIL).store(tail, Ordering::Release);
    }

    /// Sender: announce that message number `head` is being written. Returns
    /// whether the receiver sleeps: ring it, so that it waits awake and its wake-up
    /// overlaps the writing instead of following the publish. Publishing the
    /// message (head + 1) ends the announcement without another store.
    pub(crate) fn begin(&self, head: u64, slot: u32) -> bool {
        self.u32_at(PRODUCING + 8).store(slot, Ordering::Relaxed);
        self.u64_at(PRODUCING).store(head + 1, Ordering::SeqCst);
        self.u32_at(RX_WAITING).load(Ordering::SeqCst) != 0
    }

    /// Sender: the message announced by [`begin`](Self::begin) will not be published.
    pub(crate) fn cancel(&self, head: u64) {
        self.u64_at(PRODUCING).store(head, Ordering::SeqCst);
    }

    /// Receiver: whether the sender is writing a message now.
    pub(crate) fn producing(&self) -> bool {
        self.u64_at(PRODUCING).load(Ordering::SeqCst) > self.u64_at(HEAD).load(Ordering::SeqCst)
    }

    /// Sender: announce sleeping (`true`) or awake.
    pub(crate) fn set_tx_waiting(&self, waiting: bool) {
        self.u32_at(TX_WAITING)
            .store(waiting as u32, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(slot: u32, len: u64) -> Entry {
        Entry {
            slot,
            flags: 0,
            len,
        }
    }

    #[test]
    fn packed_entries_round_trip_and_only_for_their_own_number() {
        for (number, e) in [
            (0, entry(0, 0)),
            (7, entry(31, 4096)),
            (1 << 40, entry(255, (1 << 40) - 1)),
        ] {
            let w = pack(number, e);
            assert_eq!(unpack(w, number), Some(e));
            for other in [number + 1, number + 64, number.wrapping_sub(1)] {
                assert_eq!(unpack(w, other), None, "number {number} read as {other}");
            }
        }
        let dedicated = Entry {
            slot: u32::MAX,
            flags: DEDICATED,
            len: 10,
        };
        for e in [dedicated, entry(256, 1), entry(0, 1 << 40)] {
            assert_eq!(pack(3, e), 0, "{e:?} does not fit");
            assert_eq!(unpack(pack(3, e), 3), None);
        }
    }

    #[test]
    fn peek_reads_the_only_new_entry_from_the_head_line_and_others_from_the_ring() {
        let block = PrivateBlock::new();
        let c = &block.control();
        c.publish(0, entry(1, 100));
        assert_eq!(c.peek(0), Ok(Some(entry(1, 100))));
        c.publish(1, entry(2, 200));
        c.publish(2, entry(3, 300));
        // Two new: the ring answers for the older one.
        assert_eq!(c.peek(1), Ok(Some(entry(2, 200))));
        assert_eq!(c.peek(2), Ok(Some(entry(3, 300))));
        // A `newest` word that belongs to another number is not used.
        c.u64_at(NEWEST)
            .store(pack(9, entry(5, 500)), Ordering::Relaxed);
        assert_eq!(c.peek(2), Ok(Some(entry(3, 300))));
        // A dedicated message is never packed; the ring has it.
        let dedicated = Entry {
            slot: u32::MAX,
            flags: DEDICATED,
            len: 1 << 41,
        };
        c.publish(3, dedicated);
        assert_eq!(c.peek(3), Ok(Some(dedicated)));
    }
}
