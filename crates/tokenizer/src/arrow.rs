//! Reading an Arrow string array in place: its data bytes and offsets as `&str` rows, no copies.
//!
//! The buffers come from outside (Python hands over raw Arrow buffers), so nothing about them is
//! trusted: every offset is bounds-checked and every row checked to be UTF-8.

use crate::TokenizerError;

/// Offsets buffer of an Arrow string array, already sliced to the array (`len + 1` values):
/// int32 for `string`, int64 for `large_string`.
#[derive(Debug, Clone, Copy)]
pub enum ArrowOffsets<'a> {
    Small(&'a [i32]),
    Large(&'a [i64]),
}

/// Every row of the array as `&str`: row `i` is `data[offsets[i]..offsets[i + 1]]`.
pub fn arrow_strs<'a>(data: &'a [u8], offsets: ArrowOffsets<'_>) -> Result<Vec<&'a str>, TokenizerError> {
    match offsets {
        ArrowOffsets::Small(o) => rows(data, o.iter().map(|&x| i64::from(x))),
        ArrowOffsets::Large(o) => rows(data, o.iter().copied()),
    }
}

fn rows(data: &[u8], offsets: impl ExactSizeIterator<Item = i64> + Clone) -> Result<Vec<&str>, TokenizerError> {
    let ends = offsets.clone().skip(1);
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for (row, (start, end)) in offsets.zip(ends).enumerate() {
        let bytes = usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| data.get(s..e))
            .ok_or_else(|| {
                TokenizerError::InvalidArrow(format!(
                    "arrow offsets are corrupt at row {row}: {start}..{end} with {} data bytes",
                    data.len()
                ))
            })?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| TokenizerError::InvalidArrow(format!("arrow row {row} is not valid UTF-8: {e}")))?;
        out.push(text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_offsets() {
        let data = "héllo!abc".as_bytes();
        let rows = arrow_strs(data, ArrowOffsets::Small(&[0, 6, 7, 7, 10])).unwrap();
        assert_eq!(rows, vec!["héllo", "!", "", "abc"]);
        // A slice of a larger array: offsets need not start at 0.
        assert_eq!(arrow_strs(data, ArrowOffsets::Large(&[6, 7, 10])).unwrap(), vec!["!", "abc"]);
        assert!(arrow_strs(data, ArrowOffsets::Large(&[3])).unwrap().is_empty());
        assert!(arrow_strs(data, ArrowOffsets::Large(&[])).unwrap().is_empty());
    }

    #[test]
    fn corrupt_buffers_are_errors_naming_the_row() {
        let data = b"abc\xffdef";
        let cases: [(ArrowOffsets, &str); 5] = [
            (ArrowOffsets::Small(&[0, 3, 2]), "corrupt at row 1: 3..2"),
            (ArrowOffsets::Small(&[-1, 3]), "corrupt at row 0: -1..3"),
            (ArrowOffsets::Large(&[0, 8]), "corrupt at row 0: 0..8 with 7 data bytes"),
            (ArrowOffsets::Large(&[0, i64::MAX]), "corrupt at row 0"),
            (ArrowOffsets::Small(&[0, 3, 7]), "arrow row 1 is not valid UTF-8"),
        ];
        for (offsets, msg) in cases {
            match arrow_strs(data, offsets) {
                Err(TokenizerError::InvalidArrow(text)) => assert!(text.contains(msg), "{text} vs {msg}"),
                other => panic!("expected InvalidArrow({msg}), got {other:?}"),
            }
        }
    }
}
