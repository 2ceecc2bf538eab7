//! Any bytes as a request body: strict parsing never panics, and for every body it accepts the
//! canonical form is a fixed point (canonicalising the canonical form changes nothing), so the
//! fingerprint cannot depend on how the client happened to serialise the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oncepay_core::fingerprint::{canonical_json, parse_json_strict};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = parse_json_strict(data) else {
        return;
    };
    let canonical = canonical_json(&value);
    let reparsed = parse_json_strict(&canonical).expect("the canonical form is valid JSON");
    assert_eq!(canonical_json(&reparsed), canonical);
});
