//! The admin endpoint (`/admin/*` on the HTTP listener) and its CLI client
//! (`natter admin sessions|kick|stats`).
//!
//! A request must come from a loopback address AND carry
//! `Authorization: Bearer <token>`, where the token is the random value the
//! server writes to `data_dir/admin.token` (mode 0600) each time it starts.
//! Whoever can read that file can act as the operator; nobody else can, not
//! even other local users.

use crate::error::{StreamCondition, StreamError};
use crate::state::ServerState;
use anyhow::Context;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TOKEN_FILE: &str = "admin.token";

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// Write a fresh random token to `data_dir/admin.token` (0600) and return it.
pub fn create_token(data_dir: &Path) -> anyhow::Result<String> {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    natter_store::files::private_dir(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = token_path(data_dir);
    natter_store::files::write_private(data_dir, TOKEN_FILE, format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write the admin token {}", path.display()))?;
    Ok(token)
}

// ---------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------

pub fn router(state: ServerState) -> Router<ServerState> {
    Router::new()
        .route("/admin/sessions", get(sessions))
        .route("/admin/kick", post(kick))
        .route("/admin/stats", get(stats))
        .route_layer(axum::middleware::from_fn_with_state(state, guard))
}

async fn guard(
    State(state): State<ServerState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !peer.ip().is_loopback() {
        return (StatusCode::FORBIDDEN, "admin endpoint: loopback only\n").into_response();
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    use subtle::ConstantTimeEq;
    let ok: bool = given
        .trim()
        .as_bytes()
        .ct_eq(state.admin_token.as_bytes())
        .into();
    if !ok {
        tracing::warn!(%peer, "admin request with a wrong or missing token");
        return (
            StatusCode::UNAUTHORIZED,
            "admin endpoint: bearer token from data_dir/admin.token required\n",
        )
            .into_response();
    }
    next.run(req).await
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn sessions(State(state): State<ServerState>) -> Json<Value> {
    let mut list: Vec<Value> = state
        .router
        .all()
        .iter()
        .map(|h| {
            let meta = state.metrics.session_meta(h.id);
            json!({
                "jid": h.jid.to_string(),
                "transport": meta.as_ref().map(|m| m.transport),
                "since": meta.as_ref().map(|m| unix(m.since)),
                "available": h.is_available(),
                "priority": h.priority(),
                "queued": h.queued(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["jid"].as_str().cmp(&b["jid"].as_str()));
    Json(json!({ "sessions": list }))
}

/// Body: a bare JID (all its sessions) or a full JID (that one).
async fn kick(State(state): State<ServerState>, body: String) -> Response {
    let target = match jid::Jid::new(body.trim()) {
        Ok(j) => j,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not a JID: {e}\n")).into_response();
        }
    };
    let mut kicked = Vec::new();
    for h in state.router.resources(&target.to_bare()) {
        if target.resource().is_none_or(|r| h.jid.resource() == r) {
            h.close(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "disconnected by the server administrator",
            ));
            kicked.push(h.jid.to_string());
        }
    }
    tracing::info!(target = %target, n = kicked.len(), "admin kick");
    Json(json!({ "kicked": kicked })).into_response()
}

async fn stats(State(state): State<ServerState>) -> Response {
    let accounts = match state.store.list_accounts(None).await {
        Ok(a) => a.len(),
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store unreachable: {e}\n"),
            )
                .into_response()
        }
    };
    let m = &state.metrics;
    let (stanzas_in, stanzas_out) = m.stanza_totals();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "domains": state.config.domains,
        "uptime_secs": m.uptime().as_secs(),
        "accounts": accounts,
        "sessions": state.router.count(),
        "sessions_by_transport": m.sessions_by_transport(),
        "stanzas_in": stanzas_in,
        "stanzas_out": stanzas_out,
    }))
    .into_response()
}

// ---------------------------------------------------------------------------
// CLI client
// ---------------------------------------------------------------------------

/// Where to reach the running server's HTTP listener from this machine:
/// `listen.http`, with an unspecified address (0.0.0.0, ::) made loopback.
async fn admin_addr(config: &crate::config::Config) -> anyhow::Result<SocketAddr> {
    let listen = &config.listen.http;
    if listen.is_empty() {
        anyhow::bail!("listen.http is disabled, so the admin endpoint is off");
    }
    let addr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("listen.http {listen:?}"))?
        .next()
        .with_context(|| format!("listen.http {listen:?} resolves to nothing"))?;
    Ok(match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    })
}

/// One request to the admin endpoint; the JSON answer.
pub async fn call(
    config: &crate::config::Config,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<Value> {
    let token_file = token_path(&config.data_dir);
    let token = std::fs::read_to_string(&token_file).with_context(|| {
        format!(
            "cannot read {} (is the server running with this data_dir, and may you read it?)",
            token_file.display()
        )
    })?;
    let addr = admin_addr(config).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        token.trim(),
        body.len()
    );
    let exchange = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        sock.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("no answer from the server at {addr}"))?
        .with_context(|| format!("cannot reach the server at {addr} (is it running?)"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP answer from {addr}"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        anyhow::bail!("server answered {status}: {}", body.trim());
    }
    if head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"))
    {
        anyhow::bail!("unexpected chunked answer from {addr}");
    }
    serde_json::from_str(body).with_context(|| format!("malformed JSON from {addr}"))
}

/// Print `natter admin sessions` as a table.
pub fn print_sessions(v: &Value) {
    print!("{}", format_sessions(v));
}

/// The sessions as a table whose columns fit their longest value (JIDs
/// are up to 3071 bytes; a fixed width misaligns every row after a long one).
pub fn format_sessions(v: &Value) -> String {
    let list = v["sessions"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no sessions\n".into();
    }
    let header = [
        "jid",
        "transport",
        "available",
        "queued",
        "priority",
        "connected since",
    ];
    let mut rows = vec![header.map(String::from)];
    for s in &list {
        let since = s["since"]
            .as_u64()
            .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        // Numbers as plain text: serde_json's Display ignores width and
        // alignment, which is what misaligned these columns.
        let number = |v: &Value| v.as_i64().map(|n| n.to_string()).unwrap_or_default();
        rows.push([
            s["jid"].as_str().unwrap_or("").to_string(),
            s["transport"].as_str().unwrap_or("?").to_string(),
            if s["available"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
            number(&s["queued"]),
            number(&s["priority"]),
            since,
        ]);
    }
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let (jid, transport, available, queued, priority, since) =
            (&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]);
        let [w0, w1, w2, w3, w4, _] = widths;
        out.push_str(
            format!("{jid:<w0$}  {transport:<w1$}  {available:<w2$}  {queued:>w3$}  {priority:>w4$}  {since}")
                .trim_end(),
        );
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::format_sessions;

    #[test]
    fn admin_sessions_columns_line_up_with_long_jids_and_numbers() {
        let long = format!("{}@localhost/{}", "a".repeat(40), "phone".repeat(6));
        let v = serde_json::json!({"sessions": [
            {"jid": "bob@localhost/r", "transport": "tcp", "available": true,
             "queued": 0, "priority": 5, "since": 1_700_000_000u64},
            {"jid": long, "transport": "websocket", "available": false,
             "queued": 12345, "priority": -1, "since": 1_700_000_000u64},
        ]});
        let out = format_sessions(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        // Every column starts (text columns) or ends (numbers) at the same
        // offset on every line.
        let at = |l: &str, word: &str| l.find(word).unwrap_or_else(|| panic!("{word} in {l}"));
        assert_eq!(at(lines[1], "tcp"), at(lines[0], "transport"), "{out}");
        assert_eq!(
            at(lines[2], "websocket"),
            at(lines[0], "transport"),
            "{out}"
        );
        assert_eq!(at(lines[1], "yes"), at(lines[0], "available"), "{out}");
        assert_eq!(at(lines[2], "no "), at(lines[0], "available"), "{out}");
        let end = |l: &str, word: &str| at(l, word) + word.len();
        assert_eq!(end(lines[2], "12345"), end(lines[0], "queued"), "{out}");
        assert_eq!(end(lines[1], " 0 "), end(lines[0], "queued") + 1, "{out}");
        assert_eq!(end(lines[2], "-1"), end(lines[0], "priority"), "{out}");
        assert_eq!(
            at(lines[1], "2023-"),
            at(lines[0], "connected since"),
            "{out}"
        );
        assert_eq!(
            at(lines[2], "2023-"),
            at(lines[0], "connected since"),
            "{out}"
        );
    }
}
