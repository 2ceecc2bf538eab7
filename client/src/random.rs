//! Randomness as an input: backoff jitter and generated idempotency keys draw from [`Random`],
//! so tests can script it.

use std::time::Duration;

use rand::RngCore;

/// A source of uniformly random bits.
pub trait Random: Send + Sync {
    /// 64 uniformly random bits.
    fn next_u64(&self) -> u64;
}

/// The thread-local generator of `rand`, seeded from the operating system.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadRandom;

impl Random for ThreadRandom {
    fn next_u64(&self) -> u64 {
        rand::rng().next_u64()
    }
}

/// A duration drawn uniformly from `0 ..= upper`.
///
/// Multiplying by a 64-bit fraction and keeping the high half avoids both floating point and the
/// bias of a remainder; the leftover bias is below one part in 2^64 / `upper` in nanoseconds.
pub fn uniform_up_to(upper: Duration, random: &dyn Random) -> Duration {
    let span_nanos = upper.as_nanos().saturating_add(1);
    let drawn_nanos = (span_nanos * u128::from(random.next_u64())) >> 64;
    Duration::from_nanos(u64::try_from(drawn_nanos).unwrap_or(u64::MAX))
}

/// A fresh idempotency key: 128 random bits as 32 lower-case hex digits.
///
/// 128 bits make a collision between two operations of one tenant practically impossible, which
/// matters because a collision would replay another payment's outcome.
pub fn new_idempotency_key(random: &dyn Random) -> String {
    format!("{:016x}{:016x}", random.next_u64(), random.next_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u64);

    impl Random for Fixed {
        fn next_u64(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn a_uniform_draw_spans_zero_to_the_upper_bound_inclusive() {
        let upper = Duration::from_millis(800);

        let lowest = uniform_up_to(upper, &Fixed(0));
        let highest = uniform_up_to(upper, &Fixed(u64::MAX));
        let middle = uniform_up_to(upper, &Fixed(1 << 63));

        assert_eq!(lowest, Duration::ZERO);
        assert!(highest <= upper && highest > upper - Duration::from_micros(1));
        assert_eq!(middle, Duration::from_nanos(400_000_000));
    }

    #[test]
    fn a_generated_key_holds_128_bits_as_hex() {
        let key = new_idempotency_key(&ThreadRandom);

        assert_eq!(key.len(), 32);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(key, new_idempotency_key(&ThreadRandom));
    }
}
