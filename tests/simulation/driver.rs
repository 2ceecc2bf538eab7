//! The driver: one simulated world per seed, stepped by the test, and the database file read
//! beside it.

use std::path::PathBuf;
use std::sync::Arc;

use oncepay_core::time::ManualClock;
use turmoil::Sim;

use crate::client::Reply;
use crate::host::serve;
use crate::{EPOCH, SERVER, SIM_DURATION_MAX, TICK, init_logging};

/// The database file, read directly, beside the server.
pub(crate) struct Db(PathBuf);

impl Db {
    fn query(&self, sql: &str, params: impl rusqlite::Params) -> Vec<String> {
        let connection = rusqlite::Connection::open(&self.0).expect("the database opens");
        let mut statement = match connection.prepare(sql) {
            Ok(statement) => statement,
            // The server has not created its schema yet.
            Err(_) => return Vec::new(),
        };
        let rows = statement
            .query_map(params, |row| row.get::<_, String>(0))
            .expect("a query");
        rows.map(|row| row.expect("a row")).collect()
    }

    /// The ids of the payments created with `key`.
    pub(crate) fn payments(&self, key: &str) -> Vec<String> {
        self.query("select id from payments where idempotency_key = ?1", [key])
    }

    /// How many keys are claimed and not yet completed or released.
    pub(crate) fn in_flight(&self) -> usize {
        let sql = "select key from idempotency_records where state = 'in_flight'";
        self.query(sql, []).len()
    }

    /// The state of `key`'s idempotency record, if it has one.
    pub(crate) fn record_state(&self, key: &str) -> Option<String> {
        self.query(
            "select state from idempotency_records where key = ?1",
            [key],
        )
        .pop()
    }
}

/// One simulated world: the server host on a fresh database, and the clock it judges leases by.
pub(crate) struct Run {
    pub(crate) sim: Sim<'static>,
    clock: Arc<ManualClock>,
    pub(crate) db: Db,
    pub(crate) seed: u64,
    _dir: tempfile::TempDir,
}

impl Run {
    pub(crate) fn new(seed: u64, builder: &mut turmoil::Builder) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("oncepay.db");
        let clock = Arc::new(ManualClock::new(EPOCH));
        let mut sim = builder
            .rng_seed(seed)
            .tick_duration(TICK)
            .simulation_duration(SIM_DURATION_MAX)
            .build();
        let (server_path, server_clock) = (path.clone(), clock.clone());
        sim.host(SERVER, move || {
            serve(server_path.clone(), server_clock.clone())
        });
        Self {
            sim,
            clock,
            db: Db(path),
            seed,
            _dir: dir,
        }
    }

    /// Steps until every client has finished; `between` may crash, cut or heal after each step.
    pub(crate) fn run(&mut self, mut between: impl FnMut(&mut Sim<'static>, &Db)) {
        loop {
            let finished = self
                .sim
                .step()
                .unwrap_or_else(|err| panic!("seed {}: the simulation failed: {err}", self.seed));
            self.clock.advance(TICK);
            if finished {
                return;
            }
            between(&mut self.sim, &self.db);
        }
    }
}

/// Asserts the promise for `key`: exactly one payment, the one `reply` announced, also listed.
pub(crate) fn assert_one_payment(
    run: &Run,
    key: &str,
    reply: &Reply,
    listed: Option<&Vec<String>>,
) {
    let seed = run.seed;
    let id = reply.payment_id();
    assert!(
        id.is_some(),
        "seed {seed}: the answer for {key} names no payment"
    );
    assert_eq!(
        run.db.payments(key),
        Vec::from_iter(id.clone()),
        "seed {seed}: database rows"
    );
    assert_eq!(
        listed,
        Some(&Vec::from_iter(id)),
        "seed {seed}: the API's list for {key}"
    );
}
