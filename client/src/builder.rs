//! [`ClientBuilder`]: the base URL, the API key and every retry setting, checked once at
//! [`ClientBuilder::build`].

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::attempt::Sender;
use crate::budget::{MAX_RETRIES_DEFAULT, RetryBudget, SUCCESSES_PER_RETRY_DEFAULT};
use crate::client::{Client, Inner};
use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::policy::RetryPolicy;
use crate::random::{Random, ThreadRandom};
use crate::retry::Retrier;

/// Sent as `User-Agent`, so server logs tell SDK traffic from other clients.
const USER_AGENT: &str = concat!("oncepay-client/", env!("CARGO_PKG_VERSION"));

/// Settings of a [`Client`]; start with [`Client::builder`].
pub struct ClientBuilder {
    base_url: String,
    api_key: String,
    policy: RetryPolicy,
    max_retries: u32,
    successes_per_retry: u32,
    clock: Arc<dyn Clock>,
    random: Arc<dyn Random>,
    first_attempt_headers: Vec<(String, String)>,
}

impl ClientBuilder {
    pub(crate) fn new(base_url: &str, api_key: &str) -> Self {
        Self {
            base_url: base_url.to_owned(),
            api_key: api_key.to_owned(),
            policy: RetryPolicy::default(),
            max_retries: MAX_RETRIES_DEFAULT,
            successes_per_retry: SUCCESSES_PER_RETRY_DEFAULT,
            clock: Arc::new(SystemClock),
            random: Arc::new(ThreadRandom),
            first_attempt_headers: Vec::new(),
        }
    }

    /// The backoff ceiling after the first failed attempt; it doubles after each one.
    pub fn base_delay(mut self, base_delay: Duration) -> Self {
        self.policy.base_delay = base_delay;
        self
    }

    /// The largest backoff ceiling; a server's `Retry-After` may still ask for longer.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.policy.max_delay = max_delay;
        self
    }

    /// Attempts per call, the first included; 1 turns retries off.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }

    /// The time one call may take in all, waits and retries included.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.policy.deadline = deadline;
        self
    }

    /// The time one attempt may take before it is abandoned and retried.
    pub fn attempt_timeout(mut self, attempt_timeout: Duration) -> Self {
        self.policy.attempt_timeout = attempt_timeout;
        self
    }

    /// The retry budget shared by all calls: at most `max_retries` retries in a burst, and
    /// one retry earned back per `successes_per_retry` answered calls.
    pub fn retry_budget(mut self, max_retries: u32, successes_per_retry: u32) -> Self {
        self.max_retries = max_retries;
        self.successes_per_retry = successes_per_retry;
        self
    }

    /// Where the retry loop reads the time and how it sleeps; for tests.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Where jitter and generated idempotency keys come from; for tests.
    pub fn random(mut self, random: Arc<dyn Random>) -> Self {
        self.random = random;
        self
    }

    /// For testing only: a header sent on the first attempt of every call and never on a
    /// retry, such as a fault injection header that makes the server fail that one attempt.
    pub fn first_attempt_header(mut self, name: &str, value: &str) -> Self {
        self.first_attempt_headers
            .push((name.to_owned(), value.to_owned()));
        self
    }

    /// Checks the settings and creates the client.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a base URL that is not `http://`, an API key or extra
    /// header that cannot be sent, no attempt allowed, or a zero deadline or attempt timeout.
    pub fn build(self) -> Result<Client, Error> {
        check_policy(&self.policy)?;
        let base_url = parse_base_url(&self.base_url)?;
        HeaderValue::from_str(&self.api_key)
            .map_err(|_| invalid("the API key holds characters a header cannot carry"))?;
        let first_attempt_headers = header_map(&self.first_attempt_headers)?;
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .build()
            .map_err(|err| invalid(&format!("the HTTP client cannot start: {err}")))?;

        let inner = Inner {
            base_url,
            sender: Sender {
                http,
                api_key: self.api_key,
                first_attempt_headers,
            },
            retrier: Retrier {
                policy: self.policy,
                budget: RetryBudget::new(self.max_retries, self.successes_per_retry),
                clock: self.clock,
                random: self.random,
            },
        };
        Ok(Client {
            inner: Arc::new(inner),
        })
    }
}

fn check_policy(policy: &RetryPolicy) -> Result<(), Error> {
    if policy.max_attempts == 0 {
        return Err(invalid("max_attempts must be at least 1"));
    }
    if policy.deadline.is_zero() || policy.attempt_timeout.is_zero() {
        return Err(invalid(
            "the deadline and the attempt timeout must be above zero",
        ));
    }
    Ok(())
}

fn parse_base_url(text: &str) -> Result<Url, Error> {
    let url = Url::parse(text).map_err(|err| invalid(&format!("base URL `{text}`: {err}")))?;
    // NOTE: the client is built without a TLS stack to stay lean, so it speaks plain HTTP
    // only; an https:// URL is refused here rather than failing on every call.
    if url.scheme() != "http" || url.cannot_be_a_base() {
        return Err(invalid(&format!(
            "base URL `{text}` must be an http:// URL"
        )));
    }
    Ok(url)
}

fn header_map(pairs: &[(String, String)]) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(&format!("`{name}` is not a header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid(&format!("the value of `{name}` cannot be sent")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn invalid(message: &str) -> Error {
    Error::InvalidArgument(message.to_owned())
}
