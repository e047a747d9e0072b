//! Finding the next byte of a small set in JSON text, eight bytes at a time.
//!
//! The scanner spends its time looking for the next byte that can change its state: the end of
//! a string (`"` or `\`), a bracket, and at the top level a `:` or `,`. Most strings and runs of
//! a response are short (keys, ids, numbers), too short for [`memchr::memchr2`]'s vector setup
//! to pay off, and a byte-by-byte loop costs several instructions a byte. These functions read
//! the input as little-endian `u64` words and test all eight bytes of a word at once (SWAR, in
//! safe Rust), then hand long strings to `memchr`.
//!
//! A byte's test: `x = word ^ (byte * 0x01…01)` has a zero byte where `word` holds `byte`, and
//! `(x - 0x01…01) & !x & 0x80…80` sets the high bit of that zero byte. A borrow can also set
//! the high bit of a byte *above* a zero byte, never below one, so the lowest set bit always
//! marks the first match: exactly what a search needs.

use memchr::memchr2;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Bytes of a string searched eight at a time before `memchr2` takes over.
const SHORT_STRING: usize = 64;

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

/// The first `"` or `\` in `bytes`: the end of a string's plain content.
pub(crate) fn quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    let head = bytes.get(..SHORT_STRING).unwrap_or(bytes);
    if let Some(pos) = first(
        head,
        |word| equal(word, b'"') | equal(word, b'\\'),
        |b| b == b'"' || b == b'\\',
    ) {
        return Some(pos);
    }
    let rest = bytes.get(head.len()..)?;
    memchr2(b'"', b'\\', rest).map(|pos| pos + head.len())
}

/// The first `"`, `{`, `[`, `}` or `]` in `bytes`: what moves the depth inside a container.
pub(crate) fn string_or_bracket(bytes: &[u8]) -> Option<usize> {
    // `[` and `]` are `{` and `}` without bit 0x20, and no other byte becomes either with it.
    first(
        bytes,
        |word| {
            let folded = word | (ONES * 0x20);
            equal(word, b'"') | equal(folded, b'{') | equal(folded, b'}')
        },
        |b| matches!(b, b'"' | b'{' | b'[' | b'}' | b']'),
    )
}

/// The first `"`, bracket, `:` or `,` in `bytes`: what changes the state of a watched object.
pub(crate) fn structural(bytes: &[u8]) -> Option<usize> {
    first(
        bytes,
        |word| {
            let folded = word | (ONES * 0x20);
            equal(word, b'"')
                | equal(folded, b'{')
                | equal(folded, b'}')
                | equal(word, b':')
                | equal(word, b',')
        },
        |b| matches!(b, b'"' | b'{' | b'[' | b'}' | b']' | b':' | b','),
    )
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

    fn naive(bytes: &[u8], set: &[u8]) -> Option<usize> {
        bytes.iter().position(|b| set.contains(b))
    }

    /// Bytes drawn mostly from the ones searched for and their near neighbours (bit flips of
    /// them, borrows across them), with any byte now and then.
    fn text() -> impl Strategy<Value = Vec<u8>> {
        let tricky = proptest::sample::select(
            b"\"\\{}[]:,\x00\x01\x1f\x20\x21\x7f\x80\xff\x02\x5a\x5c\x7a\x7c\x3b\x2d\x5e\x7e\x22\x23aZ0 "
                .to_vec(),
        );
        let byte = prop_oneof![4 => tricky, 1 => any::<u8>()];
        proptest::collection::vec(byte, 0..200)
    }

    proptest! {
        #[test]
        fn each_search_finds_the_first_byte_of_its_set(bytes in text()) {
            prop_assert_eq!(quote_or_backslash(&bytes), naive(&bytes, b"\"\\"));
            prop_assert_eq!(string_or_bracket(&bytes), naive(&bytes, b"\"{[}]"));
            prop_assert_eq!(structural(&bytes), naive(&bytes, b"\"{[}]:,"));
            let special = bytes
                .iter()
                .position(|&b| !(0x20..0x80).contains(&b) || b == b'"' || b == b'\\');
            prop_assert_eq!(not_plain(&bytes), special);
        }
    }

    #[test]
    fn a_match_in_any_lane_and_past_the_short_head_is_found() {
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 200] {
            for at in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[at] = b'"';
                assert_eq!(quote_or_backslash(&bytes), Some(at));
                bytes[at] = b']';
                assert_eq!(string_or_bracket(&bytes), Some(at));
                bytes[at] = b',';
                assert_eq!(structural(&bytes), Some(at));
                bytes[at] = b'\n';
                assert_eq!(not_plain(&bytes), Some(at));
            }
            let bytes = vec![b'a'; len];
            assert_eq!(quote_or_backslash(&bytes), None);
            assert_eq!(not_plain(&bytes), None);
        }
    }
}
