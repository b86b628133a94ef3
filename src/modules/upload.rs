//! XEP-0363 HTTP File Upload on `<upload.subdomain>.<domain>` (default
//! `upload.<domain>`), with the bytes in content-addressed blob storage
//! (`blobs`: the local disk under `data_dir/blobs`, or S3-compatible
//! object storage; SHA-256 named, so the same bytes uploaded twice are
//! stored once).
//!
//! A slot request is answered with one URL for PUT and GET,
//! `<base>/upload/<slot>/<name>`, where `<slot>` is 128 random bits (the URL
//! is the read capability: unguessable, listed nowhere) and `<base>` is
//! `http.public_url` (or `http://<domain>:<http port>`). The PUT carries an
//! `Authorization: Bearer` token the server signed (HMAC-SHA256) over the
//! uploader, size, content type, slot and expiry; nothing is stored for a
//! slot until its bytes arrive. PUT streams the body to a temporary file,
//! hashing it on the way, and refuses it unless signature, expiry, exact
//! size and type match; GET/HEAD serve `Range`, `ETag` (the hash),
//! immutable caching, `nosniff`, and CORS for browser clients. With S3
//! and `upload.s3.downloads = "redirect"`, GET answers with a redirect to
//! a presigned URL of the storage, so the bytes do not pass through
//! natter.
//!
//! Quotas (like Prosody's mod_http_file_share): per file, per user per
//! day, per user in total and for the whole server; optional expiry after
//! N days and an allow-list of content types. A background task deletes
//! expired uploads and blobs nothing refers to any more (after an hour's
//! grace, so an upload racing a delete keeps its blob).
//!
//! When a message is retracted (XEP-0424: 1:1, seen here on its way from
//! the author; groups, by the MUC module) or moderated (XEP-0425), the
//! files it links to that its author uploaded are deleted (`api::Files`),
//! their bytes too unless another upload shares them.
//!

use super::muc::NS_RETRACT;
use super::{new_id, vocab, Cx, Flow, Hook, HookStanza, Kind, Module, Service, Task};
use crate::config::Config;
use crate::error::{Condition, StanzaError};
use crate::router::Outbound;
use crate::state::ServerState;
use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::Router;
use blobs::{BlobStore, BlobWriter};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use jid::FullJid;
use natter_store::{StoreError, Upload};
use natter_xml::{Element, NS_CLIENT};
use sha2::{Digest, Sha256};
use std::time::Duration;
use subtle::ConstantTimeEq;

pub const NS: &str = "urn:xmpp:http:upload:0";
/// Where the HTTP routes live.
const PREFIX: &str = "/upload";
/// Unreferenced blobs younger than this are kept (an upload in flight may
/// be about to refer to one).
const GRACE: Duration = Duration::from_secs(3600);
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

pub mod blobs;
pub mod thumb;

pub struct Uploads {
    blobs: Box<dyn BlobStore>,
    thumbs: thumb::Thumbnailer,
    /// Serializes placing a blob and recording its reference against the
    /// sweep's "unreferenced? delete" on this node, so a new upload of the
    /// same bytes never loses its blob to a concurrent sweep.
    placing: tokio::sync::Mutex<()>,
}

impl Uploads {
    pub fn new(config: &Config) -> Self {
        Uploads {
            blobs: blobs::open(config)
                .expect("upload storage settings are checked when the config loads"),
            thumbs: thumb::Thumbnailer::new(thumb::Limits::default()),
            placing: Default::default(),
        }
    }

    /// The blob store uploads live in (backups read it).
    pub fn blobs(&self) -> &dyn BlobStore {
        &*self.blobs
    }
}

/// The key slots are signed with: `upload.secret` (shared by a cluster's
/// nodes), else derived from this node's fake-salt key (kept across
/// restarts).
fn secret(state: &ServerState) -> Vec<u8> {
    if !state.config.upload.secret.is_empty() {
        return state.config.upload.secret.as_bytes().to_vec();
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(state.fake_salt.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(b"natter upload slots");
    mac.finalize().into_bytes().to_vec()
}

/// What a slot's token vouches for.
#[derive(Debug, PartialEq)]
struct Grant {
    owner: String,
    size: u64,
    content_type: String,
    /// Unix milliseconds: a slot lives its TTL to the millisecond, not
    /// to the end of a second.
    expires: i64,
}

fn mac_of(state: &ServerState, slot: &str, name: &str, g: &Grant) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&secret(state)).expect("HMAC takes any key length");
    for part in [
        slot,
        name,
        &g.owner,
        &g.size.to_string(),
        &g.content_type,
        &g.expires.to_string(),
    ] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac.finalize().into_bytes().to_vec()
}

fn token(state: &ServerState, slot: &str, name: &str, g: &Grant) -> String {
    let data = format!("{}\n{}\n{}\n{}", g.owner, g.size, g.content_type, g.expires);
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, data);
    format!("{b64}.{}", hex::encode(mac_of(state, slot, name, g)))
}

/// The grant in a PUT's `Authorization: Bearer` header, if it is genuine.
fn verify(state: &ServerState, slot: &str, name: &str, headers: &HeaderMap) -> Option<Grant> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (b64, mac) = auth.strip_prefix("Bearer ")?.trim().split_once('.')?;
    let data =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b64).ok()?;
    let data = String::from_utf8(data).ok()?;
    let mut parts = data.splitn(4, '\n');
    let g = Grant {
        owner: parts.next()?.to_string(),
        size: parts.next()?.parse().ok()?,
        content_type: parts.next()?.to_string(),
        expires: parts.next()?.parse().ok()?,
    };
    let given = hex::decode(mac).ok()?;
    let want = mac_of(state, slot, name, &g);
    bool::from(given.ct_eq(&want)).then_some(g)
}

fn now_millis() -> i64 {
    vocab::now_micros() / 1000
}

fn now_secs() -> i64 {
    vocab::now_micros() / 1_000_000
}

#[async_trait]
impl Module for Uploads {
    fn name(&self) -> &'static str {
        "upload"
    }
    fn services(&self, config: &Config) -> Vec<Service> {
        if !config.upload.enabled {
            return Vec::new();
        }
        Service::per_domain(
            &config.domains,
            &config.upload.subdomain,
            ("store", "file", "HTTP File Upload"),
        )
    }
    /// 1:1 retractions, on their way from the author.
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::PreRoute(Kind::Message), 50)]
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        if let (Some(retract), Some(to)) = (s.stanza.get_child("retract", NS_RETRACT), s.to) {
            let from = s
                .stanza
                .attr("from")
                .and_then(|f| f.parse::<jid::Jid>().ok());
            if s.stanza.attr("type") != Some("groupchat") {
                if let (Some(id), Some(from)) = (retract.attr("id"), from) {
                    self.retracted_1to1(cx.state, &from.to_bare(), &to.to_bare(), id)
                        .await;
                }
            }
        }
        Ok(Flow::Continue)
    }
    fn provide(self: std::sync::Arc<Self>, shared: &mut super::Shared) {
        shared.provide::<Uploads>(self.clone());
        shared.provide::<dyn super::api::Files>(self);
    }
    fn http(&self) -> Option<Router<ServerState>> {
        Some(
            Router::new().route(
                &format!("{PREFIX}/{{slot}}/{{name}}"),
                put(put_file)
                    .get(get_file)
                    .head(get_file)
                    .options(preflight),
            ),
        )
    }
    fn tasks(&self, state: &ServerState) -> Vec<Task> {
        if !state.config.upload.enabled {
            return Vec::new();
        }
        vec![Box::pin(sweep_task(state.clone()))]
    }
    async fn service_stanza(
        &self,
        state: &ServerState,
        stanza: Element,
    ) -> Result<(), StanzaError> {
        if stanza.name != "iq" {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        }
        let kind = stanza.attr("type").unwrap_or_default();
        if matches!(kind, "result" | "error") {
            return Ok(());
        }
        let from: FullJid = stanza
            .attr("from")
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| StanzaError::new(Condition::BadRequest))?;
        let payload = stanza
            .children()
            .next()
            .ok_or_else(|| StanzaError::new(Condition::BadRequest))?;
        let result = match (payload.name.as_str(), payload.ns.as_str(), kind) {
            ("query", vocab::NS_DISCO_INFO, "get") if payload.attr("node").is_none() => {
                info(&state.config)
            }
            ("query", vocab::NS_DISCO_ITEMS, "get") => Element::new("query", vocab::NS_DISCO_ITEMS),
            ("request", NS, "get") => slot(state, &from, payload).await?,
            _ => return Err(StanzaError::new(Condition::FeatureNotImplemented)),
        };
        let mut res = Element::new("iq", NS_CLIENT)
            .with_attr("type", "result")
            .with_attr("to", from.to_string())
            .with_child(result);
        for a in ["id", "to"] {
            if let Some(v) = stanza.attr(a) {
                res.set_attr(if a == "to" { "from" } else { a }, v);
            }
        }
        state.routing.deliver(&from, &Outbound::new(&res, 0));
        Ok(())
    }
}

/// disco#info with the XEP-0128 form clients read the size limit from.
fn info(config: &Config) -> Element {
    let field = |var: &str, value: String| {
        Element::new("field", vocab::NS_DATA)
            .with_attr("var", var)
            .with_child(Element::new("value", vocab::NS_DATA).with_text(value))
    };
    Element::new("query", vocab::NS_DISCO_INFO)
        .with_child(
            Element::new("identity", vocab::NS_DISCO_INFO)
                .with_attr("category", "store")
                .with_attr("type", "file")
                .with_attr("name", "HTTP File Upload"),
        )
        .with_child(Element::new("feature", vocab::NS_DISCO_INFO).with_attr("var", NS))
        .with_child(
            Element::new("x", vocab::NS_DATA)
                .with_attr("type", "result")
                .with_child(field("FORM_TYPE", NS.into()).with_attr("type", "hidden"))
                .with_child(field(
                    "max-file-size",
                    config.upload.max_file_size.to_string(),
                )),
        )
}

fn file_too_large(max: u64) -> StanzaError {
    // XEP-0363 §5: <file-too-large><max-file-size/></file-too-large>.
    StanzaError::with_text(
        Condition::NotAcceptable,
        format!("file too large: at most {max} bytes"),
    )
    .with_app("file-too-large", NS)
    .with_app_child("max-file-size", max.to_string())
}

/// A usable file name: what the client gave, without path, control or
/// URL-special characters, at most 128 bytes.
fn clean_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if "?#%\"<>|*:;".contains(c) { '_' } else { c })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        return None;
    }
    let mut end = cleaned.len().min(128);
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    Some(cleaned[..end].to_string())
}

fn valid_type(t: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    t.len() <= 255 && t.split_once('/').is_some_and(|(a, b)| ok(a) && ok(b))
}

async fn slot(state: &ServerState, from: &FullJid, req: &Element) -> Result<Element, StanzaError> {
    let cfg = &state.config.upload;
    if !state.serves(from.domain().as_str()) {
        return Err(StanzaError::with_text(
            Condition::NotAllowed,
            "only local users upload",
        ));
    }
    let name = req
        .attr("filename")
        .and_then(clean_name)
        .ok_or_else(|| StanzaError::with_text(Condition::BadRequest, "a filename is required"))?;
    let size: u64 = req
        .attr("size")
        .and_then(|s| s.trim().parse().ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| {
            StanzaError::with_text(
                Condition::BadRequest,
                "size must be a positive number of bytes",
            )
        })?;
    if size > cfg.max_file_size {
        return Err(file_too_large(cfg.max_file_size));
    }
    let content_type = req
        .attr("content-type")
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "application/octet-stream".into());
    if !valid_type(&content_type) {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "malformed content-type",
        ));
    }
    if !cfg.allowed_types.is_empty()
        && !cfg.allowed_types.iter().any(|a| {
            a == &content_type
                || a.strip_suffix("/*")
                    .is_some_and(|p| content_type.split('/').next() == Some(p))
        })
    {
        return Err(StanzaError::with_text(
            Condition::NotAcceptable,
            format!("files of type {content_type} are not accepted here"),
        ));
    }
    let owner = from.to_bare().to_string();
    let (today, total) = state
        .store
        .upload_usage(&owner, now_secs() - 86_400)
        .await
        .map_err(StanzaError::from)?;
    let quota = |what: &str, limit: u64| {
        StanzaError::with_text(
            Condition::ResourceConstraint,
            format!("{what} upload quota of {limit} bytes reached"),
        )
    };
    if cfg.daily_quota > 0 && today + size > cfg.daily_quota {
        return Err(quota("daily", cfg.daily_quota));
    }
    if cfg.user_quota > 0 && total + size > cfg.user_quota {
        return Err(quota("per-user", cfg.user_quota));
    }
    if cfg.global_quota > 0 {
        let all = state
            .store
            .upload_total()
            .await
            .map_err(StanzaError::from)?;
        if all + size > cfg.global_quota {
            return Err(quota("server", cfg.global_quota));
        }
    }
    let slot = format!("{}{}", new_id(), new_id());
    let grant = Grant {
        owner,
        size,
        content_type,
        expires: now_millis() + cfg.slot_ttl_secs as i64 * 1000,
    };
    let encoded: String = url_escape(&name);
    let url = format!("{}{PREFIX}/{slot}/{encoded}", base_url(state));
    let auth = format!("Bearer {}", token(state, &slot, &name, &grant));
    Ok(Element::new("slot", NS)
        .with_child(
            Element::new("put", NS)
                .with_attr("url", url.clone())
                .with_child(
                    Element::new("header", NS)
                        .with_attr("name", "Authorization")
                        .with_text(auth),
                ),
        )
        .with_child(Element::new("get", NS).with_attr("url", url)))
}

/// Percent-encode everything but unreserved characters (RFC 3986).
fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where clients reach the HTTP listener: `http.public_url`, else the
/// first domain at the port the listener is bound to.
fn base_url(state: &ServerState) -> String {
    let public = state.config.http.public_url.trim_end_matches('/');
    if !public.is_empty() {
        return public.to_string();
    }
    let port = state.http_addr.map_or(5280, |a| a.port());
    format!("http://{}:{port}", state.config.domains[0])
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        format!("{text}\n"),
    )
        .into_response()
}

/// CORS preflight (XEP-0363 §7: browser clients upload from other origins).
async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                "GET, HEAD, PUT, OPTIONS",
            ),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Authorization, Content-Type",
            ),
            (header::ACCESS_CONTROL_MAX_AGE, "86400"),
        ],
    )
        .into_response()
}

async fn put_file(
    State(state): State<ServerState>,
    Path((slot, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !is_slot(&slot) {
        return plain(StatusCode::NOT_FOUND, "no such upload slot");
    }
    let Some(g) = verify(&state, &slot, &name, &headers) else {
        return plain(
            StatusCode::FORBIDDEN,
            "this upload slot is not valid (bad or missing Authorization)",
        );
    };
    if g.expires < now_millis() {
        return plain(
            StatusCode::FORBIDDEN,
            "this upload slot has expired: request a new one",
        );
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n == g.size => {}
        Some(n) if n > g.size => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("this slot is for exactly {} bytes", g.size),
            )
        }
        _ => {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("Content-Length must be {}", g.size),
            )
        }
    }
    let given_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|t| t.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "application/octet-stream".into());
    if given_type != g.content_type {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!("Content-Type must be {} as requested", g.content_type),
        );
    }
    match state.store.upload_get(&slot).await {
        Ok(None) => {}
        Ok(Some(_)) => return plain(StatusCode::CONFLICT, "this slot was used already"),
        Err(e) => return store_failed(e),
    }
    let uploads = state.modules.api::<Uploads>();
    let (written, sha256) = match receive(&*uploads.blobs, &slot, g.size, body).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let _placing = uploads.placing.lock().await;
    // Replacing an existing copy of these bytes restarts the sweep's
    // grace period for them.
    if let Err(e) = written.commit(&sha256).await {
        return io_error(e);
    }
    let upload = Upload {
        slot,
        owner: g.owner,
        sha256,
        size: g.size,
        content_type: g.content_type,
        filename: name,
        created: now_secs(),
    };
    match state.store.upload_put(&upload).await {
        Ok(()) => {
            tracing::info!(owner = %upload.owner, size = upload.size, "file uploaded");
            plain(StatusCode::CREATED, "stored")
        }
        Err(StoreError::Conflict) => plain(StatusCode::CONFLICT, "this slot was used already"),
        Err(e) => store_failed(e),
    }
}

fn store_failed(e: StoreError) -> Response {
    tracing::warn!(error = %e, "upload store failed");
    match e {
        StoreError::NotFound => plain(
            StatusCode::FORBIDDEN,
            "the uploading account no longer exists",
        ),
        _ => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable, try again later",
        ),
    }
}

fn io_error(e: std::io::Error) -> Response {
    tracing::error!(error = %e, "cannot store an upload");
    if e.raw_os_error() == Some(28) {
        plain(
            StatusCode::INSUFFICIENT_STORAGE,
            "the server's disk is full",
        )
    } else {
        plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file")
    }
}

/// Stream the body into the blob store, hashing it on the way; returns
/// the written (uncommitted) object and the hash.
async fn receive(
    blobs: &dyn BlobStore,
    slot: &str,
    size: u64,
    body: Body,
) -> Result<(Box<dyn BlobWriter>, String), Response> {
    // Unique per request: two PUTs racing for one slot must not write into
    // one object (the loser's bytes would end up under the winner's hash).
    let mut writer = blobs
        .writer(&format!("{slot}.{}.part", new_id()))
        .await
        .map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    let mut stream = body.into_data_stream();
    let result: Result<(), Response> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|_| plain(StatusCode::BAD_REQUEST, "the upload was cut off"))?;
            got += chunk.len() as u64;
            if got > size {
                return Err(plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("this slot is for exactly {size} bytes"),
                ));
            }
            hasher.update(&chunk);
            writer.write(chunk).await.map_err(io_error)?;
        }
        if got != size {
            return Err(plain(
                StatusCode::BAD_REQUEST,
                &format!("got {got} of {size} bytes"),
            ));
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok((writer, hex::encode(hasher.finalize()))),
        Err(r) => {
            writer.abort().await;
            Err(r)
        }
    }
}

async fn get_file(
    State(state): State<ServerState>,
    method: Method,
    Path((slot, name)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if !is_slot(&slot) {
        return plain(StatusCode::NOT_FOUND, "no such file");
    }
    let upload = match state.store.upload_get(&slot).await {
        Ok(Some(u)) if u.filename == name => u,
        Ok(_) => return plain(StatusCode::NOT_FOUND, "no such file"),
        Err(e) => return store_failed(e),
    };
    if let Some((_, size)) = query.iter().find(|(k, _)| k == "thumb") {
        return get_thumb(&state, &upload, size, &method, &headers).await;
    }
    let etag = format!("\"{}\"", upload.sha256);
    let mut resp = immutable(&etag).header(header::ACCEPT_RANGES, "bytes");
    if not_modified(&headers, &etag) {
        return resp
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }
    // Media shows inline; anything else downloads, so an uploaded HTML page
    // never runs in this origin.
    let inline = ["image/", "audio/", "video/"]
        .iter()
        .any(|p| upload.content_type.starts_with(p))
        && upload.content_type != "image/svg+xml";
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        url_escape(&upload.filename)
    );
    let blobs = &state.modules.api::<Uploads>().blobs;
    if method == Method::GET {
        if let Some(url) = blobs
            .direct_url(&upload.sha256, &upload.content_type, &disposition)
            .await
        {
            // The storage serves the bytes (and ranges); the presigned URL
            // expires, so the redirect is cached for less than its life.
            let max_age = state.config.upload.s3.url_ttl_secs / 2;
            return Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, url)
                .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
                .header(header::CACHE_CONTROL, format!("private, max-age={max_age}"))
                .body(Body::empty())
                .unwrap_or_default();
        }
    }
    resp = resp
        .header(header::CONTENT_TYPE, &upload.content_type)
        .header(header::CONTENT_DISPOSITION, disposition);
    let size = upload.size;
    let (status, start, len) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => (StatusCode::OK, 0, size),
        Some(r) => match parse_range(r, size) {
            Some((s, e)) => {
                resp = resp.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{size}"));
                (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
            }
            None => {
                return resp
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(Body::empty())
                    .unwrap_or_default()
            }
        },
    };
    resp = resp.status(status).header(header::CONTENT_LENGTH, len);
    if method == Method::HEAD {
        return resp.body(Body::empty()).unwrap_or_default();
    }
    match blobs.read(&upload.sha256, start..start + len).await {
        Ok(Some(stream)) => resp.body(Body::from_stream(stream)).unwrap_or_default(),
        Ok(None) => {
            tracing::error!(slot = %upload.slot, "an upload's blob is missing");
            plain(StatusCode::NOT_FOUND, "no such file")
        }
        Err(e) => {
            tracing::warn!(slot = %upload.slot, error = %e, "cannot read an upload's blob");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage unavailable, try again later",
            )
        }
    }
}

/// The headers of content that never changes at its URL.
fn immutable(etag: &str) -> axum::http::response::Builder {
    Response::builder()
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox",
        )
}

fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// `GET …?thumb=N`: a JPEG preview of an image upload, made once (bounded
/// in pixels, bytes and time: `thumb`) and kept in the blob store.
async fn get_thumb(
    state: &ServerState,
    upload: &Upload,
    size: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Response {
    let refuse = |e: thumb::ThumbError| {
        let (status, text) = e.status();
        plain(status, text)
    };
    let size = size.parse::<u32>().unwrap_or(0);
    if !thumb::SIZES.contains(&size) {
        return refuse(thumb::ThumbError::BadSize(size));
    }
    if !thumb::thumbnailable(&upload.content_type) {
        return refuse(thumb::ThumbError::Unsupported);
    }
    if upload.size > thumb::MAX_INPUT {
        return refuse(thumb::ThumbError::TooLarge);
    }
    let etag = format!("\"{}-{size}\"", upload.sha256);
    let resp = immutable(&etag)
        .header(header::CONTENT_TYPE, thumb::CONTENT_TYPE)
        .header(header::CONTENT_DISPOSITION, "inline");
    if not_modified(headers, &etag) {
        return resp
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }
    let uploads = state.modules.api::<Uploads>();
    let key = thumb::cache_key(&upload.sha256, size);
    let unavailable = |e: std::io::Error| {
        tracing::warn!(error = %e, "cannot read for a preview");
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable, try again later",
        )
    };
    let jpeg = match read_all(&*uploads.blobs, &key, thumb::MAX_INPUT).await {
        Ok(Some(cached)) => cached,
        Ok(None) => {
            let original = match read_all(&*uploads.blobs, &upload.sha256, thumb::MAX_INPUT).await {
                Ok(Some(b)) => b,
                Ok(None) => return plain(StatusCode::NOT_FOUND, "no such file"),
                Err(e) => return unavailable(e),
            };
            let jpeg = match uploads
                .thumbs
                .make_bounded(original, &upload.content_type, size)
                .await
            {
                Ok(j) => j,
                Err(e) => return refuse(e),
            };
            if let Err(e) = uploads.blobs.put_small(&key, jpeg.clone().into()).await {
                tracing::warn!(error = %e, "cannot cache a preview");
            }
            jpeg
        }
        Err(e) => return unavailable(e),
    };
    let resp = resp.header(header::CONTENT_LENGTH, jpeg.len());
    if *method == Method::HEAD {
        return resp.body(Body::empty()).unwrap_or_default();
    }
    resp.body(Body::from(jpeg)).unwrap_or_default()
}

/// All of `key` (at most `cap` bytes), or None if there is no such object.
async fn read_all(blobs: &dyn BlobStore, key: &str, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    let Some(mut stream) = blobs.read(key, 0..cap).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(Some(out))
}

/// One `bytes=` range (the forms clients send) as inclusive (start, end).
fn parse_range(r: &str, size: u64) -> Option<(u64, u64)> {
    let spec = r.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let s: u64 = a.parse().ok()?;
        let e = if b.is_empty() {
            size - 1
        } else {
            b.parse::<u64>().ok()?.min(size - 1)
        };
        (s, e)
    };
    (start <= end && start < size).then_some((start, end))
}

// ---------------------------------------------------------------------------
// Files of removed messages
// ---------------------------------------------------------------------------

/// Slot ids are 32 lowercase hex digits (two `new_id`s).
fn is_slot(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The slot ids of this server's upload URLs in `text`.
fn linked_slots(text: &str) -> Vec<&str> {
    let marker = format!("{PREFIX}/");
    let mut out = Vec::new();
    for (i, _) in text.match_indices(&marker) {
        let rest = &text[i + marker.len()..];
        if let Some(slot) = rest.get(..32) {
            if is_slot(slot) && rest[32..].starts_with('/') && !out.contains(&slot) {
                out.push(slot);
            }
        }
    }
    out
}

/// How far back in a conversation a 1:1 retraction is looked for.
const RETRACT_LOOKBACK: usize = 500;

impl Uploads {
    /// `author` retracted their message `id` (its origin-id or id) to
    /// `peer`: release its files. The message is found in the author's
    /// archive, among the latest RETRACT_LOOKBACK of the conversation.
    async fn retracted_1to1(
        &self,
        state: &ServerState,
        author: &jid::BareJid,
        peer: &jid::BareJid,
        id: &str,
    ) {
        let mut q = natter_store::ArchiveQuery {
            with: Some(peer.to_string()),
            last_page: true,
            max: 100,
            ..Default::default()
        };
        let mut seen = 0;
        loop {
            let page = match state.store.archive_query(author.as_str(), &q).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look up a retracted message");
                    return;
                }
            };
            seen += page.items.len();
            let limits = natter_xml::Limits::default();
            let found = page.items.iter().rev().filter(|m| m.outgoing).find(|m| {
                natter_xml::parse_frame(m.stanza.as_bytes(), &limits).is_ok_and(|el| {
                    el.attr("id") == Some(id)
                        || el
                            .get_child("origin-id", vocab::NS_SID)
                            .and_then(|o| o.attr("id"))
                            == Some(id)
                })
            });
            if let Some(m) = found {
                super::api::Files::message_removed(self, state, &m.stanza, author).await;
                return;
            }
            match page.items.first() {
                Some(oldest) if !page.complete && seen < RETRACT_LOOKBACK => {
                    q.before_id = Some(oldest.id.clone());
                    q.last_page = false;
                }
                _ => return,
            }
        }
    }
}

#[async_trait]
impl super::api::Files for Uploads {
    async fn message_removed(&self, state: &ServerState, stanza: &str, author: &jid::BareJid) {
        for slot in linked_slots(stanza) {
            let upload = match state.store.upload_get(slot).await {
                Ok(Some(u)) if u.owner == author.as_str() => u,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look up a retracted message's file");
                    continue;
                }
            };
            let _placing = self.placing.lock().await;
            let gone = async {
                state.store.upload_delete(slot).await?;
                if !state.store.blob_referenced(&upload.sha256).await? {
                    if let Err(e) = delete_blob(&*self.blobs, &upload.sha256).await {
                        tracing::warn!(error = %e, "cannot delete a retracted file's blob");
                    }
                }
                Ok::<(), StoreError>(())
            }
            .await;
            if let Err(e) = gone {
                tracing::warn!(error = %e, "cannot delete a retracted message's file");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Expiry and blob garbage collection
// ---------------------------------------------------------------------------

async fn sweep_task(state: ServerState) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        if let Err(e) = sweep(&state).await {
            tracing::warn!(error = %e, "upload sweep failed");
        }
    }
}

/// Delete expired uploads, then blobs nothing refers to (older than the
/// grace period). Returns how many objects were deleted.
pub async fn sweep(state: &ServerState) -> anyhow::Result<usize> {
    sweep_older_than(state, GRACE).await
}

/// `sweep` with another grace period (tests).
pub async fn sweep_older_than(state: &ServerState, grace: Duration) -> anyhow::Result<usize> {
    let days = state.config.upload.expire_days;
    if days > 0 {
        let before = now_secs() - days as i64 * 86_400;
        loop {
            let old = state.store.uploads_before(before, 500).await?;
            if old.is_empty() {
                break;
            }
            for u in &old {
                state.store.upload_delete(&u.slot).await?;
            }
        }
    }
    let uploads = state.modules.api::<Uploads>();
    let mut deleted = 0;
    for obj in uploads.blobs.list().await? {
        let old = obj.modified.elapsed().is_ok_and(|age| age >= grace);
        if !old {
            continue;
        }
        // Leftovers of cut-off uploads; blobs nothing refers to, and
        // previews of them.
        let source = if obj.key.starts_with("tmp/") {
            None
        } else if let Some(thumb) = obj.key.strip_prefix("thumbs/") {
            Some(thumb.get(..64).unwrap_or_default())
        } else if blobs::is_blob_key(&obj.key) {
            Some(obj.key.as_str())
        } else {
            continue;
        };
        let _placing = uploads.placing.lock().await;
        if let Some(sha256) = source {
            if state.store.blob_referenced(sha256).await? {
                continue;
            }
        }
        uploads.blobs.delete(&obj.key).await?;
        deleted += 1;
    }
    Ok(deleted)
}

/// Delete a blob and its previews.
async fn delete_blob(blobs: &dyn BlobStore, sha256: &str) -> std::io::Result<()> {
    blobs.delete(sha256).await?;
    for size in thumb::SIZES {
        blobs.delete(&thumb::cache_key(sha256, *size)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_linked_from_a_message() {
        let a = "a".repeat(32);
        let b = "0123456789abcdef".repeat(2);
        let text = format!(
            "<body>see https://x/upload/{a}/p.jpg and http://y/upload/{b}/q%20r.png \
             https://x/upload/{a}/p.jpg /upload/short/x /upload/{a}x/y</body>"
        );
        assert_eq!(linked_slots(&text), vec![a.as_str(), b.as_str()]);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-4", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }

    #[test]
    fn names_and_types() {
        assert_eq!(clean_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(clean_name("C:\\x\\photo.jpg").as_deref(), Some("photo.jpg"));
        assert_eq!(clean_name("a?b#c%.txt").as_deref(), Some("a_b_c_.txt"));
        assert_eq!(clean_name("..."), None);
        assert_eq!(clean_name("\u{7}"), None);
        assert!(valid_type("image/jpeg"));
        assert!(valid_type("application/vnd.oasis.opendocument.text"));
        assert!(!valid_type("text/html; charset=utf-8"));
        assert!(!valid_type("image"));
        assert_eq!(url_escape("a b/ü.txt"), "a%20b%2F%C3%BC.txt");
    }
}
