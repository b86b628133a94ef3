//! XEP-0363 HTTP File Upload: slots signed for one user, size and type;
//! PUT streamed and checked; GET/HEAD with Range, ETag and caching; the same
//! bytes stored once; quotas and limits answered with clear errors;
//! unreferenced blobs swept.

mod common;

use common::*;
use natter_xml::NS_CLIENT;

const NS_UPLOAD: &str = "urn:xmpp:http:upload:0";
const SERVICE: &str = "upload.localhost";

struct Slot {
    path: String,
    auth: String,
}

fn request(name: &str, size: usize, content_type: &str) -> Element {
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_attr("to", SERVICE)
        .with_child(
            Element::new("request", NS_UPLOAD)
                .with_attr("filename", name)
                .with_attr("size", size.to_string())
                .with_attr("content-type", content_type),
        )
}

/// Ask for a slot; the URL's path (clients resolve the host; tests talk to
/// the test server's port).
async fn slot(
    srv: &TestServer,
    c: &mut Client,
    name: &str,
    size: usize,
    content_type: &str,
) -> Result<Slot, Element> {
    let res = c.iq(request(name, size, content_type)).await;
    let Some(slot) = res.get_child("slot", NS_UPLOAD) else {
        return Err(res);
    };
    let put = slot.get_child("put", NS_UPLOAD).unwrap();
    let get = slot.get_child("get", NS_UPLOAD).unwrap();
    assert_eq!(put.attr("url"), get.attr("url"));
    let url = put.attr("url").unwrap();
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
    // The listener's real port, also when configured as port 0.
    let port = srv.http.port();
    assert!(
        url.starts_with(&format!("http://localhost:{port}/upload/")),
        "{url}"
    );
    let header = put.get_child("header", NS_UPLOAD).unwrap();
    assert_eq!(header.attr("name"), Some("Authorization"));
    Ok(Slot {
        path,
        auth: header.text(),
    })
}

async fn put(srv: &TestServer, s: &Slot, content_type: &str, body: &[u8]) -> (u16, String) {
    let headers = format!(
        "Authorization: {}\r\nContent-Type: {content_type}\r\n",
        s.auth
    );
    let (status, _, text) = http_bytes(srv.http, "PUT", &s.path, &headers, body).await;
    (status, String::from_utf8_lossy(&text).to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn blob_files(srv: &TestServer) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![srv.state().config.data_dir.join("blobs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[tokio::test]
async fn upload_then_download_with_range_etag_and_caching() {
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    // Advertised with the size limit clients read.
    let info = a
        .iq(xml(&format!(
            "<iq type='get' to='{SERVICE}'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )))
        .await;
    let text = info.to_string();
    assert!(
        text.contains(NS_UPLOAD) && text.contains("max-file-size"),
        "{info}"
    );
    assert!(text.contains("104857600"), "{info}");

    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let s = slot(
        &srv,
        &mut a,
        "../holiday photo.jpg",
        body.len(),
        "image/jpeg",
    )
    .await
    .unwrap();
    assert!(s.path.ends_with("/holiday%20photo.jpg"), "{}", s.path);
    let (status, text) = put(&srv, &s, "image/jpeg", &body).await;
    assert_eq!(status, 201, "{text}");
    // The slot is used up.
    let (status, _) = put(&srv, &s, "image/jpeg", &body).await;
    assert_eq!(status, 409);

    let (status, head, got) = http_bytes(srv.http, "GET", &s.path, "", b"").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(got, body);
    assert_eq!(header(&head, "content-type"), Some("image/jpeg"));
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "access-control-allow-origin"), Some("*"));
    assert!(header(&head, "cache-control")
        .unwrap()
        .contains("immutable"));
    assert!(header(&head, "content-disposition")
        .unwrap()
        .starts_with("inline"));
    let etag = header(&head, "etag").unwrap().to_string();
    // HEAD: headers only.
    let (status, head, got) = http_bytes(srv.http, "HEAD", &s.path, "", b"").await;
    assert_eq!((status, got.len()), (200, 0));
    assert_eq!(header(&head, "content-length"), Some("100000"));
    // Range.
    let (status, head, got) =
        http_bytes(srv.http, "GET", &s.path, "Range: bytes=1000-1999\r\n", b"").await;
    assert_eq!(status, 206, "{head}");
    assert_eq!(got, &body[1000..2000]);
    assert_eq!(
        header(&head, "content-range"),
        Some("bytes 1000-1999/100000")
    );
    let (status, _, _) =
        http_bytes(srv.http, "GET", &s.path, "Range: bytes=200000-\r\n", b"").await;
    assert_eq!(status, 416);
    // Revalidation.
    let (status, _, got) = http_bytes(
        srv.http,
        "GET",
        &s.path,
        &format!("If-None-Match: {etag}\r\n"),
        b"",
    )
    .await;
    assert_eq!((status, got.len()), (304, 0));
    // Unknown slots and names are not found; CORS preflight answers.
    let wrong = s.path.replace("holiday%20photo.jpg", "other.jpg");
    assert_eq!(http_request(srv.http, "GET", &wrong, "").await.0, 404);
    assert_eq!(
        http_request(srv.http, "GET", "/upload/0123/x.jpg", "")
            .await
            .0,
        404
    );
    let (status, head, _) = http_request(srv.http, "OPTIONS", &s.path, "").await;
    assert_eq!(status, 204);
    assert!(header(&head, "access-control-allow-methods")
        .unwrap()
        .contains("PUT"));
    srv.assert_healthy().await;
}

#[tokio::test]
async fn slots_are_bound_to_size_type_signature_and_time() {
    let srv = start_server(|c| c.upload.max_file_size = 1000).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    // Too large: file-too-large with the limit.
    let err = slot(&srv, &mut a, "big.bin", 1001, "application/octet-stream")
        .await
        .err()
        .unwrap();
    assert_eq!(
        stanza_error(&err).as_deref(),
        Some("not-acceptable"),
        "{err}"
    );
    let limit = err
        .get_child("error", NS_CLIENT)
        .and_then(|e| e.get_child("file-too-large", NS_UPLOAD))
        .and_then(|f| f.child_text("max-file-size", NS_UPLOAD));
    assert_eq!(limit.as_deref(), Some("1000"), "{err}");
    for bad in [
        request("", 10, "text/plain"),
        request("a.txt", 0, "text/plain"),
        request("a.txt", 10, "text/plain; x=<y>"),
    ] {
        let res = a.iq(bad).await;
        assert_eq!(stanza_error(&res).as_deref(), Some("bad-request"), "{res}");
    }
    let s = slot(&srv, &mut a, "a.txt", 10, "text/plain").await.unwrap();
    // Wrong size, wrong type, forged or missing token.
    assert_eq!(put(&srv, &s, "text/plain", b"0123456789x").await.0, 413);
    assert_eq!(put(&srv, &s, "text/plain", b"012345678").await.0, 400);
    assert_eq!(put(&srv, &s, "text/html", b"0123456789").await.0, 400);
    let forged = Slot {
        path: s.path.clone(),
        auth: format!("{}0", s.auth),
    };
    assert_eq!(put(&srv, &forged, "text/plain", b"0123456789").await.0, 403);
    let other_name = Slot {
        path: s.path.replace("a.txt", "b.txt"),
        auth: s.auth.clone(),
    };
    assert_eq!(
        put(&srv, &other_name, "text/plain", b"0123456789").await.0,
        403
    );
    let (status, _, _) = http_bytes(
        srv.http,
        "PUT",
        &s.path,
        "Content-Type: text/plain\r\n",
        b"0123456789",
    )
    .await;
    assert_eq!(status, 403);
    // The genuine one still works; nothing was stored by the failures.
    assert_eq!(put(&srv, &s, "text/plain", b"0123456789").await.0, 201);
    let files = blob_files(&srv);
    assert_eq!(files.len(), 1, "{files:?}");
    // Disposition: not inline for what a browser would run.
    let (_, head, _) = http_bytes(srv.http, "HEAD", &s.path, "", b"").await;
    assert!(header(&head, "content-disposition")
        .unwrap()
        .starts_with("attachment"));
    srv.assert_healthy().await;
}

#[tokio::test]
async fn expired_slots_are_refused() {
    let srv = start_server(|c| c.upload.slot_ttl_secs = 1).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let s = slot(&srv, &mut a, "late.txt", 3, "text/plain")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, text) = put(&srv, &s, "text/plain", b"abc").await;
    assert_eq!(status, 403);
    assert!(text.contains("expired"), "{text}");
}

#[tokio::test]
async fn same_bytes_are_stored_once_and_quotas_hold() {
    let srv = start_server(|c| c.upload.daily_quota = 25).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bytes = b"forwarded media".to_vec(); // 15 bytes
    let s1 = slot(&srv, &mut a, "meme.png", bytes.len(), "image/png")
        .await
        .unwrap();
    assert_eq!(put(&srv, &s1, "image/png", &bytes).await.0, 201);
    let s2 = slot(&srv, &mut b, "meme.png", bytes.len(), "image/png")
        .await
        .unwrap();
    assert_eq!(put(&srv, &s2, "image/png", &bytes).await.0, 201);
    assert_ne!(s1.path, s2.path);
    assert_eq!(blob_files(&srv).len(), 1, "stored once");
    for s in [&s1, &s2] {
        assert_eq!(http_bytes(srv.http, "GET", &s.path, "", b"").await.2, bytes);
    }
    // alice has 15 of her 25 daily bytes: 11 more are refused, naming the quota.
    let err = slot(&srv, &mut a, "more.png", 11, "image/png")
        .await
        .err()
        .unwrap();
    assert_eq!(
        stanza_error(&err).as_deref(),
        Some("resource-constraint"),
        "{err}"
    );
    assert!(
        err.to_string().contains("daily upload quota of 25 bytes"),
        "{err}"
    );
    assert!(slot(&srv, &mut a, "fits.png", 10, "image/png")
        .await
        .is_ok());

    // One reference gone: the blob stays for the other; both gone (and the
    // grace period over): swept.
    let store = &srv.state().store;
    let slot_of = |s: &Slot| s.path.split('/').nth(2).unwrap().to_string();
    assert!(store.upload_delete(&slot_of(&s1)).await.unwrap());
    let age = |f: &std::path::Path| {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    };
    for f in blob_files(&srv) {
        age(&f);
    }
    assert_eq!(
        natter::modules::upload::sweep(srv.state()).await.unwrap(),
        0
    );
    assert_eq!(
        http_bytes(srv.http, "GET", &s2.path, "", b"").await.2,
        bytes
    );
    assert!(store.upload_delete(&slot_of(&s2)).await.unwrap());
    assert_eq!(
        natter::modules::upload::sweep(srv.state()).await.unwrap(),
        1
    );
    assert!(blob_files(&srv).is_empty());
    assert_eq!(http_request(srv.http, "GET", &s2.path, "").await.0, 404);
}

/// A retracted group message takes its author's files with it: a blob
/// nothing else refers to goes at once, one another upload shares stays.
#[tokio::test]
async fn a_retraction_frees_the_files_it_linked() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let own = slot(&srv, &mut a, "mine.png", 4, "image/png")
        .await
        .unwrap();
    assert_eq!(put(&srv, &own, "image/png", b"mine").await.0, 201);
    let shared = slot(&srv, &mut a, "meme.png", 6, "image/png")
        .await
        .unwrap();
    assert_eq!(put(&srv, &shared, "image/png", b"shared").await.0, 201);
    let bobs = slot(&srv, &mut b, "meme.png", 6, "image/png")
        .await
        .unwrap();
    assert_eq!(put(&srv, &bobs, "image/png", b"shared").await.0, 201);
    assert_eq!(blob_files(&srv).len(), 2);

    // alice's room; she posts both links, then retracts the message.
    let room = "pics@conference.localhost";
    a.send(&xml(&format!(
        "<presence to='{room}/alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    )))
    .await;
    a.recv_until(|e| e.name == "message" && e.get_child("subject", NS_CLIENT).is_some())
        .await;
    let body = format!(
        "look http://localhost{} and http://localhost{}",
        own.path, shared.path
    );
    let msg = Element::new("message", NS_CLIENT)
        .with_attr("to", room)
        .with_attr("type", "groupchat")
        .with_child(Element::new("body", NS_CLIENT).with_text(body.clone()));
    a.send(&msg).await;
    let echo = a
        .recv_until(|e| e.child_text("body", NS_CLIENT).as_deref() == Some(body.as_str()))
        .await;
    let sid = echo
        .get_child("stanza-id", "urn:xmpp:sid:0")
        .unwrap()
        .attr("id")
        .unwrap()
        .to_string();
    a.send(&xml(&format!(
        "<message to='{room}' type='groupchat'><retract xmlns='urn:xmpp:message-retract:1' id='{sid}'/></message>"
    )))
    .await;
    a.recv_until(|e| {
        e.get_child("retract", "urn:xmpp:message-retract:1")
            .is_some()
    })
    .await;
    assert_eq!(http_request(srv.http, "GET", &own.path, "").await.0, 404);
    assert_eq!(http_request(srv.http, "GET", &shared.path, "").await.0, 404);
    assert_eq!(
        http_bytes(srv.http, "GET", &bobs.path, "", b"").await.2,
        b"shared"
    );
    assert_eq!(blob_files(&srv).len(), 1, "only bob's copy is left");
}

/// Two PUTs racing for one slot: one wins, the other is refused, and the
/// stored bytes are exactly the winner's (they match their content address).
#[tokio::test]
async fn racing_puts_for_one_slot_store_one_file_intact() {
    use sha2::Digest;
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let s = slot(
        &srv,
        &mut a,
        "race.bin",
        300_000,
        "application/octet-stream",
    )
    .await
    .unwrap();
    let one = vec![1u8; 300_000];
    let two = vec![2u8; 300_000];
    let (r1, r2) = tokio::join!(
        put(&srv, &s, "application/octet-stream", &one),
        put(&srv, &s, "application/octet-stream", &two)
    );
    let mut codes = [r1.0, r2.0];
    codes.sort();
    assert_eq!(codes, [201, 409], "{r1:?} {r2:?}");
    let (_, head, got) = http_bytes(srv.http, "GET", &s.path, "", b"").await;
    assert!(got == one || got == two);
    let etag = header(&head, "etag").unwrap().trim_matches('"').to_string();
    assert_eq!(etag, hex::encode(sha2::Sha256::digest(&got)));
}
