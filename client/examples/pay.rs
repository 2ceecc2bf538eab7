//! Creates one payment against a running oncepay service and prints it.
//!
//! ```text
//! oncepay serve --database memory:// &
//! cargo run -p oncepay-client --example pay
//! ```
//!
//! `ONCEPAY_URL` (default `http://127.0.0.1:8080`) and `ONCEPAY_API_KEY` (default
//! `sk_test_demo`) choose the service and the tenant.

use std::collections::BTreeMap;
use std::process::ExitCode;

use oncepay_client::wire::{CreatePayment, MinorUnits};
use oncepay_client::{Client, Error, Resolution};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let url = std::env::var("ONCEPAY_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let api_key = std::env::var("ONCEPAY_API_KEY").unwrap_or_else(|_| "sk_test_demo".into());

    match pay(&url, &api_key).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pay: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn pay(url: &str, api_key: &str) -> Result<(), Error> {
    let client = Client::builder(url, api_key).build()?;
    let request = CreatePayment {
        amount: MinorUnits(1250),
        currency: "EUR".into(),
        customer_id: "cus_001".into(),
        description: Some("example payment".into()),
        metadata: BTreeMap::from([("order".to_owned(), "42".to_owned())]),
    };

    match client.create_payment(&request, None).await {
        Ok(payment) => {
            println!(
                "created {} for {} {}",
                payment.id, payment.amount.0, payment.currency
            );
            println!("{payment:#?}");
            Ok(())
        }
        // The retries ran out without an answer: the key tells whether it was charged.
        Err(Error::OutcomeUnknown {
            idempotency_key, ..
        }) => {
            match client.resolve_payment(&idempotency_key).await? {
                Resolution::Executed(payment) => println!("charged once: {payment:#?}"),
                other => println!("key {idempotency_key}: {other:?}"),
            }
            Ok(())
        }
        Err(err) => Err(err),
    }
}
