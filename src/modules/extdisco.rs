//! XEP-0215 External Service Discovery (`urn:xmpp:extdisco:2`): the
//! `[[external_services]]` of the configuration (STUN/TURN servers) for
//! the server's own users. `<services/>` lists them (optionally of one
//! `type`); a restricted service's credentials come only from
//! `<credentials/>`.
//!
//! Where credentials come from is the `Credentials` seam: today the
//! configured username/password; time-limited TURN credentials (a shared
//! secret, RFC 8489-style REST credentials) replace `Configured` there.

use super::{Cx, Iq, IqResult, IqType, Module, Target};
use crate::config::ExternalService;
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use jid::BareJid;
use natter_xml::Element;

pub const NS: &str = "urn:xmpp:extdisco:2";

/// Credentials handed to one user for one service.
pub struct Creds {
    pub username: String,
    pub password: String,
    /// XEP-0082 date-time after which they stop working, if they do.
    pub expires: Option<String>,
}

/// Where a service's credentials come from.
pub trait Credentials: Send + Sync {
    fn for_user(&self, service: &ExternalService, user: &BareJid) -> Option<Creds>;
}

/// The username and password written in the configuration.
pub struct Configured;

impl Credentials for Configured {
    fn for_user(&self, s: &ExternalService, _user: &BareJid) -> Option<Creds> {
        Some(Creds {
            username: s.username.clone()?,
            password: s.password.clone()?,
            expires: None,
        })
    }
}

pub struct ExtDisco {
    credentials: Box<dyn Credentials>,
}

impl Default for ExtDisco {
    fn default() -> Self {
        ExtDisco {
            credentials: Box::new(Configured),
        }
    }
}

#[async_trait]
impl Module for ExtDisco {
    fn name(&self) -> &'static str {
        "extdisco"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "services"), (NS, "credentials")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        // Sessions are the server's own authenticated users; the services
        // are the server's, not an account's.
        if !matches!(iq.target, Target::Server(_)) {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        }
        if iq.kind != IqType::Get {
            return Err(StanzaError::new(Condition::NotAllowed));
        }
        let all = &cx.state.config.external_services;
        let user = iq.from.to_bare();
        let q = iq.payload();
        if q.name == "services" {
            let mut out = Element::new("services", NS);
            if let Some(t) = q.attr("type") {
                out.set_attr("type", t);
            }
            for s in all
                .iter()
                .filter(|s| q.attr("type").is_none_or(|t| t == s.kind))
            {
                let creds = (!s.restricted)
                    .then(|| self.credentials.for_user(s, &user))
                    .flatten();
                out.append_child(service(s, creds));
            }
            return Ok(Some(out));
        }
        // XEP-0215 §3.3: credentials for one service, by host and type
        // (and port, when given).
        let wanted = q
            .get_child("service", NS)
            .ok_or_else(|| StanzaError::new(Condition::BadRequest))?;
        let found = all.iter().find(|s| {
            wanted.attr("host") == Some(s.host.as_str())
                && wanted.attr("type") == Some(s.kind.as_str())
                && wanted
                    .attr("port")
                    .is_none_or(|p| s.port.is_some_and(|sp| sp.to_string() == p))
        });
        let Some(s) = found else {
            return Err(StanzaError::new(Condition::ItemNotFound));
        };
        let creds = self.credentials.for_user(s, &user);
        Ok(Some(
            Element::new("credentials", NS).with_child(service(s, creds)),
        ))
    }
}

/// One `<service/>`, with credentials when given.
fn service(s: &ExternalService, creds: Option<Creds>) -> Element {
    let mut e = Element::new("service", NS)
        .with_attr("type", s.kind.clone())
        .with_attr("host", s.host.clone());
    let optional = [
        ("port", s.port.map(|p| p.to_string())),
        ("transport", s.transport.clone()),
        ("name", s.name.clone()),
        ("restricted", s.restricted.then(|| "true".to_string())),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            e.set_attr(k, v);
        }
    }
    if let Some(c) = creds {
        e.set_attr("username", c.username);
        e.set_attr("password", c.password);
        if let Some(x) = c.expires {
            e.set_attr("expires", x);
        }
    }
    e
}
