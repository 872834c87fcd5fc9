//! The slowest request body unpart waits for.
//!
//! The idle timeout alone lets a client hold a request open for ever by sending one byte just
//! before each timeout; in stream mode that also holds a backend connection and the backend's
//! handler. A minimum rate bounds it. Only time spent waiting for the client counts: while
//! unpart is blocked writing to a slow backend it is not reading the client, and that is not
//! the client's fault.

use std::time::Duration;

pub struct Pace {
    /// Bytes per second; 0 turns the check off.
    min_rate: u64,
    window: Duration,
    waited: Duration,
    bytes: u64,
}

impl Pace {
    pub fn new(min_rate: u64, window: Duration) -> Pace {
        Pace {
            min_rate,
            window,
            waited: Duration::ZERO,
            bytes: 0,
        }
    }

    /// Bytes per second; 0 when the check is off.
    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }

    /// Records one read of `n` bytes that took `waited`. Once a window's worth of waiting has
    /// gone by, its average must reach the minimum; `Err` carries the rate it had instead.
    pub fn record(&mut self, n: usize, waited: Duration) -> Result<(), u64> {
        if self.min_rate == 0 {
            return Ok(());
        }
        self.waited += waited;
        self.bytes += n as u64;
        if self.waited < self.window {
            return Ok(());
        }
        let rate = self.bytes as f64 / self.waited.as_secs_f64();
        if rate < self.min_rate as f64 {
            return Err(rate as u64);
        }
        self.waited = Duration::ZERO;
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn one_byte_a_second_fails_after_one_window() {
        let mut p = Pace::new(100, 10 * S);
        for _ in 0..9 {
            assert_eq!(p.record(1, S), Ok(()));
        }
        assert_eq!(p.record(1, S), Err(1));
    }

    #[test]
    fn each_window_is_judged_on_its_own() {
        let mut p = Pace::new(100, 10 * S);
        // A fast first window does not pay for a slow second one.
        assert_eq!(p.record(1_000_000, 10 * S), Ok(()));
        for _ in 0..9 {
            assert_eq!(p.record(10, S), Ok(()));
        }
        assert_eq!(p.record(10, S), Err(10));
    }

    #[test]
    fn bursts_after_long_waits_are_fine_at_the_rate() {
        let mut p = Pace::new(100, 10 * S);
        assert_eq!(p.record(64 * 1024, 59 * S), Ok(()));
        // Time spent elsewhere (writing to the backend) is never recorded: no read, no wait.
        assert_eq!(p.record(2_000, 10 * S), Ok(()));
        assert_eq!(p.record(999, 10 * S), Err(99));
    }

    #[test]
    fn zero_turns_it_off() {
        let mut p = Pace::new(0, S);
        for _ in 0..100 {
            assert_eq!(p.record(0, 10 * S), Ok(()));
        }
    }

    #[test]
    fn fast_reads_never_fail() {
        let mut p = Pace::new(500, S);
        for _ in 0..10_000 {
            assert_eq!(p.record(16 * 1024, Duration::from_micros(50)), Ok(()));
        }
    }
}
