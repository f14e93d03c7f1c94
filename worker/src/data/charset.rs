//! The text of a web page in whatever charset it was served: UTF-8 when the bytes are (most of the
//! web, and every page that is read as before), else the charset the HTTP header or a `<meta>` tag in
//! the first 1,024 bytes declares, else the one `chardetng` (Firefox's detector) guesses, with the
//! URL's top-level domain as a hint. `encoding_rs` decodes (the WHATWG Encoding Standard's decoders,
//! replacing malformed sequences). DataTrove does the same with `charset_normalizer` after a UTF-8
//! attempt.

use std::borrow::Cow;

use chardetng::EncodingDetector;
use encoding_rs::{Encoding, UTF_8};

/// A decoded body: its text (borrowed from the body when that is UTF-8 already), and the charset it
/// was decoded from when that was not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The text.
    pub text: Cow<'a, str>,
    /// The charset's WHATWG name (`windows-1252`, `Shift_JIS`, ...), `None` for UTF-8.
    pub charset: Option<&'static str>,
}

/// Decodes an HTML body served with `content_type` from `url`.
pub fn decode_html<'a>(body: &'a [u8], content_type: Option<&str>, url: Option<&str>) -> Decoded<'a> {
    if let Some((encoding, bom)) = Encoding::for_bom(body) {
        return decode(encoding, &body[bom..]);
    }
    if let Ok(text) = std::str::from_utf8(body) {
        return Decoded { text: Cow::Borrowed(text), charset: None };
    }
    let declared = content_type.and_then(charset_param).or_else(|| meta_charset(&body[..body.len().min(1024)]));
    let encoding = declared.filter(|e| *e != UTF_8).unwrap_or_else(|| {
        let mut detector = EncodingDetector::new();
        detector.feed(body, true);
        detector.guess(url.and_then(top_level_domain).map(str::as_bytes), true)
    });
    decode(encoding, body)
}

fn decode<'a>(encoding: &'static Encoding, bytes: &'a [u8]) -> Decoded<'a> {
    let (text, _) = encoding.decode_without_bom_handling(bytes);
    Decoded { text, charset: (encoding != UTF_8).then(|| encoding.name()) }
}

/// The encoding a `charset=` parameter names (`text/html; charset="iso-8859-1"`).
fn charset_param(header: &str) -> Option<&'static Encoding> {
    let lower = header.to_ascii_lowercase();
    let at = lower.find("charset=")? + "charset=".len();
    let value = header[at..].split([';', ' ', ',']).next()?.trim_matches(['"', '\'']);
    Encoding::for_label(value.as_bytes())
}

/// The charset of a `<meta charset=...>` or `<meta http-equiv="content-type" content="...;
/// charset=...">` tag in `head` (the HTML standard's prescan looks at the first 1,024 bytes).
fn meta_charset(head: &[u8]) -> Option<&'static Encoding> {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("<meta") {
        let tag = &rest[at..rest[at..].find('>').map_or(rest.len(), |end| at + end)];
        if let Some(found) = charset_param(tag) {
            return Some(found);
        }
        rest = &rest[at + 5..];
    }
    None
}

/// The last label of a URL's host (`jp` in `https://www.example.co.jp/x`).
fn top_level_domain(url: &str) -> Option<&str> {
    let host = url.split("://").nth(1)?.split(['/', '?', '#', ':']).next()?;
    host.rsplit('.').next().filter(|tld| tld.chars().all(|c| c.is_ascii_alphabetic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_read_as_it_is_and_other_charsets_are_decoded() {
        let utf8 = "<p>Grüße aus Köln</p>";
        assert_eq!(decode_html(utf8.as_bytes(), Some("text/html"), None), Decoded { text: utf8.into(), charset: None });
        // Latin-1 bytes declared in the header, in a <meta> tag, and not at all.
        let (latin1, _, _) = encoding_rs::WINDOWS_1252.encode(utf8);
        let declared = decode_html(&latin1, Some("text/html; charset=ISO-8859-1"), None);
        assert_eq!(declared, Decoded { text: utf8.into(), charset: Some("windows-1252") });
        let page = format!("<html><head><meta charset=\"iso-8859-1\"></head><body>{utf8}</body></html>");
        let (bytes, _, _) = encoding_rs::WINDOWS_1252.encode(&page);
        assert_eq!(decode_html(&bytes, Some("text/html"), None).text, page);
        let german =
            "<p>Die Straße führt über die Brücke zur Kirche. Schöne Grüße aus München, Düsseldorf und Köln.</p>";
        let (bytes, _, _) = encoding_rs::WINDOWS_1252.encode(german);
        assert_eq!(decode_html(&bytes, None, Some("https://www.example.de/seite")).text, german);
        // Shift_JIS, guessed with the .jp hint.
        let japanese = "<p>日本語のウェブページです。東京の天気は晴れです。今日はとても良い天気ですね。</p>";
        let (bytes, _, _) = encoding_rs::SHIFT_JIS.encode(japanese);
        let guessed = decode_html(&bytes, Some("text/html"), Some("http://example.jp/"));
        assert_eq!(guessed, Decoded { text: japanese.into(), charset: Some("Shift_JIS") });
    }

    #[test]
    fn a_byte_order_mark_wins_and_is_not_kept() {
        let mut bytes = vec![0xFF, 0xFE];
        bytes.extend("<p>hi</p>".encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode_html(&bytes, None, None), Decoded { text: "<p>hi</p>".into(), charset: Some("UTF-16LE") });
    }
}
