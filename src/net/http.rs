//! HTTP: the WebSocket endpoint (RFC 7395) and health probes.

use crate::c2s::transport::WsTransport;
use crate::state::ServerState;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/xmpp-websocket", get(websocket))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .with_state(state)
}

async fn ready(State(state): State<ServerState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unreachable: {e}\n"),
        )
            .into_response(),
    }
}

async fn websocket(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<ServerState>,
) -> Response {
    let Some(guard) = state.preauth.try_acquire(peer.ip()) else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many unauthenticated connections\n",
        )
            .into_response();
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
            crate::c2s::serve(WsTransport::new(socket, peer, limits), state, guard).await;
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
