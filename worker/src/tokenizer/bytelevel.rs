//! The byte-level pieces of GPT-2 style BPE: the byte <-> printable-character map that
//! `tokenizer.json` vocabularies are written in, and the pre-tokenizer that splits text into words.

use std::sync::LazyLock;

use regex::Regex;

/// The GPT-2 byte-to-character table: printable Latin-1 bytes map to themselves, the other 68 bytes
/// to U+0100 onwards, in byte order.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("the table stays below U+0200");
    }
    table
}

/// Bytes of a vocabulary entry written in the byte-level alphabet; `None` if a character is not in it.
pub fn token_bytes(token: &str) -> Option<Vec<u8>> {
    static INVERSE: LazyLock<[i16; 512]> = LazyLock::new(|| {
        let mut inverse = [-1i16; 512];
        for (b, c) in byte_to_char().iter().enumerate() {
            inverse[*c as usize] = b as i16;
        }
        inverse
    });
    token.chars().map(|c| INVERSE.get(c as usize).and_then(|&b| u8::try_from(b).ok())).collect()
}

/// The GPT-2 split pattern without its one look-ahead (`\s+(?!\S)`), which [`split`] restores.
const PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

static SPLIT: LazyLock<Regex> = LazyLock::new(|| Regex::new(PATTERN).expect("the split pattern compiles"));

/// Splits text into the words BPE works on, exactly as the `ByteLevel` pre-tokenizer of the
/// `tokenizers` library does (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`).
///
/// The look-ahead means: a run of whitespace followed by text gives up its last character, which then
/// starts the next word (`"a  b"` splits as `"a", " ", " b"`).
pub fn split(text: &str, mut word: impl FnMut(&str)) {
    let mut at = 0;
    while let Some(m) = SPLIT.find_at(text, at) {
        let mut end = m.end();
        let piece = m.as_str();
        if end < text.len() && piece.starts_with(char::is_whitespace) && piece.chars().all(char::is_whitespace) {
            // Followed by a non-space (the match is greedy): hand the last whitespace to the next word.
            let last = piece.chars().next_back().expect("matches are not empty");
            if piece.len() > last.len_utf8() {
                end -= last.len_utf8();
            }
        }
        word(&text[m.start()..end]);
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        split(text, |w| out.push(w.to_string()));
        out
    }

    #[test]
    fn table_is_a_bijection_onto_printable_characters() {
        let table = byte_to_char();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        for (b, c) in table.iter().enumerate() {
            assert_eq!(token_bytes(&c.to_string()), Some(vec![b as u8]));
        }
        assert_eq!(token_bytes("x\u{4e00}"), None);
    }

    #[test]
    fn whitespace_runs_leave_their_last_character_to_the_next_word() {
        assert_eq!(words("a  b"), ["a", " ", " b"]);
        assert_eq!(words("a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(words("x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(words("end   "), ["end", "   "]);
        assert_eq!(words("it's 42 dollars!!"), ["it", "'s", " 42", " dollars", "!!"]);
        assert_eq!(words("  héllo wörld\u{3000}日本"), [" ", " héllo", " wörld", "\u{3000}", "日本"]);
    }
}
