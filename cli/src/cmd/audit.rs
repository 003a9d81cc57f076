//! `keysync audit verify|export|replay`: the hash-chained audit log.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer::pull};
use clap::Subcommand;
use futures::StreamExt;
use keysync_schemas::{decode, record_hash, AuditFact, AuditRecord, HsmId, KeyId};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{print_json, Cli};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Walk the chain; report the first bad link (exit 1) or that it is intact.
    Verify {
        /// Audit stream to verify (default: the cluster's).
        #[arg(long)]
        stream: Option<String>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write every record as one line of JSON (for a SIEM): each with its
    /// `seq`, the fact, who caused it (`actor`) and RFC 3339 times.
    Export {
        /// Audit stream (default: the cluster's).
        #[arg(long)]
        stream: Option<String>,
        /// JSON lines (the only format).
        #[arg(long)]
        json: bool,
        /// Only records after this one: a record sequence (the `seq` of the
        /// last line a previous run printed, to resume exactly there), or
        /// an RFC 3339 time (records of facts stored at or after it).
        #[arg(long)]
        since: Option<String>,
        /// Keep printing records as they are appended (tail it).
        #[arg(long)]
        follow: bool,
    },
    /// Rebuild and print the cluster (which keys, on which HSMs) as it was
    /// at a chain sequence or an RFC 3339 time.
    Replay {
        /// A record sequence, or an RFC 3339 time (e.g. 2026-11-28T10:00:00Z).
        #[arg(long)]
        until: String,
        /// Audit stream (default: the cluster's).
        #[arg(long)]
        stream: Option<String>,
        /// One JSON document on stdout (members, keys with their HSMs,
        /// deleted keys) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// One stored record: its stream sequence, payload hash and decoded body.
struct Stored {
    seq: u64,
    hash: [u8; 32],
    record: Result<AuditRecord, String>,
}

/// Reads every message of the audit stream in order.
async fn read_all(cli: &Cli, stream: &Option<String>) -> anyhow::Result<Vec<Stored>> {
    let nats = cli.nats("keysync audit").await?;
    let js = jetstream::new(nats);
    let name = stream.clone().unwrap_or(cli.subjects()?.audit_stream());
    let mut s = js
        .get_stream(&name)
        .await
        .with_context(|| format!("audit stream {name}"))?;
    let info = s.info().await?.clone();
    if info.state.messages == 0 {
        return Ok(Vec::new());
    }
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while let Some(m) = messages.next().await {
        let m = m?;
        let i = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (seq, pending) = (i.stream_sequence, i.pending);
        out.push(Stored {
            seq,
            hash: record_hash(&m.payload),
            record: decode::<AuditRecord>(&m.payload)
                .map(|e| e.body)
                .map_err(|e| e.to_string()),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// What a walk of the audit stream found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Walk {
    /// Audit records (foreign messages not counted).
    records: usize,
    /// Foreign messages: (sequence, why it is not an audit record).
    foreign: Vec<(u64, String)>,
    /// The first bad link: (sequence, what is wrong).
    broken: Option<(u64, String)>,
}

/// Walks the chain.
///
/// A message that does not decode as an audit record is *foreign*: nobody
/// can edit a record in place in JetStream, so it was published there by
/// someone other than the appender (a reply aimed at the audit stream, a
/// stray publish). It is listed with its sequence and skipped: the next
/// record must link to the last record before it, exactly as if it were
/// not there, so a foreign message can neither hide nor cause a broken
/// link. Everything that decodes as a record is held to the chain: it
/// sits at the sequence it claims, and its `prev_hash` is the hash of the
/// previous *record*. A gap in the sequences is a removed record only if
/// the link across it breaks (a removed foreign message leaves the chain
/// whole).
fn walk(stored: &[Stored]) -> Walk {
    let mut w = Walk::default();
    let mut prev_seq = 0u64;
    let mut prev_hash = [0u8; 32];
    for r in stored {
        let rec = match &r.record {
            Ok(rec) => rec,
            Err(e) => {
                w.foreign.push((r.seq, format!("not an audit record: {e}")));
                continue;
            }
        };
        if rec.chain_seq != r.seq {
            w.broken = Some((
                r.seq,
                format!(
                    "record at {} claims sequence {}: inserted or moved",
                    r.seq, rec.chain_seq
                ),
            ));
            return w;
        }
        if rec.prev_hash != prev_hash {
            let first_gap = (prev_seq + 1..r.seq).find(|s| !stored.iter().any(|m| m.seq == *s));
            let why = match first_gap {
                Some(missing) => format!(
                    "record {missing} is missing (removed): the chain jumps from {prev_seq} to {}",
                    r.seq
                ),
                None => format!(
                    "record {} does not follow record {prev_seq}: one of them was edited, or {} was inserted",
                    r.seq, r.seq
                ),
            };
            w.broken = Some((first_gap.unwrap_or(r.seq), why));
            return w;
        }
        w.records += 1;
        prev_seq = r.seq;
        prev_hash = r.hash;
    }
    w
}

fn fact_json(f: &AuditFact) -> serde_json::Value {
    match f {
        AuditFact::KeyCreated {
            key_id,
            key_type,
            fingerprint,
            hsm,
            origin,
            durability,
        } => {
            json!({"kind": "key_created", "key_id": key_id.to_string(), "key_type": key_type.as_str(),
            "fingerprint": fingerprint.to_hex(), "hsm": hsm.as_str(), "origin": format!("{origin:?}").to_lowercase(),
            "durability": durability.to_string()})
        }
        AuditFact::CloneApplied {
            key_id,
            hsm,
            fingerprint,
        } => {
            json!({"kind": "clone_applied", "key_id": key_id.to_string(), "hsm": hsm.as_str(), "fingerprint": fingerprint.to_hex()})
        }
        AuditFact::CloneFailed {
            key_id,
            hsm,
            reason,
        } => {
            json!({"kind": "clone_failed", "key_id": key_id.to_string(), "hsm": hsm.as_str(), "reason": reason})
        }
        AuditFact::KeyReplicated {
            key_id,
            sync_latency_micros,
        } => {
            json!({"kind": "key_replicated", "key_id": key_id.to_string(), "sync_latency_micros": sync_latency_micros})
        }
        AuditFact::KeyDeleted { key_id, hsm } => {
            json!({"kind": "key_deleted", "key_id": key_id.to_string(), "hsm": hsm.as_str()})
        }
        AuditFact::KeyErased { key_id, hsm } => {
            json!({"kind": "key_erased", "key_id": key_id.to_string(), "hsm": hsm.as_str()})
        }
        AuditFact::HsmJoined { hsm } => json!({"kind": "hsm_joined", "hsm": hsm.as_str()}),
        AuditFact::HsmFailed { hsm } => json!({"kind": "hsm_failed", "hsm": hsm.as_str()}),
        AuditFact::HsmRecovered { hsm } => json!({"kind": "hsm_recovered", "hsm": hsm.as_str()}),
        AuditFact::HsmEnrolled {
            hsm,
            public_key,
            via,
        } => {
            json!({"kind": "hsm_enrolled", "hsm": hsm.as_str(), "public_key": hex::encode(public_key), "via": format!("{via:?}").to_lowercase()})
        }
        AuditFact::HsmRevoked { hsm } => json!({"kind": "hsm_revoked", "hsm": hsm.as_str()}),
        AuditFact::HsmCapabilities { hsm, holds } => {
            json!({"kind": "hsm_capabilities", "hsm": hsm.as_str(), "holds": holds.iter().map(|t| t.as_str()).collect::<Vec<_>>()})
        }
        AuditFact::Checkpoint {
            after_seq,
            through_seq,
            chain,
        } => {
            json!({"kind": "checkpoint", "after_seq": after_seq, "through_seq": through_seq, "chain": hex::encode(chain)})
        }
        AuditFact::ClonesApplied { hsm, applied } => {
            json!({"kind": "clones_applied", "hsm": hsm.as_str(),
            "applied": applied.iter().map(|(k, f)| json!({"key_id": k.to_string(), "fingerprint": f.to_hex()})).collect::<Vec<_>>()})
        }
        AuditFact::JoinTokenIssued { hsm, expires_at_ns } => {
            json!({"kind": "join_token_issued", "hsm": hsm.as_str(), "expires_at": rfc3339(*expires_at_ns)})
        }
        AuditFact::JoinRequested { hsm, public_key } => {
            json!({"kind": "join_requested", "hsm": hsm.as_str(), "public_key": hex::encode(public_key)})
        }
    }
}

/// Where an export starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Since {
    /// After this record sequence.
    After(u64),
    /// Records of facts stored at or after this time (ns since the epoch).
    At(u64),
}

impl Since {
    fn parse(text: Option<&str>) -> anyhow::Result<Since> {
        let Some(text) = text else {
            return Ok(Since::After(0));
        };
        if let Ok(seq) = text.parse::<u64>() {
            return Ok(Since::After(seq));
        }
        let t = OffsetDateTime::parse(text, &Rfc3339).with_context(|| {
            format!("--since {text:?} is neither a record sequence nor an RFC 3339 time (e.g. 2026-11-28T10:00:00Z)")
        })?;
        Ok(Since::At(
            u64::try_from(t.unix_timestamp_nanos()).unwrap_or(0),
        ))
    }

    /// Whether a stored record is exported.
    fn keeps(self, seq: u64, record: &Result<AuditRecord, String>) -> bool {
        match (self, record) {
            (Since::After(after), _) => seq > after,
            (Since::At(ns), Ok(r)) => r.event_time_ns >= ns,
            // A foreign message has no fact time: kept by its place.
            (Since::At(_), Err(_)) => true,
        }
    }
}

/// One exported line.
fn export_line(
    seq: u64,
    hash: [u8; 32],
    record: &Result<AuditRecord, String>,
) -> serde_json::Value {
    match record {
        Ok(rec) => {
            let actor = rec.fact.actor();
            let actor = match &actor {
                keysync_schemas::Actor::Hsm(h) => json!({"kind": actor.kind(), "hsm": h.as_str()}),
                _ => json!({"kind": actor.kind()}),
            };
            json!({
                "seq": seq,
                "hash": hex::encode(hash),
                "prev_hash": hex::encode(rec.prev_hash),
                "chain_seq": rec.chain_seq,
                "event_seq": rec.event_seq,
                "event_time": rfc3339(rec.event_time_ns),
                "actor": actor,
                "fact": fact_json(&rec.fact),
            })
        }
        Err(e) => json!({"seq": seq, "hash": hex::encode(hash), "foreign": true, "error": e}),
    }
}

/// Prints the audit records after `since` as JSON lines; with `follow`,
/// then every record appended, until interrupted. A closed stdout (a
/// reader that stopped, as `| head -1`) ends it quietly.
async fn export(
    cli: &Cli,
    stream: &Option<String>,
    since: Option<&str>,
    follow: bool,
) -> anyhow::Result<()> {
    let since = Since::parse(since)?;
    let nats = cli.nats("keysync audit export").await?;
    let js = jetstream::new(nats);
    let name = stream.clone().unwrap_or(cli.subjects()?.audit_stream());
    let mut s = js
        .get_stream(&name)
        .await
        .with_context(|| format!("audit stream {name}"))?;
    let last = s.info().await?.state.last_sequence;
    let start = match since {
        Since::After(seq) => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        // A record is stored after its fact: none before the time is needed.
        Since::At(ns) => jetstream::consumer::DeliverPolicy::ByStartTime {
            start_time: OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        },
    };
    // Without --follow, the export ends at the stream's last record as of
    // now; nothing to wait for if it lies before the start.
    let nothing_yet = match since {
        Since::After(seq) => seq >= last,
        Since::At(ns) => match s.direct_get(last).await {
            Ok(m) => m.time.unix_timestamp_nanos() < i128::from(ns),
            Err(_) => last == 0,
        },
    };
    if nothing_yet && !follow {
        return Ok(());
    }
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            deliver_policy: start,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = std::io::stdout();
    while let Some(m) = messages.next().await {
        let m = m?;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        let record = decode::<AuditRecord>(&m.payload)
            .map(|e| e.body)
            .map_err(|e| e.to_string());
        if since.keeps(seq, &record) {
            let line = export_line(seq, record_hash(&m.payload), &record);
            if !super::write_line(&mut out, &line.to_string())? {
                return Ok(());
            }
        }
        if !follow && seq >= last {
            break;
        }
    }
    Ok(())
}

fn rfc3339(ns: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[derive(Default)]
struct KeyAt {
    key_type: String,
    fingerprint: String,
    hsms: BTreeSet<HsmId>,
    deleted: bool,
}

pub async fn run(cli: &Cli, cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Verify { stream, json } => {
            let stored = read_all(cli, stream).await?;
            let w = walk(&stored);
            let foreign_json: Vec<serde_json::Value> = w
                .foreign
                .iter()
                .map(|(seq, why)| json!({"seq": seq, "reason": why}))
                .collect();
            let foreign_text = if w.foreign.is_empty() {
                String::new()
            } else {
                let at: Vec<String> = w.foreign.iter().map(|(s, _)| s.to_string()).collect();
                format!(
                    "; {} foreign message{} skipped (not audit records) at {}",
                    w.foreign.len(),
                    if w.foreign.len() == 1 { "" } else { "s" },
                    at.join(", ")
                )
            };
            match &w.broken {
                None => {
                    if *json {
                        print_json(
                            &json!({"intact": true, "records": w.records, "foreign": foreign_json}),
                        )?;
                    } else {
                        outln!("audit chain intact: {} records{foreign_text}", w.records);
                    }
                    if !w.foreign.is_empty() {
                        eprintln!(
                            "warning: the audit stream holds {} message{} the appender did not write; see who may publish on it",
                            w.foreign.len(),
                            if w.foreign.len() == 1 { "" } else { "s" }
                        );
                    }
                    Ok(())
                }
                Some((seq, why)) => {
                    if *json {
                        print_json(
                            &json!({"intact": false, "records": w.records, "first_bad_seq": seq, "reason": why, "foreign": foreign_json}),
                        )?;
                    }
                    bail!("audit chain broken at record {seq}: {why}{foreign_text}")
                }
            }
        }
        Command::Export {
            stream,
            since,
            follow,
            ..
        } => export(cli, stream, since.as_deref(), *follow).await,
        Command::Replay {
            until,
            stream,
            json,
        } => {
            let limit: Box<dyn Fn(&AuditRecord) -> bool> = match until.parse::<u64>() {
                Ok(seq) => Box::new(move |r: &AuditRecord| r.chain_seq <= seq),
                Err(_) => {
                    let t = OffsetDateTime::parse(until, &Rfc3339).with_context(|| {
                        format!("--until {until:?} is neither a sequence nor an RFC 3339 time")
                    })?;
                    let ns = u64::try_from(t.unix_timestamp_nanos()).unwrap_or(0);
                    Box::new(move |r: &AuditRecord| r.event_time_ns <= ns)
                }
            };
            let records = read_all(cli, stream).await?;
            if let Some((seq, why)) = walk(&records).broken {
                eprintln!(
                    "warning: audit chain broken at record {seq}: {why}; replaying what is there"
                );
            }
            let mut keys: BTreeMap<KeyId, KeyAt> = BTreeMap::new();
            let mut members: BTreeMap<HsmId, &'static str> = BTreeMap::new();
            let mut last = (0u64, 0u64);
            for rec in records.iter().filter_map(|r| r.record.as_ref().ok()) {
                if !limit(rec) {
                    break;
                }
                last = (rec.chain_seq, rec.event_time_ns);
                match &rec.fact {
                    AuditFact::KeyCreated {
                        key_id,
                        key_type,
                        fingerprint,
                        hsm,
                        ..
                    } => {
                        let k = keys.entry(*key_id).or_default();
                        k.key_type = key_type.as_str().into();
                        k.fingerprint = fingerprint.to_hex();
                        k.hsms.insert(hsm.clone());
                    }
                    AuditFact::CloneApplied { key_id, hsm, .. } => {
                        if let Some(k) = keys.get_mut(key_id).filter(|k| !k.deleted) {
                            k.hsms.insert(hsm.clone());
                        }
                    }
                    AuditFact::ClonesApplied { hsm, applied } => {
                        for (key_id, _) in applied {
                            if let Some(k) = keys.get_mut(key_id).filter(|k| !k.deleted) {
                                k.hsms.insert(hsm.clone());
                            }
                        }
                    }
                    AuditFact::KeyDeleted { key_id, hsm } => {
                        let k = keys.entry(*key_id).or_default();
                        k.deleted = true;
                        k.hsms.remove(hsm);
                    }
                    AuditFact::KeyErased { key_id, hsm } => {
                        if let Some(k) = keys.get_mut(key_id) {
                            k.hsms.remove(hsm);
                        }
                    }
                    AuditFact::HsmJoined { hsm } | AuditFact::HsmRecovered { hsm } => {
                        members.insert(hsm.clone(), "live");
                    }
                    AuditFact::HsmFailed { hsm } => {
                        members.insert(hsm.clone(), "failed");
                    }
                    AuditFact::HsmRevoked { hsm } => {
                        members.insert(hsm.clone(), "removed");
                    }
                    AuditFact::CloneFailed { .. }
                    | AuditFact::KeyReplicated { .. }
                    | AuditFact::HsmEnrolled { .. }
                    | AuditFact::JoinTokenIssued { .. }
                    | AuditFact::JoinRequested { .. }
                    | AuditFact::HsmCapabilities { .. }
                    | AuditFact::Checkpoint { .. } => {}
                }
            }
            let doc = json!({
                "until_seq": last.0,
                "until_time": rfc3339(last.1),
                "members": members.iter().map(|(h, s)| json!({"hsm_id": h.as_str(), "state": s})).collect::<Vec<_>>(),
                "keys": keys.iter().filter(|(_, k)| !k.deleted).map(|(id, k)| json!({
                    "key_id": id.to_string(),
                    "key_type": k.key_type,
                    "fingerprint": k.fingerprint,
                    "hsm_ids": k.hsms.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                    "hsms": k.hsms.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "deleted": keys.iter().filter(|(_, k)| k.deleted).map(|(id, _)| id.to_string()).collect::<Vec<_>>(),
            });
            if *json {
                return print_json(&doc);
            }
            outln!(
                "the cluster at audit record {} ({})",
                last.0,
                rfc3339(last.1)
            );
            outln!("{:<16} STATE", "HSM");
            for (h, state) in &members {
                outln!("{:<16} {state}", h.as_str());
            }
            outln!("{:<36}  {:<8} HSMS", "KEY", "TYPE");
            for (id, k) in keys.iter().filter(|(_, k)| !k.deleted) {
                let hsms: Vec<&str> = k.hsms.iter().map(|h| h.as_str()).collect();
                outln!("{id}  {:<8} {}", k.key_type, hsms.join(","));
            }
            let deleted = keys.values().filter(|k| k.deleted).count();
            outln!(
                "{} live keys, {deleted} deleted (--json for fingerprints and the deleted ids)",
                keys.len() - deleted
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keysync_schemas::{encode, Envelope, Source};

    /// A chain of `n` records at sequences 1..=n, as stored.
    fn chain(n: u64) -> Vec<Stored> {
        let mut out = Vec::new();
        let mut prev = [0u8; 32];
        for seq in 1..=n {
            out.push(stored(seq, prev));
            prev = out[out.len() - 1].hash;
        }
        out
    }

    fn stored(seq: u64, prev_hash: [u8; 32]) -> Stored {
        let rec = AuditRecord {
            chain_seq: seq,
            prev_hash,
            event_seq: seq,
            event_time_ns: seq,
            fact: AuditFact::HsmJoined {
                hsm: HsmId::new("hsm-1").expect("id"),
            },
        };
        let bytes = encode(&Envelope::new(
            Source::Orchestrator("o".into()),
            rec.clone(),
        ))
        .expect("encode");
        Stored {
            seq,
            hash: record_hash(&bytes),
            record: Ok(rec),
        }
    }

    fn foreign(seq: u64) -> Stored {
        Stored {
            seq,
            hash: record_hash(b"junk"),
            record: Err("bad magic".into()),
        }
    }

    #[test]
    fn since_takes_a_sequence_or_a_time_and_resumes_after_it() {
        assert_eq!(Since::parse(None).expect("none"), Since::After(0));
        assert_eq!(Since::parse(Some("42")).expect("seq"), Since::After(42));
        assert_eq!(
            Since::parse(Some("1970-01-01T00:00:01Z")).expect("time"),
            Since::At(1_000_000_000)
        );
        assert!(Since::parse(Some("yesterday")).is_err());
        let r = stored(5, [0; 32]).record;
        assert!(!Since::After(5).keeps(5, &r));
        assert!(Since::After(4).keeps(5, &r));
        // `stored` puts the fact at 5 ns.
        assert!(Since::At(5).keeps(5, &r));
        assert!(!Since::At(6).keeps(5, &r));
    }

    #[test]
    fn an_exported_record_names_its_actor() {
        let r = stored(1, [0; 32]);
        let line = export_line(1, r.hash, &r.record);
        assert_eq!(line["actor"], json!({"kind": "hsm", "hsm": "hsm-1"}));
        assert_eq!(line["event_time"], "1970-01-01T00:00:00.000000001Z");
    }

    #[test]
    fn an_intact_chain_has_no_bad_link() {
        let w = walk(&chain(5));
        assert_eq!((w.records, w.broken, w.foreign.len()), (5, None, 0));
    }

    #[test]
    fn a_foreign_message_is_listed_and_the_chain_links_across_it() {
        let mut s = chain(3);
        s.push(foreign(4));
        // The appender's next record lands at 5 and links to record 3.
        s.push(stored(5, s[2].hash));
        let w = walk(&s);
        assert_eq!(w.broken, None, "{w:?}");
        assert_eq!(w.records, 4);
        assert_eq!(w.foreign.iter().map(|f| f.0).collect::<Vec<_>>(), vec![4]);
        // Removing the foreign message leaves the chain whole.
        s.remove(3);
        assert_eq!(walk(&s).broken, None);
    }

    #[test]
    fn a_foreign_message_does_not_hide_a_removed_record() {
        let mut s = chain(4);
        s.remove(2); // record 3
        s.push(foreign(5));
        let w = walk(&s);
        let (seq, why) = w.broken.expect("broken");
        assert_eq!(seq, 3, "{why}");
        assert!(why.contains("record 3 is missing"), "{why}");
    }

    #[test]
    fn records_that_decode_are_held_to_the_chain() {
        // Inserted: a record that claims its place but links elsewhere.
        let mut s = chain(2);
        s.push(stored(3, [7; 32]));
        assert_eq!(walk(&s).broken.map(|b| b.0), Some(3));
        // Moved: a record at a sequence it does not claim.
        let mut s = chain(2);
        let mut moved = stored(4, s[1].hash);
        moved.seq = 3;
        s.push(moved);
        let (seq, why) = walk(&s).broken.expect("broken");
        assert_eq!(seq, 3);
        assert!(why.contains("claims sequence 4"), "{why}");
        // The first record removed.
        let s: Vec<Stored> = chain(3).into_iter().skip(1).collect();
        assert_eq!(walk(&s).broken.map(|b| b.0), Some(1));
    }
}
