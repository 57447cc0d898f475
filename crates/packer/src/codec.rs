//! Token arrays as base64 text (standard alphabet, padded), for text-based (JSON) packer states.
//!
//! The encoded bytes are a width tag (2 or 4) followed by every token in little-endian at that
//! width: 2 bytes when all tokens fit in 16 bits (any vocabulary up to 65,536 tokens), else 4.
//! Base64 of 16-bit tokens keeps a state at 2.7 bytes per token instead of the many bytes per token
//! of a JSON list of integers. Base64 decoding is strict (only canonical text is accepted).

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why a string is not the encoding of a token array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

/// Base64 of the width tag and the little-endian bytes of `tokens` (16-bit when they all fit).
pub fn encode_tokens(tokens: &[u32]) -> String {
    let narrow = tokens.iter().all(|&t| t <= u32::from(u16::MAX));
    let width: usize = if narrow { 2 } else { 4 };
    let mut bytes = Vec::with_capacity(1 + width * tokens.len());
    bytes.push(width as u8);
    for &t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes()[..width]);
    }
    encode_bytes(&bytes)
}

/// Inverse of [`encode_tokens`].
pub fn decode_tokens(text: &str) -> Result<Vec<u32>, CodecError> {
    let bytes = decode_bytes(text)?;
    let Some((&width, body)) = bytes.split_first() else {
        return Err(CodecError("empty encoding (no width tag)".into()));
    };
    match width {
        2 if body.len() % 2 == 0 => Ok(body.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect()),
        4 if body.len() % 4 == 0 => Ok(body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        2 | 4 => Err(CodecError(format!("{} bytes is not a whole number of {width}-byte tokens", body.len()))),
        _ => Err(CodecError(format!("unknown token width tag {width} (expected 2 or 4)"))),
    }
}

/// Base64 of a loss mask: one byte (0 or 1) per token.
pub fn encode_mask(mask: &[u8]) -> String {
    encode_bytes(mask)
}

/// Inverse of [`encode_mask`]; every value must be 0 or 1.
pub fn decode_mask(text: &str) -> Result<Vec<u8>, CodecError> {
    let mask = decode_bytes(text)?;
    match mask.iter().position(|&m| m > 1) {
        Some(i) => Err(CodecError(format!("mask value {} at index {i} is not 0 or 1", mask[i]))),
        None => Ok(mask),
    }
}

fn encode_bytes(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = [n >> 18, n >> 12, n >> 6, n].map(|s| ALPHABET[(s & 63) as usize]);
        // A chunk of k bytes carries k + 1 significant characters; the rest is padding.
        out.extend_from_slice(&sextets[..chunk.len() + 1]);
        out.extend(std::iter::repeat_n(b'=', 3 - chunk.len()));
    }
    // Only ASCII characters from ALPHABET and '=' were written.
    String::from_utf8(out).unwrap_or_default()
}

fn sextet(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

fn decode_bytes(text: &str) -> Result<Vec<u8>, CodecError> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return Err(CodecError(format!("base64 length {} is not a multiple of 4", text.len())));
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let num_quads = text.len() / 4;
    for (q, quad) in text.chunks_exact(4).enumerate() {
        let padding = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && q + 1 != num_quads) {
            return Err(CodecError(format!("misplaced '=' padding in base64 group {q}")));
        }
        let mut n = 0u32;
        for &c in &quad[..4 - padding] {
            let s = sextet(c).ok_or_else(|| CodecError(format!("invalid base64 character {:?}", c as char)))?;
            n = (n << 6) | s;
        }
        n <<= 6 * padding as u32;
        let kept = 3 - padding;
        // Canonical encodings leave the bits below the last kept byte zero.
        if n & ((1u32 << (8 * padding as u32)) - 1) != 0 {
            return Err(CodecError(format!("non-canonical base64 padding bits in group {q}")));
        }
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..kept]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        assert_eq!(encode_bytes(b""), "");
        assert_eq!(encode_bytes(b"f"), "Zg==");
        assert_eq!(encode_bytes(b"fo"), "Zm8=");
        assert_eq!(encode_bytes(b"foo"), "Zm9v");
        assert_eq!(encode_bytes(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_tokens(&[1]), "AgEA"); // [2, 1, 0]
        assert_eq!(encode_tokens(&[65536]), "BAAAAQA="); // [4, 0, 0, 1, 0]
        assert_eq!(encode_tokens(&[]), "Ag==");
        assert_eq!(decode_tokens("AgEA").unwrap(), vec![1]);
        assert_eq!(decode_tokens("BAAAAQA=").unwrap(), vec![65536]);
        assert_eq!(encode_mask(&[0, 1, 1]), "AAEB");
        assert!(decode_mask("AAIB").is_err(), "2 is not a mask value");
    }

    #[test]
    fn rejects_malformed_text() {
        // Bad base64, then: no tag, unknown tag 1, odd length for width 2, 3 bytes for width 4.
        for bad in ["A", "AgEA=", "AQ==AAAA", "AQAAAA=A", "A===", "AQAAA*==", "Zh==", "Zm9=", "", "AQAA", "AgEAAA==", "BAAAAA=="] {
            assert!(decode_tokens(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn roundtrip(tokens in proptest::collection::vec(any::<u32>(), 0..64), narrow in any::<bool>()) {
            let tokens: Vec<u32> = if narrow { tokens.iter().map(|&t| t & 0xFFFF).collect() } else { tokens };
            let text = encode_tokens(&tokens);
            prop_assert_eq!(decode_tokens(&text).unwrap(), tokens);
        }

        #[test]
        fn mask_roundtrip(mask in proptest::collection::vec(0u8..2, 0..64)) {
            prop_assert_eq!(decode_mask(&encode_mask(&mask)).unwrap(), mask);
        }

        #[test]
        fn bytes_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_bytes(&encode_bytes(&bytes)).unwrap(), bytes);
        }
    }
}
