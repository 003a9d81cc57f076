//! The JetStream streams a cluster needs, created if missing.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use keysync_schemas::{Subjects, MAX_MESSAGE_BYTES};

/// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates: the
/// first half of the replay window (see `keysync_security::freshness`).
pub const DUPLICATE_WINDOW: Duration = keysync_security::freshness::DUPLICATE_WINDOW;

/// Dead letters kept: at most this many, for at most a week.
pub const DEAD_LETTERS_MAX: i64 = 100_000;

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
        max_message_size: MAX_MESSAGE_BYTES as i32,
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
/// in count and age (oldest dropped) so a flood cannot fill the disk.
pub fn dead_letters_config(subjects: &Subjects, replicas: usize) -> stream::Config {
    stream::Config {
        name: subjects.dead_letter_stream(),
        description: Some("keysync dead letters: every rejected message, with its reason".into()),
        subjects: vec![subjects.dead_letters_all()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_messages: DEAD_LETTERS_MAX,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_message_size: MAX_MESSAGE_BYTES as i32,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Creates the streams if missing; returns the events stream.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> anyhow::Result<stream::Stream> {
    js.get_or_create_stream(commands_config(subjects, replicas))
        .await?;
    js.get_or_create_stream(dead_letters_config(subjects, replicas))
        .await?;
    Ok(js
        .get_or_create_stream(events_config(subjects, replicas))
        .await?)
}
