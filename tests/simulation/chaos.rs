//! The concurrent scenario: several clients retry on a few keys through a lossy network that
//! the driver partitions, while the server may crash once.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turmoil::Sim;

use crate::client::{Reply, exchange, is_final, listed_payment_ids, payment_request};
use crate::driver::{Db, Run};
use crate::{ATTEMPTS_MAX, P1, P2, RETRY_INTERVAL, SERVER, ms, seeds};

/// What one attempt of a concurrent client saw.
#[derive(Clone, Debug)]
struct Seen {
    key: usize,
    body: &'static str,
    reply: Option<Reply>,
}

const CLIENTS: usize = 4;
const KEYS: usize = 3;
const OPS_PER_CLIENT: usize = 6;

fn chaos_key(key: usize) -> String {
    format!("k-chaos-{key}")
}

/// A fault for one attempt, or none: every kind of in-flight window and failure the server has.
fn random_fault(rng: &mut StdRng) -> Option<String> {
    let delay_ms: u64 = rng.random_range(100..2_500);
    match rng.random_range(0..8) {
        0 => Some(format!("after_claim=delay:{delay_ms}")),
        1 => Some(format!("after_commit=delay:{delay_ms}")),
        2 => Some("before_commit=fail".to_owned()),
        3 => Some("after_commit=drop".to_owned()),
        _ => None,
    }
}

/// One concurrent client: a few operations on random keys, each retried until final.
///
/// Answers whether every operation got a final answer.
async fn chaos_client(seed: u64, index: usize, log: Rc<RefCell<Vec<Seen>>>) -> bool {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000) + index as u64);
    let mut settled_all = true;
    for _ in 0..OPS_PER_CLIENT {
        let key = rng.random_range(0..KEYS);
        let body = if rng.random_bool(0.8) { P1 } else { P2 };
        let mut settled = false;
        for _ in 0..ATTEMPTS_MAX / 2 {
            let fault = random_fault(&mut rng);
            let request = payment_request(&chaos_key(key), body, fault.as_deref());
            let reply = exchange(&request, ms(2_500)).await.ok();
            settled = reply.as_ref().is_some_and(is_final);
            log.borrow_mut().push(Seen { key, body, reply });
            if settled {
                break;
            }
            tokio::time::sleep(RETRY_INTERVAL + ms(rng.random_range(0..200))).await;
        }
        settled_all &= settled;
    }
    settled_all
}

/// Cuts one client off for a while now and then, and on some seeds crashes the server once,
/// at the first moment after a seeded time when some key is in flight.
fn network_chaos(seed: u64) -> impl FnMut(&mut Sim<'static>, &Db) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let crash_after = rng
        .random_bool(0.5)
        .then(|| ms(rng.random_range(200..4_000)));
    let mut bounce_at = None;
    let mut cut: Option<(String, Duration)> = None;
    move |sim, db| {
        let now = sim.elapsed();
        let crash_due = crash_after.is_some_and(|after| now >= after) && bounce_at.is_none();
        if crash_due && db.in_flight() > 0 {
            sim.crash(SERVER);
            bounce_at = Some(now + ms(rng.random_range(0..2_000)));
        }
        if bounce_at.is_some_and(|at| now >= at) && !sim.is_host_running(SERVER) {
            sim.bounce(SERVER);
        }
        match &cut {
            Some((client, until)) if now >= *until => {
                sim.repair(client.as_str(), SERVER);
                cut = None;
            }
            None if rng.random_bool(0.002) => {
                let client = format!("client-{}", rng.random_range(0..CLIENTS));
                sim.partition(client.as_str(), SERVER);
                cut = Some((client, now + ms(rng.random_range(300..3_000))));
            }
            _ => {}
        }
    }
}

#[test]
fn concurrent_retries_through_a_lossy_network_charge_each_key_at_most_once() {
    for seed in seeds() {
        let mut builder = turmoil::Builder::new();
        builder
            .max_message_latency(ms(60))
            .fail_rate(0.01)
            .repair_rate(0.3);
        let mut run = Run::new(seed, &mut builder);
        let log = Rc::new(RefCell::new(Vec::new()));
        let unsettled = Rc::new(Cell::new(0));

        for index in 0..CLIENTS {
            let (log, unsettled) = (log.clone(), unsettled.clone());
            run.sim.client(format!("client-{index}"), async move {
                if !chaos_client(seed, index, log).await {
                    unsettled.set(unsettled.get() + 1);
                }
                Ok(())
            });
        }
        run.run(network_chaos(seed));
        assert_eq!(
            unsettled.get(),
            0,
            "seed {seed}: a client never got a final answer"
        );

        // Audit through the API once the dust settles, on a healthy network.
        run.sim.set_fail_rate(0.0);
        let listed = Rc::new(RefCell::new(Vec::new()));
        let audit = listed.clone();
        run.sim.client("auditor", async move {
            for key in 0..KEYS {
                let ids = listed_payment_ids(&chaos_key(key)).await;
                audit.borrow_mut().push(ids);
            }
            Ok(())
        });
        run.run(|_, _| {});

        let (seen, listed) = (log.take(), listed.take());
        let statuses: Vec<u16> = seen
            .iter()
            .map(|s| s.reply.as_ref().map_or(0, |r| r.status))
            .collect();
        tracing::info!(seed, ?statuses, elapsed = ?run.sim.elapsed(), "chaos run");
        for (key, listed) in listed.iter().enumerate() {
            check_chaos_key(&run, key, &seen, listed.as_ref());
        }
    }
}

/// At most one payment for the key; every 201 for it byte-identical, for one body, naming that
/// payment.
fn check_chaos_key(run: &Run, key: usize, seen: &[Seen], listed: Option<&Vec<String>>) {
    let context = format!("seed {}, {}", run.seed, chaos_key(key));
    let rows = run.db.payments(&chaos_key(key));
    assert!(
        rows.len() <= 1,
        "{context}: {} payments in the database",
        rows.len()
    );
    assert_eq!(
        listed,
        Some(&rows),
        "{context}: the API lists other payments"
    );
    let successes: Vec<(&str, &Reply)> = seen
        .iter()
        .filter(|s| s.key == key)
        .filter_map(|s| s.reply.as_ref().map(|reply| (s.body, reply)))
        .filter(|(_, reply)| reply.status == 201)
        .collect();
    let Some((body, first)) = successes.first() else {
        return;
    };
    assert_eq!(
        rows,
        Vec::from_iter(first.payment_id()),
        "{context}: paid another"
    );
    for (other_body, reply) in &successes {
        assert_eq!(other_body, body, "{context}: both bodies got a 201");
        assert_eq!(
            reply.body, first.body,
            "{context}: two different 201 bodies"
        );
    }
}
