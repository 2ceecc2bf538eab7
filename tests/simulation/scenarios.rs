//! Scenarios with one client: an answer that comes too late, an answer lost in the network, and
//! a crash at every point of a request.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::client::{exchange, listed_payment_ids, payment_request, settle};
use crate::driver::{Db, Run, assert_one_payment};
use crate::{LEASE, P1, RETRY_INTERVAL, SERVER, ms, seeds};

#[test]
fn a_client_that_times_out_before_a_slow_answer_gets_the_committed_payment_on_retry() {
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let delay_ms: u64 = rng.random_range(1_500..5_000);
        let mut run = Run::new(seed, turmoil::Builder::new().max_message_latency(ms(50)));
        let seen = Rc::new(RefCell::new(None));

        // The answer waits after the commit for longer than the client is willing to wait.
        let log = seen.clone();
        run.sim.client("client", async move {
            let fault = format!("after_commit=delay:{delay_ms}");
            let first = exchange(&payment_request("k-slow", P1, Some(&fault)), ms(1_000)).await;
            let retry = settle("k-slow", P1).await;
            tokio::time::sleep(ms(delay_ms)).await;
            let late = settle("k-slow", P1).await;
            let listed = listed_payment_ids("k-slow").await;
            *log.borrow_mut() = Some((first.map(|r| r.status), retry, late, listed));
            Ok(())
        });
        run.run(|_, _| {});

        let (first, retry, late, listed) = seen.take().expect("the client finished");
        let (retry, late) = (retry.expect("the retry settles"), late.expect("settles"));
        assert!(
            first.is_err(),
            "seed {seed}: the first attempt should time out: {first:?}"
        );
        assert_eq!(retry.reply.status, 201, "seed {seed}");
        assert!(
            retry.reply.replayed(),
            "seed {seed}: the retry must be the replay"
        );
        assert_eq!(
            late.reply.body, retry.reply.body,
            "seed {seed}: replays differ"
        );
        assert_one_payment(&run, "k-slow", &retry.reply, listed.as_ref());
    }
}

#[test]
fn an_answer_lost_in_the_network_after_the_commit_is_replayed_to_the_retry() {
    for seed in seeds() {
        // Every message takes at least two ticks, so the answer is still on the wire when the
        // driver sees the payment in the database and holds the link.
        let mut builder = turmoil::Builder::new();
        builder
            .min_message_latency(ms(2))
            .max_message_latency(ms(40));
        let mut run = Run::new(seed, &mut builder);
        let gave_up = Rc::new(Cell::new(false));
        let seen = Rc::new(RefCell::new(None));

        let (flag, log) = (gave_up.clone(), seen.clone());
        run.sim.client("client", async move {
            let first = exchange(&payment_request("k-lost", P1, None), ms(1_000)).await;
            flag.set(true);
            tokio::time::sleep(RETRY_INTERVAL).await;
            let retry = settle("k-lost", P1).await;
            let listed = listed_payment_ids("k-lost").await;
            *log.borrow_mut() = Some((first.map(|r| r.status), retry, listed));
            Ok(())
        });
        let (mut held, mut released) = (false, false);
        run.run(|sim, db| {
            if !held && !db.payments("k-lost").is_empty() {
                sim.hold("client", SERVER);
                held = true;
            }
            if held && !released && gave_up.get() {
                sim.release("client", SERVER);
                released = true;
            }
        });

        let (first, retry, listed) = seen.take().expect("the client finished");
        let retry = retry.expect("the retry settles");
        assert!(held, "seed {seed}: the payment never reached the database");
        assert!(
            first.is_err(),
            "seed {seed}: the answer should have been lost: {first:?}"
        );
        assert_eq!(retry.reply.status, 201, "seed {seed}");
        assert!(
            retry.reply.replayed(),
            "seed {seed}: the retry must be the replay"
        );
        assert_one_payment(&run, "k-lost", &retry.reply, listed.as_ref());
    }
}

/// Where a request is parked when the server dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    AfterClaim,
    BeforeCommit,
    AfterCommit,
}

impl Point {
    fn header(self) -> &'static str {
        match self {
            Point::AfterClaim => "after_claim=delay:60000",
            Point::BeforeCommit => "before_commit=delay:60000",
            Point::AfterCommit => "after_commit=delay:60000",
        }
    }

    /// Whether the database shows the request parked at this point.
    fn reached(self, db: &Db, key: &str) -> bool {
        match self {
            Point::AfterClaim | Point::BeforeCommit => {
                db.record_state(key).as_deref() == Some("in_flight")
            }
            Point::AfterCommit => !db.payments(key).is_empty(),
        }
    }
}

/// When the driver crashed and restarted the server, and what the database held at the crash.
#[derive(Debug, Default)]
struct Crash {
    at: Option<Duration>,
    downtime: Duration,
    payments_at_crash: Vec<String>,
}

/// Crashes the server a seeded moment after the request parks at `point`, then restarts it.
fn crash_while_parked(run: &mut Run, point: Point, rng: &mut StdRng) -> Crash {
    let linger = ms(rng.random_range(0..1_500));
    let downtime = ms(rng.random_range(0..3_000));
    let mut crash = Crash {
        downtime,
        ..Crash::default()
    };
    let mut parked_at = None;
    run.run(|sim, db| {
        let now = sim.elapsed();
        match (parked_at, crash.at) {
            (None, _) if point.reached(db, "k-crash") => parked_at = Some(now),
            (Some(parked), None) if now >= parked + linger => {
                crash.payments_at_crash = db.payments("k-crash");
                sim.crash(SERVER);
                crash.at = Some(now);
            }
            (Some(_), Some(at)) if now >= at + downtime && !sim.is_host_running(SERVER) => {
                sim.bounce(SERVER);
            }
            _ => {}
        }
    });
    crash
}

#[test]
fn a_crash_at_every_point_of_a_request_leaves_one_payment_after_the_restart() {
    for point in [Point::AfterClaim, Point::BeforeCommit, Point::AfterCommit] {
        for seed in seeds() {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut run = Run::new(seed, turmoil::Builder::new().max_message_latency(ms(50)));
            let seen = Rc::new(RefCell::new(None));

            // The first attempt parks at the point; its connection dies with the process.
            let log = seen.clone();
            run.sim.client("client", async move {
                let parked = payment_request("k-crash", P1, Some(point.header()));
                let first = exchange(&parked, Duration::from_secs(120)).await;
                let settled = settle("k-crash", P1).await;
                let again = settle("k-crash", P1).await;
                let listed = listed_payment_ids("k-crash").await;
                *log.borrow_mut() = Some((first.map(|r| r.status), settled, again, listed));
                Ok(())
            });
            let crash = crash_while_parked(&mut run, point, &mut rng);

            let context = format!("seed {seed}, crash {point:?}");
            let (first, settled, again, listed) = seen.take().expect("the client finished");
            let crashed_at = crash
                .at
                .unwrap_or_else(|| panic!("{context}: never parked"));
            let settled = settled.unwrap_or_else(|| panic!("{context}: no final answer"));
            let again = again.unwrap_or_else(|| panic!("{context}: no second answer"));
            assert!(
                first.is_err(),
                "{context}: the parked attempt got {first:?}"
            );
            assert_eq!(settled.reply.status, 201, "{context}");
            assert_eq!(
                again.reply.body, settled.reply.body,
                "{context}: replays differ"
            );
            assert!(again.reply.replayed(), "{context}");
            assert_one_payment(&run, "k-crash", &settled.reply, listed.as_ref());
            if point == Point::AfterCommit {
                // The committed payment survives the crash and is what the retry gets back.
                assert!(settled.reply.replayed(), "{context}: not a replay");
                let id = settled.reply.payment_id();
                assert_eq!(crash.payments_at_crash, Vec::from_iter(id), "{context}");
            } else {
                assert!(
                    crash.payments_at_crash.is_empty(),
                    "{context}: paid before commit"
                );
                assert!(
                    !settled.reply.replayed(),
                    "{context}: nothing was stored to replay"
                );
            }

            // Lease recovery: once the server is back, the key frees up within the lease, and
            // the client notices within one retry interval (plus the wire and the in-flight
            // wait's polling).
            let recovery = crash.downtime.max(LEASE) + RETRY_INTERVAL + ms(500);
            let took = settled.at.saturating_sub(crashed_at);
            assert!(
                took <= recovery,
                "{context}: settled {took:?} after the crash"
            );
        }
    }
}
