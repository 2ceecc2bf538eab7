//! The reference model against the HTTP service itself: random sequences of requests (two
//! tenants, two keys, two payloads), clock ticks and sweeps, on the memory and SQLite stores in
//! lockstep. Every answer must be the model's, and every replay the exact bytes of the original.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use oncepay_core::engine::Policy;
use oncepay_core::model::{Expected, Model, Op};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

use crate::harness::*;

const LEASE_MS: u64 = 3_000;
const RETENTION_MS: u64 = 10_000;
const TOMBSTONE_MS: u64 = 20_000;

/// One step the service can be asked to take.
#[derive(Clone, Debug)]
enum Step {
    /// A request from `tenant` with key `key` and payload `body`.
    Request {
        tenant: u8,
        key: u8,
        body: u8,
    },
    Tick(u64),
    Sweep,
}

/// What the model says a request must get: executed (completion `n`) or not.
#[derive(Clone, Debug)]
struct Reference {
    model: Model,
    expected: Expected,
}

struct HttpModel;

impl ReferenceStateMachine for HttpModel {
    type State = Reference;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Reference> {
        let model = Model::new(LEASE_MS, RETENTION_MS, TOMBSTONE_MS);
        Just(Reference {
            model,
            expected: Expected::Nothing,
        })
        .boxed()
    }

    fn transitions(_: &Reference) -> BoxedStrategy<Step> {
        prop_oneof![
            6 => (0u8..2, 0u8..2, 0u8..2).prop_map(|(tenant, key, body)| Step::Request { tenant, key, body }),
            2 => prop_oneof![(1u64..8).prop_map(|n| n * 500), Just(RETENTION_MS), Just(TOMBSTONE_MS)].prop_map(Step::Tick),
            1 => Just(Step::Sweep),
        ]
        .boxed()
    }

    fn apply(mut state: Reference, step: &Step) -> Reference {
        state.expected = match *step {
            Step::Request { tenant, key, body } => {
                // Over HTTP a request that executes also completes before it answers.
                match state.model.apply(&Op::Begin { tenant, key, body }) {
                    Expected::Execute { .. } => {
                        let last = state.model.owners.len() - 1;
                        state.model.apply(&Op::Complete(last))
                    }
                    other => other,
                }
            }
            Step::Tick(ms) => state.model.apply(&Op::Tick(ms)),
            Step::Sweep => state.model.apply(&Op::Sweep),
        };
        state
    }
}

struct Services {
    runtime: tokio::runtime::Runtime,
    services: Vec<Harness>,
    /// The body of each completion, by the model's number, per service.
    bodies: BTreeMap<u64, Vec<Vec<u8>>>,
}

fn api_key(tenant: u8) -> &'static str {
    if tenant == 0 { ACME } else { GLOBEX }
}

fn payload(body: u8) -> String {
    format!(
        r#"{{"amount": {}, "currency": "EUR", "customer_id": "cus_model"}}"#,
        1000 + u32::from(body)
    )
}

impl StateMachineTest for Services {
    type SystemUnderTest = Self;
    type Reference = HttpModel;

    fn init_test(_: &Reference) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let policy = Policy {
            lease: Duration::from_millis(LEASE_MS),
            retention: Duration::from_millis(RETENTION_MS),
            tombstone_retention: Duration::from_millis(TOMBSTONE_MS),
        };
        let services = runtime.block_on(async {
            KINDS
                .iter()
                .map(|kind| Harness::with(*kind, policy, test_config()))
                .collect()
        });
        Services {
            runtime,
            services,
            bodies: BTreeMap::new(),
        }
    }

    fn apply(mut sut: Self, reference: &Reference, step: Step) -> Self {
        match step {
            Step::Request { tenant, key, body } => {
                sut.request(tenant, key, body, &reference.expected)
            }
            Step::Tick(ms) => sut
                .services
                .iter()
                .for_each(|s| s.advance(Duration::from_millis(ms))),
            Step::Sweep => {
                for service in &sut.services {
                    sut.runtime.block_on(service.store.sweep()).unwrap();
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Self, reference: &Reference) {
        for ((tenant, key), completions) in &reference.model.completions {
            for service in &sut.services {
                let found = sut
                    .runtime
                    .block_on(service.payments_with_key(api_key(*tenant), &format!("mk-{key}")));
                assert_eq!(
                    found.len() as u64,
                    *completions,
                    "{:?}: payments of key {key}",
                    service.kind
                );
            }
        }
    }
}

impl Services {
    fn request(&mut self, tenant: u8, key: u8, body: u8, expected: &Expected) {
        let mut bodies = Vec::new();
        for service in &self.services {
            let path = "/v1/payments";
            let reply = self.runtime.block_on(service.post(
                path,
                api_key(tenant),
                Some(&format!("mk-{key}")),
                &payload(body),
            ));
            let kind = service.kind;
            match expected {
                Expected::Completed { .. } => {
                    assert_eq!(
                        (reply.status, reply.replayed()),
                        (StatusCode::CREATED, false),
                        "{kind:?}"
                    );
                    bodies.push(reply.body);
                }
                Expected::Replay { response } => {
                    assert_eq!(
                        (reply.status, reply.replayed()),
                        (StatusCode::CREATED, true),
                        "{kind:?}"
                    );
                    let index = bodies.len();
                    assert_eq!(
                        reply.body, self.bodies[response][index],
                        "{kind:?}: the original bytes"
                    );
                    bodies.push(reply.body);
                }
                Expected::Reused => assert_eq!(reply.code(), "idempotency_key_reused", "{kind:?}"),
                Expected::Expired => {
                    assert_eq!(reply.code(), "idempotency_key_expired", "{kind:?}")
                }
                other => panic!("{kind:?}: a sequential request cannot expect {other:?}"),
            }
        }
        if let Expected::Completed { response } = expected {
            self.bodies.insert(*response, bodies);
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64)
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/http_model.txt"),
        ))),
        ..Config::default()
    })]

    #[test]
    fn the_http_service_gives_the_reference_models_answer_at_every_step(sequential 1..32 => Services);
}
