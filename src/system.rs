//! The process's real clock and the OS random generator. The policy core and the admin layer never
//! reach for either: they take a [`Clock`] and a [`RandomSource`], and `server` hands them these.

use std::time::SystemTime;

use keyfence_policy::{clock::Clock, model::UnixMillis, random::RandomSource};
use rand::TryRngCore;

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        UnixMillis::from_system_time(SystemTime::now())
    }
}

/// The operating system's CSPRNG.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&self, dest: &mut [u8]) {
        // An OS generator that fails cannot mint a secret safely: stop rather than continue with
        // predictable bytes.
        rand::rngs::OsRng
            .try_fill_bytes(dest)
            .expect("the operating system's random generator failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_random_fills_and_clock_moves_forward() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        OsRandom.fill(&mut a);
        OsRandom.fill(&mut b);
        assert_ne!(a, b);
        assert!(SystemClock.now() > UnixMillis::from_secs(1_700_000_000));
    }
}
