//! The replay window.
//!
//! A captured signed message can be sent again. Its signature covers its
//! deduplication id, so a replay carries the same id: within JetStream's
//! duplicate window ([`DUPLICATE_WINDOW`], set on every keysync stream)
//! JetStream drops it. After the window it is stored again, but its
//! `emitted_at` (inside the signed payload) is then more than [`MAX_AGE`]
//! older than the time JetStream stored it, and it is rejected as stale. So
//! no set of seen ids has to be kept, and a fold over the log stays
//! deterministic: both times come from the log. Clocks of agents and
//! orchestrators must agree with the NATS servers' within [`MAX_SKEW`].
//!
//! Heartbeats travel on core NATS (no store time): each sender's heartbeats
//! must be fresh against the receiver's clock and strictly newer than the
//! last one accepted ([`Monotonic`]).

use std::collections::HashMap;
use std::time::Duration;

use keysync_schemas::{RejectReason, Rejection};

/// JetStream's duplicate window on keysync streams.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(300);
/// Clock skew tolerated between a sender and the NATS servers.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// The oldest a message may be when stored. A replay stored after the
/// duplicate window is at least `DUPLICATE_WINDOW - MAX_SKEW` old, so this
/// must stay below that.
pub const MAX_AGE: Duration = Duration::from_secs(200);

/// Checks a message emitted at `emitted_ns` and stored (or received) at
/// `reference_ns`, both nanoseconds since the Unix epoch.
pub fn check(emitted_ns: u64, reference_ns: u64) -> Result<(), Rejection> {
    if emitted_ns > reference_ns.saturating_add(MAX_SKEW.as_nanos() as u64) {
        let ahead_ms = (emitted_ns - reference_ns) / 1_000_000;
        return Err(Rejection::new(
            RejectReason::Future,
            format!("emitted {ahead_ms} ms in the future"),
        ));
    }
    let age = reference_ns.saturating_sub(emitted_ns);
    if age > MAX_AGE.as_nanos() as u64 {
        let age_ms = age / 1_000_000;
        return Err(Rejection::new(
            RejectReason::Stale,
            format!("emitted {age_ms} ms before it was stored: outside the replay window"),
        ));
    }
    Ok(())
}

/// Per-sender monotonic timestamps (for messages that are not stored).
#[derive(Debug, Default)]
pub struct Monotonic {
    last: HashMap<String, u64>,
}

impl Monotonic {
    /// Accepts `emitted_ns` from `sender` if fresh against `now_ns` and newer
    /// than the last accepted one.
    pub fn check(&mut self, sender: &str, emitted_ns: u64, now_ns: u64) -> Result<(), Rejection> {
        check(emitted_ns, now_ns)?;
        match self.last.get_mut(sender) {
            Some(last) if emitted_ns <= *last => Err(Rejection::new(
                RejectReason::Replayed,
                "not newer than the last one accepted from this sender",
            )),
            Some(last) => {
                *last = emitted_ns;
                Ok(())
            }
            None => {
                self.last.insert(sender.to_string(), emitted_ns);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_window_accepts_fresh_and_rejects_old_or_future() {
        let now = 1_000_000 * S;
        assert_eq!(check(now, now), Ok(()));
        assert_eq!(check(now - 199 * S, now), Ok(()));
        assert_eq!(check(now + 30 * S, now), Ok(()));
        assert_eq!(
            check(now - 201 * S, now).map_err(|r| r.reason),
            Err(RejectReason::Stale)
        );
        assert_eq!(
            check(now + 61 * S, now).map_err(|r| r.reason),
            Err(RejectReason::Future)
        );
    }

    #[test]
    fn a_replay_after_the_duplicate_window_is_stale() {
        // Worst case: the sender's clock runs MAX_SKEW fast, so the message
        // looks younger than it is. Stored at t, replayed and stored again
        // no earlier than t + DUPLICATE_WINDOW.
        let t = 1_000_000 * S;
        let emitted = t + MAX_SKEW.as_nanos() as u64;
        let replay_stored = t + DUPLICATE_WINDOW.as_nanos() as u64;
        assert_eq!(check(emitted, t), Ok(()));
        assert_eq!(
            check(emitted, replay_stored).map_err(|r| r.reason),
            Err(RejectReason::Stale)
        );
    }

    #[test]
    fn heartbeats_must_move_forward() {
        let mut m = Monotonic::default();
        let now = 1_000_000 * S;
        assert_eq!(m.check("a", now, now), Ok(()));
        assert_eq!(
            m.check("a", now, now).map_err(|r| r.reason),
            Err(RejectReason::Replayed)
        );
        assert_eq!(
            m.check("a", now - 1, now).map_err(|r| r.reason),
            Err(RejectReason::Replayed)
        );
        assert_eq!(m.check("b", now - 1, now), Ok(()));
        assert_eq!(m.check("a", now + 1, now), Ok(()));
    }
}
