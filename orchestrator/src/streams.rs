//! The JetStream streams a cluster needs, created if missing, and their
//! limits brought up to date on an existing deployment.
//!
//! **What a sender can store.** Anyone who may publish on a keysync subject
//! can store a message in its stream, whether or not keysync accepts it.
//! Each stream therefore refuses messages larger than keysync itself ever
//! writes there: events are at most [`MAX_EVENT_BYTES`] (a tenth of what a
//! command may be), commands [`MAX_MESSAGE_BYTES`] (clone batches), and the
//! dead-letter stream is bounded in count, bytes and age. What is stored
//! and rejected is then removed by the orchestrator.
//!
//! Per-subject limits (`max_msgs_per_subject`) are one number for a whole
//! stream, and keysync's subjects differ: a key's `created` subject holds
//! one message, but `hsm.<id>.failed`, `.recovered`, `.joined`,
//! `.enrolled` and `.token` hold one per occurrence, for good, and the fold
//! needs them all (dropping the oldest would change what a replay decides);
//! a command subject holds a down member's whole backlog. No per-subject
//! limit fits, so none is set.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use keysync_schemas::{Subjects, MAX_EVENT_BYTES, MAX_MESSAGE_BYTES};

/// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates: the
/// first half of the replay window (see `keysync_security::freshness`).
pub const DUPLICATE_WINDOW: Duration = keysync_security::freshness::DUPLICATE_WINDOW;

/// Dead letters kept: at most this many, for at most a week.
pub const DEAD_LETTERS_MAX: i64 = 100_000;

/// Dead letters kept: at most this many bytes (a letter keeps a rejected
/// payload of up to 64 KiB; without a byte limit 100,000 of them could
/// take 6 GiB).
pub const DEAD_LETTERS_MAX_BYTES: i64 = 256 * 1024 * 1024;

/// The events stream: every fact, kept (limits retention), file storage.
/// Direct get is on so a `KeyCreated` can be fetched by sequence quickly
/// (and from any replica).
pub fn events_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects.events_stream(),
        description: Some("keysync key lifecycle and membership events".into()),
        subjects: vec![subjects.events_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_message_size: MAX_EVENT_BYTES as i32,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The command stream: a work queue, one durable consumer per HSM; a
/// command stays until its HSM acknowledges it.
pub fn commands_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects.commands_stream(),
        description: Some("keysync clone commands, one subject per HSM".into()),
        subjects: vec![subjects.commands_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        max_message_size: MAX_MESSAGE_BYTES as i32,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The dead-letter stream: rejected messages with their reasons, bounded
/// in count, bytes and age (oldest dropped) so a flood cannot fill the
/// disk.
pub fn dead_letters_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects.dead_letter_stream(),
        description: Some("keysync dead letters: every rejected message, with its reason".into()),
        subjects: vec![subjects.dead_letters_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_messages: DEAD_LETTERS_MAX,
        max_bytes: DEAD_LETTERS_MAX_BYTES,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_message_size: MAX_MESSAGE_BYTES as i32,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The answer to a message delete.
#[derive(serde::Deserialize)]
struct Deleted {
    #[serde(default)]
    success: bool,
}

/// Deletes the message at `seq` from stream `stream`; `erase` overwrites
/// its bytes on disk too. Returns whether it was there.
///
/// The client's own `delete_message` always erases, and an erase rewrites
/// and syncs on every call: about 10 ms each on a file store, so a few
/// thousand refused events took a minute and starved every other
/// JetStream request of the account. Junk is deleted without erasing
/// (6,000 in about a second); material the log must not keep (a
/// replayed `KeyCreated` of a deleted key) is erased.
pub async fn delete_message(
    js: &jetstream::Context,
    stream: &str,
    seq: u64,
    erase: bool,
) -> anyhow::Result<bool> {
    let answer: jetstream::response::Response<Deleted> = js
        .request(
            format!("STREAM.MSG.DELETE.{stream}"),
            &serde_json::json!({ "seq": seq, "no_erase": !erase }),
        )
        .await?;
    match answer {
        jetstream::response::Response::Ok(d) => Ok(d.success),
        jetstream::response::Response::Err { error } => {
            anyhow::bail!("deleting {stream} seq {seq}: {error}")
        }
    }
}

/// `have` with the limits `want` sets, where `have`'s are looser (or
/// none): the largest message, and the count and bytes where `want` sets
/// them. `None` when nothing changes. Nothing else is touched: not what an
/// operator changed on purpose (replicas, placement, a tighter limit).
pub fn tightened(have: &stream::Config, want: &stream::Config) -> Option<stream::Config> {
    fn tighter<T: Copy + PartialOrd + Default>(have: T, want: T) -> T {
        let none = T::default();
        if want > none && (have <= none || have > want) {
            want
        } else {
            have
        }
    }
    let mut next = have.clone();
    next.max_message_size = tighter(have.max_message_size, want.max_message_size);
    next.max_messages = tighter(have.max_messages, want.max_messages);
    next.max_bytes = tighter(have.max_bytes, want.max_bytes);
    (next != *have).then_some(next)
}

/// Creates `want`'s stream if missing; on an existing one (made by an
/// older build), tightens its limits in place ([`tightened`]).
pub(crate) async fn ensure_one(
    js: &jetstream::Context,
    want: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let mut s = js.get_or_create_stream(want.clone()).await?;
    let have = s.info().await?.config.clone();
    if let Some(next) = tightened(&have, &want) {
        tracing::info!(
            stream = %want.name,
            max_msg_size = next.max_message_size,
            max_msgs = next.max_messages,
            max_bytes = next.max_bytes,
            "tightening the stream's limits in place"
        );
        js.update_stream(&next).await?;
        s = js.get_stream(&want.name).await?;
    }
    Ok(s)
}

/// Creates the streams if missing, tightens their limits if they exist;
/// returns the events stream.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> anyhow::Result<stream::Stream> {
    ensure_one(js, commands_config(subjects, replicas)).await?;
    ensure_one(js, dead_letters_config(subjects, replicas)).await?;
    ensure_one(js, events_config(subjects, replicas)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_deployments_limits_are_tightened_and_nothing_else() {
        let subjects = Subjects::default();
        let want = events_config(&subjects, 3);
        // Given the events stream as an older build made it, as the
        // server reports it (no limit = -1), with replicas changed by hand
        let mut have = want.clone();
        have.max_message_size = MAX_MESSAGE_BYTES as i32;
        have.max_messages = -1;
        have.max_bytes = -1;
        have.num_replicas = 5;
        // Then only the message size changes
        let next = tightened(&have, &want).expect("an update");
        assert_eq!(next.max_message_size, MAX_EVENT_BYTES as i32);
        assert_eq!((next.max_messages, next.max_bytes), (-1, -1));
        assert_eq!(next.num_replicas, 5);
        // And once updated, nothing more
        assert_eq!(tightened(&next, &want), None);
    }

    #[test]
    fn the_dead_letter_stream_gets_its_byte_limit_and_a_tighter_one_is_kept() {
        let subjects = Subjects::default();
        let want = dead_letters_config(&subjects, 1);
        let mut have = want.clone();
        have.max_bytes = -1;
        let next = tightened(&have, &want).expect("an update");
        assert_eq!(next.max_bytes, DEAD_LETTERS_MAX_BYTES);
        // An operator's tighter limits stay.
        have.max_bytes = 1024 * 1024;
        have.max_message_size = 4096;
        assert_eq!(tightened(&have, &want), None);
    }

    #[test]
    fn events_are_bounded_well_below_commands() {
        let subjects = Subjects::default();
        assert_eq!(
            events_config(&subjects, 1).max_message_size,
            MAX_EVENT_BYTES as i32
        );
        assert_eq!(
            commands_config(&subjects, 1).max_message_size,
            MAX_MESSAGE_BYTES as i32
        );
        const { assert!(MAX_EVENT_BYTES * 8 <= MAX_MESSAGE_BYTES) };
    }
}
