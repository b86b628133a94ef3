use rand::rngs::OsRng;
use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::error::{malformed, SaslError};
use crate::mechanism::Hash;

/// What the store keeps per account and hash: never the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

pub const DEFAULT_ITERATIONS: u32 = 4096;

const SALT_LEN: usize = 16;

/// RFC 4013 SASLprep, as RFC 5802 requires for passwords (stored-strings profile).
pub(crate) fn saslprep(s: &str) -> Result<String, SaslError> {
    stringprep::saslprep(s)
        .map(|c| c.into_owned())
        .map_err(|e| SaslError::MalformedRequest(format!("SASLprep: {e}")))
}

/// Keys derived from a password: (ClientKey, StoredKey, ServerKey).
pub(crate) struct Keys {
    pub client_key: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

pub(crate) fn derive_keys(
    hash: Hash,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<Keys, SaslError> {
    if iterations == 0 {
        return Err(malformed("iteration count must be positive"));
    }
    let prepared = saslprep(password)?;
    if prepared.is_empty() {
        return Err(malformed("empty password"));
    }
    let salted = hash.hi(prepared.as_bytes(), salt, iterations);
    let client_key = hash.hmac(&salted, b"Client Key");
    let stored_key = hash.digest(&client_key);
    let server_key = hash.hmac(&salted, b"Server Key");
    Ok(Keys {
        client_key,
        stored_key,
        server_key,
    })
}

/// SASLprep the password and derive credentials with a fresh random 16-byte salt.
pub fn new_credentials(
    hash: Hash,
    password: &str,
    iterations: u32,
) -> Result<ScramCredentials, SaslError> {
    let mut salt = vec![0u8; SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    derive_credentials(hash, password, &salt, iterations)
}

/// Same as [`new_credentials`] with a given salt.
pub fn derive_credentials(
    hash: Hash,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<ScramCredentials, SaslError> {
    let keys = derive_keys(hash, password, salt, iterations)?;
    Ok(ScramCredentials {
        salt: salt.to_vec(),
        iterations,
        stored_key: keys.stored_key,
        server_key: keys.server_key,
    })
}

/// PLAIN login check against stored SCRAM keys, comparing in constant time.
pub fn verify_password(creds: &ScramCredentials, hash: Hash, password: &str) -> bool {
    let Ok(keys) = derive_keys(hash, password, &creds.salt, creds.iterations) else {
        return false;
    };
    let ok = keys.stored_key.ct_eq(&creds.stored_key) & keys.server_key.ct_eq(&creds.server_key);
    ok.into()
}
