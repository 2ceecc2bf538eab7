//! Request fingerprints: strict JSON parsing, RFC 8785 canonical form and the SHA-256 digest.
//!
//! Two requests share a fingerprint exactly when they ask for the same thing: the same method,
//! route template, path parameters, query and JSON body up to key order, whitespace and string
//! escapes. Array order and every value still count.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 digest identifying what a request asked for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The digest as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits back into a fingerprint.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..12])
    }
}

/// Everything about a request that its fingerprint covers.
#[derive(Debug, Clone, Copy)]
pub struct RequestShape<'a> {
    /// The HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The route template, e.g. `/v1/payments/{id}/refunds`.
    pub route: &'a str,
    /// The values of the route's path parameters, in route order.
    pub path_params: &'a [(&'a str, &'a str)],
    /// The raw query string, empty when there is none.
    pub query: &'a str,
    /// The parsed JSON body, `None` for an empty body.
    pub body: Option<&'a Value>,
}

impl RequestShape<'_> {
    /// The fingerprint of this request.
    ///
    /// Each part is length-prefixed so that no two different requests can be cut into the same
    /// byte stream.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut hasher = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        part(self.method.as_bytes());
        part(self.route.as_bytes());
        for (name, value) in self.path_params {
            part(name.as_bytes());
            part(value.as_bytes());
        }
        part(self.query.as_bytes());
        let body = if cfg!(feature = "mutant-fingerprint-ignores-body") {
            mutant_body_left_out(self.body)
        } else {
            self.body
        };
        match body {
            Some(body) => part(&canonical_json(body)),
            None => part(b""),
        }
        Fingerprint(hasher.finalize().into())
    }
}

/// The body-left-out bug of the mutation proof: every body hashes like an empty one.
fn mutant_body_left_out(_body: Option<&Value>) -> Option<&Value> {
    None
}

/// The RFC 8785 (JSON Canonicalization Scheme) serialisation of a value.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    // A `Value` holds only finite numbers and valid strings, which JCS can always serialise.
    serde_json_canonicalizer::to_vec(value).unwrap_or_default()
}

/// Why a request body is not acceptable JSON.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct JsonError {
    /// The member at fault when one is known (a duplicated member's name), else `None`.
    pub field: Option<String>,
    /// What is wrong, for a human.
    pub message: String,
}

/// Parses JSON, refusing duplicated object members at any depth.
///
/// `serde_json` keeps the last of two equal members silently; a payment body where `amount`
/// appears twice is ambiguous, so it is rejected instead of guessed at.
///
/// # Errors
///
/// [`JsonError`] for malformed JSON, trailing data or a duplicated member.
pub fn parse_json_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = StrictSeed {
        duplicate: &duplicate,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    parsed.map_err(|err| match duplicate.into_inner() {
        Some(name) => JsonError {
            message: format!("the member \"{name}\" appears more than once"),
            field: Some(name),
        },
        None => JsonError {
            field: None,
            message: format!("the body is not valid JSON: {err}"),
        },
    })
}

/// A seed that builds a [`Value`] and remembers the first duplicated member it meets.
#[derive(Clone, Copy)]
struct StrictSeed<'a> {
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value_seed(self)?;
            if members.contains_key(&name) {
                let message = format!("duplicate member `{name}`");
                self.duplicate.borrow_mut().get_or_insert(name);
                return Err(de::Error::custom(message));
            }
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn shape_fingerprint(body: &str) -> Fingerprint {
        let value = parse_json_strict(body.as_bytes()).expect("valid json");
        RequestShape {
            method: "POST",
            route: "/v1/payments",
            path_params: &[],
            query: "",
            body: Some(&value),
        }
        .fingerprint()
    }

    #[test]
    fn key_order_whitespace_and_escapes_do_not_change_the_fingerprint() {
        let base = shape_fingerprint(r#"{"amount":1250,"currency":"EUR","m":{"a":"1","b":"2"}}"#);
        for same in [
            r#"{"currency":"EUR","amount":1250,"m":{"b":"2","a":"1"}}"#,
            "{\n\t\"amount\" : 1250 ,\n \"currency\":\"\\u0045UR\", \"m\":{\"a\":\"1\",\"b\":\"2\"}}",
        ] {
            assert_eq!(shape_fingerprint(same), base, "{same}");
        }
    }

    #[test]
    fn values_and_array_order_change_the_fingerprint() {
        let base = shape_fingerprint(r#"{"amount":1250,"tags":["a","b"]}"#);
        assert_ne!(
            shape_fingerprint(r#"{"amount":1251,"tags":["a","b"]}"#),
            base
        );
        assert_ne!(
            shape_fingerprint(r#"{"amount":1250,"tags":["b","a"]}"#),
            base
        );
    }

    #[test]
    fn route_parameters_and_query_change_the_fingerprint() {
        let body = Value::Null;
        let fingerprint = |id: &'static str, query: &'static str| {
            RequestShape {
                method: "POST",
                route: "/v1/payments/{id}/refunds",
                path_params: &[("id", id)],
                query,
                body: Some(&body),
            }
            .fingerprint()
        };
        let base = fingerprint("pay_1", "");
        assert_ne!(fingerprint("pay_2", ""), base);
        assert_ne!(fingerprint("pay_1", "x=1"), base);
    }

    #[test]
    fn a_duplicated_member_is_rejected_naming_the_member() {
        let err = parse_json_strict(br#"{"amount":1,"amount":1250}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("amount"));
        let nested = parse_json_strict(br#"{"metadata":{"a":"1","a":"2"}}"#).unwrap_err();
        assert_eq!(nested.field.as_deref(), Some("a"));
    }

    #[test]
    fn malformed_json_and_trailing_data_are_rejected() {
        for bad in [&b"{"[..], b"{\"a\":1} x", b"", b"[1,]"] {
            let err = parse_json_strict(bad).unwrap_err();
            assert_eq!(err.field, None);
        }
    }

    #[test]
    fn hex_round_trips() {
        let fp = shape_fingerprint("{}");
        assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Some(fp));
    }
}

#[cfg(all(test, not(loom)))]
mod more_tests {
    use super::*;

    #[test]
    fn from_hex_refuses_anything_but_64_hex_digits() {
        assert_eq!(Fingerprint::from_hex("ab"), None);
        assert_eq!(Fingerprint::from_hex(&"g".repeat(64)), None);
        assert_eq!(Fingerprint::from_hex(&"é".repeat(32)), None);
        assert_eq!(
            Fingerprint::from_hex(&"0".repeat(64)),
            Some(Fingerprint([0; 32]))
        );
    }

    #[test]
    fn debug_shows_a_short_hex_prefix() {
        assert_eq!(
            format!("{:?}", Fingerprint([0xab; 32])),
            "Fingerprint(abababababab)"
        );
    }

    #[test]
    fn strict_parsing_keeps_every_kind_of_value() {
        let text = r#"{"t":true,"f":false,"i":-7,"u":7,"x":1.5,"s":"a","n":null,"a":[1,"b"]}"#;
        let strict = parse_json_strict(text.as_bytes()).unwrap();
        let plain: Value = serde_json::from_str(text).unwrap();
        assert_eq!(strict, plain);
        assert_eq!(
            parse_json_strict(br#""\u00e9""#).unwrap(),
            Value::String("é".into())
        );
    }
}
