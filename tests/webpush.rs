//! Web Push (RFC 8030/8291/8292) for natter's own chat page, against a
//! stand-in push service: an HTTP server in this test on 127.0.0.1 that
//! checks the VAPID token's ES256 signature and audience and decrypts the
//! RFC 8291 aes128gcm body with the subscription's private key (by hand,
//! with p256, hkdf and aes-gcm: not with the crate natter encrypts with).
//! A closed tab (no session) gets one push per burst with the sender and
//! count and no body; an active session gets none; disable stops them; a
//! subscription the push service says is gone (410) is removed; bad
//! subscriptions are refused with a reason.

mod common;

use aes_gcm::aead::{Aead, KeyInit};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use natter::config::Config;
use p256::ecdsa::signature::Verifier;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const NS_WEBPUSH: &str = "urn:natter:webpush:0";

/// One POST the stand-in received.
struct Received {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// The stand-in push service: records every POST and answers `status`.
struct PushService {
    base: String,
    rx: mpsc::UnboundedReceiver<Received>,
    status: Arc<AtomicU16>,
}

#[derive(Clone)]
struct Standin {
    tx: mpsc::UnboundedSender<Received>,
    status: Arc<AtomicU16>,
}

async fn push_service() -> PushService {
    let (tx, rx) = mpsc::unbounded_channel();
    let status = Arc::new(AtomicU16::new(201));
    let app = axum::Router::new()
        .route(
            "/push/{id}",
            axum::routing::post(
                |State(s): State<Standin>,
                 Path(id): Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let _ = s.tx.send(Received {
                        path: id,
                        headers,
                        body: body.to_vec(),
                    });
                    StatusCode::from_u16(s.status.load(Ordering::Relaxed)).unwrap()
                },
            ),
        )
        .with_state(Standin {
            tx,
            status: status.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    PushService {
        base: format!("http://{addr}"),
        rx,
        status,
    }
}

impl PushService {
    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a push within 10 s")
            .expect("stand-in running")
    }

    async fn none(&mut self, wait: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(wait, self.rx.recv()).await {
            panic!("unexpected push to /push/{}", r.path);
        }
    }
}

/// A browser's side of a subscription: the key pair and auth secret the
/// push is encrypted for.
struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
}

impl Browser {
    fn new() -> Browser {
        let mut auth = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut auth);
        Browser {
            secret: p256::SecretKey::random(&mut rand::rngs::OsRng),
            auth,
        }
    }

    fn p256dh(&self) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn enable(&self, endpoint: &str) -> Element {
        xml(&format!(
            "<iq type='set'><enable xmlns='{NS_WEBPUSH}' endpoint='{endpoint}' p256dh='{}' auth='{}'/></iq>",
            URL_SAFE_NO_PAD.encode(self.p256dh()),
            URL_SAFE_NO_PAD.encode(self.auth),
        ))
    }

    /// RFC 8291 §3.4 and RFC 8188 §2: one aes128gcm record.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        assert!(body.len() > 21 + 65 + 16, "body too short: {}", body.len());
        let (salt, rest) = body.split_at(16);
        let rs = u32::from_be_bytes(rest[..4].try_into().unwrap());
        let idlen = rest[4] as usize;
        assert_eq!(idlen, 65, "keyid is the sender's uncompressed P-256 key");
        let as_public = p256::PublicKey::from_sec1_bytes(&rest[5..5 + idlen]).unwrap();
        let ciphertext = &rest[5 + idlen..];
        assert!(ciphertext.len() <= rs as usize, "a single record");
        let ecdh =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), as_public.as_affine());
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend(self.p256dh());
        key_info.extend(&rest[5..5 + idlen]);
        let mut ikm = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.auth), ecdh.raw_secret_bytes())
            .expand(&key_info, &mut ikm)
            .unwrap();
        let prk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &ikm);
        let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
            .unwrap();
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce)
            .unwrap();
        let mut plain = aes_gcm::Aes128Gcm::new(&cek.into())
            .decrypt(&nonce.into(), ciphertext)
            .expect("the push decrypts with the subscription's keys");
        // Padding: the last record's delimiter 2, then zeros.
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "last-record delimiter");
        plain
    }
}

/// Check the VAPID token (RFC 8292): signed by the server's key for the
/// push service's origin; returns its claims.
fn check_vapid(r: &Received, server_key: &str, origin: &str) -> serde_json::Value {
    let auth = r.headers["authorization"].to_str().unwrap();
    let (t, k) = auth
        .strip_prefix("vapid t=")
        .and_then(|x| x.split_once(", k="))
        .unwrap_or_else(|| panic!("not a VAPID authorization: {auth}"));
    assert_eq!(k, server_key, "k is the key the page subscribed with");
    let (signed, sig) = t.rsplit_once('.').unwrap();
    let (header, claims) = signed.split_once('.').unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    let key =
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
    key.verify(signed.as_bytes(), &sig)
        .expect("the token's ES256 signature verifies");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(claims["aud"], origin);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp > now && exp <= now + 24 * 3600, "exp within a day");
    assert!(claims["sub"].as_str().unwrap().starts_with("https://"));
    claims
}

fn webpush_config(c: &mut Config) {
    c.push.coalesce_ms = 300;
    c.push.webpush_allow_http = true;
}

async fn vapid_key(srv: &TestServer) -> String {
    let res = reqwest::get(format!("http://{}/push/vapid-public-key", srv.http))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

#[tokio::test]
async fn a_closed_tab_gets_one_decryptable_push_per_burst() {
    let srv = start_server(webpush_config).await;
    let mut service = push_service().await;
    let key = vapid_key(&srv).await;
    assert_eq!(URL_SAFE_NO_PAD.decode(&key).unwrap().len(), 65);
    // The page's service worker, at the origin's root.
    let sw = reqwest::get(format!("http://{}/sw.js", srv.http))
        .await
        .unwrap();
    assert!(sw.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(sw.text().await.unwrap().contains("showNotification"));

    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();
    let browser = Browser::new();
    let endpoint = format!("{}/push/tab-1", service.base);
    let res = a.iq(browser.enable(&endpoint)).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    // The tab is closed.
    a.close().await;
    for i in 0..10 {
        b.send(&message(&alice, &format!("secret text {i}"))).await;
    }
    let r = service.next().await;
    assert_eq!(r.path, "tab-1");
    assert_eq!(r.headers["content-encoding"], "aes128gcm");
    assert_eq!(r.headers["urgency"], "high");
    assert!(r.headers["ttl"].to_str().unwrap().parse::<u64>().unwrap() > 0);
    check_vapid(&r, &key, &service.base);
    let payload: serde_json::Value = serde_json::from_slice(&browser.decrypt(&r.body)).unwrap();
    assert_eq!(payload["count"], 10, "{payload}");
    assert_eq!(payload["sender"], b.bare_jid(), "{payload}");
    assert!(payload.get("body").is_none(), "no body: {payload}");
    // One push for the burst.
    service.none(Duration::from_millis(800)).await;
    // Later: the count goes on.
    b.send(&message(&alice, "one more")).await;
    let r = service.next().await;
    let payload: serde_json::Value = serde_json::from_slice(&browser.decrypt(&r.body)).unwrap();
    assert_eq!(payload["count"], 11, "{payload}");

    // The tab is back (same resource): nothing while it is open.
    let mut a = srv.login(&alice, "password", "res").await;
    a.send(&xml("<enable xmlns='urn:xmpp:sm:3' resume='true'/>"))
        .await;
    let enabled = a.recv_matching(|e| e.ns == "urn:xmpp:sm:3").await;
    assert!(enabled.is("enabled", "urn:xmpp:sm:3"), "{enabled}");
    b.send(&message(a.jid(), "you're here")).await;
    a.recv_until(|e| e.name == "message").await;
    service.none(Duration::from_millis(1000)).await;
    // Closed again with everything acknowledged (the session parks for
    // resumption): nothing waits, so no push.
    a.send(&xml("<a xmlns='urn:xmpp:sm:3' h='1'/>")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(a);
    service.none(Duration::from_millis(1200)).await;
    srv.assert_healthy().await;
}

#[tokio::test]
async fn disable_gone_and_bad_subscriptions() {
    let srv = start_server(webpush_config).await;
    let mut service = push_service().await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();
    let browser = Browser::new();

    // Bad subscriptions are refused with a reason.
    let refused = |res: &Element, cond: &str, text: &str| {
        assert_eq!(stanza_error(res).as_deref(), Some(cond), "{res}");
        assert!(res.to_string().contains(text), "{res}");
    };
    let res = a.iq(browser.enable("http://push.example/x")).await;
    refused(&res, "not-acceptable", "https");
    let res = a.iq(browser.enable("ftp://127.0.0.1/x")).await;
    refused(&res, "not-acceptable", "https");
    let res = a
        .iq(xml(&format!(
            "<iq type='set'><enable xmlns='{NS_WEBPUSH}' endpoint='https://push.example/x'/></iq>"
        )))
        .await;
    refused(&res, "bad-request", "p256dh");
    let res = a
        .iq(xml(&format!(
            "<iq type='set'><enable xmlns='{NS_WEBPUSH}' endpoint='https://push.example/x' \
             p256dh='AAAA' auth='AAAAAAAAAAAAAAAAAAAAAA'/></iq>"
        )))
        .await;
    refused(&res, "not-acceptable", "P-256");

    // Enabled, then disabled: nothing.
    let endpoint = format!("{}/push/tab-2", service.base);
    assert_eq!(
        a.iq(browser.enable(&endpoint)).await.attr("type"),
        Some("result")
    );
    let res = a
        .iq(xml(&format!(
            "<iq type='set'><disable xmlns='{NS_WEBPUSH}' endpoint='{endpoint}'/></iq>"
        )))
        .await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    a.close().await;
    b.send(&message(&alice, "after disable")).await;
    service.none(Duration::from_millis(1200)).await;

    // Enabled again; the push service says it is gone: removed.
    let mut a = srv.login(&alice, "password", "res").await;
    assert_eq!(
        a.iq(browser.enable(&endpoint)).await.attr("type"),
        Some("result")
    );
    a.close().await;
    service.status.store(410, Ordering::Relaxed);
    b.send(&message(&alice, "m1")).await;
    assert_eq!(service.next().await.path, "tab-2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    service.status.store(201, Ordering::Relaxed);
    b.send(&message(&alice, "m2")).await;
    service.none(Duration::from_millis(1200)).await;
    srv.assert_healthy().await;
}

#[tokio::test]
async fn the_body_only_when_configured_and_off_means_off() {
    let srv = start_server(|c| {
        webpush_config(c);
        c.push.include_body = true;
    })
    .await;
    let mut service = push_service().await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();
    let browser = Browser::new();
    let endpoint = format!("{}/push/tab-3", service.base);
    assert_eq!(
        a.iq(browser.enable(&endpoint)).await.attr("type"),
        Some("result")
    );
    a.close().await;
    b.send(&message(&alice, "dinner at 8")).await;
    let r = service.next().await;
    let payload: serde_json::Value = serde_json::from_slice(&browser.decrypt(&r.body)).unwrap();
    assert_eq!(payload["body"], "dinner at 8", "{payload}");
    srv.stop().await;

    // Web Push off: no key served, enable refused.
    let srv = start_server(|c| c.push.webpush = false).await;
    let res = reqwest::get(format!("http://{}/push/vapid-public-key", srv.http))
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let (mut a, _b) = srv.logged_in_pair().await;
    let res = a.iq(browser.enable("https://push.example/x")).await;
    assert_eq!(
        stanza_error(&res).as_deref(),
        Some("feature-not-implemented"),
        "{res}"
    );
}

/// In a cluster: a tab subscribed on one node, closed; a message accepted
/// by another node is pushed from there, signed with the key the nodes
/// share (issue 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_comes_from_whichever_node_accepted_the_message() {
    let db = TestDb::create().await;
    let cluster = cluster_name();
    let node = |name: &'static str, vapid: Option<std::path::PathBuf>| {
        let (cluster, url) = (cluster.clone(), db.url.clone());
        start_server(move |c| {
            webpush_config(c);
            clustered(c, &cluster, name, &url);
            if let Some(v) = vapid {
                c.push.vapid_private_key = v.to_string_lossy().into_owned();
            }
        })
    };
    let n1 = node("n1", None).await;
    let shared = n1.state().config.data_dir.join("vapid.key");
    let n2 = node("n2", Some(shared)).await;
    let key = vapid_key(&n1).await;
    assert_eq!(vapid_key(&n2).await, key, "the nodes share one VAPID key");
    let mut service = push_service().await;
    let alice = n1.add_user("alice", "password").await;
    let bob = n1.add_user("bob", "password").await;
    let mut a = n1.login(&alice, "password", "tab").await;
    let browser = Browser::new();
    let res = a
        .iq(browser.enable(&format!("{}/push/tab-n1", service.base)))
        .await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    a.close().await;
    let mut b = n2.login(&bob, "password", "phone").await;
    b.send(&message(&alice, "from the other node")).await;
    let r = service.next().await;
    assert_eq!(r.path, "tab-n1");
    check_vapid(&r, &key, &service.base);
    let payload: serde_json::Value = serde_json::from_slice(&browser.decrypt(&r.body)).unwrap();
    assert_eq!(payload["count"], 1, "{payload}");
    assert_eq!(payload["sender"], bob, "{payload}");
    n2.stop().await;
    n1.stop().await;
}
