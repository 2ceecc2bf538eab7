//! [`Client`]: one method per endpoint, each run through the retry loop, and
//! [`Client::resolve_payment`] to learn what became of a call whose outcome is unknown.

use std::sync::Arc;

use oncepay_core::IdempotencyKey;
use oncepay_core::wire::{
    CreatePayment, CreateRefund, CustomerId, KeyState, KeyStatus, List, Payment, PaymentId, Refund,
    Rewards,
};
use reqwest::{Method, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::attempt::{Request, Sender};
use crate::builder::ClientBuilder;
use crate::error::Error;
use crate::random::new_idempotency_key;
use crate::retry::Retrier;

/// A client of the oncepay API; cheap to clone, and clones share connections and the retry
/// budget.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key stays out of logs and panic messages.
        f.debug_struct("Client")
            .field("base_url", &self.inner.base_url.as_str())
            .field("policy", &self.inner.retrier.policy)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) base_url: Url,
    pub(crate) sender: Sender,
    pub(crate) retrier: Retrier,
}

/// The filters of [`Client::list_payments`]; the default lists the newest payments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPayments {
    /// Only this customer's payments.
    pub customer_id: Option<CustomerId>,
    /// Only the payment created with this idempotency key.
    pub idempotency_key: Option<String>,
    /// Page size, 1 ..= 100; the server's default when absent.
    pub limit: Option<u32>,
    /// Continue after this payment, the last of the previous page.
    pub starting_after: Option<PaymentId>,
}

/// What became of a payment request, found from its idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The request executed once and created this payment (succeeded or declined).
    Executed(Payment),
    /// Nothing executed: the key is unknown or was released. A retry with the key executes once.
    NotExecuted,
    /// The original request is still running; ask again after a moment.
    InProgress(KeyStatus),
    /// The key finished without creating a payment, for example it was used for a refund.
    NoPayment(KeyStatus),
}

impl Client {
    /// Starts configuring a client of the API at `base_url` (such as `http://127.0.0.1:8080`).
    pub fn builder(base_url: &str, api_key: &str) -> ClientBuilder {
        ClientBuilder::new(base_url, api_key)
    }

    /// Creates a payment, charging at most once however often the call is retried.
    ///
    /// Without `idempotency_key` a random key is generated for this call and kept across its
    /// retries; pass your own to retry the same payment from another process later.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `card_declined` (402) for a decline, `idempotency_key_reused` (422)
    /// for a key used with another body; [`Error::OutcomeUnknown`] when it gave up not knowing.
    pub async fn create_payment(
        &self,
        request: &CreatePayment,
        idempotency_key: Option<&str>,
    ) -> Result<Payment, Error> {
        let url = self.url(&["v1", "payments"])?;
        self.post(url, request, idempotency_key).await
    }

    /// Fetches a payment.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `not_found`; [`Error::Transport`] when no answer came.
    pub async fn get_payment(&self, id: &PaymentId) -> Result<Payment, Error> {
        let url = self.url(&["v1", "payments", id.as_str()])?;
        self.get(url).await
    }

    /// Lists payments, newest first.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `invalid_request` for a limit out of range.
    pub async fn list_payments(&self, filter: &ListPayments) -> Result<List<Payment>, Error> {
        let mut url = self.url(&["v1", "payments"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(customer_id) = &filter.customer_id {
                query.append_pair("customer_id", customer_id.as_str());
            }
            if let Some(key) = &filter.idempotency_key {
                query.append_pair("idempotency_key", key);
            }
            if let Some(limit) = filter.limit {
                query.append_pair("limit", &limit.to_string());
            }
            if let Some(after) = &filter.starting_after {
                query.append_pair("starting_after", after.as_str());
            }
        }
        // An empty query string would still leave a bare `?` behind.
        if url.query() == Some("") {
            url.set_query(None);
        }
        self.get(url).await
    }

    /// Refunds part of a payment, or what is left of it when `request.amount` is absent.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `refund_exceeds_payment` or `payment_not_refundable` (400);
    /// [`Error::OutcomeUnknown`] when it gave up not knowing.
    pub async fn refund(
        &self,
        payment_id: &PaymentId,
        request: &CreateRefund,
        idempotency_key: Option<&str>,
    ) -> Result<Refund, Error> {
        let url = self.url(&["v1", "payments", payment_id.as_str(), "refunds"])?;
        self.post(url, request, idempotency_key).await
    }

    /// A customer's reward points and their ledger.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `invalid_request` for a malformed customer id.
    pub async fn rewards(&self, customer_id: &CustomerId) -> Result<Rewards, Error> {
        let url = self.url(&["v1", "customers", customer_id.as_str(), "rewards"])?;
        self.get(url).await
    }

    /// Where one of the caller's idempotency keys stands.
    ///
    /// # Errors
    ///
    /// [`Error::Api`] with `not_found` for a key this tenant never used.
    pub async fn key_status(&self, key: &str) -> Result<KeyStatus, Error> {
        let url = self.url(&["v1", "idempotency-keys", key])?;
        self.get(url).await
    }

    /// Finds out what became of a payment request sent with `idempotency_key`, typically
    /// after [`Error::OutcomeUnknown`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a malformed key; any error of the two reads it makes.
    pub async fn resolve_payment(&self, idempotency_key: &str) -> Result<Resolution, Error> {
        let key = checked_key(idempotency_key)?;

        // The key's state first: a payment committed after this read still shows up below.
        let status = match self.key_status(&key).await {
            Ok(status) => Some(status),
            Err(Error::Api { status: 404, .. }) => None,
            Err(err) => return Err(err),
        };
        let filter = ListPayments {
            idempotency_key: Some(key),
            limit: Some(1),
            ..ListPayments::default()
        };
        let payment = self.list_payments(&filter).await?.data.into_iter().next();

        Ok(match (payment, status) {
            (Some(payment), _) => Resolution::Executed(payment),
            (None, None) => Resolution::NotExecuted,
            (None, Some(status)) if status.state == KeyState::InProgress => {
                Resolution::InProgress(status)
            }
            (None, Some(status)) => Resolution::NoPayment(status),
        })
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        url: Url,
        body: &B,
        idempotency_key: Option<&str>,
    ) -> Result<T, Error> {
        // One key per logical operation, kept by every retry: that is what makes them safe.
        let key = match idempotency_key {
            Some(key) => checked_key(key)?,
            None => new_idempotency_key(self.inner.retrier.random.as_ref()),
        };
        let body = serde_json::to_vec(body)
            .map_err(|err| Error::InvalidArgument(format!("the body cannot be encoded: {err}")))?;
        let request = Request {
            method: Method::POST,
            url,
            body: Some(body),
            idempotency_key: Some(key),
        };
        self.execute(&request).await
    }

    async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, Error> {
        let request = Request {
            method: Method::GET,
            url,
            body: None,
            idempotency_key: None,
        };
        self.execute(&request).await
    }

    async fn execute<T: DeserializeOwned>(&self, request: &Request) -> Result<T, Error> {
        let Inner {
            sender, retrier, ..
        } = self.inner.as_ref();
        let key = request.idempotency_key.as_deref();
        retrier
            .run(key, |attempt| sender.attempt(request, attempt))
            .await
    }

    /// The base URL with `segments` appended, each percent-encoded as one path segment.
    fn url(&self, segments: &[&str]) -> Result<Url, Error> {
        // The URL parser drops `.` and `..` segments and an empty one names another route, so
        // such a value would silently reach a different endpoint.
        if let Some(segment) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            let message = format!("`{segment}` cannot be sent as a path segment");
            return Err(Error::InvalidArgument(message));
        }
        let mut url = self.inner.base_url.clone();
        url.set_query(None);
        url.path_segments_mut()
            .map_err(|()| Error::InvalidArgument("the base URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }
}

/// A caller's key as the server will read it: validated, and unquoted if it was an sf-string.
fn checked_key(key: &str) -> Result<String, Error> {
    IdempotencyKey::parse(key.as_bytes())
        .map(|key| key.as_str().to_owned())
        .map_err(|err| Error::InvalidArgument(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base_url: &str) -> Client {
        Client::builder(base_url, "sk_test").build().unwrap()
    }

    #[test]
    fn path_segments_are_percent_encoded_one_by_one() {
        let client = client("http://127.0.0.1:8080");

        let url = client
            .url(&["v1", "idempotency-keys", "a/b?c#d%e"])
            .unwrap();

        assert_eq!(url.path(), "/v1/idempotency-keys/a%2Fb%3Fc%23d%25e");
        assert_eq!(url.query(), None);
    }

    #[test]
    fn a_base_url_with_a_path_prefix_keeps_it() {
        let client = client("http://127.0.0.1:8080/api/");

        let url = client.url(&["v1", "payments"]).unwrap();

        assert_eq!(url.as_str(), "http://127.0.0.1:8080/api/v1/payments");
    }

    #[test]
    fn a_dot_segment_is_refused_rather_than_sent_to_another_path() {
        let client = client("http://127.0.0.1:8080");

        for dots in [".", "..", ""] {
            let result = client.url(&["v1", "payments", dots]);

            assert!(matches!(result, Err(Error::InvalidArgument(_))), "{dots:?}");
        }
    }

    #[test]
    fn a_quoted_key_is_sent_unquoted_and_a_malformed_one_is_refused() {
        assert_eq!(checked_key("\"k-1\"").unwrap(), "k-1");
        assert!(matches!(checked_key("a b"), Err(Error::InvalidArgument(_))));
        assert!(matches!(checked_key(""), Err(Error::InvalidArgument(_))));
    }
}
