//! Pre-tokenisation: splitting text into chunks before BPE.
//!
//! The default (GPT-4 style, 1–2 digit numbers) pattern is matched by a hand-written scanner that
//! is equivalent to running the regex with `fancy_regex` (which is what `tiktoken` and `rustbpe`
//! do) but several times faster, because it never backtracks. Any other pattern goes through
//! `fancy_regex`. The character classes (`\p{L}`, `\p{N}`, `\s`, case-insensitive letters) are
//! taken from `regex-syntax`, the same Unicode tables the regex engines use, so the two paths agree
//! on every code point.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

use crate::TokenizerError;

/// The split pattern used when none is given (GPT-4 style with 1–2 digit numbers).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Splits text into pre-tokenisation chunks.
#[derive(Debug, Clone)]
pub enum Splitter {
    /// Hand-written scanner for [`DEFAULT_PATTERN`].
    Default,
    /// Any other pattern, run through `fancy_regex`.
    Regex(Box<fancy_regex::Regex>),
}

impl Splitter {
    /// Build the splitter for `pattern`; the default pattern gets the fast scanner.
    pub fn new(pattern: &str) -> Result<Self, TokenizerError> {
        if pattern == DEFAULT_PATTERN {
            return Ok(Splitter::Default);
        }
        if pattern.is_empty() {
            return Err(TokenizerError::InvalidPattern("the split pattern is empty".into()));
        }
        let regex = fancy_regex::Regex::new(pattern)
            .map_err(|e| TokenizerError::InvalidPattern(format!("{pattern:?}: {e}")))?;
        Ok(Splitter::Regex(Box::new(regex)))
    }

    /// Call `emit` with every chunk of `text`, in order.
    pub fn split<'t>(&self, text: &'t str, mut emit: impl FnMut(&'t str)) -> Result<(), TokenizerError> {
        match self {
            Splitter::Default => {
                let mut start = 0;
                while start < text.len() {
                    let end = default_chunk_end(text, start);
                    emit(&text[start..end]);
                    start = end;
                }
                Ok(())
            }
            Splitter::Regex(regex) => {
                for found in regex.find_iter(text) {
                    let found = found.map_err(|e| TokenizerError::Regex(e.to_string()))?;
                    // An empty match carries no bytes; BPE has nothing to do with it.
                    if !found.as_str().is_empty() {
                        emit(found.as_str());
                    }
                }
                Ok(())
            }
        }
    }
}

// Character classes. Flags are combined in one byte per code point of the BMP for O(1) lookups;
// astral code points fall back to a binary search over the class ranges.
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;

struct CharClasses {
    bmp: Vec<u8>,
    letters: Vec<(u32, u32)>,
    numbers: Vec<(u32, u32)>,
    spaces: Vec<(u32, u32)>,
    /// Case-insensitive forms of the contraction letters, e.g. `s` also matches `S` and `ſ`.
    fold_s_d_m_t: Vec<char>,
    fold_l: Vec<char>,
    fold_v: Vec<char>,
    fold_r: Vec<char>,
    fold_e: Vec<char>,
}

fn unicode_class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    // These are fixed, valid class expressions, so parsing cannot fail.
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .expect("built-in character class must parse");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => {
            class.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        HirKind::Literal(lit) => {
            let c = std::str::from_utf8(&lit.0).expect("literal is UTF-8").chars().next().expect("one char");
            vec![(c as u32, c as u32)]
        }
        other => panic!("built-in class {pattern:?} parsed to {other:?}"),
    }
}

fn class_chars(pattern: &str) -> Vec<char> {
    unicode_class_ranges(pattern)
        .into_iter()
        .flat_map(|(lo, hi)| (lo..=hi).filter_map(char::from_u32))
        .collect()
}

fn classes() -> &'static CharClasses {
    static CLASSES: OnceLock<CharClasses> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let letters = unicode_class_ranges(r"\p{L}");
        let numbers = unicode_class_ranges(r"\p{N}");
        let spaces = unicode_class_ranges(r"\s");
        let mut bmp = vec![0u8; 0x10000];
        for (ranges, flag) in [(&letters, LETTER), (&numbers, NUMBER), (&spaces, SPACE)] {
            for &(lo, hi) in ranges.iter() {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= flag;
                }
            }
        }
        CharClasses {
            bmp,
            letters,
            numbers,
            spaces,
            fold_s_d_m_t: class_chars("(?i:[sdmt])"),
            fold_l: class_chars("(?i:l)"),
            fold_v: class_chars("(?i:v)"),
            fold_r: class_chars("(?i:r)"),
            fold_e: class_chars("(?i:e)"),
        }
    })
}

fn in_ranges(ranges: &[(u32, u32)], cp: u32) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

#[inline]
fn flags(c: char) -> u8 {
    let classes = classes();
    let cp = c as u32;
    if cp < 0x10000 {
        return classes.bmp[cp as usize];
    }
    let mut f = 0;
    if in_ranges(&classes.letters, cp) {
        f |= LETTER;
    }
    if in_ranges(&classes.numbers, cp) {
        f |= NUMBER;
    }
    if in_ranges(&classes.spaces, cp) {
        f |= SPACE;
    }
    f
}

/// The char starting at byte `i` (which must be a char boundary inside `s`).
#[inline]
fn char_at(s: &str, i: usize) -> Option<char> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        Some(b as char)
    } else {
        s[i..].chars().next()
    }
}

#[inline]
fn is_letter(c: char) -> bool {
    flags(c) & LETTER != 0
}

#[inline]
fn is_cr_or_lf(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// End of the run of chars from `i` that satisfy `pred`.
#[inline]
fn run_end(s: &str, mut i: usize, pred: impl Fn(char) -> bool) -> usize {
    while let Some(c) = char_at(s, i) {
        if !pred(c) {
            break;
        }
        i += c.len_utf8();
    }
    i
}

/// Byte offset where the chunk starting at `start` ends, under [`DEFAULT_PATTERN`].
///
/// The alternatives are tried in the pattern's order and the first that matches wins, exactly as a
/// backtracking engine does. Every char starts some alternative, so the scanner never skips text.
fn default_chunk_end(s: &str, start: usize) -> usize {
    let Some(c) = char_at(s, start) else { return start };
    let after_c = start + c.len_utf8();
    let next = char_at(s, after_c);
    let f = flags(c);

    // 1. '(?i:[sdmt]|ll|ve|re)
    if c == '\'' {
        if let Some(c1) = next {
            let classes = classes();
            if classes.fold_s_d_m_t.contains(&c1) {
                return after_c + c1.len_utf8();
            }
            let after_c1 = after_c + c1.len_utf8();
            if let Some(c2) = char_at(s, after_c1) {
                let pair_matches = (classes.fold_l.contains(&c1) && classes.fold_l.contains(&c2))
                    || (classes.fold_v.contains(&c1) && classes.fold_e.contains(&c2))
                    || (classes.fold_r.contains(&c1) && classes.fold_e.contains(&c2));
                if pair_matches {
                    return after_c1 + c2.len_utf8();
                }
            }
        }
    }

    // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
    if f & LETTER != 0 {
        return run_end(s, after_c, is_letter);
    }
    if f & NUMBER == 0 && !is_cr_or_lf(c) && next.is_some_and(is_letter) {
        return run_end(s, after_c, is_letter);
    }

    // 3. \p{N}{1,2}
    if f & NUMBER != 0 {
        return match next {
            Some(c1) if flags(c1) & NUMBER != 0 => after_c + c1.len_utf8(),
            _ => after_c,
        };
    }

    // 4. ' '?[^\s\p{L}\p{N}]++[\r\n]*
    let is_other = |ch: char| flags(ch) & (LETTER | NUMBER | SPACE) == 0;
    let other_start = if c == ' ' && next.is_some_and(is_other) {
        Some(after_c)
    } else if is_other(c) {
        Some(start)
    } else {
        None
    };
    if let Some(i) = other_start {
        let end = run_end(s, i, is_other);
        return run_end(s, end, is_cr_or_lf);
    }

    // What is left starts with whitespace. Let the whole whitespace run be [start, ws_end).
    let ws_end = run_end(s, start, |ch| flags(ch) & SPACE != 0);

    // 5. \s*[\r\n]: the longest prefix of the run that ends in \r or \n.
    if let Some(last_newline) = s[start..ws_end].rfind(['\r', '\n']) {
        return start + last_newline + 1;
    }

    // 6. \s+(?!\S): the whole run at end of text, else the run minus its last char (if non-empty).
    if ws_end == s.len() {
        return ws_end;
    }
    let last_ws_start = s[..ws_end].char_indices().next_back().map_or(start, |(i, _)| i);
    if last_ws_start > start {
        return last_ws_start;
    }

    // 7. \s+
    ws_end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_fast(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        Splitter::Default.split(text, |c| out.push(c)).unwrap();
        out
    }

    fn split_regex(text: &str) -> Vec<String> {
        let regex = fancy_regex::Regex::new(DEFAULT_PATTERN).unwrap();
        regex.find_iter(text).map(|m| m.unwrap().as_str().to_string()).collect()
    }

    #[test]
    fn splits_like_the_regex_on_examples() {
        let cases = [
            "Hello world! It's 2024, isn't it?",
            "   leading spaces\n\n\ttabs\r\n  and   trailing   ",
            "I'LL WE'VE THEY'RE 'Sup 'ſ x'ſa",
            "12345 1 22 333 ٣٤٥ ½¼",
            "emoji 🎉🎉 and ñandú über straße",
            "a\n\n\n b\r\r\n  \n  c",
            "foo.bar()[baz] += 1;\n    return x",
            "  \u{a0}\u{2003}word \u{85}x",
            "",
            " ",
            "\n",
            "'",
            "''s",
        ];
        for case in cases {
            assert_eq!(split_fast(case), split_regex(case), "text: {case:?}");
        }
    }

    #[test]
    fn custom_pattern_uses_regex() {
        let splitter = Splitter::new(r"\w+|\s+").unwrap();
        let mut out = Vec::new();
        splitter.split("ab cd", |c| out.push(c)).unwrap();
        assert_eq!(out, vec!["ab", " ", "cd"]);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        assert!(matches!(Splitter::new("(unclosed"), Err(TokenizerError::InvalidPattern(_))));
        assert!(matches!(Splitter::new(""), Err(TokenizerError::InvalidPattern(_))));
    }

    fn interesting_char() -> impl Strategy<Value = char> {
        prop_oneof![
            4 => prop::sample::select(vec![
                ' ', ' ', '\n', '\r', '\t', '\'', 's', 'S', 'l', 'L', 'v', 'e', 'r', 'R', 'd', 'm', 't',
                'ſ', 'a', 'Z', '0', '7', '.', ',', '!', '-', '\u{a0}', '\u{2003}', '\u{85}', 'é', 'ß',
                '٣', '½', '🎉', '中', '\u{1d7d8}', '\u{10400}', '_', '(', ')',
            ]),
            1 => any::<char>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn fast_scanner_matches_fancy_regex(chars in prop::collection::vec(interesting_char(), 0..40)) {
            let text: String = chars.into_iter().collect();
            prop_assert_eq!(split_fast(&text), split_regex(&text));
        }

        #[test]
        fn chunks_concatenate_to_the_input(text in ".{0,60}") {
            prop_assert_eq!(split_fast(&text).concat(), text);
        }
    }
}
