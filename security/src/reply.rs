//! Where keysync answers requests, and under which inbox it asks them.
//!
//! A NATS request names its own reply subject, and a responder publishes
//! the answer there with *its* permissions. A responder that answers on
//! whatever subject it is given can be made to publish into the audit
//! stream (`keysync.audit`), the lease bucket (`$KV.KEYSYNC_LEASE.active`)
//! or a command queue. So every keysync responder (the orchestrator's
//! status server, the agents' operation server) answers only a reply
//! subject that is an *inbox*: under `_INBOX.` ([`check`]). Anything else
//! is refused with [`RejectReason::ForeignReplySubject`], counted, and
//! never answered (nor acted on).
//!
//! Every keysync process asks under its own inbox prefix, `_INBOX.<name>`
//! ([`prefix_for`]): `_INBOX.orchestrator`, `_INBOX.<hsm id>`,
//! `_INBOX.client`, or `_INBOX.<NATS user>` for whoever logs in with a user
//! name. Inboxes are then `_INBOX.<name>.<random>`, and NATS permissions
//! can confine each role's subscriptions to `_INBOX.<name>.>` (subject
//! permissions match whole tokens, so `_INBOX.hsm-1.>` does not cover
//! `_INBOX.hsm-10.…`), while a responder's publish permission names
//! `_INBOX.>` or the prefixes it answers. A prefix outside `_INBOX` is
//! refused ([`validate_prefix`]): keysync's own responders would refuse to
//! answer it.

use keysync_schemas::{RejectReason, Rejection};

/// The root every inbox lives under.
pub const INBOX_ROOT: &str = "_INBOX";

/// Longest reply subject answered (NATS itself allows longer; no inbox
/// keysync makes comes close).
pub const MAX_REPLY_LEN: usize = 256;

/// Why an inbox prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxPrefixError {
    /// Not `_INBOX` or under `_INBOX.`: keysync responders would not answer it.
    #[error("inbox prefix {0:?} is not under {INBOX_ROOT}. (keysync answers only inboxes)")]
    NotAnInbox(String),
    /// An empty token, a wildcard or whitespace.
    #[error("inbox prefix {0:?} is not a valid subject (empty token, wildcard or whitespace)")]
    Invalid(String),
}

/// Whether `token` is one literal subject token: not empty, no `.`, no
/// wildcard, no whitespace or control character.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '.' | '*' | '>'))
}

/// Whether `subject` is a literal subject: one or more valid tokens.
fn literal(subject: &str) -> bool {
    subject.split('.').all(valid_token)
}

/// Whether a request's reply subject may be answered: a literal subject
/// with at least one token after one of `prefixes` (each a literal subject
/// itself, such as `_INBOX` or `_INBOX.client`).
pub fn allowed(reply: &str, prefixes: &[&str]) -> Result<(), Rejection> {
    let shown = || reply.chars().take(64).collect::<String>();
    if reply.len() > MAX_REPLY_LEN || !literal(reply) {
        return Err(Rejection::new(
            RejectReason::ForeignReplySubject,
            format!("reply subject {:?} is not a literal subject", shown()),
        ));
    }
    let under = |p: &&str| {
        reply
            .strip_prefix(*p)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty())
    };
    if prefixes.iter().any(under) {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectReason::ForeignReplySubject,
            format!(
                "reply subject {:?} is not an inbox (under {})",
                shown(),
                prefixes.join(", ")
            ),
        ))
    }
}

/// [`allowed`] under [`INBOX_ROOT`]: the rule every keysync responder
/// applies.
pub fn check(reply: &str) -> Result<(), Rejection> {
    allowed(reply, &[INBOX_ROOT])
}

/// Checks an inbox prefix given by configuration: `_INBOX` itself, or
/// `_INBOX.` followed by literal tokens.
pub fn validate_prefix(prefix: &str) -> Result<(), InboxPrefixError> {
    if !literal(prefix) {
        return Err(InboxPrefixError::Invalid(prefix.to_string()));
    }
    if prefix == INBOX_ROOT || prefix.starts_with("_INBOX.") {
        Ok(())
    } else {
        Err(InboxPrefixError::NotAnInbox(prefix.to_string()))
    }
}

/// The inbox prefix of a process named `name` (a role, an HSM id, a NATS
/// user): `_INBOX.<name>`, if `name` makes a literal subject.
pub fn prefix_for(name: &str) -> Option<String> {
    literal(name).then(|| format!("{INBOX_ROOT}.{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inboxes_are_answered() {
        assert_eq!(check("_INBOX.abc"), Ok(()));
        assert_eq!(check("_INBOX.client.Xy12.3"), Ok(()));
        assert_eq!(check("_INBOX.hsm-1.abc"), Ok(()));
        assert_eq!(allowed("_INBOX.client.abc", &["_INBOX.client"]), Ok(()));
    }

    #[test]
    fn anything_else_is_a_foreign_reply_subject() {
        for reply in [
            "keysync.audit",
            "$KV.KEYSYNC_LEASE.active",
            "keysync.cmd.hsm-1",
            "$JS.API.STREAM.DELETE.KEYSYNC_EVENTS",
            "_INBOX",
            "_INBOX.",
            "_INBOXES.x",
            "_INBOX_client.x",
            "x._INBOX.y",
            "_INBOX..x",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX.a b",
            "_INBOX.a\tb",
            "",
        ] {
            let r = check(reply).expect_err(reply);
            assert_eq!(r.reason, RejectReason::ForeignReplySubject, "{reply}");
        }
        let long = format!("_INBOX.{}", "a".repeat(MAX_REPLY_LEN));
        assert!(check(&long).is_err());
    }

    #[test]
    fn a_role_prefix_does_not_cover_another() {
        assert!(allowed("_INBOX.client.x", &["_INBOX.client"]).is_ok());
        assert!(allowed("_INBOX.clients.x", &["_INBOX.client"]).is_err());
        assert!(allowed("_INBOX.hsm-10.x", &["_INBOX.hsm-1"]).is_err());
        assert!(allowed("_INBOX.client", &["_INBOX.client"]).is_err());
    }

    #[test]
    fn configured_prefixes_must_be_inboxes() {
        assert_eq!(validate_prefix("_INBOX"), Ok(()));
        assert_eq!(validate_prefix("_INBOX.hsm-1"), Ok(()));
        assert_eq!(validate_prefix("_INBOX.team.alice"), Ok(()));
        assert!(matches!(
            validate_prefix("keysync.audit"),
            Err(InboxPrefixError::NotAnInbox(_))
        ));
        assert!(matches!(
            validate_prefix("_INBOX_client"),
            Err(InboxPrefixError::NotAnInbox(_))
        ));
        for bad in ["_INBOX.*", "_INBOX.>", "_INBOX.", "", "_INBOX.a b"] {
            assert!(
                matches!(validate_prefix(bad), Err(InboxPrefixError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_make_prefixes_when_they_are_subjects() {
        assert_eq!(prefix_for("hsm-1").as_deref(), Some("_INBOX.hsm-1"));
        assert_eq!(
            prefix_for("orchestrator").as_deref(),
            Some("_INBOX.orchestrator")
        );
        assert_eq!(
            prefix_for("alice.smith").as_deref(),
            Some("_INBOX.alice.smith")
        );
        assert_eq!(prefix_for("a b"), None);
        assert_eq!(prefix_for("*"), None);
        assert_eq!(prefix_for(""), None);
        for name in ["hsm-1", "client", "alice.smith"] {
            let p = prefix_for(name).expect("prefix");
            assert_eq!(validate_prefix(&p), Ok(()));
            assert!(check(&format!("{p}.abc")).is_ok());
        }
    }

    proptest::proptest! {
        #[test]
        fn only_subjects_under_the_inbox_root_pass(reply in "\\PC{0,80}") {
            if check(&reply).is_ok() {
                proptest::prop_assert!(reply.starts_with("_INBOX."));
                proptest::prop_assert!(!reply.contains(['*', '>', ' ']));
            }
        }
    }
}
