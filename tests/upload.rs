//! XEP-0363 HTTP File Upload: slots signed for one user, size and type;
//! PUT streamed and checked; GET/HEAD with Range, ETag and caching; the same
//! bytes stored once; quotas and limits answered with clear errors;
//! unreferenced blobs swept. The storage-touching tests run twice: on
//! the local disk and on S3 (a real moto server on loopback).

mod common;

use common::*;
use natter::config::Config;
use natter::modules::upload::blobs::is_blob_key;
use natter::modules::upload::Uploads;
use natter_xml::NS_CLIENT;
use std::time::Duration;

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

#[derive(Clone, Copy)]
enum Blobs {
    Disk,
    S3,
}

/// A server whose uploads live on `blobs` (and the S3 server, if any,
/// which must outlive it).
async fn start_on(blobs: Blobs, tweak: impl FnOnce(&mut Config)) -> (TestServer, Option<S3Server>) {
    let s3 = match blobs {
        Blobs::Disk => None,
        Blobs::S3 => Some(S3Server::start().await),
    };
    let bucket = match &s3 {
        Some(s3) => Some(s3.bucket().await),
        None => None,
    };
    let srv = start_server(|c| {
        if let (Some(s3), Some(bucket)) = (&s3, bucket) {
            s3.use_in(c, bucket);
        }
        tweak(c);
    })
    .await;
    (srv, s3)
}

/// Run a test on the disk and on S3.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn disk() {
                super::$name(super::Blobs::Disk).await
            }
            #[tokio::test]
            async fn s3() {
                super::$name(super::Blobs::S3).await
            }
        }
    };
}

/// The stored blobs' hashes, whichever the backend.
async fn blob_files(srv: &TestServer) -> Vec<String> {
    let uploads = srv.state().modules.api::<Uploads>();
    let mut keys: Vec<String> = uploads
        .blobs()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| is_blob_key(k))
        .collect();
    keys.sort();
    keys
}

on_both!(upload_then_download_with_range_etag_and_caching);
async fn upload_then_download_with_range_etag_and_caching(blobs: Blobs) {
    let (srv, _s3) = start_on(blobs, |_| {}).await;
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
    if let Blobs::S3 = blobs {
        let on_disk = srv.state().config.data_dir.join("blobs");
        assert!(!on_disk.exists(), "S3 uploads must not touch {on_disk:?}");
    }
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

on_both!(slots_are_bound_to_size_type_signature_and_time);
async fn slots_are_bound_to_size_type_signature_and_time(blobs: Blobs) {
    let (srv, _s3) = start_on(blobs, |c| c.upload.max_file_size = 1000).await;
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
    let files = blob_files(&srv).await;
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

on_both!(same_bytes_are_stored_once_and_quotas_hold);
async fn same_bytes_are_stored_once_and_quotas_hold(blobs: Blobs) {
    let (srv, _s3) = start_on(blobs, |c| c.upload.daily_quota = 25).await;
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
    assert_eq!(blob_files(&srv).await.len(), 1, "stored once");
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
    let sweep = |grace| natter::modules::upload::sweep_older_than(srv.state(), grace);
    let slot_of = |s: &Slot| s.path.split('/').nth(2).unwrap().to_string();
    assert!(store.upload_delete(&slot_of(&s1)).await.unwrap());
    // One reference left: kept, also past the grace period.
    assert_eq!(sweep(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(
        http_bytes(srv.http, "GET", &s2.path, "", b"").await.2,
        bytes
    );
    // None left: a young blob is kept (an upload in flight may be about to
    // refer to it); past the grace period it is swept.
    assert!(store.upload_delete(&slot_of(&s2)).await.unwrap());
    assert_eq!(sweep(Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(blob_files(&srv).await.len(), 1);
    assert_eq!(sweep(Duration::ZERO).await.unwrap(), 1);
    assert!(blob_files(&srv).await.is_empty());
    assert_eq!(http_request(srv.http, "GET", &s2.path, "").await.0, 404);
}

on_both!(a_retraction_frees_the_files_it_linked);
/// A retracted group message takes its author's files with it: a blob
/// nothing else refers to goes at once, one another upload shares stays.
async fn a_retraction_frees_the_files_it_linked(blobs: Blobs) {
    let (srv, _s3) = start_on(blobs, |_| {}).await;
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
    assert_eq!(blob_files(&srv).await.len(), 2);

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
    assert_eq!(blob_files(&srv).await.len(), 1, "only bob's copy is left");
}

on_both!(racing_puts_for_one_slot_store_one_file_intact);
/// Two PUTs racing for one slot: one wins, the other is refused, and the
/// stored bytes are exactly the winner's (they match their content address).
async fn racing_puts_for_one_slot_store_one_file_intact(blobs: Blobs) {
    use sha2::Digest;
    let (srv, _s3) = start_on(blobs, |_| {}).await;
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

/// S3 with `downloads = "redirect"`: GET answers with a presigned URL of
/// the storage, which serves the bytes, ranges and the upload's type and
/// disposition; HEAD and the checks stay with natter.
#[tokio::test]
async fn s3_downloads_can_redirect_to_presigned_urls() {
    let (srv, s3) = start_on(Blobs::S3, |c| c.upload.s3.downloads = "redirect".into()).await;
    let s3 = s3.unwrap();
    let (mut a, _b) = srv.logged_in_pair().await;
    let body: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let s = slot(&srv, &mut a, "clip.mp4", body.len(), "video/mp4")
        .await
        .unwrap();
    assert_eq!(put(&srv, &s, "video/mp4", &body).await.0, 201);
    let (status, head, _) = http_request(srv.http, "GET", &s.path, "").await;
    assert_eq!(status, 302, "{head}");
    let location = header(&head, "location").unwrap().to_string();
    let presigned = location
        .strip_prefix(&s3.endpoint)
        .unwrap_or_else(|| panic!("{location} is not on {}", s3.endpoint));
    assert!(presigned.contains("X-Amz-Signature="), "{presigned}");
    let (status, head, got) = http_bytes(s3.addr, "GET", presigned, "", b"").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(got, body);
    assert_eq!(header(&head, "content-type"), Some("video/mp4"));
    assert!(header(&head, "content-disposition")
        .unwrap()
        .starts_with("inline"));
    let (status, _, got) =
        http_bytes(s3.addr, "GET", presigned, "Range: bytes=10-19\r\n", b"").await;
    assert_eq!((status, got.as_slice()), (206, &body[10..20]));
    // The signature covers the path: another object is refused.
    let other = presigned.replacen("/natter-", "/natter-x", 1);
    assert_eq!(http_request(s3.addr, "GET", &other, "").await.0, 403);
    // HEAD is natter's own.
    let (status, head, _) = http_request(srv.http, "HEAD", &s.path, "").await;
    assert_eq!(status, 200);
    assert_eq!(header(&head, "content-length"), Some("50000"));
    // A cut-off upload leaves nothing behind in the bucket.
    let s2 = slot(&srv, &mut a, "cut.bin", 1000, "application/octet-stream")
        .await
        .unwrap();
    let cut = format!(
        "Authorization: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n",
        s2.auth
    );
    cut_off(
        srv.http,
        &format!("PUT {} HTTP/1.1\r\nHost: x\r\n{cut}\r\n", s2.path),
        &[7u8; 400],
    )
    .await;
    // The server notices the cut and cleans up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let uploads = srv.state().modules.api::<Uploads>();
    let keys: Vec<String> = uploads
        .blobs()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys.len(), 1, "only the video's blob: {keys:?}");
    srv.assert_healthy().await;
}

/// XEP-0424 in a 1:1 chat: the author's retraction (by origin-id) frees
/// the file the message linked; another user's retraction of a message
/// that is not theirs frees nothing.
#[tokio::test]
async fn a_1to1_retraction_frees_the_file_it_linked() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let pic = slot(&srv, &mut a, "pic.png", 3, "image/png").await.unwrap();
    assert_eq!(put(&srv, &pic, "image/png", b"pic").await.0, 201);
    let url = format!("http://localhost{}", pic.path);
    // Full JIDs: these sessions sent no presence, so bare-JID messages
    // would wait offline.
    let bob = b.jid().to_string();
    let alice = a.jid().to_string();
    a.send(&xml(&format!(
        "<message to='{bob}' type='chat' id='m1'><body>{url}</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='o-1'/></message>"
    )))
    .await;
    b.recv_until(|e| e.child_text("body", NS_CLIENT).as_deref() == Some(url.as_str()))
        .await;
    // bob "retracts" alice's message: not his, nothing happens. Then
    // alice retracts it: gone.
    retract_1to1(&mut b, &mut a, &alice, "o-1").await;
    assert_eq!(http_request(srv.http, "GET", &pic.path, "").await.0, 200);
    retract_1to1(&mut a, &mut b, &bob, "o-1").await;
    assert_eq!(http_request(srv.http, "GET", &pic.path, "").await.0, 404);
    assert!(blob_files(&srv).await.is_empty());
    srv.assert_healthy().await;
}

/// `from` retracts message `id` in its chat with `to` (XEP-0424).
async fn retract_1to1(from: &mut Client, to: &mut Client, to_jid: &str, id: &str) {
    from.send(&xml(&format!(
        "<message to='{to_jid}' type='chat'><retract xmlns='urn:xmpp:message-retract:1' id='{id}'/>\
         <body>/me retracted</body></message>"
    )))
    .await;
    to.recv_until(|e| {
        e.get_child("retract", "urn:xmpp:message-retract:1")
            .is_some()
    })
    .await;
}

/// Send a request whose body stops short, then close the connection.
async fn cut_off(addr: std::net::SocketAddr, head: &str, body: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
}

/// A PNG header claiming `w`×`h` pixels, with no pixel data: what a
/// decompression bomb shows a decoder first.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (!(crc & 1)).wrapping_add(1));
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png
}

on_both!(image_previews_are_made_once_and_bounded);
/// `?thumb=N`: a JPEG preview at most N pixels on its long side, cached in
/// the blob store and released with the blob; sizes, types and bombs
/// refused with clear statuses.
async fn image_previews_are_made_once_and_bounded(blobs: Blobs) {
    let (srv, _s3) = start_on(blobs, |_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let photo = image::RgbImage::from_fn(600, 300, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut png = Vec::new();
    photo
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let s = slot(&srv, &mut a, "wide.png", png.len(), "image/png")
        .await
        .unwrap();
    assert_eq!(put(&srv, &s, "image/png", &png).await.0, 201);
    let thumb = format!("{}?thumb=256", s.path);
    let (status, head, jpeg) = http_bytes(srv.http, "GET", &thumb, "", b"").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(header(&head, "content-type"), Some("image/jpeg"));
    assert!(header(&head, "cache-control")
        .unwrap()
        .contains("immutable"));
    let preview = image::load_from_memory(&jpeg).unwrap();
    assert_eq!((preview.width(), preview.height()), (256, 128));
    // Cached: stored in the blob store, the same bytes served again, and
    // revalidated by its own ETag.
    let uploads = srv.state().modules.api::<Uploads>();
    let keys = || async {
        let mut k: Vec<String> = uploads
            .blobs()
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        k.sort();
        k
    };
    assert!(
        keys().await.iter().any(|k| k.starts_with("thumbs/")),
        "{:?}",
        keys().await
    );
    assert_eq!(http_bytes(srv.http, "GET", &thumb, "", b"").await.2, jpeg);
    let etag = header(&head, "etag").unwrap();
    let (status, _, _) = http_bytes(
        srv.http,
        "GET",
        &thumb,
        &format!("If-None-Match: {etag}\r\n"),
        b"",
    )
    .await;
    assert_eq!(status, 304);
    // Refusals: a size not offered, a type previews are not made for,
    // bytes that are no image (what encrypted media looks like), a bomb.
    assert_eq!(
        http_request(srv.http, "GET", &format!("{}?thumb=100", s.path), "")
            .await
            .0,
        400
    );
    let cases: [(&str, &str, Vec<u8>, u16); 3] = [
        ("doc.bin", "application/octet-stream", vec![1; 100], 415),
        (
            "secret.jpg",
            "image/jpeg",
            (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            415,
        ),
        ("bomb.png", "image/png", png_header(60_000, 60_000), 422),
    ];
    for (name, ty, bytes, want) in cases {
        let s = slot(&srv, &mut a, name, bytes.len(), ty).await.unwrap();
        assert_eq!(put(&srv, &s, ty, &bytes).await.0, 201);
        let (status, head, _) =
            http_request(srv.http, "GET", &format!("{}?thumb=256", s.path), "").await;
        assert_eq!(status, want, "{name}: {head}");
    }
    // The preview goes with its blob.
    let store = &srv.state().store;
    for slot in store.uploads_before(i64::MAX, 100).await.unwrap() {
        store.upload_delete(&slot.slot).await.unwrap();
    }
    natter::modules::upload::sweep_older_than(srv.state(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(keys().await, Vec::<String>::new());
    srv.assert_healthy().await;
}

/// Issue 14: in a cluster on S3 (moto) and PostgreSQL, a file uploaded
/// through one node downloads from another (the blob is in the bucket,
/// the slot in the shared store, the URL signed with the shared secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_uploaded_through_one_node_downloads_from_another() {
    let db = TestDb::create().await;
    let s3 = S3Server::start().await;
    let bucket = s3.bucket().await;
    let cluster = cluster_name();
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        let (cluster, url, bucket) = (cluster.clone(), db.url.clone(), bucket.clone());
        let s3 = &s3;
        nodes.push(
            start_server(move |c| {
                s3.use_in(c, bucket);
                c.upload.secret = "one secret for the cluster".into();
                clustered(c, &cluster, name, &url);
            })
            .await,
        );
    }
    let alice = nodes[0].add_user("alice", "password").await;
    let mut a = nodes[0].login(&alice, "password", "phone").await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let s = slot(
        &nodes[0],
        &mut a,
        "clip.bin",
        body.len(),
        "application/octet-stream",
    )
    .await
    .unwrap();
    let (status, text) = put(&nodes[0], &s, "application/octet-stream", &body).await;
    assert_eq!(status, 201, "{text}");
    let (status, _, got) = http_bytes(nodes[1].http, "GET", &s.path, "", b"").await;
    assert_eq!(status, 200);
    assert!(
        got == body,
        "n2 served other bytes ({} of {})",
        got.len(),
        body.len()
    );
    for n in nodes {
        n.stop().await;
    }
}
