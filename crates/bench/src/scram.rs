//! SCRAM client side (RFC 5802 / RFC 7677) with a process-wide cache of the
//! derived keys, like real clients keep (Conversations, Gajim, …): PBKDF2
//! (4096 iterations on all three servers) then runs once per
//! (password, salt, iterations) instead of once per login, so a login storm
//! measures the server, not the generator's PBKDF2. `--scram-no-cache`
//! turns the cache off (every login pays PBKDF2 on the generator's core).
//!
//! The server side still does its full SCRAM verification every time
//! (it stores StoredKey/ServerKey, so it never runs PBKDF2 at login either).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use natter_sasl::Hash;
use rand::RngCore;
use sha1::{Digest, Sha1};
use sha2::Sha256;

/// Set once from the command line: derive keys for every login.
pub static NO_CACHE: AtomicBool = AtomicBool::new(false);

#[derive(Clone)]
struct Keys {
    client_key: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

type CacheKey = (bool, String, Vec<u8>, u32);

fn cache() -> &'static Mutex<HashMap<CacheKey, Keys>> {
    static C: OnceLock<Mutex<HashMap<CacheKey, Keys>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

fn hmac(h: Hash, key: &[u8], data: &[u8]) -> Vec<u8> {
    match h {
        Hash::Sha1 => {
            let mut m = Hmac::<Sha1>::new_from_slice(key).expect("any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Hash::Sha256 => {
            let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
    }
}

fn digest(h: Hash, data: &[u8]) -> Vec<u8> {
    match h {
        Hash::Sha1 => Sha1::digest(data).to_vec(),
        Hash::Sha256 => Sha256::digest(data).to_vec(),
    }
}

fn derive(h: Hash, password: &str, salt: &[u8], iterations: u32) -> anyhow::Result<Keys> {
    if iterations == 0 || iterations > 10_000_000 {
        bail!("SCRAM: unreasonable iteration count {iterations}");
    }
    let key = (
        h == Hash::Sha256,
        password.to_owned(),
        salt.to_vec(),
        iterations,
    );
    let use_cache = !NO_CACHE.load(Ordering::Relaxed);
    if use_cache {
        if let Some(k) = cache().lock().unwrap().get(&key) {
            return Ok(k.clone());
        }
    }
    let prepared = stringprep::saslprep(password).map_err(|e| anyhow!("SASLprep: {e}"))?;
    let mut salted = vec![0u8; h.output_len()];
    match h {
        Hash::Sha1 => {
            pbkdf2::pbkdf2_hmac::<Sha1>(prepared.as_bytes(), salt, iterations, &mut salted)
        }
        Hash::Sha256 => {
            pbkdf2::pbkdf2_hmac::<Sha256>(prepared.as_bytes(), salt, iterations, &mut salted)
        }
    }
    let client_key = hmac(h, &salted, b"Client Key");
    let keys = Keys {
        stored_key: digest(h, &client_key),
        client_key,
        server_key: hmac(h, &salted, b"Server Key"),
    };
    if use_cache {
        let mut c = cache().lock().unwrap();
        // Bounded: one entry per account's salt; a run uses few accounts per
        // login worker, but an idle run may log in many.
        if c.len() >= 100_000 {
            c.clear();
        }
        c.insert(key, keys.clone());
    }
    Ok(keys)
}

fn saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

/// One client exchange (gs2 flag "n": no channel binding).
pub struct Client {
    hash: Hash,
    password: String,
    nonce: String,
    first_bare: String,
    server_signature: Option<Vec<u8>>,
}

impl Client {
    pub fn new(hash: Hash, user: &str, password: &str) -> Self {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        Client {
            hash,
            password: password.to_owned(),
            first_bare: format!("n={},r={}", saslname(user), nonce),
            nonce,
            server_signature: None,
        }
    }

    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.first_bare).into_bytes()
    }

    pub fn client_final(&mut self, server_first: &[u8]) -> anyhow::Result<Vec<u8>> {
        let sf =
            std::str::from_utf8(server_first).map_err(|_| anyhow!("server-first not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for (i, attr) in sf.split(',').enumerate() {
            match attr.split_at_checked(2) {
                Some(("m=", _)) if i == 0 => bail!("SCRAM: unsupported mandatory extension"),
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v)?),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            bail!("SCRAM: server-first lacks r, s or i: {sf}");
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            bail!("SCRAM: server nonce does not extend ours");
        }
        let keys = derive(self.hash, &self.password, &salt, iterations)?;
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{},{},{}", self.first_bare, sf, without_proof);
        let sig = hmac(self.hash, &keys.stored_key, auth.as_bytes());
        let proof: Vec<u8> = keys
            .client_key
            .iter()
            .zip(&sig)
            .map(|(k, s)| k ^ s)
            .collect();
        self.server_signature = Some(hmac(self.hash, &keys.server_key, auth.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    pub fn verify_server_final(&self, msg: &[u8]) -> anyhow::Result<()> {
        let msg = std::str::from_utf8(msg).map_err(|_| anyhow!("server-final not UTF-8"))?;
        let v = msg
            .strip_prefix("v=")
            .ok_or_else(|| anyhow!("server-final: {msg}"))?
            .split(',')
            .next()
            .unwrap_or_default();
        let v = B64.decode(v)?;
        match &self.server_signature {
            Some(s) if *s == v => Ok(()),
            _ => bail!("server signature does not match"),
        }
    }
}
