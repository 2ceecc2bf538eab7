//! The `Idempotency-Key` header value, validated at the edge.

use std::fmt;

use thiserror::Error;

/// The longest key accepted, counted after an sf-string is unquoted. Long enough for a UUID with
/// a prefix or a hash, short enough to keep an index entry small.
pub const KEY_LEN_MAX: usize = 255;

/// Why a request carries no usable idempotency key.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The header is absent.
    #[error("the Idempotency-Key header is required on this request")]
    Missing,
    /// The header is present but not a valid key.
    #[error("the Idempotency-Key header is invalid: {0}")]
    Invalid(&'static str),
}

/// A client's idempotency key: 1 ..= 255 visible ASCII characters, compared exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses the values of every `Idempotency-Key` header of a request.
    ///
    /// # Errors
    ///
    /// [`KeyError::Missing`] without a header; [`KeyError::Invalid`] for a repeated header or a
    /// value that is not a valid key.
    pub fn from_header_values<'a>(
        mut values: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Self, KeyError> {
        let first = values.next().ok_or(KeyError::Missing)?;
        if values.next().is_some() {
            return Err(KeyError::Invalid("the header was given more than once"));
        }
        Self::parse(first)
    }

    /// Parses one header value: surrounding spaces dropped, an RFC 8941 sf-string unquoted.
    ///
    /// # Errors
    ///
    /// [`KeyError::Invalid`] when the value is empty, too long, or holds anything but visible
    /// ASCII.
    pub fn parse(raw: &[u8]) -> Result<Self, KeyError> {
        let trimmed = trim_spaces(raw);
        let value = match trimmed.first() {
            Some(b'"') => unquote_sf_string(trimmed)?,
            _ => trimmed.to_vec(),
        };
        if value.is_empty() {
            return Err(KeyError::Invalid("the key is empty"));
        }
        if value.len() > KEY_LEN_MAX {
            return Err(KeyError::Invalid("the key is longer than 255 characters"));
        }
        if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(KeyError::Invalid(
                "the key may hold only visible ASCII characters (0x21 to 0x7E)",
            ));
        }
        // Every byte was checked to be ASCII just above.
        let text = String::from_utf8(value).map_err(|_| KeyError::Invalid("not ASCII"))?;
        Ok(Self(text))
    }

    /// The key as the client sent it (unquoted).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn trim_spaces(raw: &[u8]) -> &[u8] {
    let start = raw.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = raw.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => &raw[start..=end],
        _ => &[],
    }
}

/// Unquotes an RFC 8941 sf-string: `"` ... `"` with only `\"` and `\\` as escapes.
fn unquote_sf_string(quoted: &[u8]) -> Result<Vec<u8>, KeyError> {
    let malformed = KeyError::Invalid("a quoted key must be a valid structured-field string");
    let inner = quoted
        .strip_prefix(b"\"")
        .and_then(|rest| rest.strip_suffix(b"\""))
        .ok_or(malformed.clone())?;
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return Err(malformed),
            },
            b'"' => return Err(malformed),
            _ => out.push(byte),
        }
    }
    Ok(out)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<String, KeyError> {
        IdempotencyKey::parse(raw.as_bytes()).map(|k| k.0)
    }

    #[test]
    fn a_quoted_key_equals_the_bare_key() {
        assert_eq!(parse("\"abc\""), Ok("abc".into()));
        assert_eq!(parse("abc"), Ok("abc".into()));
        assert_eq!(parse(r#""a\"b\\c""#), Ok(r#"a"b\c"#.into()));
    }

    #[test]
    fn surrounding_spaces_are_not_part_of_the_key() {
        assert_eq!(parse("  k-1\t"), Ok("k-1".into()));
    }

    #[test]
    fn empty_long_spaced_and_non_ascii_keys_are_invalid() {
        for bad in [
            "",
            "   ",
            "\"\"",
            "a b",
            "caf\u{e9}",
            "a\u{7f}",
            "\"unterminated",
            r#""a"b""#,
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&"x".repeat(KEY_LEN_MAX)).is_ok());
        assert!(parse(&"x".repeat(KEY_LEN_MAX + 1)).is_err());
        let quoted_max = format!("\"{}\"", "x".repeat(KEY_LEN_MAX));
        assert!(
            parse(&quoted_max).is_ok(),
            "the limit applies after unquoting"
        );
    }

    #[test]
    fn a_repeated_header_is_invalid_and_an_absent_one_missing() {
        let twice = [b"a".as_slice(), b"a".as_slice()];
        assert!(matches!(
            IdempotencyKey::from_header_values(twice.into_iter()),
            Err(KeyError::Invalid(_))
        ));
        assert_eq!(
            IdempotencyKey::from_header_values(std::iter::empty()),
            Err(KeyError::Missing)
        );
    }

    #[test]
    fn a_key_displays_as_its_unquoted_value() {
        let key = IdempotencyKey::parse(b"\"abc\"").unwrap();
        assert_eq!(key.to_string(), "abc");
    }

    #[test]
    fn key_values_are_compared_case_sensitively() {
        assert_ne!(parse("K19"), parse("k19"));
    }
}
