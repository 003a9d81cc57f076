//! Heartbeat intake: a heartbeat is believed only if its HSM's enrolled key
//! signed it, it is fresh, it is newer than the last one accepted from that
//! HSM, and it came on that HSM's own subject.
//!
//! Heartbeats travel on core NATS, not in the log: they are not folded, and
//! there is no stream time to judge them by, so freshness is judged against
//! this process's clock and replays are refused by the per-sender
//! monotonic check. What they mean (liveness, anti-entropy) is decided by
//! [`liveness`](crate::liveness) and [`anti_entropy`](crate::anti_entropy).

use keysync_schemas::{Heartbeat, RejectReason, Rejection, Subjects};
use keysync_security::{freshness::Monotonic, DeadLetters, Filing, Keep};

use crate::state::ClusterState;

/// Checks heartbeats and files the refused ones.
pub struct Heartbeats {
    subjects: Subjects,
    /// The newest heartbeat accepted from each HSM.
    seen: Monotonic,
    dead_letters: DeadLetters,
}

impl Heartbeats {
    /// Nothing accepted yet.
    pub fn new(subjects: Subjects, dead_letters: DeadLetters) -> Self {
        Heartbeats {
            subjects,
            seen: Monotonic::default(),
            dead_letters,
        }
    }

    /// The heartbeat in `msg`, received at `now_ns`, if it is to be
    /// believed.
    pub fn check(
        &mut self,
        state: &ClusterState,
        msg: &async_nats::Message,
        now_ns: u64,
    ) -> Result<Heartbeat, Rejection> {
        let env = keysync_security::check_heartbeat(
            msg.headers.as_ref(),
            &msg.subject,
            &msg.payload,
            now_ns,
            |h| state.enrolled_key(h),
            &mut self.seen,
        )?;
        if msg.subject.as_str() == self.subjects.heartbeat(&env.body.hsm) {
            Ok(env.body)
        } else {
            Err(Rejection::new(
                RejectReason::SubjectMismatch,
                "heartbeat on another HSM's subject",
            ))
        }
    }

    /// Files a refused heartbeat as a dead letter.
    pub async fn refused(&self, msg: &async_nats::Message, rejection: Rejection) {
        self.dead_letters
            .file(
                Filing {
                    subject: &msg.subject,
                    rejection,
                    stream_seq: None,
                    payload: &msg.payload,
                    dedup_id: None,
                },
                Keep::Payload,
            )
            .await;
    }
}
