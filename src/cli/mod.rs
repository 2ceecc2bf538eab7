//! The client subcommands of `oncepay`: `pay`, `get`, `list`, `refund`, `rewards` and `key`
//! call a running service through the client SDK.
//!
//! Output is human-readable on stdout, or the JSON object with `--json`. Errors go to stderr
//! with their problem code, and the exit code says what kind of failure it was.

mod output;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use oncepay_client::wire::{CreatePayment, CreateRefund, MinorUnits};
use oncepay_client::{Client, Error, ListPayments};
use serde::Serialize;

/// The call succeeded.
const EXIT_OK: u8 = 0;
/// The API answered with an error, a final answer that retrying does not change; or the answer
/// could not be printed.
const EXIT_API_ERROR: u8 = 1;
/// The command line was wrong; clap uses the same code for its own usage errors.
const EXIT_USAGE: u8 = 2;
/// No answer: the server is unreachable, or a payment's outcome is unknown and must be resolved.
const EXIT_UNREACHABLE: u8 = 3;

/// The service a client subcommand talks to, and how it prints.
#[derive(Args, Debug)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// Base URL of the oncepay service.
    #[arg(long, env = "ONCEPAY_URL", default_value = "http://127.0.0.1:8080")]
    url: String,

    /// API key, sent as `Authorization: Bearer`.
    #[arg(
        long,
        env = "ONCEPAY_API_KEY",
        default_value = "sk_test_demo",
        hide_env_values = true
    )]
    api_key: String,

    /// Print the JSON object instead of a human-readable summary.
    #[arg(long)]
    json: bool,
}

/// A client subcommand's own arguments with the connection flags.
#[derive(Args, Debug)]
pub struct Call<T: Args> {
    #[command(flatten)]
    args: T,

    #[command(flatten)]
    connection: Connection,
}

/// The subcommands that call a running service.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Create a payment.
    Pay(Call<PayArgs>),
    /// Show a payment.
    Get(Call<GetArgs>),
    /// List payments, newest first.
    List(Call<ListArgs>),
    /// Refund a payment, in part or what is left of it.
    Refund(Call<RefundArgs>),
    /// Show a customer's reward points and their ledger.
    Rewards(Call<RewardsArgs>),
    /// Show where an idempotency key stands.
    Key(Call<KeyArgs>),
}

/// Arguments of `oncepay pay`.
#[derive(Args, Debug)]
pub struct PayArgs {
    /// Amount in minor units (cents): 1250 is 12.50.
    #[arg(long)]
    amount: i64,
    /// ISO 4217 currency code, such as EUR.
    #[arg(long)]
    currency: String,
    /// The paying customer's id.
    #[arg(long)]
    customer: String,
    /// Free text, at most 500 characters.
    #[arg(long)]
    description: Option<String>,
    /// A metadata entry as key=value; repeat for more.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    metadata: Vec<(String, String)>,
    /// Reuse this key to retry an earlier attempt safely; a fresh one is generated otherwise.
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// Arguments of `oncepay get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The payment's id, `pay_...`.
    payment_id: String,
}

/// Arguments of `oncepay list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this customer's payments.
    #[arg(long)]
    customer: Option<String>,
    /// Page size, 1 to 100.
    #[arg(long)]
    limit: Option<u32>,
    /// Continue after this payment id, the last of the previous page.
    #[arg(long)]
    starting_after: Option<String>,
}

/// Arguments of `oncepay refund`.
#[derive(Args, Debug)]
pub struct RefundArgs {
    /// The payment to refund, `pay_...`.
    payment_id: String,
    /// Amount in minor units; what is left of the payment when absent.
    #[arg(long)]
    amount: Option<i64>,
    /// Reuse this key to retry an earlier attempt safely; a fresh one is generated otherwise.
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// Arguments of `oncepay rewards`.
#[derive(Args, Debug)]
pub struct RewardsArgs {
    /// The customer's id.
    customer_id: String,
}

/// Arguments of `oncepay key`.
#[derive(Args, Debug)]
pub struct KeyArgs {
    /// The idempotency key.
    key: String,
}

/// Runs a client subcommand and maps its outcome to the exit code.
pub async fn run(command: ClientCommand) -> ExitCode {
    let (result, url) = match &command {
        ClientCommand::Pay(call) => (pay(call).await, &call.connection.url),
        ClientCommand::Get(call) => (get(call).await, &call.connection.url),
        ClientCommand::List(call) => (list(call).await, &call.connection.url),
        ClientCommand::Refund(call) => (refund(call).await, &call.connection.url),
        ClientCommand::Rewards(call) => (rewards(call).await, &call.connection.url),
        ClientCommand::Key(call) => (key(call).await, &call.connection.url),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(Failure::Client(err)) => ExitCode::from(report(&err, url)),
        // The reader went away, as `| head` does: like other command-line tools, stop quietly.
        Err(Failure::Output(err)) if err.kind() == io::ErrorKind::BrokenPipe => {
            ExitCode::from(EXIT_OK)
        }
        Err(Failure::Output(err)) => {
            eprintln!("oncepay: cannot print the answer: {err}");
            ExitCode::from(EXIT_API_ERROR)
        }
    }
}

/// Why a client subcommand failed.
enum Failure {
    /// The call failed.
    Client(Error),
    /// The call succeeded but its answer could not be written to stdout.
    Output(io::Error),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        Self::Client(err)
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Self::Output(err)
    }
}

async fn pay(call: &Call<PayArgs>) -> Result<(), Failure> {
    let args = &call.args;
    let request = CreatePayment {
        amount: MinorUnits(args.amount),
        currency: args.currency.as_str().into(),
        customer_id: args.customer.as_str().into(),
        description: args.description.clone(),
        metadata: args.metadata.iter().cloned().collect(),
    };
    let key = args.idempotency_key.as_deref();

    let payment = call
        .connection
        .client()?
        .create_payment(&request, key)
        .await?;
    call.connection.print(&payment, output::payment)
}

async fn get(call: &Call<GetArgs>) -> Result<(), Failure> {
    let id = call.args.payment_id.as_str().into();
    let payment = call.connection.client()?.get_payment(&id).await?;
    call.connection.print(&payment, output::payment)
}

async fn list(call: &Call<ListArgs>) -> Result<(), Failure> {
    let args = &call.args;
    let filter = ListPayments {
        customer_id: args.customer.as_deref().map(Into::into),
        idempotency_key: None,
        limit: args.limit,
        starting_after: args.starting_after.as_deref().map(Into::into),
    };

    let page = call.connection.client()?.list_payments(&filter).await?;
    call.connection.print(&page, output::payment_list)
}

async fn refund(call: &Call<RefundArgs>) -> Result<(), Failure> {
    let args = &call.args;
    let payment_id = args.payment_id.as_str().into();
    let request = CreateRefund {
        amount: args.amount.map(MinorUnits),
    };
    let key = args.idempotency_key.as_deref();

    let client = call.connection.client()?;
    let refund = client.refund(&payment_id, &request, key).await?;
    call.connection.print(&refund, output::refund)
}

async fn rewards(call: &Call<RewardsArgs>) -> Result<(), Failure> {
    let customer_id = call.args.customer_id.as_str().into();
    let rewards = call.connection.client()?.rewards(&customer_id).await?;
    call.connection.print(&rewards, output::rewards)
}

async fn key(call: &Call<KeyArgs>) -> Result<(), Failure> {
    let status = call.connection.client()?.key_status(&call.args.key).await?;
    call.connection.print(&status, output::key_status)
}

impl Connection {
    fn client(&self) -> Result<Client, Error> {
        Client::builder(&self.url, &self.api_key).build()
    }

    /// Prints `value` as pretty JSON with `--json`, or as `human` renders it.
    fn print<T: Serialize>(&self, value: &T, human: fn(&T) -> String) -> Result<(), Failure> {
        let mut stdout = io::stdout().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut stdout, value).map_err(io::Error::from)?;
            writeln!(stdout)?;
        } else {
            writeln!(stdout, "{}", human(value))?;
        }
        stdout.flush()?;
        Ok(())
    }
}

/// Prints `err` on stderr and picks the exit code.
fn report(err: &Error, url: &str) -> u8 {
    match err {
        Error::Api { status, problem } => {
            eprintln!("{}", output::problem(*status, problem));
            EXIT_API_ERROR
        }
        Error::UnexpectedResponse { .. } => {
            eprintln!("oncepay: {err}");
            EXIT_API_ERROR
        }
        Error::OutcomeUnknown {
            idempotency_key,
            last_error,
        } => {
            eprintln!("{}", output::outcome_unknown(idempotency_key, last_error));
            EXIT_UNREACHABLE
        }
        Error::Transport(_) => {
            eprintln!("oncepay: cannot reach {url}: {}", output::causes(err));
            EXIT_UNREACHABLE
        }
        Error::InvalidArgument(message) => {
            eprintln!("oncepay: {message}");
            EXIT_USAGE
        }
    }
}

/// Parses `--metadata key=value`.
fn parse_metadata(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}
