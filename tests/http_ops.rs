//! The operator's HTTP surface (issue 5): the chat page (and its fallback
//! when the npm assets are missing), /health, /ready, /metrics moving under
//! traffic, and the admin endpoint's token guard, listing, stats and kick.

mod common;

use common::*;
use std::net::SocketAddr;

/// (status, body) of one HTTP/1.1 request.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, method, path, headers).await;
    (status, body)
}

fn metric_opt(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn metric(text: &str, line_start: &str) -> f64 {
    metric_opt(text, line_start).unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

#[tokio::test]
async fn page_health_metrics_and_admin() {
    let nowhere = tempfile::tempdir().unwrap();
    let server = start_server(|c| c.http.web_root = nowhere.path().join("web")).await;
    let addr = server.http;

    let (st, body) = http(addr, "GET", "/", "").await;
    assert_eq!(st, 200, "a missing install is a page, not an error");
    assert!(body.contains("cd web &amp;&amp; npm ci"), "{body}");
    assert_eq!(http(addr, "GET", "/health", "").await.0, 200);
    assert_eq!(
        http(addr, "GET", "/ready", "").await,
        (200, "ready\n".into())
    );

    let (_, before) = http(addr, "GET", "/metrics", "").await;
    server.assert_healthy().await;
    let (mut a, _b) = server.logged_in_pair().await;
    let mut bad = Client::connect_tls(server.c2s_tls).await;
    let _ = bad
        .authenticate(
            natter_sasl::Mechanism::ScramSha256,
            a.bare_jid(),
            "not-the-password",
            None,
        )
        .await;
    let (st, after) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(st, 200);
    let moved = |name: &str| metric(&after, name) > metric_opt(&before, name).unwrap_or(0.0);
    assert!(
        moved("natter_stanzas_in_total{kind=\"message\"}"),
        "{after}"
    );
    assert!(moved("natter_stanzas_out_total{kind=\"message\"}"));
    assert!(moved("natter_routing_seconds_count{kind=\"message\"}"));
    assert!(moved("natter_store_seconds_count{op=\"credentials\"}"));
    assert!(metric(&after, "natter_sessions{transport=\"tls\"}") >= 2.0);
    assert!(
        metric(
            &after,
            "natter_auth_failures_total{condition=\"not-authorized\"}"
        ) >= 1.0
    );
    assert!(after.contains("natter_queue_depth "));

    // Admin: a token file only the owner can read, and nothing without it.
    let token_file = server.dir.path().join("admin.token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(http(addr, "GET", "/admin/stats", "").await.0, 401);
    let wrong = "Authorization: Bearer 0000\r\n";
    assert_eq!(http(addr, "GET", "/admin/stats", wrong).await.0, 401);

    let config = server.state().config.as_ref().clone();
    let mut cfg = config.clone();
    cfg.listen.http = addr.to_string();
    let stats = natter::admin::call(&cfg, "GET", "/admin/stats", "")
        .await
        .unwrap();
    assert!(stats["accounts"].as_u64().unwrap() >= 4, "{stats}");
    assert!(stats["sessions"].as_u64().unwrap() >= 2, "{stats}");
    let sessions = natter::admin::call(&cfg, "GET", "/admin/sessions", "")
        .await
        .unwrap();
    let list = sessions["sessions"].as_array().unwrap();
    assert!(list.iter().any(|s| s["jid"] == a.jid()), "{sessions}");
    assert!(list.iter().all(|s| s["transport"] == "tls"), "{sessions}");

    let kicked = natter::admin::call(&cfg, "POST", "/admin/kick", a.bare_jid())
        .await
        .unwrap();
    assert_eq!(kicked["kicked"][0], a.jid());
    assert_eq!(a.expect_stream_error().await, "policy-violation");
    server.stop().await;
}
