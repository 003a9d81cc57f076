//! Reading a member's inventory over NATS: anti-entropy's only I/O.
//!
//! An agent answers an `Inventory` request with up to a page of (key,
//! fingerprint) pairs after a given key; the whole inventory is read page
//! by page, so no reply comes near the message size limit. What to do with
//! it is [`anti_entropy::repairs`](crate::anti_entropy::repairs).

use std::time::Duration;

use keysync_schemas::{
    decode, encode, Envelope, Fingerprint, HsmId, KeyId, OpReply, OpRequest, Source, Subjects,
};

/// Inventory entries asked for per request.
const INVENTORY_PAGE: u32 = 2000;

/// How long one page may take to come.
const PAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every (key, fingerprint) member `hsm` holds, or `None` if it did not
/// answer (or answered something else): the repair is then postponed to a
/// later heartbeat.
pub async fn read_inventory(
    nats: &async_nats::Client,
    subjects: &Subjects,
    source: Source,
    hsm: &HsmId,
) -> anyhow::Result<Option<Vec<(KeyId, Fingerprint)>>> {
    let mut inventory = Vec::new();
    let mut after = None;
    loop {
        let req = encode(&Envelope::new(
            source.clone(),
            OpRequest::Inventory {
                after,
                limit: INVENTORY_PAGE,
            },
        ))?;
        let reply = match tokio::time::timeout(
            PAGE_TIMEOUT,
            nats.request(subjects.hsm_op(hsm), req.into()),
        )
        .await
        {
            Ok(Ok(r)) => r,
            _ => {
                tracing::warn!(%hsm, "inventory request unanswered; repair postponed");
                return Ok(None);
            }
        };
        match decode::<OpReply>(&reply.payload).map(|e| e.body) {
            Ok(OpReply::Inventory(page)) => {
                let last = page.last().map(|(k, _)| *k);
                let done = page.len() < INVENTORY_PAGE as usize;
                inventory.extend(page);
                match last {
                    Some(k) if !done => after = Some(k),
                    _ => return Ok(Some(inventory)),
                }
            }
            _ => {
                tracing::warn!(%hsm, "unexpected inventory reply; repair postponed");
                return Ok(None);
            }
        }
    }
}
