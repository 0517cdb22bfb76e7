//! Per-partition offset bookkeeping for out-of-order completion.
//!
//! Records of one partition finish out of order (many are in flight, one
//! video's run takes minutes). Kafka stores one offset per partition, so the
//! runner commits the lowest unfinished offset, and stores the offsets above
//! it that are already done in the commit's metadata string. After a restart
//! or a rebalance, the new owner reads that metadata and skips those records
//! instead of running them again.
//!
//! Kafka caps commit metadata (`offset.metadata.max.bytes`, 4096 by default).
//! The set is encoded compactly in the smaller of two forms, as Confluent's
//! Parallel Consumer does: a bitset from the committed offset, or run lengths
//! of alternating not-done/done stretches. When even that is too long, the
//! highest offsets are left out: they are re-run, which is safe (at-least-
//! once), only wasteful.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Budget for the encoded metadata, below Kafka's default 4096-byte cap.
pub const METADATA_BUDGET: usize = 3900;

const PREFIX: &str = "vp1";

/// Offsets of one partition: what is in flight, what finished above the
/// lowest unfinished one, and where consumption stands.
#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Received and not yet finished.
    in_flight: BTreeSet<i64>,
    /// Finished, above the commit position (includes those inherited from
    /// the previous owner's commit metadata).
    done_above: BTreeSet<i64>,
    /// One past the highest offset received (or the committed position
    /// before anything arrives).
    next: i64,
}

impl PartitionOffsets {
    /// State for a partition whose committed position is `position`, with
    /// the metadata stored alongside it.
    pub fn from_commit(position: i64, metadata: &str) -> Self {
        let done_above = decode(position, metadata).unwrap_or_default();
        Self {
            in_flight: BTreeSet::new(),
            done_above,
            next: position,
        }
    }

    /// Registers a received record. Returns `false` when the record was
    /// already finished before (from commit metadata) and must be skipped.
    pub fn receive(&mut self, offset: i64) -> bool {
        self.next = self.next.max(offset + 1);
        if self.done_above.contains(&offset) {
            return false;
        }
        self.in_flight.insert(offset);
        true
    }

    /// Marks a received record finished (output durable, or failed and
    /// dead-lettered).
    pub fn complete(&mut self, offset: i64) {
        if self.in_flight.remove(&offset) {
            self.done_above.insert(offset);
        }
        let position = self.position();
        // Everything below the position is covered by the offset itself.
        self.done_above = self.done_above.split_off(&position);
    }

    /// The offset to commit: the lowest unfinished record, or one past the
    /// highest received when nothing is unfinished.
    pub fn position(&self) -> i64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }

    /// Records received and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Position and metadata for a commit.
    pub fn commit_point(&self) -> (i64, String) {
        let position = self.position();
        (
            position,
            encode(position, &self.done_above, METADATA_BUDGET),
        )
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes the finished offsets above `position`, within `budget` bytes.
pub fn encode(position: i64, done: &BTreeSet<i64>, budget: usize) -> String {
    let mut offsets: Vec<i64> = done.range(position + 1..).copied().collect();
    while !offsets.is_empty() {
        let s = encode_all(position, &offsets);
        if s.len() <= budget {
            return s;
        }
        // Too long: keep the lower half (the records that will be reached
        // first); the rest are re-run after a restart.
        offsets.truncate(offsets.len() / 2);
    }
    String::new()
}

fn encode_all(position: i64, offsets: &[i64]) -> String {
    let Some(&last) = offsets.last() else {
        return String::new();
    };
    let span = (last - position) as usize; // offsets are > position
    // Bitset: bit i set when position + 1 + i is done.
    let mut bits = vec![0u8; span.div_ceil(8)];
    for &o in offsets {
        let i = (o - position - 1) as usize;
        bits[i / 8] |= 1 << (i % 8);
    }
    // Run lengths: alternating not-done / done stretches from position + 1.
    let mut runs = Vec::new();
    let mut cursor = position + 1;
    let mut i = 0;
    while i < offsets.len() {
        let start = offsets[i];
        let mut end = start;
        while i + 1 < offsets.len() && offsets[i + 1] == end + 1 {
            i += 1;
            end += 1;
        }
        put_varint(&mut runs, (start - cursor) as u64);
        put_varint(&mut runs, (end - start + 1) as u64);
        cursor = end + 1;
        i += 1;
    }
    let (kind, body) = if bits.len() <= runs.len() {
        ('b', bits)
    } else {
        ('r', runs)
    };
    let mut payload = Vec::with_capacity(body.len() + 10);
    put_varint(&mut payload, position as u64);
    payload.extend_from_slice(&body);
    format!("{PREFIX}{kind}{}", URL_SAFE_NO_PAD.encode(payload))
}

/// Decodes metadata written by [`encode`] for the same position. Anything
/// else (another tool's metadata, a reset offset) yields `None`, which means
/// "nothing known to be done": safe.
pub fn decode(position: i64, metadata: &str) -> Option<BTreeSet<i64>> {
    let rest = metadata.strip_prefix(PREFIX)?;
    let mut chars = rest.chars();
    let kind = chars.next()?;
    let payload = URL_SAFE_NO_PAD.decode(chars.as_str()).ok()?;
    let mut input = payload.as_slice();
    let base = get_varint(&mut input)? as i64;
    if base != position {
        return None;
    }
    let mut done = BTreeSet::new();
    match kind {
        'b' => {
            for (byte_i, byte) in input.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        done.insert(position + 1 + (byte_i * 8 + bit) as i64);
                    }
                }
            }
        }
        'r' => {
            let mut cursor = position + 1;
            while !input.is_empty() {
                let gap = get_varint(&mut input)? as i64;
                let len = get_varint(&mut input)? as i64;
                cursor += gap;
                done.extend(cursor..cursor + len);
                cursor += len;
            }
        }
        _ => return None,
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_the_lowest_unfinished_record() {
        let mut p = PartitionOffsets::from_commit(10, "");
        for o in 10..15 {
            assert!(p.receive(o));
        }
        p.complete(12);
        p.complete(13);
        assert_eq!(p.position(), 10);
        p.complete(10);
        assert_eq!(p.position(), 11);
        p.complete(11);
        assert_eq!(p.position(), 14);
        p.complete(14);
        assert_eq!(p.position(), 15);
    }

    #[test]
    fn a_new_owner_skips_what_the_old_one_finished() {
        let mut old = PartitionOffsets::from_commit(0, "");
        for o in 0..100 {
            old.receive(o);
        }
        for o in (1..100).filter(|o| o % 3 != 0) {
            old.complete(o);
        }
        let (position, meta) = old.commit_point();
        assert_eq!(position, 0);
        let mut new = PartitionOffsets::from_commit(position, &meta);
        let rerun: Vec<i64> = (0..100).filter(|&o| new.receive(o)).collect();
        assert_eq!(rerun, (0..100).filter(|o| o % 3 == 0).collect::<Vec<_>>());
    }

    #[test]
    fn gaps_from_transaction_markers_do_not_hold_the_position_back() {
        // Offsets 3 and 7 are commit markers: never delivered.
        let mut p = PartitionOffsets::from_commit(0, "");
        for o in [0, 1, 2, 4, 5, 6] {
            p.receive(o);
            p.complete(o);
        }
        assert_eq!(p.position(), 7);
    }

    #[test]
    fn both_encodings_round_trip() {
        let position = 1_000_000;
        let sparse: BTreeSet<i64> = (0..50).map(|i| position + 1 + i * 997).collect();
        let dense: BTreeSet<i64> = (0..3000)
            .filter(|i| i % 2 == 0)
            .map(|i| position + 1 + i)
            .collect();
        for set in [sparse, dense] {
            let s = encode(position, &set, METADATA_BUDGET);
            assert!(s.len() <= METADATA_BUDGET);
            assert_eq!(decode(position, &s).unwrap(), set, "{s}");
        }
    }

    #[test]
    fn too_much_to_record_falls_back_to_a_safe_subset() {
        let position = 0;
        // Every other offset of 100k: neither form fits in 3.9 KB.
        let set: BTreeSet<i64> = (1..100_000).filter(|i| i % 2 == 1).collect();
        let s = encode(position, &set, METADATA_BUDGET);
        assert!(s.len() <= METADATA_BUDGET, "{}", s.len());
        let kept = decode(position, &s).unwrap_or_default();
        assert!(kept.is_subset(&set));
        assert!(!kept.is_empty());
        // What is kept is the lowest part: the first records reached again.
        assert_eq!(kept.first(), set.first());
    }

    #[test]
    fn metadata_for_another_position_or_tool_is_ignored() {
        let set: BTreeSet<i64> = [5, 6].into();
        let s = encode(3, &set, METADATA_BUDGET);
        assert!(decode(4, &s).is_none());
        assert!(decode(3, "something else").is_none());
        assert!(decode(3, "vp1xAAAA").is_none());
    }
}
