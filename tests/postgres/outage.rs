//! A database that goes away under a running server, and comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::common::fresh_key;
use crate::harness::{TestDb, get, payment_body, post, retry_until_settled, start_servers};

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of PostgreSQL that a test can cut and restore.

/// Forwards connections to PostgreSQL until cut: then it closes every live connection and
/// hangs up on new ones at once, as a database host that went away would.
struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("a bound address");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0);
        let task = tokio::spawn(accept_loop(listener, target, open.clone(), cuts.clone()));
        Proxy {
            addr,
            open,
            cuts,
            task,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|generation| *generation += 1);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            continue;
        }
        let mut cut = cuts.subscribe();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// Where the admin URL's PostgreSQL listens.
fn postgres_addr(admin_url: &str) -> SocketAddr {
    let options: sqlx::postgres::PgConnectOptions = admin_url.parse().expect("a valid URL");
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    format!("{host}:{}", options.get_port())
        .parse()
        .expect("the test server's host is an IP address or localhost")
}

// ---------------------------------------------------------------------------------------------
// The server while the proxy is cut.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_database_answers_503_and_the_same_server_recovers_without_a_restart() {
    let db = TestDb::create().await;
    let proxy = Proxy::start(postgres_addr(&db.admin_url)).await;
    let url = db.url_via(proxy.addr);
    let server = start_servers(1, &url, &["--lease", "2s", "--enable-fault-injection"]).remove(0);
    let body = payment_body(4_200, "cus_outage");
    let before = post(&server.url, "/v1/payments", &fresh_key("up"), &body, None)
        .await
        .unwrap();
    assert_eq!(before.status, 201, "{}", before.describe());

    // Cut: requests fail closed and leave nothing behind.
    proxy.cut();
    let key = fresh_key("down");
    for _ in 0..3 {
        let reply = post(&server.url, "/v1/payments", &key, &body, None)
            .await
            .unwrap();
        assert_eq!(reply.status, 503, "{}", reply.describe());
        assert_eq!(reply.json()["code"], "store_unavailable");
        assert!(reply.retry_after_secs().is_some_and(|s| s >= 1));
    }
    assert_eq!(get(&server.url, "/readyz").await.status, 503);
    let records: i64 =
        sqlx::query_scalar("select count(*) from idempotency_records where key = $1")
            .bind(&key)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((records, db.payments_for_key("acme", &key).await), (0, 0));

    // Restore: the same process serves again and the retry executes once.
    proxy.restore();
    let after = retry_until_settled(&server.url, &key, &body, Duration::from_secs(10)).await;
    assert_eq!(
        (after.status, after.replayed()),
        (201, false),
        "{}",
        after.describe()
    );
    assert_eq!(db.payments_for_key("acme", &key).await, 1);

    // A cut between the claim and the commit: the request fails, and once the database is back
    // the key is free again after its lease instead of staying in use.
    let key = fresh_key("mid");
    let doomed = {
        let (base, key, body) = (server.url.clone(), key.clone(), body.clone());
        tokio::spawn(async move {
            post(
                &base,
                "/v1/payments",
                &key,
                &body,
                Some("after_claim=delay:1500"),
            )
            .await
        })
    };
    db.wait_for_claim(&key).await;
    proxy.cut();
    let failed = doomed.await.unwrap().expect("the request is answered");
    assert_eq!(failed.status, 503, "{}", failed.describe());
    proxy.restore();
    let settled = retry_until_settled(&server.url, &key, &body, Duration::from_secs(10)).await;
    assert_eq!(
        (settled.status, settled.replayed()),
        (201, false),
        "{}",
        settled.describe()
    );
    assert_eq!(db.payments_for_key("acme", &key).await, 1);
}
