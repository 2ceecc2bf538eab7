//! The store conformance suite over the in-memory store alone, so the core crate's own tests
//! hold its store to the reference model without any runtime or database.
#![cfg(all(not(loom), feature = "conformance"))]

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use oncepay_core::conformance::{Fixture, Stores, cases, policy};
use oncepay_core::memory::MemoryStore;
use oncepay_core::store::Store;
use oncepay_core::time::{Clock, ManualClock};
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::prop_state_machine;

struct Memory {
    stores: Vec<(&'static str, Arc<dyn Store>)>,
}

impl Fixture for Memory {
    fn open(clock: Arc<ManualClock>) -> Self {
        let clock: Arc<dyn Clock> = clock;
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(policy(), clock, 4));
        Memory {
            stores: vec![("memory", store)],
        }
    }

    fn stores(&self) -> &[(&'static str, Arc<dyn Store>)] {
        &self.stores
    }

    /// The memory store never waits, so its futures finish on their first poll.
    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        let mut future = pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("a memory store future waited"),
        }
    }
}

type MemoryStores = Stores<Memory>;

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases(512),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../proptest-regressions/memory_conformance.txt"),
        ))),
        ..Config::default()
    })]

    #[test]
    fn the_memory_store_gives_the_reference_models_answer_at_every_step(sequential 1..48 => MemoryStores);
}
