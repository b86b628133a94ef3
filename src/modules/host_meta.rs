//! XEP-0156 Discovering Alternative XMPP Connection Methods (HTTP lookup):
//! `/.well-known/host-meta` (XRD) and `/.well-known/host-meta.json`
//! (JRD) point web clients to the WebSocket endpoint. The address is
//! `http.public_url` when set (natter behind a TLS proxy); otherwise the
//! request's Host header, over wss:// when a proxy says the request came
//! over HTTPS (`X-Forwarded-Proto`), ws:// else — the listener itself is
//! plain HTTP.

use super::Module;
use crate::state::ServerState;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use natter_xml::Element;

pub const REL_WEBSOCKET: &str = "urn:xmpp:alt-connections:websocket";
const NS_XRD: &str = "http://docs.oasis-open.org/ns/xri/xrd-1.0";
/// Where `src/net/http.rs` serves RFC 7395.
const WS_PATH: &str = "/xmpp-websocket";

pub struct HostMeta;

impl Module for HostMeta {
    fn name(&self) -> &'static str {
        "host_meta"
    }
    fn http(&self) -> Option<Router<ServerState>> {
        Some(
            Router::new()
                .route("/.well-known/host-meta", get(xrd))
                .route("/.well-known/host-meta.json", get(jrd)),
        )
    }
}

/// The WebSocket URL this request should be told about.
fn websocket_url(state: &ServerState, headers: &HeaderMap) -> String {
    let public = &state.config.http.public_url;
    if let Some(rest) = public.strip_prefix("https://") {
        return format!("wss://{}{WS_PATH}", rest.trim_end_matches('/'));
    }
    if let Some(rest) = public.strip_prefix("http://") {
        return format!("ws://{}{WS_PATH}", rest.trim_end_matches('/'));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // Only host[:port] characters: the value goes back into a URL.
    let host = header(header::HOST.as_str())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or(&state.config.domains[0]);
    let tls = header("x-forwarded-proto").is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let scheme = if tls { "wss" } else { "ws" };
    format!("{scheme}://{host}{WS_PATH}")
}

/// XEP-0156 §3.3: readable from web pages on any origin.
const CORS: (header::HeaderName, &str) = (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");

async fn xrd(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    let doc = Element::new("XRD", NS_XRD).with_child(
        Element::new("Link", NS_XRD)
            .with_attr("rel", REL_WEBSOCKET)
            .with_attr("href", websocket_url(&state, &headers)),
    );
    (
        [(header::CONTENT_TYPE, "application/xrd+xml"), CORS],
        format!("<?xml version='1.0' encoding='utf-8'?>\n{doc}\n"),
    )
        .into_response()
}

async fn jrd(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    let doc = serde_json::json!({
        "links": [{ "rel": REL_WEBSOCKET, "href": websocket_url(&state, &headers) }]
    });
    (
        [(header::CONTENT_TYPE, "application/json"), CORS],
        format!("{doc}\n"),
    )
        .into_response()
}
