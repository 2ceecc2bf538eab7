//! Time as an input: the retry loop reads the time and sleeps only through [`Clock`], so tests
//! step a fake clock instead of waiting for real backoff delays.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// A sleep in progress, boxed so that [`Clock`] stays object-safe.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the retry loop gets the time from and how it waits.
pub trait Clock: Send + Sync {
    /// The current instant on a monotonic clock.
    fn now(&self) -> Instant;

    /// Waits for `duration`.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// The real clock: [`Instant::now`] and tokio's timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}
