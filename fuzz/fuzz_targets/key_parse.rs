//! Any bytes as an `Idempotency-Key` header value: parsing never panics, and what it accepts is
//! always a valid key that parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oncepay_core::key::{IdempotencyKey, KEY_LEN_MAX};

fuzz_target!(|data: &[u8]| {
    let Ok(key) = IdempotencyKey::parse(data) else {
        return;
    };
    let text = key.as_str();
    assert!((1..=KEY_LEN_MAX).contains(&text.len()));
    assert!(text.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    // A key that does not start with a quote is its own header value; one that does would be
    // unquoted again, which is the sf-string rule, not a round trip.
    if !text.starts_with('"') {
        assert_eq!(IdempotencyKey::parse(text.as_bytes()), Ok(key.clone()));
    }
});
