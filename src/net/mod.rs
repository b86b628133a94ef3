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
    accept_each(&listener, &state, |sock, peer| {
        if let Some(conn) = connection(sock, peer, state.clone(), direct_tls) {
            state.tasks.spawn(conn);
        }
    })
    .await
}

/// Accept connections for a module's listener (`Module::listeners`) until
/// shutdown; each one goes to the module's `accept` in its own task.
pub async fn accept_module(listener: TcpListener, state: ServerState, module: usize, index: usize) {
    accept_each(&listener, &state, |sock, peer| {
        let _ = sock.set_nodelay(true);
        let m = state.modules.module(module).clone();
        let st = state.clone();
        state
            .tasks
            .spawn(async move { m.accept(&st, index, sock, peer).await });
    })
    .await
}

/// Hand each accepted connection to `each` until shutdown.
async fn accept_each(
    listener: &TcpListener,
    state: &ServerState,
    mut each: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
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
        each(sock, peer);
    }
}

/// A new c2s connection's task, or None when its address has too many
/// unauthenticated connections already.
pub(crate) fn connection(
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    state: ServerState,
    direct_tls: bool,
) -> Option<impl std::future::Future<Output = ()> + Send> {
    let _ = sock.set_nodelay(true);
    let guard = match state.preauth.try_acquire(peer.ip()) {
        Ok(g) => g,
        Err(why) => {
            tracing::info!(%peer, "{why}");
            return None;
        }
    };
    let limits = crate::c2s_limits(&state.config, false);
    let transport = if direct_tls {
        TcpTransport::direct_tls(sock, peer, limits)
    } else {
        TcpTransport::plain(sock, peer, limits)
    };
    Some(crate::c2s::serve(transport, state, guard))
}

#[cfg(test)]
mod tests {
    /// The size of the future a function returns, without calling it.
    fn future_size<F, A, B, C, D, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Option<Fut>,
    {
        std::mem::size_of::<Fut>()
    }

    /// An idle connection costs its task's future (plus tokio's task header,
    /// the whole rounded up to 128 bytes): negotiation, TLS handshakes and
    /// stanza handling must stay out of it (boxed), or every idle session
    /// pays for their largest state. 712 bytes when written (a 896-byte task).
    #[test]
    fn connection_task_future_is_small() {
        let size = future_size(super::connection);
        assert!(size <= 768, "connection task future is {size} bytes");
    }
}
