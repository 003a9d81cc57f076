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
    /// Write every record as one line of JSON (for a SIEM).
    Export {
        /// Audit stream (default: the cluster's).
        #[arg(long)]
        stream: Option<String>,
        /// JSON lines (the only format).
        #[arg(long)]
        json: bool,
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
        AuditFact::JoinTokenIssued { hsm, expires_at_ns } => {
            json!({"kind": "join_token_issued", "hsm": hsm.as_str(), "expires_at": rfc3339(*expires_at_ns)})
        }
        AuditFact::JoinRequested { hsm, public_key } => {
            json!({"kind": "join_requested", "hsm": hsm.as_str(), "public_key": hex::encode(public_key)})
        }
    }
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
        Command::Export { stream, .. } => {
            for r in read_all(cli, stream).await? {
                let line = match &r.record {
                    Ok(rec) => json!({
                        "seq": r.seq,
                        "hash": hex::encode(r.hash),
                        "prev_hash": hex::encode(rec.prev_hash),
                        "chain_seq": rec.chain_seq,
                        "event_seq": rec.event_seq,
                        "event_time": rfc3339(rec.event_time_ns),
                        "fact": fact_json(&rec.fact),
                    }),
                    Err(e) => {
                        json!({"seq": r.seq, "hash": hex::encode(r.hash), "foreign": true, "error": e})
                    }
                };
                outln!("{line}");
            }
            Ok(())
        }
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
                    | AuditFact::HsmCapabilities { .. } => {}
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
