//! Minimal SCRAM client, for exercising the server in tests (unit and end-to-end).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::creds::derive_keys;
use crate::error::{malformed, SaslError};
use crate::mechanism::Hash;
use crate::scram::{check_extensions, check_nonce, encode_saslname, ChannelBinding};

/// What the client says about channel binding (the RFC 5802 gs2-cbind-flag).
#[derive(Clone, Debug)]
pub enum ClientBinding {
    /// "n": the client does not support channel binding.
    Unsupported,
    /// "y": the client supports it but thinks the server does not.
    NotAdvertised,
    /// "p=<kind>": bind to this data (use with a -PLUS mechanism).
    Use(ChannelBinding),
}

/// Client side of one SCRAM exchange.
pub struct ScramClient {
    hash: Hash,
    password: String,
    binding: ClientBinding,
    client_nonce: String,
    gs2_header: String,
    client_first_bare: String,
    server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    pub fn new(
        hash: Hash,
        username: &str,
        password: &str,
        authzid: Option<&str>,
        binding: ClientBinding,
    ) -> Self {
        let mut raw = [0u8; 18];
        OsRng.fill_bytes(&mut raw);
        Self::with_nonce(hash, username, password, authzid, binding, &B64.encode(raw))
    }

    /// Fixed client nonce (reproducing published example exchanges).
    pub fn with_nonce(
        hash: Hash,
        username: &str,
        password: &str,
        authzid: Option<&str>,
        binding: ClientBinding,
        nonce: &str,
    ) -> Self {
        let flag = match &binding {
            ClientBinding::Unsupported => "n".to_owned(),
            ClientBinding::NotAdvertised => "y".to_owned(),
            ClientBinding::Use(b) => format!("p={}", b.kind),
        };
        let authz = authzid
            .map(|a| format!("a={}", encode_saslname(a)))
            .unwrap_or_default();
        ScramClient {
            hash,
            password: password.to_owned(),
            binding,
            client_nonce: nonce.to_owned(),
            gs2_header: format!("{flag},{authz},"),
            client_first_bare: format!("n={},r={}", encode_saslname(username), nonce),
            server_signature: None,
        }
    }

    /// The client-first-message.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    /// Take the server-first-message, return the client-final-message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, SaslError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| malformed("message is not UTF-8"))?;
        let mut attrs = server_first.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(malformed("unsupported mandatory extension"));
        }
        let nonce = first
            .strip_prefix("r=")
            .ok_or_else(|| malformed("missing nonce"))?;
        check_nonce(nonce)?;
        // The server must extend our nonce, not replace or merely echo it.
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(SaslError::NotAuthorized);
        }
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .ok_or_else(|| malformed("missing salt"))?;
        let salt = B64
            .decode(salt)
            .map_err(|_| malformed("bad base64 in salt"))?;
        let iterations: u32 = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| malformed("missing or bad iteration count"))?;
        check_extensions(attrs)?;

        let keys = derive_keys(self.hash, &self.password, &salt, iterations)?;
        let mut cbind = self.gs2_header.clone().into_bytes();
        if let ClientBinding::Use(b) = &self.binding {
            cbind.extend_from_slice(&b.data);
        }
        let without_proof = format!("c={},r={}", B64.encode(cbind), nonce);
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, server_first, without_proof
        );
        let client_signature = self.hash.hmac(&keys.stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.server_signature = Some(self.hash.hmac(&keys.server_key, auth_message.as_bytes()));
        Ok(format!("{},p={}", without_proof, B64.encode(proof)).into_bytes())
    }

    /// Check the server-final-message: proves the server knew our credentials.
    pub fn verify_server_final(&self, msg: &[u8]) -> Result<(), SaslError> {
        let expected = self
            .server_signature
            .as_ref()
            .ok_or_else(|| malformed("unexpected server-final-message"))?;
        let msg = std::str::from_utf8(msg).map_err(|_| malformed("message is not UTF-8"))?;
        let sig = msg
            .strip_prefix("v=")
            .ok_or(SaslError::NotAuthorized)?
            .split(',')
            .next()
            .unwrap_or_default();
        let sig = B64
            .decode(sig)
            .map_err(|_| malformed("bad base64 in verifier"))?;
        if bool::from(sig.ct_eq(expected)) {
            Ok(())
        } else {
            Err(SaslError::NotAuthorized)
        }
    }
}
