//! Time as an argument: the engine decides at the `now` it is given, and the layers above ask a
//! [`Clock`] for it, so that no code in this crate reads the system clock and every time-dependent
//! rule (expiry, the signature window, rotation grace) can be tested at any instant.

use crate::model::UnixMillis;

/// Where the current wall-clock time comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> UnixMillis;
}

/// A clock that always says the same time, for tests and benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub UnixMillis);

impl Clock for FixedClock {
    fn now(&self) -> UnixMillis {
        self.0
    }
}
