//! Listeners: c2s with STARTTLS, c2s with direct TLS (XEP-0368), and HTTP
//! (WebSocket RFC 7395 at /xmpp-websocket, /health).

pub mod http;
pub mod tls;

use crate::c2s::transport::TcpTransport;
use crate::state::ServerState;
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

pub async fn bind(addr: &str, what: &str) -> anyhow::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))?;
    Ok(Some(l))
}

/// Accept c2s connections until shutdown. `direct_tls`: XEP-0368 port.
pub async fn accept_c2s(listener: TcpListener, state: ServerState, direct_tls: bool) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, never exit.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move { handle_tcp(sock, peer, state, direct_tls).await });
    }
}

async fn handle_tcp(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    state: ServerState,
    direct_tls: bool,
) {
    let _ = sock.set_nodelay(true);
    let Some(guard) = state.preauth.try_acquire(peer.ip()) else {
        tracing::info!(%peer, "too many unauthenticated connections from this address");
        return;
    };
    let limits = crate::c2s_limits(&state.config, false);
    let transport = if direct_tls {
        let acceptor = tokio_rustls::TlsAcceptor::from(state.tls.clone());
        let secs = state.config.c2s.preauth_timeout_secs;
        match tokio::time::timeout(Duration::from_secs(secs), acceptor.accept(sock)).await {
            Ok(Ok(s)) => TcpTransport::tls(s, peer, limits),
            _ => return,
        }
    } else {
        TcpTransport::plain(sock, peer, limits)
    };
    crate::c2s::serve(transport, state, guard).await;
}
