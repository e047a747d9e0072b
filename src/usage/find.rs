//! Finding the bytes of JSON text that can change a scanner's state: the end of a string (`"`
//! or `\`), a bracket, and at the top level a `:` or `,`.
//!
//! [`Index`] looks at its input 64 bytes at a time: one 16-byte vector comparison per byte of
//! interest and lane (SSE2 through `wide`, safe Rust), turned into one bit per byte, so that a
//! block's masks are made once and every search in that block is a shift and a count of
//! trailing zeros. The scanner searches often and not far (most keys, values and runs between
//! tokens are a few bytes long), so a search must cost next to nothing; a string that runs past
//! its block is handed to `memchr2`, whose loop is faster over long text.
//!
//! [`not_plain`] checks short captured strings eight bytes at a time in a `u64` (SWAR).
//! A byte's test there: `x = word ^ (byte * 0x01…01)` has a zero byte where `word` holds
//! `byte`, and `(x - 0x01…01) & !x & 0x80…80` sets the high bit of that zero byte. A borrow can
//! also set the high bit of a byte *above* a zero byte, never below one, so the lowest set bit
//! always marks the first match: exactly what a search needs.

use memchr::memchr2;
use wide::u8x16;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Bytes per block of [`Index`]: one bit each in a `u64`.
const BLOCK: usize = 64;
/// Bytes per vector.
const LANE: usize = 16;

/// A set of bytes [`Index::next`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Set {
    /// `"` or `\`: the end of a string's plain content.
    QuoteOrBackslash,
    /// `"`, `{`, `[`, `}` or `]`: what moves the depth inside a container.
    StringOrBracket,
    /// `"`, a bracket, `:` or `,`: what changes the state of a watched object.
    Structural,
}

impl Set {
    fn holds(self, b: u8) -> bool {
        match self {
            Set::QuoteOrBackslash => matches!(b, b'"' | b'\\'),
            Set::StringOrBracket => matches!(b, b'"' | b'{' | b'[' | b'}' | b']'),
            Set::Structural => matches!(b, b'"' | b'{' | b'[' | b'}' | b']' | b':' | b','),
        }
    }
}

/// One block's bytes of each set, one bit per byte (bit `i` for the block's byte `i`).
#[derive(Debug, Clone, Copy, Default)]
struct Masks {
    quote_or_backslash: u64,
    string_or_bracket: u64,
    structural: u64,
}

impl Masks {
    /// The masks of `block`, at most [`BLOCK`] bytes; bytes past its end match nothing. All
    /// four lanes are compared even for a short last block: a loop with a fixed count is
    /// unrolled, and that is worth more than the lanes a short block could skip (inputs under
    /// one lane never get here, see [`Index::next_in_blocks`]).
    fn of(block: &[u8]) -> Masks {
        let mut padded = [0u8; BLOCK];
        let bytes = match <&[u8; BLOCK]>::try_from(block) {
            Ok(full) => full,
            Err(_) => {
                let len = block.len().min(BLOCK);
                if let (Some(dst), Some(src)) = (padded.get_mut(..len), block.get(..len)) {
                    dst.copy_from_slice(src);
                }
                &padded
            }
        };
        let quote = u8x16::splat(b'"');
        let backslash = u8x16::splat(b'\\');
        // `[` and `]` are `{` and `}` without bit 0x20, and no other byte becomes either with it.
        let case = u8x16::splat(0x20);
        let open = u8x16::splat(b'{');
        let close = u8x16::splat(b'}');
        let colon = u8x16::splat(b':');
        let comma = u8x16::splat(b',');
        let mut masks = Masks::default();
        for (lane, chunk) in bytes.chunks_exact(LANE).enumerate() {
            let mut array = [0u8; LANE];
            array.copy_from_slice(chunk);
            let v = u8x16::from(array);
            let folded = v | case;
            let bits = |m: u8x16| u64::from(m.to_bitmask()) << (lane * LANE);
            let quotes = bits(v.simd_eq(quote));
            let brackets = bits(folded.simd_eq(open) | folded.simd_eq(close));
            masks.quote_or_backslash |= quotes | bits(v.simd_eq(backslash));
            masks.string_or_bracket |= quotes | brackets;
            masks.structural |= quotes | brackets | bits(v.simd_eq(colon) | v.simd_eq(comma));
        }
        masks
    }

    fn of_set(&self, set: Set) -> u64 {
        match set {
            Set::QuoteOrBackslash => self.quote_or_backslash,
            Set::StringOrBracket => self.string_or_bracket,
            Set::Structural => self.structural,
        }
    }
}

/// The bytes of one input that can change a scanner's state, found block by block as searches
/// reach them (the masks of the last block searched are kept).
#[derive(Debug)]
pub(crate) struct Index<'a> {
    bytes: &'a [u8],
    /// The block whose masks `masks` holds (`usize::MAX`: none yet).
    block: usize,
    masks: Masks,
}

impl<'a> Index<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Index {
            bytes,
            block: usize::MAX,
            masks: Masks::default(),
        }
    }

    /// The input.
    pub(crate) fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The index of the first byte at or after `from` that is in `set`.
    #[inline]
    pub(crate) fn next(&mut self, from: usize, set: Set) -> Option<usize> {
        // Most searches end in the block of the search before: a shift and a count.
        if from / BLOCK == self.block {
            let found = self.masks.of_set(set) & (u64::MAX << (from % BLOCK));
            if found != 0 {
                return Some(self.block * BLOCK + found.trailing_zeros() as usize);
            }
        }
        self.next_in_blocks(from, set)
    }

    /// [`Self::next`], block by block from the one that holds `from`.
    #[inline(never)]
    fn next_in_blocks(&mut self, from: usize, set: Set) -> Option<usize> {
        if self.bytes.len() < LANE {
            // A frame of a few bytes (a stream cut byte by byte): a loop costs less than a
            // lane's comparisons.
            let rest = self.bytes.get(from..)?;
            return rest
                .iter()
                .position(|&b| set.holds(b))
                .map(|pos| from + pos);
        }
        let mut block = from / BLOCK;
        // Bits of the first block below `from` are not looked at.
        let mut above = u64::MAX << (from % BLOCK);
        while block.saturating_mul(BLOCK) < self.bytes.len() {
            let found = self.masks(block).of_set(set) & above;
            if found != 0 {
                return Some(block * BLOCK + found.trailing_zeros() as usize);
            }
            block += 1;
            above = u64::MAX;
            if set == Set::QuoteOrBackslash {
                // A string longer than its block: the rest is for memchr's longer strides.
                let rest = self.bytes.get(block * BLOCK..)?;
                return memchr2(b'"', b'\\', rest).map(|pos| block * BLOCK + pos);
            }
        }
        None
    }

    fn masks(&mut self, block: usize) -> Masks {
        if self.block != block {
            let start = block.saturating_mul(BLOCK);
            let end = start.saturating_add(BLOCK).min(self.bytes.len());
            self.masks = Masks::of(self.bytes.get(start..end).unwrap_or_default());
            self.block = block;
        }
        self.masks
    }
}

/// High bits marking the bytes of `word` equal to `byte` (the lowest one exact).
#[inline(always)]
fn equal(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// The index of the first byte of `bytes` for which `marks` (a word's match bits) or `is` (one
/// byte) says yes.
#[inline(always)]
fn first(bytes: &[u8], marks: impl Fn(u64) -> u64, is: impl Fn(u8) -> bool) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in words.by_ref() {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let found = marks(u64::from_le_bytes(word));
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| is(b))
        .map(|pos| at + pos)
}

/// The first byte of `bytes` that is not plain text: `"`, `\`, a control byte (below 0x20) or
/// a byte outside ASCII. A string whose content runs to its closing quote without one means
/// what it says, byte for byte.
pub(crate) fn not_plain(bytes: &[u8]) -> Option<usize> {
    first(
        bytes,
        |word| {
            // Below 0x20: subtracting 0x20 borrows into the high bit (exact for the lowest such
            // byte, as for `equal`). At or above 0x80: the high bit itself.
            let low = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
            low | (word & HIGHS) | equal(word, b'"') | equal(word, b'\\')
        },
        |b| !(0x20..0x80).contains(&b) || b == b'"' || b == b'\\',
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(bytes: &[u8], from: usize, set: &[u8]) -> Option<usize> {
        let rest = bytes.get(from..)?;
        rest.iter()
            .position(|b| set.contains(b))
            .map(|pos| from + pos)
    }

    const SETS: [(Set, &[u8]); 3] = [
        (Set::QuoteOrBackslash, b"\"\\"),
        (Set::StringOrBracket, b"\"{[}]"),
        (Set::Structural, b"\"{[}]:,"),
    ];

    /// Bytes drawn mostly from the ones searched for and their near neighbours (bit flips of
    /// them, borrows across them), with any byte now and then.
    fn text() -> impl Strategy<Value = Vec<u8>> {
        let tricky = proptest::sample::select(
            b"\"\\{}[]:,\x00\x01\x1f\x20\x21\x7f\x80\xff\x02\x5a\x5c\x7a\x7c\x3b\x2d\x5e\x7e\x22\x23\x5b\x5d\x7b\x7daZ0 "
                .to_vec(),
        );
        let byte = prop_oneof![4 => tricky, 1 => any::<u8>()];
        proptest::collection::vec(byte, 0..300)
    }

    proptest! {
        #[test]
        fn each_search_finds_the_first_byte_of_its_set(bytes in text(), order in any::<u64>()) {
            // From every position, and in an order that goes back now and then (a search in a
            // block before the one whose masks are kept).
            let mut index = Index::new(&bytes);
            for from in 0..=bytes.len() + 1 {
                let from = if order >> (from % 64) & 1 == 1 { bytes.len() + 1 - from } else { from };
                for (set, members) in SETS {
                    prop_assert_eq!(index.next(from, set), naive(&bytes, from, members), "{:?} from {}", set, from);
                }
            }
            let special = bytes
                .iter()
                .position(|&b| !(0x20..0x80).contains(&b) || b == b'"' || b == b'\\');
            prop_assert_eq!(not_plain(&bytes), special);
        }
    }

    #[test]
    fn a_match_in_any_lane_and_any_block_is_found() {
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200] {
            for at in 0..len {
                for (byte, set) in [
                    (b'"', Set::QuoteOrBackslash),
                    (b'\\', Set::QuoteOrBackslash),
                    (b']', Set::StringOrBracket),
                    (b'{', Set::StringOrBracket),
                    (b',', Set::Structural),
                    (b':', Set::Structural),
                ] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = byte;
                    let mut index = Index::new(&bytes);
                    for from in 0..=at {
                        assert_eq!(index.next(from, set), Some(at), "{len} {at} {from}");
                    }
                    assert_eq!(index.next(at + 1, set), None);
                }
                let mut bytes = vec![b'a'; len];
                bytes[at] = b'\n';
                assert_eq!(not_plain(&bytes), Some(at));
            }
            let bytes = vec![b'a'; len];
            let mut index = Index::new(&bytes);
            for (set, _) in SETS {
                assert_eq!(index.next(0, set), None);
            }
            assert_eq!(not_plain(&bytes), None);
        }
    }
}
