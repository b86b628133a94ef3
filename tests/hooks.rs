//! The module API (issue 10): a module that touches no core file plugs in
//! a pre-route policy hook, a service on its own domain, an HTTP route and
//! event listeners, all declared as data, and the core runs them.

mod common;

use common::*;
use natter::config::Config;
use natter::error::{Condition, StanzaError};
use natter::modules::{Cx, Event, EventKind, Flow, Hook, HookStanza, Kind, Module, Service};
use natter::router::{Outbound, SessionHandle};
use natter::state::ServerState;
use parking_lot::Mutex;
use std::sync::Arc;

const SERVICE: &str = "echo.localhost";

/// Refuses messages saying "spam", echoes messages sent to its service,
/// serves one HTTP route and records the events it hears.
#[derive(Default)]
struct Probe {
    events: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Module for Probe {
    fn name(&self) -> &'static str {
        "test-probe"
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        // Above blocking (100): runs first.
        &[(Hook::PreRoute(Kind::Message), 200)]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[
            (EventKind::Authenticated, 0),
            (EventKind::Bound, 0),
            (EventKind::Available, 0),
            (EventKind::OfflineQueued, 0),
            (EventKind::Closed, 0),
        ]
    }
    fn services(&self, config: &Config) -> Vec<Service> {
        assert!(config.serves("localhost"));
        vec![Service {
            domain: SERVICE.into(),
            identity: ("component".into(), "generic".into(), "Echo".into()),
            listed: true,
        }]
    }
    fn http(&self) -> Option<axum::Router<ServerState>> {
        Some(axum::Router::new().route(
            "/test-probe",
            axum::routing::get(|| async { "probe says hi\n" }),
        ))
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        _cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        let body = s.stanza.child_text("body", natter_xml::NS_CLIENT);
        if body.as_deref() == Some("spam") {
            return Err(StanzaError::with_text(
                Condition::PolicyViolation,
                "no spam here",
            ));
        }
        Ok(Flow::Continue)
    }
    async fn on_event(
        &self,
        _state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        let who = match (event, session) {
            (Event::Authenticated { user }, _) => user.to_string(),
            (Event::OfflineQueued { user, .. }, _) => user.to_string(),
            (_, Some(h)) => h.jid.to_string(),
            (_, None) => String::new(),
        };
        self.events.lock().push(format!("{:?} {who}", event.kind()));
    }
    async fn service_stanza(
        &self,
        state: &ServerState,
        stanza: natter_xml::Element,
    ) -> Result<(), StanzaError> {
        if stanza.name != "message" {
            return Err(StanzaError::new(Condition::FeatureNotImplemented));
        }
        let from = stanza.attr("from").unwrap_or_default().to_string();
        let to: jid::FullJid = from
            .parse()
            .map_err(|_| StanzaError::new(Condition::JidMalformed))?;
        let mut echo = natter_xml::Element::new("message", natter_xml::NS_CLIENT)
            .with_attr("from", stanza.attr("to").unwrap_or(SERVICE))
            .with_attr("to", from)
            .with_attr("type", "chat");
        if let Some(b) = stanza.get_child("body", natter_xml::NS_CLIENT) {
            echo.append_child(b.clone());
        }
        state.routing.deliver(&to, &Outbound::new(&echo, 0));
        Ok(())
    }
}

#[tokio::test]
async fn a_module_plugs_in_hooks_a_service_a_route_and_events() {
    let probe = Arc::new(Probe::default());
    let srv = start_server_with(|_| {}, vec![probe.clone()]).await;
    let alice = srv.add_user("alice", "secret1").await;
    let bob = srv.add_user("bob", "secret2").await;
    let mut a = srv.login(&alice, "secret1", "phone").await;

    // The pre-route hook refuses before anything is routed or stored.
    a.send(&message(&bob, "spam")).await;
    let err = a.recv_until(|e| e.name == "message").await;
    assert_eq!(err.attr("type"), Some("error"), "{err}");
    assert!(err.to_string().contains("policy-violation"), "{err}");
    assert_eq!(srv.state().store.offline_count(&bob).await.unwrap(), 0);

    // Other messages pass the hook: bob is offline, so it is queued, and
    // the module hears of it.
    a.send(&message(&bob, "hello")).await;
    let pong = a
        .iq(xml("<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>"))
        .await;
    assert_eq!(pong.attr("type"), Some("result"));
    assert_eq!(srv.state().store.offline_count(&bob).await.unwrap(), 1);

    // The service on its own domain gets stanzas addressed to it.
    a.send(&message(SERVICE, "echo me")).await;
    let echo = a.recv_until(|e| e.name == "message").await;
    assert_eq!(echo.attr("from"), Some(SERVICE), "{echo}");
    assert_eq!(
        echo.child_text("body", natter_xml::NS_CLIENT).as_deref(),
        Some("echo me")
    );
    // ... and the server's disco#items lists it.
    let items = a
        .iq(xml(
            "<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
        ))
        .await;
    assert!(
        items.to_string().contains(&format!("jid=\"{SERVICE}\""))
            || items.to_string().contains(&format!("jid='{SERVICE}'")),
        "{items}"
    );

    // Its HTTP route is served next to the core's.
    let (status, _headers, body) = http_request(srv.http, "GET", "/test-probe", "").await;
    assert_eq!((status, body.as_str()), (200, "probe says hi\n"));

    drop(a);
    // Closed comes once the session has gone.
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    while !probe.events.lock().iter().any(|e| e.starts_with("Closed")) {
        assert!(tokio::time::Instant::now() < deadline, "no Closed event");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let events = probe.events.lock().clone();
    let expected = [
        format!("Authenticated {alice}"),
        format!("Bound {alice}/phone"),
        format!("OfflineQueued {bob}"),
        format!("Closed {alice}/phone"),
    ];
    let positions: Vec<usize> = expected
        .iter()
        .map(|e| {
            events
                .iter()
                .position(|x| x == e)
                .unwrap_or_else(|| panic!("no {e:?} in {events:?}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{events:?}");
    srv.stop().await;
}

#[tokio::test]
async fn a_message_to_an_unknown_service_domain_is_an_error_not_a_drop() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut a = srv.login(&alice, "secret1", "phone").await;
    a.send(&message("nothing.example.net", "anyone?")).await;
    let err = a.recv_until(|e| e.name == "message").await;
    assert_eq!(err.attr("type"), Some("error"), "{err}");
    assert!(err.to_string().contains("remote-server-not-found"), "{err}");
    srv.stop().await;
}
