//! One-time join tokens.
//!
//! `keysync hsm token --id ID` makes a fresh Ed25519 key, logs only its
//! public half (`JoinTokenIssued`, signed by the cluster key, with an
//! expiry) and prints the private half once, as the token. The agent started
//! with it signs its own identity key with the token key (`JoinRequested`);
//! the orchestrator enrolls that identity if the token is known, unused,
//! unexpired and for that HSM. The proof binds the HSM id and the identity
//! key, so someone who sees the request cannot reuse it for another key.

use base64::Engine as _;
use keysync_schemas::{join_proof_message, HsmId};
use zeroize::Zeroizing;

use crate::identity::{self, Identity, IdentityError};

const PREFIX: &str = "ksjt1";

/// Why a token could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    /// Not a token.
    #[error("not a keysync join token (ksjt1.<hsm id>.<secret>)")]
    Format,
    /// Making one failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A join token: the HSM it is for and its private key.
pub struct JoinToken {
    /// The HSM the token enrolls.
    pub hsm: HsmId,
    key: Identity,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "JoinToken({}, {})",
            self.hsm,
            hex::encode(self.public_key())
        )
    }
}

impl JoinToken {
    /// A new token for `hsm`.
    pub fn issue(hsm: HsmId) -> Result<Self, JoinTokenError> {
        Ok(JoinToken {
            hsm,
            key: Identity::generate()?,
        })
    }

    /// The token's public key (what the log holds).
    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// The token as text, to hand to the agent's operator once.
    pub fn encode(&self) -> Zeroizing<String> {
        let secret =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.key.seed().as_ref());
        Zeroizing::new(format!("{PREFIX}.{}.{secret}", self.hsm))
    }

    /// Reads a token.
    pub fn parse(text: &str) -> Result<Self, JoinTokenError> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(hsm), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JoinTokenError::Format);
        };
        let hsm: HsmId = hsm.parse().map_err(|_| JoinTokenError::Format)?;
        let raw = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(secret)
                .map_err(|_| JoinTokenError::Format)?,
        );
        let seed: &[u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| JoinTokenError::Format)?;
        Ok(JoinToken {
            hsm,
            key: Identity::from_seed(seed),
        })
    }

    /// The proof that enrolls `identity_key` for this token's HSM.
    pub fn proof(&self, identity_key: &[u8; 32]) -> [u8; 64] {
        self.key.sign(&join_proof_message(&self.hsm, identity_key))
    }
}

/// Checks a join proof.
pub fn verify_proof(
    token_key: &[u8; 32],
    hsm: &HsmId,
    identity_key: &[u8; 32],
    proof: &[u8],
) -> bool {
    identity::verify(token_key, &join_proof_message(hsm, identity_key), proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_prove_one_key_for_one_hsm() {
        let hsm: HsmId = "hsm-4".parse().expect("id");
        let token = JoinToken::issue(hsm.clone()).expect("token");
        let text = token.encode();
        let back = JoinToken::parse(&text).expect("parse");
        assert_eq!(back.hsm, hsm);
        assert_eq!(back.public_key(), token.public_key());
        let agent = Identity::generate().expect("rng").public_key();
        let proof = back.proof(&agent);
        assert!(verify_proof(&token.public_key(), &hsm, &agent, &proof));
        let other = Identity::generate().expect("rng").public_key();
        assert!(!verify_proof(&token.public_key(), &hsm, &other, &proof));
        let other_hsm: HsmId = "hsm-5".parse().expect("id");
        assert!(!verify_proof(
            &token.public_key(),
            &other_hsm,
            &agent,
            &proof
        ));
        assert!(!format!("{token:?}").contains(text.rsplit('.').next().expect("secret")));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "ksjt1",
            "ksjt1.a",
            "ksjt1.a.b.c",
            "ksjt2.a.AAAA",
            "ksjt1.a b.AAAA",
            "ksjt1.a.AAAA",
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
