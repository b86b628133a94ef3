//! Web Push (RFC 8030) for natter's own chat page: natter is the page's
//! application server. A push is the small JSON the service worker shows,
//! encrypted for the subscription (RFC 8291 aes128gcm, by web-push-native)
//! and POSTed to the subscription's endpoint with a VAPID token (RFC 8292,
//! ES256, signed here with p256).
//!
//! The VAPID key pair is the server's identity towards push services: a
//! browser subscription is bound to its public key, so it must not change
//! (and must be the same on every node of a cluster): `push.vapid_private_key`
//! names a PEM file, else `data_dir/vapid.key` is created once (0600).

use crate::config::Config;
use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The generated key's file under data_dir.
pub const FILE: &str = "vapid.key";
/// Longest subscription endpoint accepted (FCM's and Mozilla's are ~200).
const MAX_ENDPOINT: usize = 1024;
/// How long a VAPID token is valid (RFC 8292 §2: at most 24 hours).
const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long a push service keeps a push for an offline browser (RFC 8030
/// §5.2): a chat notification older than a day is noise.
const TTL_SECS: u64 = 86_400;

/// A browser's subscription: where to POST, and the keys to encrypt for.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub endpoint: reqwest::Url,
    pub p256dh: p256::PublicKey,
    pub auth: [u8; 16],
}

impl Subscription {
    /// Check what a page sent (`PushSubscription` fields, base64url keys);
    /// the error says what is wrong, for the stanza error's text.
    pub fn parse(
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        allow_http: bool,
    ) -> Result<Subscription, String> {
        if endpoint.len() > MAX_ENDPOINT {
            return Err(format!("endpoint over {MAX_ENDPOINT} bytes"));
        }
        let url = reqwest::Url::parse(endpoint).map_err(|e| format!("endpoint: {e}"))?;
        let host = url.host_str().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if allow_http && loopback => {}
            _ => return Err("endpoint must be an https URL".into()),
        }
        if url.host().is_none() || !url.username().is_empty() || url.password().is_some() {
            return Err("endpoint must name a host and no credentials".into());
        }
        let key = b64(p256dh, "p256dh")?;
        let p256dh = p256::PublicKey::from_sec1_bytes(&key)
            .map_err(|_| "p256dh is not a P-256 public key".to_string())?;
        let auth: [u8; 16] = b64(auth, "auth")?
            .try_into()
            .map_err(|_| "auth must be 16 bytes".to_string())?;
        Ok(Subscription {
            endpoint: url,
            p256dh,
            auth,
        })
    }
}

/// base64url, padded or not (browsers' keys come both ways).
fn b64(s: &str, what: &str) -> Result<Vec<u8>, String> {
    if s.len() > 200 {
        return Err(format!("{what} is too long"));
    }
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("{what} is not base64url"))
}

/// What became of one push.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Accepted,
    /// The push service says the subscription is gone (404/410, RFC 8030
    /// §7.3): remove the registration.
    Gone,
    Failed(String),
}

/// natter's side of Web Push: the VAPID key and an HTTP client.
pub struct Sender {
    key: SigningKey,
    /// The public key, uncompressed point, base64url: the page's
    /// `applicationServerKey` and the token's `k`.
    public: String,
    subject: String,
    client: reqwest::Client,
}

impl Sender {
    pub fn new(config: &Config) -> anyhow::Result<Sender> {
        let key = if config.push.vapid_private_key.is_empty() {
            load_or_create(&config.data_dir)?
        } else {
            load(Path::new(&config.push.vapid_private_key)).context("push.vapid_private_key")?
        };
        let public = URL_SAFE_NO_PAD.encode(key.verifying_key().to_encoded_point(false).as_bytes());
        let subject = match config.push.vapid_subject.as_str() {
            "" if !config.http.public_url.is_empty() => config.http.public_url.clone(),
            "" => format!("https://{}", config.domains[0]),
            s => s.to_string(),
        };
        // reqwest is built without a crypto provider of its own: it uses
        // the process default, ring, as natter's own TLS does. A second
        // install is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeout = Duration::from_secs(config.push.webpush_timeout_secs);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // An endpoint is where the browser said; never somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("cannot set up the Web Push HTTP client")?;
        Ok(Sender {
            key,
            public,
            subject,
            client,
        })
    }

    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// `Authorization: vapid t=<JWT>, k=<public key>` for `endpoint`'s
    /// origin (RFC 8292 §3).
    fn authorization(&self, endpoint: &reqwest::Url) -> String {
        let exp = (SystemTime::now() + TOKEN_LIFETIME)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({
            "aud": endpoint.origin().ascii_serialization(),
            "exp": exp,
            "sub": self.subject,
        });
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig: Signature = self.key.sign(signed.as_bytes());
        format!(
            "vapid t={signed}.{}, k={}",
            URL_SAFE_NO_PAD.encode(sig.to_bytes()),
            self.public
        )
    }

    /// Encrypt `payload` for `sub` and POST it to its endpoint.
    pub async fn send(&self, sub: &Subscription, payload: &[u8]) -> Outcome {
        let body = match web_push_native::encrypt(
            payload.to_vec(),
            &sub.p256dh,
            &web_push_native::Auth::clone_from_slice(&sub.auth),
        ) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(format!("cannot encrypt: {e}")),
        };
        let res = self
            .client
            .post(sub.endpoint.clone())
            .header("TTL", TTL_SECS)
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            // Chat messages: deliver now, also to a phone on battery
            // (RFC 8030 §5.3).
            .header("Urgency", "high")
            // A newer push replaces one the push service still holds
            // (RFC 8030 §5.4): the count in it is the latest.
            .header("Topic", "messages")
            .header("Authorization", self.authorization(&sub.endpoint))
            .body(body)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => Outcome::Accepted,
            Ok(r) if matches!(r.status().as_u16(), 404 | 410) => Outcome::Gone,
            Ok(r) => Outcome::Failed(format!("push service answered {}", r.status())),
            Err(e) => Outcome::Failed(format!("{e}")),
        }
    }
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// A P-256 private key from PEM: PKCS#8 ("PRIVATE KEY", what natter
/// writes) or SEC1 ("EC PRIVATE KEY", what `openssl ecparam -genkey`
/// writes).
fn load(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the VAPID key {}", path.display()))?;
    let secret = p256::SecretKey::from_pkcs8_pem(&pem)
        .ok()
        .or_else(|| p256::SecretKey::from_sec1_pem(&pem).ok())
        .with_context(|| {
            format!(
                "{} is not a P-256 private key in PEM (PKCS#8 or SEC1)",
                path.display()
            )
        })?;
    Ok(SigningKey::from(secret))
}

/// data_dir/vapid.key, created on first start. A file in the way that is
/// not a key is an error naming it, never replaced: every browser's
/// subscription is bound to the key.
fn load_or_create(data_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = path(data_dir);
    if path.exists() {
        // Tighten a key left readable by others (a copy from another node).
        natter_store::files::tighten(&path)
            .with_context(|| format!("cannot make {} private (0600)", path.display()))?;
        return load(&path)
            .context("delete it to create a new one (browsers then subscribe again)");
    }
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .context("cannot encode the VAPID key")?;
    natter_store::files::write_private(data_dir, FILE, pem.as_bytes())
        .with_context(|| format!("cannot write the VAPID key {}", path.display()))?;
    Ok(SigningKey::from(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use std::os::unix::fs::PermissionsExt;

    fn keys() -> (String, String) {
        let ua = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let point = ua.public_key().to_encoded_point(false);
        (
            URL_SAFE_NO_PAD.encode(point.as_bytes()),
            URL_SAFE_NO_PAD.encode([7u8; 16]),
        )
    }

    #[test]
    fn subscriptions_are_checked() {
        let (p, a) = keys();
        assert!(Subscription::parse("https://push.example/x", &p, &a, false).is_ok());
        let padded = format!("{a}==");
        assert!(Subscription::parse("https://push.example/x", &p, &padded, false).is_ok());
        let err =
            |e: &str, p: &str, a: &str, http: bool| Subscription::parse(e, p, a, http).unwrap_err();
        assert!(err("http://push.example/x", &p, &a, true).contains("https"));
        assert!(err("http://127.0.0.1:9/x", &p, &a, false).contains("https"));
        assert!(Subscription::parse("http://127.0.0.1:9/x", &p, &a, true).is_ok());
        assert!(err("https://u:pw@push.example/x", &p, &a, false).contains("credentials"));
        assert!(err("not a url", &p, &a, false).contains("endpoint"));
        let long = format!("https://push.example/{}", "x".repeat(MAX_ENDPOINT));
        assert!(err(&long, &p, &a, false).contains("bytes"));
        assert!(err("https://push.example/x", "AAAA", &a, false).contains("P-256"));
        assert!(err("https://push.example/x", &p, "AAAA", false).contains("16 bytes"));
        assert!(err("https://push.example/x", &p, "!!", false).contains("base64url"));
    }

    #[test]
    fn the_key_is_created_once_private_and_signs_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().into(),
            ..Config::default()
        };
        let a = Sender::new(&config).unwrap();
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Sender::new(&config).unwrap();
        assert_eq!(a.public_key(), b.public_key(), "kept across restarts");
        // The same file named in the config: the same key (a cluster's).
        config.push.vapid_private_key = path(dir.path()).display().to_string();
        config.data_dir = dir.path().join("other-node");
        assert_eq!(Sender::new(&config).unwrap().public_key(), a.public_key());

        let url = reqwest::Url::parse("https://push.example:8443/abc").unwrap();
        let auth = a.authorization(&url);
        let (t, k) = auth
            .strip_prefix("vapid t=")
            .and_then(|r| r.split_once(", k="))
            .unwrap();
        assert_eq!(k, a.public_key());
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(signed.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "https://push.example:8443");
        assert_eq!(claims["sub"], "https://localhost");
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
        a.key
            .verifying_key()
            .verify(signed.as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn a_damaged_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "not a key\n").unwrap();
        let config = Config {
            data_dir: dir.path().into(),
            ..Config::default()
        };
        let e = format!("{:#}", Sender::new(&config).err().unwrap());
        assert!(e.contains(FILE) && e.contains("delete it"), "{e}");
    }
}
