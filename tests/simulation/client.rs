//! The client side: one HTTP/1.1 exchange per connection.

use std::io;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

use crate::{API_KEY, ATTEMPTS_MAX, PORT, REQUEST_TIMEOUT, RETRY_INTERVAL, SERVER};

/// A response, read whole.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(n, _)| n == name);
        found.next().map(|(_, value)| value.as_str())
    }

    pub(crate) fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    pub(crate) fn payment_id(&self) -> Option<String> {
        let body: Value = serde_json::from_slice(&self.body).ok()?;
        body["id"].as_str().map(str::to_owned)
    }
}

pub(crate) fn payment_request(key: &str, body: &str, fault: Option<&str>) -> Vec<u8> {
    let fault = fault.map_or(String::new(), |f| format!("oncepay-fault: {f}\r\n"));
    let length = body.len();
    format!(
        "POST /v1/payments HTTP/1.1\r\nhost: {SERVER}\r\nauthorization: Bearer {API_KEY}\r\n\
         idempotency-key: {key}\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\nconnection: close\r\n{fault}\r\n{body}"
    )
    .into_bytes()
}

/// Sends `request` on a new connection and reads the answer until the server closes it.
pub(crate) async fn exchange(request: &[u8], timeout: Duration) -> io::Result<Reply> {
    let attempt = async {
        let mut stream = TcpStream::connect((SERVER, PORT)).await?;
        stream.write_all(request).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_reply(&raw)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a cut or malformed response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let reply = Reply {
        status: status.ok_or_else(bad)?,
        headers,
        body: raw[end + 4..].to_vec(),
    };
    // A connection that died mid-answer also ends in EOF: only a complete body counts.
    let length: usize = reply
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    if reply.body.len() != length {
        return Err(bad());
    }
    Ok(reply)
}

/// A final answer: anything but a refusal to run now (409) or a server failure (5xx).
pub(crate) fn is_final(reply: &Reply) -> bool {
    reply.status != 409 && reply.status < 500
}

/// A final answer and the simulated time it arrived.
#[derive(Clone, Debug)]
pub(crate) struct Settled {
    pub(crate) reply: Reply,
    pub(crate) at: Duration,
}

/// Retries like a patient client until a final answer, at a fixed interval.
pub(crate) async fn settle(key: &str, body: &str) -> Option<Settled> {
    let request = payment_request(key, body, None);
    for _ in 0..ATTEMPTS_MAX {
        if let Ok(reply) = exchange(&request, REQUEST_TIMEOUT).await
            && is_final(&reply)
        {
            let at = turmoil::sim_elapsed().unwrap_or_default();
            return Some(Settled { reply, at });
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    None
}

/// The ids of the payments the API lists for `key`.
pub(crate) async fn listed_payment_ids(key: &str) -> Option<Vec<String>> {
    let request = format!(
        "GET /v1/payments?limit=100&idempotency_key={key} HTTP/1.1\r\nhost: {SERVER}\r\n\
         authorization: Bearer {API_KEY}\r\nconnection: close\r\n\r\n"
    );
    for _ in 0..ATTEMPTS_MAX {
        if let Ok(reply) = exchange(request.as_bytes(), REQUEST_TIMEOUT).await
            && reply.status == 200
        {
            let page: Value = serde_json::from_slice(&reply.body).ok()?;
            let data = page["data"].as_array()?;
            return Some(
                data.iter()
                    .filter_map(|p| p["id"].as_str())
                    .map(str::to_owned)
                    .collect(),
            );
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
    None
}
