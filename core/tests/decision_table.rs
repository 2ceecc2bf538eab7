//! The whole decision table of the state machine, enumerated and snapshotted: every record
//! state, against the same and another payload, at every time boundary. A change in semantics
//! shows up as a reviewed diff of `snapshots/decision_table.snap`.
#![cfg(not(loom))]

use std::fmt::Write;
use std::time::Duration;

use oncepay_core::engine::{
    Decision, Policy, Record, RecordState, StoredResponse, decide, sweep_action,
};
use oncepay_core::fingerprint::Fingerprint;
use oncepay_core::time::Timestamp;

const T0: u64 = 1_000_000;

fn policy() -> Policy {
    Policy {
        lease: Duration::from_secs(5),
        retention: Duration::from_secs(10),
        tombstone_retention: Duration::from_secs(20),
    }
}

fn records() -> Vec<(&'static str, Option<Record>)> {
    let record = |state| Record {
        fingerprint: Fingerprint([1; 32]),
        token: 7,
        created_at: Timestamp(T0),
        state,
    };
    let response = StoredResponse {
        status: 201,
        content_type: "application/json".into(),
        location: None,
        body: b"{}".to_vec(),
        resource_id: Some("pay_1".into()),
    };
    vec![
        ("absent", None),
        (
            "in_flight(lease ends +5s)",
            Some(record(RecordState::InFlight {
                lease_expires_at: Timestamp(T0 + 5_000),
            })),
        ),
        (
            "completed(at +0s)",
            Some(record(RecordState::Completed {
                completed_at: Timestamp(T0),
                response,
            })),
        ),
        (
            "tombstone(completed at +0s)",
            Some(record(RecordState::Tombstone {
                completed_at: Timestamp(T0),
                response_status: 201,
                resource_id: Some("pay_1".into()),
            })),
        ),
    ]
}

/// Offsets from T0 that sit on and around every boundary: lease 5 s, retention 10 s,
/// tombstone end 30 s.
const OFFSETS_MS: [u64; 10] = [
    0, 4_001, 4_999, 5_000, 9_999, 10_000, 29_999, 30_000, 30_001, 99_000,
];

fn describe(decision: &Decision) -> String {
    match decision {
        Decision::Wait { retry_after_secs } => format!("wait (Retry-After {retry_after_secs})"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[test]
fn the_decision_table_matches_its_snapshot() {
    let mut table = String::new();
    for (name, record) in records() {
        for (payload, fingerprint) in [
            ("same", Fingerprint([1; 32])),
            ("other", Fingerprint([2; 32])),
        ] {
            for offset in OFFSETS_MS {
                let now = Timestamp(T0 + offset);
                let decision = decide(record.as_ref(), &fingerprint, now, &policy());
                let sweep = record.as_ref().map_or("-".into(), |r| {
                    format!("{:?}", sweep_action(r, now, &policy())).to_lowercase()
                });
                writeln!(
                    table,
                    "{name:<28} {payload:<5} +{offset:>6}ms  decide: {:<24} sweep: {sweep}",
                    describe(&decision)
                )
                .unwrap();
            }
        }
    }
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!("decision_table", table));
}
