//! HTTP: the WebSocket endpoint (RFC 7395), the web chat page (Converse.js
//! at `/`, its assets under `/dist`), health probes, Prometheus metrics and
//! the admin endpoint (`crate::admin`).

use crate::c2s::transport::WsTransport;
use crate::state::ServerState;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub fn router(state: ServerState) -> Router {
    let dist = converse_dist(&state.config.http.web_root);
    Router::new()
        .route("/", get(index))
        .route("/xmpp-websocket", get(websocket))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest_service("/dist", tower_http::services::ServeDir::new(dist))
        .merge(crate::admin::router(state.clone()))
        // Routes modules declare (`Module::http`).
        .merge(state.modules.http())
        .with_state(state)
}

/// Where the installed Converse.js build lives under `http.web_root`.
pub fn converse_dist(web_root: &Path) -> PathBuf {
    web_root.join("node_modules/converse.js/dist")
}

/// Whether `npm ci` has installed the chat page's assets under `web_root`.
pub fn assets_installed(web_root: &Path) -> bool {
    converse_dist(web_root).join("converse.min.js").is_file()
}

/// The chat page; the server fills in its domain and registration setting.
const PAGE: &str = include_str!("../../web/index.html");

async fn index(State(state): State<ServerState>) -> Response {
    let root = &state.config.http.web_root;
    if !assets_installed(root) {
        return Html(missing_assets_page(root)).into_response();
    }
    let cfg = serde_json::json!({
        "domain": state.config.domains[0],
        "registration": state.config.registration_enabled(),
    });
    // Inside <script>: keep `</script>` and friends from ending it.
    let cfg = cfg.to_string().replace('<', "\\u003c");
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Html(PAGE.replace("__NATTER_CONFIG__", &cfg)),
    )
        .into_response()
}

fn missing_assets_page(web_root: &Path) -> String {
    let abs = std::path::absolute(web_root).unwrap_or_else(|_| web_root.to_path_buf());
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>natter</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}\
         code,pre{{background:#f2f2f2;padding:.2em .4em}}</style></head><body>\
         <h1>natter</h1><p>The server is running, but the web chat page's files are not \
         installed.</p><p>Install them once (needs Node.js and npm), from the natter source \
         directory:</p><pre>cd web &amp;&amp; npm ci</pre><p>then reload this page. natter \
         looks for them in <code>{}</code> (the <code>http.web_root</code> setting, \
         now <code>{}</code>; relative to the directory natter was started in).</p>\
         <p>Desktop and mobile XMPP apps can connect meanwhile.</p></body></html>\n",
        esc(&converse_dist(&abs).display().to_string()),
        esc(&web_root.display().to_string()),
    )
}

async fn metrics(State(state): State<ServerState>) -> Response {
    crate::disk::refresh(&state);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.router),
    )
        .into_response()
}

/// 200 while the store answers reads and its writes succeed (and, in a
/// cluster, NATS is connected); 503 naming the cause
/// otherwise (e.g. a full disk), so a load balancer sends new clients elsewhere. It turns
/// 200 again by itself: with no traffic, `writable` probes with a write of its own.
async fn ready(State(state): State<ServerState>) -> Response {
    if state.cluster.as_ref().is_some_and(|c| !c.connected()) {
        let why = "NATS unreachable (cluster.nats_url)\n";
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    let unready = match state.store.ping().await {
        Err(e) => format!("store unreachable: {e}\n"),
        Ok(()) => match state.store.writable().await {
            Ok(()) => return (StatusCode::OK, "ready\n").into_response(),
            Err(e) => format!("store writes failing: {e}\n"),
        },
    };
    (StatusCode::SERVICE_UNAVAILABLE, unready).into_response()
}

async fn websocket(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<ServerState>,
) -> Response {
    let guard = match state.preauth.try_acquire(peer.ip()) {
        Ok(g) => g,
        Err(why) => return (StatusCode::TOO_MANY_REQUESTS, format!("{why}\n")).into_response(),
    };
    // The stanza limit is enforced on each frame by the c2s parser, which
    // answers with a policy-violation stream error. The WebSocket layer's
    // own cap (which can only drop the connection) sits above it.
    let max = state.config.limits.max_stanza_bytes.saturating_mul(2);
    ws.protocols(["xmpp"])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let limits = crate::c2s_limits(&state.config, false);
            // axum spawned this task; shutdown waits for it like any session.
            let tasks = state.tasks.clone();
            let serve = crate::c2s::serve(WsTransport::new(socket, peer, limits), state, guard);
            tasks.track_future(serve).await;
        })
}

pub async fn serve(listener: tokio::net::TcpListener, state: ServerState) {
    let shutdown = state.shutdown.clone();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "HTTP listener failed");
    }
}
