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

/// The first bad link, if any: (sequence, what is wrong).
fn first_bad_link(records: &[Stored]) -> Option<(u64, String)> {
    let mut prev_seq = 0u64;
    let mut prev_hash = [0u8; 32];
    for r in records {
        if r.seq != prev_seq + 1 {
            return Some((
                prev_seq + 1,
                format!(
                    "record {} is missing (removed): the chain jumps from {} to {}",
                    prev_seq + 1,
                    prev_seq,
                    r.seq
                ),
            ));
        }
        let rec = match &r.record {
            Ok(rec) => rec,
            Err(e) => {
                return Some((
                    r.seq,
                    format!("record {} is not an audit record: {e}", r.seq),
                ))
            }
        };
        if rec.chain_seq != r.seq {
            return Some((
                r.seq,
                format!(
                    "record at {} claims sequence {}: inserted or moved",
                    r.seq, rec.chain_seq
                ),
            ));
        }
        if rec.prev_hash != prev_hash {
            return Some((
                r.seq,
                format!(
                    "record {} does not follow record {}: one of them was edited, or {} was inserted",
                    r.seq, prev_seq, r.seq
                ),
            ));
        }
        prev_seq = r.seq;
        prev_hash = r.hash;
    }
    None
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
            let records = read_all(cli, stream).await?;
            match first_bad_link(&records) {
                None => {
                    if *json {
                        print_json(&json!({"intact": true, "records": records.len()}))?;
                    } else {
                        println!("audit chain intact: {} records", records.len());
                    }
                    Ok(())
                }
                Some((seq, why)) => {
                    if *json {
                        print_json(
                            &json!({"intact": false, "records": records.len(), "first_bad_seq": seq, "reason": why}),
                        )?;
                    }
                    bail!("audit chain broken at record {seq}: {why}")
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
                    Err(e) => json!({"seq": r.seq, "hash": hex::encode(r.hash), "error": e}),
                };
                println!("{line}");
            }
            Ok(())
        }
        Command::Replay { until, stream } => {
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
            if let Some((seq, why)) = first_bad_link(&records) {
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
                    | AuditFact::JoinRequested { .. } => {}
                }
            }
            print_json(&json!({
                "until_seq": last.0,
                "until_time": rfc3339(last.1),
                "members": members.iter().map(|(h, s)| json!({"hsm_id": h.as_str(), "state": s})).collect::<Vec<_>>(),
                "keys": keys.iter().filter(|(_, k)| !k.deleted).map(|(id, k)| json!({
                    "key_id": id.to_string(),
                    "key_type": k.key_type,
                    "fingerprint": k.fingerprint,
                    "hsms": k.hsms.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "deleted": keys.iter().filter(|(_, k)| k.deleted).map(|(id, _)| id.to_string()).collect::<Vec<_>>(),
            }))
        }
    }
}
