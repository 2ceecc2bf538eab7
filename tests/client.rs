//! The client SDK and the `oncepay` client subcommands against the real server binary: dropped
//! responses, a server killed mid-payment, a server down past the deadline, and the CLI's
//! output and exit codes.

mod common;

use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, fresh_key};
use oncepay_client::wire::{CreatePayment, KeyState, List, MinorUnits, Payment, Refund, Rewards};
use oncepay_client::{Client, ClientBuilder, Error, ListPayments, Resolution};

/// How long a test waits for a condition before it fails instead of hanging.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// How often a test polls a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The fault header the server honours with `--enable-fault-injection`.
const FAULT_HEADER: &str = "Oncepay-Fault";

/// A server on a fixed port, so that a restart comes back at the same URL and, with a SQLite
/// file, with the same data.
struct RestartableServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RestartableServer {
    fn start(args: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process again (killing a running one first) and waits until it listens.
    fn restart(&mut self) {
        self.kill();
        let mut command = Command::new(env!("CARGO_BIN_EXE_oncepay"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if std::env::var_os("TEST_LOG").is_some() {
            command.stderr(Stdio::inherit()).env("ONCEPAY_LOG", "debug");
        } else {
            command.stderr(Stdio::null());
        }
        let mut child = command.spawn().expect("the oncepay binary starts");

        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = child.try_wait().expect("the child can be polled");
            assert!(exited.is_none(), "oncepay exited at start: {exited:?}");
            assert!(
                started.elapsed() < WAIT_LIMIT,
                "oncepay did not listen in time"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        self.child = Some(child);
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RestartableServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A restartable server keeping its data in a SQLite file in `dir`, with fault injection on.
fn sqlite_server(dir: &tempfile::TempDir, extra_args: &[&str]) -> RestartableServer {
    let database = format!("sqlite://{}", dir.path().join("oncepay.db").display());
    let mut args = vec!["--database", &database, "--enable-fault-injection"];
    args.extend_from_slice(extra_args);
    RestartableServer::start(&args)
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("a bound address").port()
}

/// A client that retries quickly, so tests spend little time in backoff.
fn fast_client(url: &str) -> ClientBuilder {
    Client::builder(url, "sk_test_demo")
        .base_delay(Duration::from_millis(20))
        .max_delay(Duration::from_millis(200))
}

fn payment_request(customer_id: &str, amount_minor: i64) -> CreatePayment {
    CreatePayment {
        amount: MinorUnits(amount_minor),
        currency: "EUR".into(),
        customer_id: customer_id.into(),
        description: None,
        metadata: Default::default(),
    }
}

fn customer(prefix: &str) -> String {
    fresh_key(prefix).replace('-', "_")
}

async fn payments_of(client: &Client, customer_id: &str) -> Vec<Payment> {
    let filter = ListPayments {
        customer_id: Some(customer_id.into()),
        limit: Some(100),
        ..ListPayments::default()
    };
    client
        .list_payments(&filter)
        .await
        .expect("the list answers")
        .data
}

/// Polls `probe` until it yields a value, failing the test after [`WAIT_LIMIT`].
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_first_response_is_dropped_is_returned_once_by_the_retry() {
    let server = Server::start(&["--database", "memory://", "--enable-fault-injection"]);
    let client = fast_client(&server.url)
        .first_attempt_header(FAULT_HEADER, "after_commit=drop")
        .build()
        .unwrap();
    let customer_id = customer("cus_drop");

    let payment = client
        .create_payment(&payment_request(&customer_id, 1250), None)
        .await
        .expect("the retry replays the committed payment");

    let payments = payments_of(&client, &customer_id).await;
    assert_eq!(payments, std::slice::from_ref(&payment));
    let key = client.key_status(&payment.idempotency_key).await.unwrap();
    assert_eq!(key.resource_id.as_deref(), Some(payment.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_response_without_a_retry_is_an_unknown_outcome_with_the_key() {
    let server = Server::start(&["--database", "memory://", "--enable-fault-injection"]);
    let client = fast_client(&server.url)
        .max_attempts(1)
        .first_attempt_header(FAULT_HEADER, "after_commit=drop")
        .build()
        .unwrap();
    let key = fresh_key("dropped");

    let outcome = client
        .create_payment(&payment_request(&customer("cus_drop"), 1250), Some(&key))
        .await;

    let Err(Error::OutcomeUnknown {
        idempotency_key,
        last_error,
    }) = outcome
    else {
        panic!("expected an unknown outcome, got {outcome:?}");
    };
    assert_eq!(idempotency_key, key);
    assert!(matches!(*last_error, Error::Transport(_)), "{last_error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_failing_before_it_executes_succeeds_once_on_the_retry() {
    let server = Server::start(&["--database", "memory://", "--enable-fault-injection"]);
    let failing_once = |max_attempts| {
        fast_client(&server.url)
            .max_attempts(max_attempts)
            .first_attempt_header(FAULT_HEADER, "after_claim=fail")
            .build()
            .unwrap()
    };
    let customer_id = customer("cus_fail_once");
    let request = payment_request(&customer_id, 300);

    // The first attempt answers 500 and releases the key; only a retry, sent without the
    // fault header, executes.
    let without_retry = failing_once(1).create_payment(&request, None).await;
    let payment = failing_once(5)
        .create_payment(&request, None)
        .await
        .expect("the retry executes the payment");

    let Err(Error::OutcomeUnknown { last_error, .. }) = without_retry else {
        panic!("expected an unknown outcome, got {without_retry:?}");
    };
    assert_eq!(last_error.code(), Some("internal_error"));
    let observer = fast_client(&server.url).build().unwrap();
    assert_eq!(payments_of(&observer, &customer_id).await, [payment]);
}

/// Kills the server while the first attempt is held at `fault`, restarts it on the same file
/// and port, and checks the call still ends with exactly one payment.
async fn kill_mid_payment_and_restart(fault: &str, held_state: KeyState) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = sqlite_server(&dir, &["--lease", "1s"]);
    // Retries while the server is down are not what this test counts: give them room.
    let client = fast_client(&server.url())
        .max_attempts(100)
        .retry_budget(1000, 10)
        .first_attempt_header(FAULT_HEADER, fault)
        .build()
        .unwrap();
    let observer = fast_client(&server.url()).max_attempts(1).build().unwrap();
    let (key, customer_id) = (fresh_key("killed"), customer("cus_killed"));

    let call = {
        let (client, key) = (client.clone(), key.clone());
        let request = payment_request(&customer_id, 4200);
        tokio::spawn(async move { client.create_payment(&request, Some(&key)).await })
    };
    let held = wait_for("the first attempt to reach the fault", || async {
        let status = observer.key_status(&key).await.ok()?;
        (status.state == held_state).then_some(status)
    })
    .await;
    assert_eq!(held.state, held_state);
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();

    let payment = call.await.unwrap().expect("the call ends with the payment");
    assert_eq!(payment.idempotency_key, key);
    assert_eq!(payments_of(&observer, &customer_id).await, [payment]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_before_the_payment_commits_charges_exactly_once_after_restart() {
    kill_mid_payment_and_restart("before_commit=delay:20000", KeyState::InProgress).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_after_the_payment_commits_charges_exactly_once_after_restart() {
    kill_mid_payment_and_restart("after_commit=delay:20000", KeyState::Completed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_past_the_deadline_gives_an_unknown_outcome_that_resolves_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = sqlite_server(&dir, &[]);
    let client = fast_client(&server.url())
        .deadline(Duration::from_secs(3))
        .first_attempt_header(FAULT_HEADER, "after_commit=delay:20000")
        .build()
        .unwrap();
    let observer = fast_client(&server.url()).max_attempts(1).build().unwrap();
    let customer_id = customer("cus_down");

    // The payment commits, then the server dies before answering and stays down.
    let call = {
        let client = client.clone();
        let request = payment_request(&customer_id, 990);
        tokio::spawn(async move { client.create_payment(&request, None).await })
    };
    wait_for("the payment to commit", || async {
        let committed = !payments_of(&observer, &customer_id).await.is_empty();
        committed.then_some(())
    })
    .await;
    server.kill();
    let outcome = call.await.unwrap();

    let Err(Error::OutcomeUnknown {
        idempotency_key, ..
    }) = outcome
    else {
        panic!("expected an unknown outcome, got {outcome:?}");
    };
    server.restart();
    let resolution = client.resolve_payment(&idempotency_key).await.unwrap();
    let Resolution::Executed(payment) = resolution else {
        panic!("expected the executed payment, got {resolution:?}");
    };
    assert_eq!(payment.idempotency_key, idempotency_key);
    assert_eq!(payments_of(&client, &customer_id).await, [payment]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_key_the_server_never_saw_reports_not_executed() {
    let server = Server::start(&["--database", "memory://"]);
    let client = fast_client(&server.url).build().unwrap();

    let resolution = client.resolve_payment(&fresh_key("never")).await.unwrap();

    assert_eq!(resolution, Resolution::NotExecuted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_a_key_whose_payment_is_still_running_reports_in_progress() {
    let server = Server::start(&["--database", "memory://", "--enable-fault-injection"]);
    let slow = fast_client(&server.url)
        .first_attempt_header(FAULT_HEADER, "before_commit=delay:3000")
        .build()
        .unwrap();
    let client = fast_client(&server.url).build().unwrap();
    let key = fresh_key("running");

    let call = {
        let (slow, key) = (slow.clone(), key.clone());
        let request = payment_request(&customer("cus_running"), 700);
        tokio::spawn(async move { slow.create_payment(&request, Some(&key)).await })
    };
    let resolution = wait_for("the key to be claimed", || async {
        let resolution = client.resolve_payment(&key).await.unwrap();
        (resolution != Resolution::NotExecuted).then_some(resolution)
    })
    .await;

    assert!(
        matches!(resolution, Resolution::InProgress(_)),
        "{resolution:?}"
    );
    let payment = call.await.unwrap().unwrap();
    assert_eq!(
        client.resolve_payment(&key).await.unwrap(),
        Resolution::Executed(payment)
    );
}

/// Runs `oncepay` with `command_line` split at spaces; `url` and `api_key` reach it through
/// the environment, as a user's shell would set them.
fn oncepay(url: &str, api_key: &str, command_line: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oncepay"))
        .args(command_line.split_whitespace())
        .env("ONCEPAY_URL", url)
        .env("ONCEPAY_API_KEY", api_key)
        .stdin(Stdio::null())
        .output()
        .expect("the oncepay binary runs")
}

fn stdout_json<T: serde::de::DeserializeOwned>(output: &Output) -> T {
    assert_eq!(output.status.code(), Some(0), "{}", stderr(output));
    serde_json::from_slice(&output.stdout).expect("stdout is the JSON object")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_cli_pays_shows_lists_refunds_and_reports_rewards_and_keys() {
    let server = Server::start(&["--database", "memory://"]);
    let run = |command_line: String| oncepay(&server.url, "sk_test_demo", &command_line);
    let (key, customer) = (fresh_key("cli"), customer("cus_cli"));

    let payment: Payment = stdout_json(&run(format!(
        "pay --amount 1250 --currency EUR --customer {customer} --metadata order=42 \
         --idempotency-key {key} --json"
    )));
    let id = payment.id.as_str();
    let get = run(format!("get {id}"));
    let list: List<Payment> = stdout_json(&run(format!("list --customer {customer} --json")));
    let refund: Refund = stdout_json(&run(format!("refund {id} --amount 500 --json")));
    let rewards: Rewards = stdout_json(&run(format!("rewards {customer} --json")));
    let key_status = run(format!("key {key}"));

    assert_eq!(payment.metadata["order"], "42");
    assert_eq!(get.status.code(), Some(0));
    assert!(stdout(&get).starts_with(&format!("{id}  succeeded")));
    assert!(stdout(&get).contains("1250 EUR"));
    assert_eq!(list.data, std::slice::from_ref(&payment));
    assert_eq!(refund.payment_id, payment.id);
    assert_eq!(refund.amount, MinorUnits(500));
    assert_eq!(rewards.points_balance, (1250 - 500) / 100);
    assert_eq!(key_status.status.code(), Some(0));
    assert!(stdout(&key_status).starts_with(&format!("{key}  completed")));
    assert!(stdout(&key_status).contains(id));
}

#[test]
fn the_cli_with_a_bad_api_key_exits_1_and_names_unauthorized() {
    let server = Server::start(&["--database", "memory://"]);

    let output = oncepay(&server.url, "sk_test_wrong", "list");

    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("unauthorized (401)"),
        "{}",
        stderr(&output)
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn the_cli_reusing_a_key_for_another_amount_exits_1_with_idempotency_key_reused() {
    let server = Server::start(&["--database", "memory://"]);
    let key = fresh_key("reuse");
    let pay = |amount: i64| {
        let command_line = format!(
            "pay --amount {amount} --currency EUR --customer cus_reuse --idempotency-key {key}"
        );
        oncepay(&server.url, "sk_test_demo", &command_line)
    };

    let first = pay(1000);
    let second = pay(2000);

    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(1));
    let message = stderr(&second);
    assert!(
        message.contains("idempotency_key_reused (422)"),
        "{message}"
    );
}

#[test]
fn the_cli_against_an_unreachable_server_exits_3() {
    let url = format!("http://127.0.0.1:{}", free_port());

    let output = oncepay(&url, "sk_test_demo", "get pay_nowhere");

    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("cannot reach {url}")),
        "{message}"
    );
}

#[test]
fn the_cli_prints_the_key_of_a_payment_whose_outcome_is_unknown_and_exits_3() {
    // A listener that accepts every connection and closes it unanswered, as a server that
    // crashes mid-request would.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hang_up = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < WAIT_LIMIT {
                // Dropping the accepted stream closes it at once.
                let _ = listener.accept();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let key = fresh_key("unknown");

    let command_line =
        format!("pay --amount 100 --currency EUR --customer cus_x --idempotency-key {key}");
    let output = oncepay(&url, "sk_test_demo", &command_line);
    stop.store(true, Ordering::Relaxed);
    hang_up.join().unwrap();

    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert!(message.contains("the outcome is unknown"), "{message}");
    assert!(
        message.contains(&format!("--idempotency-key {key}")),
        "{message}"
    );
}

#[test]
fn the_cli_refuses_malformed_arguments_with_exit_code_2() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let pay = "pay --amount 1 --currency EUR --customer cus_x";

    let metadata = oncepay(&url, "sk_test_demo", &format!("{pay} --metadata no-equals"));
    let key = oncepay(
        &url,
        "sk_test_demo",
        &format!("{pay} --idempotency-key clé"),
    );

    assert_eq!(metadata.status.code(), Some(2));
    assert_eq!(key.status.code(), Some(2), "{}", stderr(&key));
}
