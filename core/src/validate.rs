//! Request validation: turns a parsed JSON body into a typed request or field-level errors.
//!
//! Validation reads the `serde_json::Value` itself rather than leaning on typed deserialisation,
//! so every error names its field and an amount of `1250.0` or `"1250"` is refused, not coerced.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::wire::{CreatePayment, CreateRefund, Currency, CustomerId, FieldError, MinorUnits};

/// The smallest amount a payment or refund may have, in minor units.
pub const AMOUNT_MIN: i64 = 1;
/// The largest amount: a billion in a two-decimal currency, far below where `i64` sums overflow.
pub const AMOUNT_MAX: i64 = 100_000_000_000;
/// The longest description; enough for a line on a statement, small enough to store cheaply.
pub const DESCRIPTION_CHARS_MAX: usize = 500;
/// The most metadata entries a payment may carry.
pub const METADATA_ENTRIES_MAX: usize = 20;
/// The longest metadata key.
pub const METADATA_KEY_CHARS_MAX: usize = 40;
/// The longest metadata value.
pub const METADATA_VALUE_CHARS_MAX: usize = 500;
/// The longest customer id.
pub const CUSTOMER_ID_CHARS_MAX: usize = 64;

/// Active ISO 4217 currency codes that a card payment can be made in (funds, precious metals
/// and testing codes excluded).
const CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// Collects field errors while a body is read.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

/// Validates the body of `POST /v1/payments`.
///
/// # Errors
///
/// Every field error found, in field order.
pub fn create_payment(body: &Value) -> Result<CreatePayment, Vec<FieldError>> {
    let mut errors = Errors::default();
    let Some(object) = as_object(body, &mut errors) else {
        return Err(errors.0);
    };
    let allowed = [
        "amount",
        "currency",
        "customer_id",
        "description",
        "metadata",
    ];
    reject_unknown(object, &allowed, &mut errors);

    let amount = amount(object.get("amount"), true, &mut errors);
    let currency = currency(object.get("currency"), &mut errors);
    let customer_id = customer_id(object.get("customer_id"), &mut errors);
    let description = description(object.get("description"), &mut errors);
    let metadata = metadata(object.get("metadata"), &mut errors);
    match (amount, currency, customer_id) {
        (Some(amount), Some(currency), Some(customer_id)) if errors.0.is_empty() => {
            Ok(CreatePayment {
                amount,
                currency,
                customer_id,
                description,
                metadata,
            })
        }
        _ => Err(errors.0),
    }
}

/// Validates the body of `POST /v1/payments/{id}/refunds`; an empty body is `{}`.
///
/// # Errors
///
/// Every field error found.
pub fn create_refund(body: Option<&Value>) -> Result<CreateRefund, Vec<FieldError>> {
    let Some(body) = body else {
        return Ok(CreateRefund::default());
    };
    let mut errors = Errors::default();
    let Some(object) = as_object(body, &mut errors) else {
        return Err(errors.0);
    };
    reject_unknown(object, &["amount"], &mut errors);
    let amount = amount(object.get("amount"), false, &mut errors);
    if errors.0.is_empty() {
        Ok(CreateRefund { amount })
    } else {
        Err(errors.0)
    }
}

fn as_object<'a>(body: &'a Value, errors: &mut Errors) -> Option<&'a Map<String, Value>> {
    let object = body.as_object();
    if object.is_none() {
        errors.push("body", "the body must be a JSON object");
    }
    object
}

fn reject_unknown(object: &Map<String, Value>, allowed: &[&str], errors: &mut Errors) {
    for name in object
        .keys()
        .filter(|name| !allowed.contains(&name.as_str()))
    {
        errors.push(name, "unknown field");
    }
}

fn amount(value: Option<&Value>, required: bool, errors: &mut Errors) -> Option<MinorUnits> {
    let value = match (value, required) {
        (None, false) => return None,
        (None | Some(Value::Null), true) => {
            errors.push("amount", "amount is required");
            return None;
        }
        // An explicit null is refused rather than read as "everything that is left": a client
        // bug must not turn into a full refund.
        (Some(Value::Null), false) => {
            errors.push("amount", "amount must be an integer, or left out");
            return None;
        }
        (Some(value), _) => value,
    };
    match value.as_i64() {
        // `as_i64` is `None` for floats (`1250.0`, `1.25e3`), strings and integers beyond i64.
        Some(amount) if (AMOUNT_MIN..=AMOUNT_MAX).contains(&amount) => Some(MinorUnits(amount)),
        _ => {
            let range = format!("from {AMOUNT_MIN} to {AMOUNT_MAX}");
            errors.push(
                "amount",
                format!("amount must be an integer number of minor units {range}"),
            );
            None
        }
    }
}

fn required_str<'a>(field: &str, value: Option<&'a Value>, errors: &mut Errors) -> Option<&'a str> {
    match value {
        None | Some(Value::Null) => {
            errors.push(field, format!("{field} is required"));
            None
        }
        Some(Value::String(text)) => Some(text),
        Some(_) => {
            errors.push(field, format!("{field} must be a string"));
            None
        }
    }
}

fn currency(value: Option<&Value>, errors: &mut Errors) -> Option<Currency> {
    let code = required_str("currency", value, errors)?;
    if CURRENCIES.contains(&code) {
        Some(Currency(code.to_owned()))
    } else {
        errors.push(
            "currency",
            "currency must be an ISO 4217 code in upper case, e.g. EUR",
        );
        None
    }
}

fn customer_id(value: Option<&Value>, errors: &mut Errors) -> Option<CustomerId> {
    let id = required_str("customer_id", value, errors)?;
    if is_customer_id(id) {
        Some(CustomerId(id.to_owned()))
    } else {
        errors.push(
            "customer_id",
            "customer_id must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
        );
        None
    }
}

/// Whether `id` is a valid customer id: 1 ..= 64 of `[A-Za-z0-9_-]`.
pub fn is_customer_id(id: &str) -> bool {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    (1..=CUSTOMER_ID_CHARS_MAX).contains(&id.len()) && id.chars().all(valid_char)
}

fn description(value: Option<&Value>, errors: &mut Errors) -> Option<String> {
    match value {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if text.chars().count() <= DESCRIPTION_CHARS_MAX => {
            Some(text.clone())
        }
        Some(Value::String(_)) => {
            errors.push("description", "description is longer than 500 characters");
            None
        }
        Some(_) => {
            errors.push("description", "description must be a string");
            None
        }
    }
}

fn metadata(value: Option<&Value>, errors: &mut Errors) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let entries = match value {
        None | Some(Value::Null) => return out,
        Some(Value::Object(entries)) => entries,
        Some(_) => {
            errors.push("metadata", "metadata must be an object of strings");
            return out;
        }
    };
    if entries.len() > METADATA_ENTRIES_MAX {
        errors.push("metadata", "metadata holds more than 20 entries");
    }
    for (key, value) in entries {
        let field = format!("metadata.{key}");
        if !(1..=METADATA_KEY_CHARS_MAX).contains(&key.chars().count()) {
            errors.push(&field, "metadata keys are 1 to 40 characters");
        }
        match value.as_str() {
            Some(text) if text.chars().count() <= METADATA_VALUE_CHARS_MAX => {
                out.insert(key.clone(), text.to_owned());
            }
            Some(_) => errors.push(&field, "metadata values are at most 500 characters"),
            None => errors.push(&field, "metadata values must be strings"),
        }
    }
    out
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(body: Value) -> Vec<String> {
        create_payment(&body)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_valid_payment_is_accepted() {
        let body = json!({"amount": 1250, "currency": "EUR", "customer_id": "cus_001",
            "description": "tea", "metadata": {"order": "42"}});
        let payment = create_payment(&body).unwrap();
        assert_eq!(payment.amount, MinorUnits(1250));
        assert_eq!(payment.metadata["order"], "42");
    }

    #[test]
    fn amounts_that_are_not_integers_in_range_are_refused() {
        for amount in [
            json!(1250.0),
            json!(1.25e3),
            json!("1250"),
            json!(12.5),
            json!(0),
            json!(-5),
            json!(9_007_199_254_740_993_u64),
            json!(AMOUNT_MAX + 1),
        ] {
            let body = json!({"amount": amount, "currency": "EUR", "customer_id": "c"});
            assert_eq!(fields(body), ["amount"], "{amount} was accepted");
        }
    }

    #[test]
    fn bad_currency_customer_and_unknown_fields_name_their_field() {
        let body = json!({"amount": 1, "currency": "EURO", "customer_id": "a b", "x": 1});
        assert_eq!(fields(body), ["x", "currency", "customer_id"]);
        let lower = json!({"amount": 1, "currency": "eur", "customer_id": "c"});
        assert_eq!(fields(lower), ["currency"]);
    }

    #[test]
    fn a_description_is_kept_up_to_its_limit() {
        let body =
            |d: &str| json!({"amount": 1, "currency": "EUR", "customer_id": "c", "description": d});
        let kept = create_payment(&body(&"é".repeat(500))).unwrap();
        assert_eq!(kept.description, Some("é".repeat(500)));
        assert_eq!(fields(body(&"d".repeat(501))), ["description"]);
    }

    #[test]
    fn twenty_metadata_entries_are_allowed() {
        let twenty: Map<String, Value> = (0..20).map(|i| (format!("k{i}"), json!("v"))).collect();
        let body = json!({"amount": 1, "currency": "EUR", "customer_id": "c", "metadata": twenty});
        assert_eq!(create_payment(&body).unwrap().metadata.len(), 20);
    }

    #[test]
    fn metadata_limits_are_enforced() {
        let many: Map<String, Value> = (0..21).map(|i| (format!("k{i}"), json!("v"))).collect();
        let body = json!({"amount": 1, "currency": "EUR", "customer_id": "c", "metadata": many});
        assert_eq!(fields(body), ["metadata"]);
        let long = json!({"amount": 1, "currency": "EUR", "customer_id": "c",
            "metadata": {"k": "v".repeat(501)}});
        assert_eq!(fields(long), ["metadata.k"]);
    }

    #[test]
    fn a_refund_body_may_be_empty_but_not_hold_a_bad_amount() {
        assert_eq!(create_refund(None), Ok(CreateRefund::default()));
        assert_eq!(create_refund(Some(&json!({}))), Ok(CreateRefund::default()));
        assert!(create_refund(Some(&json!({"amount": 0}))).is_err());
        assert!(create_refund(Some(&json!({"amount": null}))).is_err());
        assert!(create_refund(Some(&json!({"amount": 5, "reason": "x"}))).is_err());
    }
}
