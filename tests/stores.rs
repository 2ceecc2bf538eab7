//! The store conformance suite over the durable stores: the memory and SQLite stores run the
//! reference model's sequences in lockstep (see `oncepay_core::conformance`).

use std::future::Future;
use std::sync::Arc;

use oncepay::store::sqlite::SqliteStore;
use oncepay_core::conformance::{Fixture, Stores, cases, policy};
use oncepay_core::memory::MemoryStore;
use oncepay_core::store::Store;
use oncepay_core::time::{Clock, ManualClock};
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::prop_state_machine;

/// The memory and SQLite stores, on a tokio runtime (the SQLite store reads on blocking threads).
struct Durable {
    runtime: tokio::runtime::Runtime,
    stores: Vec<(&'static str, Arc<dyn Store>)>,
    _dir: tempfile::TempDir,
}

impl Fixture for Durable {
    fn open(clock: Arc<ManualClock>) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = clock;
        let path = dir.path().join("model.db");
        let sqlite = SqliteStore::open(path.to_str().unwrap(), policy(), clock.clone()).unwrap();
        let stores: Vec<(&'static str, Arc<dyn Store>)> = vec![
            ("memory", Arc::new(MemoryStore::new(policy(), clock, 4))),
            ("sqlite", Arc::new(sqlite)),
        ];
        Durable {
            runtime,
            stores,
            _dir: dir,
        }
    }

    fn stores(&self) -> &[(&'static str, Arc<dyn Store>)] {
        &self.stores
    }

    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }
}

type DurableStores = Stores<Durable>;

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/stores.txt"),
        ))),
        ..Config::default()
    })]

    #[test]
    fn every_store_gives_the_reference_models_answer_at_every_step(sequential 1..48 => DurableStores);
}
