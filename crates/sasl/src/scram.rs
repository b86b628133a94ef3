use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use subtle::{Choice, ConstantTimeEq};

use crate::creds::{saslprep, ScramCredentials, DEFAULT_ITERATIONS};
use crate::error::{malformed, SaslError};
use crate::mechanism::Hash;

const SERVER_NONCE_LEN: usize = 24;

/// Channel binding data the TLS layer can give the server: ("tls-exporter", 32 bytes of
/// exported keying material, RFC 9266) or ("tls-server-end-point", cert hash).
#[derive(Clone, Debug)]
pub struct ChannelBinding {
    pub kind: &'static str,
    pub data: Vec<u8>,
}

/// What the server learns from the client-first-message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFirst {
    /// Un-escaped (`=2C`, `=3D`) and SASLprepped.
    pub username: String,
    /// Un-escaped, otherwise as sent; the caller decides whether it is acceptable.
    pub authzid: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Initial,
    ClientFirstReceived,
    ServerFirstSent,
    Done,
    Failed,
}

/// One SCRAM exchange on the server side.
///
/// Calls must come in order `client_first`, `server_first`, `client_final`; any error
/// (or out-of-order call) makes every later step fail.
pub struct ScramServer {
    hash: Hash,
    plus: bool,
    binding: Option<ChannelBinding>,
    state: State,
    /// Only set by the test constructor, to replay RFC example exchanges.
    fixed_server_nonce: Option<String>,
    gs2_header: Vec<u8>,
    cb_used: bool,
    username: String,
    client_first_bare: String,
    client_nonce: String,
    nonce: String,
    server_first: String,
    creds: Option<ScramCredentials>,
    user_known: bool,
}

impl ScramServer {
    /// `plus`: the mechanism is a -PLUS one. `binding`: what this connection supports
    /// (`None` on plain TCP or when the TLS layer cannot export). `Some` also means the
    /// server advertises -PLUS, so a client answering "y" is treated as a downgrade.
    pub fn new(hash: Hash, plus: bool, binding: Option<ChannelBinding>) -> Self {
        ScramServer {
            hash,
            plus,
            binding,
            state: State::Initial,
            fixed_server_nonce: None,
            gs2_header: Vec::new(),
            cb_used: false,
            username: String::new(),
            client_first_bare: String::new(),
            client_nonce: String::new(),
            nonce: String::new(),
            server_first: String::new(),
            creds: None,
            user_known: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_server_nonce(
        hash: Hash,
        plus: bool,
        binding: Option<ChannelBinding>,
        server_nonce: &str,
    ) -> Self {
        let mut s = Self::new(hash, plus, binding);
        s.fixed_server_nonce = Some(server_nonce.to_owned());
        s
    }

    /// The hash this exchange uses (to pick the matching stored credentials).
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// Whether the client bound the exchange to the TLS channel ("p=" flag).
    pub fn channel_binding_used(&self) -> bool {
        self.cb_used
    }

    /// Parse client-first-message (raw bytes after base64 decode by the caller).
    pub fn client_first(&mut self, msg: &[u8]) -> Result<ClientFirst, SaslError> {
        let r = self.client_first_inner(msg);
        self.state = if r.is_ok() {
            State::ClientFirstReceived
        } else {
            State::Failed
        };
        r
    }

    fn client_first_inner(&mut self, msg: &[u8]) -> Result<ClientFirst, SaslError> {
        if self.state != State::Initial {
            return Err(malformed("unexpected client-first-message"));
        }
        let msg = std::str::from_utf8(msg).map_err(|_| malformed("message is not UTF-8"))?;
        let (flag, rest) = msg
            .split_once(',')
            .ok_or_else(|| malformed("missing GS2 header"))?;
        let (authz, bare) = rest
            .split_once(',')
            .ok_or_else(|| malformed("missing GS2 header"))?;

        self.cb_used = self.check_cbind_flag(flag)?;

        let authzid = if authz.is_empty() {
            None
        } else {
            let v = authz
                .strip_prefix("a=")
                .ok_or_else(|| malformed("bad authzid in GS2 header"))?;
            Some(decode_saslname(v)?)
        };

        let mut attrs = bare.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(malformed("unsupported mandatory extension"));
        }
        let user = first
            .strip_prefix("n=")
            .ok_or_else(|| malformed("missing username"))?;
        let username = saslprep(&decode_saslname(user)?)?;
        if username.is_empty() {
            return Err(malformed("empty username"));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or_else(|| malformed("missing nonce"))?;
        check_nonce(nonce)?;
        check_extensions(attrs)?;

        self.gs2_header = msg.as_bytes()[..flag.len() + authz.len() + 2].to_vec();
        self.client_first_bare = bare.to_owned();
        self.client_nonce = nonce.to_owned();
        self.username = username.clone();
        Ok(ClientFirst { username, authzid })
    }

    /// RFC 5802 §6 gs2-cbind-flag rules; returns whether channel binding is in use.
    fn check_cbind_flag(&self, flag: &str) -> Result<bool, SaslError> {
        match flag {
            "n" | "y" if self.plus => Err(malformed("-PLUS mechanism requires channel binding")),
            "n" => Ok(false),
            // The client thinks we do not support binding, but we do (and advertise
            // -PLUS): a man in the middle must have stripped it from the list.
            "y" if self.binding.is_some() => Err(SaslError::NotAuthorized),
            "y" => Ok(false),
            _ => {
                let name = flag
                    .strip_prefix("p=")
                    .ok_or_else(|| malformed("bad channel binding flag"))?;
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                {
                    return Err(malformed("bad channel binding name"));
                }
                if !self.plus {
                    return Err(malformed("channel binding requires a -PLUS mechanism"));
                }
                match &self.binding {
                    Some(b) if b.kind == name => Ok(true),
                    _ => Err(malformed("unsupported channel binding type")),
                }
            }
        }
    }

    /// Build server-first-message. Pass `None` when the user does not exist: fake but
    /// stable credentials derived from `unknown` are used so unknown users look like
    /// known ones, and the exchange then fails in [`ScramServer::client_final`].
    ///
    /// Called out of order it returns an empty message and the exchange is failed.
    pub fn server_first(
        &mut self,
        creds: Option<&ScramCredentials>,
        unknown: &FakeSaltKey,
    ) -> Vec<u8> {
        if self.state != State::ClientFirstReceived {
            self.state = State::Failed;
            return Vec::new();
        }
        let creds = match creds {
            Some(c) => {
                self.user_known = true;
                c.clone()
            }
            None => {
                self.user_known = false;
                unknown.credentials(self.hash, &self.username)
            }
        };
        let server_nonce = self.fixed_server_nonce.clone().unwrap_or_else(|| {
            let mut raw = [0u8; SERVER_NONCE_LEN];
            OsRng.fill_bytes(&mut raw);
            B64.encode(raw)
        });
        self.nonce = format!("{}{}", self.client_nonce, server_nonce);
        self.server_first = format!(
            "r={},s={},i={}",
            self.nonce,
            B64.encode(&creds.salt),
            creds.iterations
        );
        self.creds = Some(creds);
        self.state = State::ServerFirstSent;
        self.server_first.clone().into_bytes()
    }

    /// Verify client-final-message. `Ok(server-final-message "v=...")` on success;
    /// `Err(NotAuthorized)` on a bad proof, nonce or channel binding.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, SaslError> {
        let r = self.client_final_inner(msg);
        self.state = if r.is_ok() {
            State::Done
        } else {
            State::Failed
        };
        r
    }

    fn client_final_inner(&mut self, msg: &[u8]) -> Result<Vec<u8>, SaslError> {
        if self.state != State::ServerFirstSent {
            return Err(malformed("unexpected client-final-message"));
        }
        let msg = std::str::from_utf8(msg).map_err(|_| malformed("message is not UTF-8"))?;
        // The proof is always the last attribute and base64 has no commas.
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or_else(|| malformed("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or_else(|| malformed("missing channel binding"))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or_else(|| malformed("missing nonce"))?;
        check_extensions(attrs)?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| malformed("bad base64 in channel binding"))?;
        let proof = B64
            .decode(proof)
            .map_err(|_| malformed("bad base64 in proof"))?;
        if proof.len() != self.hash.output_len() {
            return Err(malformed("proof has the wrong length"));
        }

        let mut expected = self.gs2_header.clone();
        if self.cb_used {
            if let Some(b) = &self.binding {
                expected.extend_from_slice(&b.data);
            }
        }
        if !bool::from(cbind.ct_eq(&expected)) {
            return Err(SaslError::NotAuthorized);
        }
        if nonce != self.nonce {
            return Err(SaslError::NotAuthorized);
        }

        let creds = self
            .creds
            .as_ref()
            .ok_or_else(|| malformed("unexpected client-final-message"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = self.hash.hmac(&creds.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let ok = self.hash.digest(&client_key).ct_eq(&creds.stored_key)
            & Choice::from(u8::from(self.user_known));
        if !bool::from(ok) {
            return Err(SaslError::NotAuthorized);
        }
        let server_signature = self.hash.hmac(&creds.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// The secret from which the credentials of names that are not accounts
/// are derived: the salt a probing client sees for such a name is stable
/// across attempts (and, with the secret kept on disk, across restarts),
/// like a real account's.
#[derive(Clone)]
pub struct FakeSaltKey([u8; 32]);

impl FakeSaltKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        FakeSaltKey(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut s = [0u8; 32];
        OsRng.fill_bytes(&mut s);
        FakeSaltKey(s)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Credentials for `username`, which has no account: the salt and
    /// iteration count look like a real account's; no password matches the
    /// keys (a login still fails, as [`ScramServer`] knows the user is unknown).
    pub fn credentials(&self, hash: Hash, username: &str) -> ScramCredentials {
        let tag = match hash {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
        };
        let derive = |purpose: &str, len: usize| {
            let input = format!("{purpose}\0{tag}\0{username}");
            let mut out = Hash::Sha256.hmac(&self.0, input.as_bytes());
            out.truncate(len);
            out
        };
        ScramCredentials {
            salt: derive("salt", 16),
            iterations: DEFAULT_ITERATIONS,
            stored_key: derive("stored", hash.output_len()),
            server_key: derive("server", hash.output_len()),
        }
    }
}

impl std::fmt::Debug for FakeSaltKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeSaltKey(..)")
    }
}

/// Un-escape an RFC 5802 saslname (`=2C` -> `,`, `=3D` -> `=`).
pub(crate) fn decode_saslname(s: &str) -> Result<String, SaslError> {
    if s.is_empty() {
        return Err(malformed("empty name"));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['=', '\0']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("=2C") {
            out.push(',');
        } else if tail.starts_with("=3D") {
            out.push('=');
        } else {
            return Err(malformed("bad escape in name"));
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Escape a name for use as an RFC 5802 saslname.
pub(crate) fn encode_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

/// Nonces are `printable`: %x21-2B / %x2D-7E (visible ASCII except the comma).
pub(crate) fn check_nonce(nonce: &str) -> Result<(), SaslError> {
    if nonce.is_empty()
        || !nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
    {
        return Err(malformed("bad nonce"));
    }
    Ok(())
}

/// Optional trailing attributes: unknown ones are ignored, but "m" marks an extension
/// the peer says we must understand, and we understand none.
pub(crate) fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), SaslError> {
    for attr in attrs {
        let b = attr.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_alphabetic() || b[1] != b'=' {
            return Err(malformed("bad attribute"));
        }
        if b[0] == b'm' {
            return Err(malformed("unsupported mandatory extension"));
        }
    }
    Ok(())
}
