//! Protocol modules, one file per XEP family. A module declares its disco
//! features, the IQ payloads it answers and the stream features it offers
//! as data; `Modules` builds the dispatch table from those declarations.
//!
//! Invariant: every stanza reaching a module has a `from` stamped by the
//! c2s session (the sender's full JID) and a syntactically valid `to`.

pub mod api;
pub mod blocking;
mod cache;
pub mod carbons;
pub mod cluster;
pub mod component;
pub mod contact;
pub mod disco;
pub mod extdisco;
pub mod hooks;
pub mod host_meta;
pub mod last;
pub mod mam;
pub mod message;
pub mod muc;
pub mod multicast;
pub mod offline;
pub mod pep;
pub mod ping;
pub mod presence;
pub mod private;
pub mod push;
pub mod register;
pub mod roster;
pub mod s2s;
pub mod stories;
pub mod upload;
pub mod vcard;
pub mod version;
pub mod vocab;

use crate::config::Config;
use crate::error::{Condition, StanzaError};
use crate::jids::Bare;
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_xml::{Element, NS_CLIENT};
use std::sync::Arc;

pub use hooks::{Event, EventKind, Flow, Hook, HookStanza, Kind, SentCopy, Service, Shared};

/// Who an IQ is for, once routing decided the server answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The server itself (no `to`, or `to` = a served domain).
    Server(String),
    /// An account hosted here, answered by the server on its behalf
    /// (RFC 6120 §10.5.3.1: `to` absent means the sender's own account for
    /// account-level namespaces such as roster and vCard).
    Account(BareJid),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IqType {
    Get,
    Set,
}

/// A request IQ for a module: the whole stanza plus what routing found.
pub struct Iq {
    pub stanza: Element,
    pub kind: IqType,
    pub from: FullJid,
    pub target: Target,
}

impl Iq {
    pub fn payload(&self) -> &Element {
        self.stanza
            .children()
            .next()
            .expect("dispatch checked one payload")
    }

    /// True when the IQ targets the sender's own account (or the server
    /// with no `to`, which RFC 6120 treats as the account).
    pub fn is_own_account(&self) -> bool {
        match &self.target {
            Target::Account(b) => *b == self.from.bare(),
            Target::Server(_) => self.stanza.attr("to").is_none(),
        }
    }
}

/// The requesting session and the server.
pub struct Cx<'a> {
    pub state: &'a ServerState,
    pub session: &'a Arc<SessionHandle>,
}

/// (namespace, element name) of an IQ payload.
pub type PayloadKey = (&'static str, &'static str);

pub type IqResult = Result<Option<Element>, StanzaError>;

/// XEP-0030 identity: category, type, name.
pub type Identity = (&'static str, &'static str, &'static str);

/// A background task a module runs for the server's lifetime.
pub type Task = futures::future::BoxFuture<'static, ()>;

/// A task running `round` every `period` until shutdown (sweeps).
pub fn periodic<F>(state: ServerState, period: std::time::Duration, mut round: F) -> Task
where
    F: FnMut(ServerState) -> Task + Send + 'static,
{
    Box::pin(async move {
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            round(state.clone()).await;
        }
    })
}

/// A capability. Everything it adds to the server is declared by the
/// methods below (all optional) and read once when `Modules` is built:
/// the core never names a module.
#[async_trait]
pub trait Module: Send + Sync + 'static {
    /// Names the module in logs and `depends` lists.
    fn name(&self) -> &'static str;
    /// Modules that must be registered too (checked at start).
    fn depends(&self) -> &'static [&'static str] {
        &[]
    }
    /// disco#info features this module adds to the server.
    fn features(&self) -> &'static [&'static str] {
        &[]
    }
    /// disco#info features this module adds to each account (bare JID).
    fn account_features(&self) -> &'static [&'static str] {
        &[]
    }
    /// disco#info identities this module adds to the server.
    fn identities(&self) -> &'static [Identity] {
        &[]
    }
    /// disco#info identities this module adds to each account.
    fn account_identities(&self) -> &'static [Identity] {
        &[]
    }
    /// IQ payloads this module answers: (namespace, element name).
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
    /// XEP-0128 extended disco#info forms (`jabber:x:data`, type result)
    /// this module adds to the server, from the configuration; they count
    /// in the server's XEP-0115 verification string.
    fn server_info_forms(&self, _config: &Config) -> Vec<Element> {
        Vec::new()
    }
    /// Stream features offered after authentication.
    fn stream_features(&self) -> Vec<Element> {
        Vec::new()
    }
    /// Stanza hooks this module runs at, with priorities (higher first).
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[]
    }
    /// Events this module listens to, with priorities (higher first).
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[]
    }
    /// Services on their own domains that this module answers for.
    fn services(&self, _config: &Config) -> Vec<Service> {
        Vec::new()
    }
    /// HTTP routes this module serves (merged into the HTTP listener).
    fn http(&self) -> Option<axum::Router<ServerState>> {
        None
    }
    /// Interfaces this module offers other modules (`Modules::api`), and
    /// its own state for its free functions (by its concrete type).
    fn provide(self: Arc<Self>, _shared: &mut Shared) {}
    /// Load or create what the module keeps on disk (keys), once at start
    /// before anything is served; an error stops the start, naming why.
    fn prepare(&self, _config: &Config) -> anyhow::Result<()> {
        Ok(())
    }
    /// Background tasks, spawned at start and ended at shutdown.
    fn tasks(&self, _state: &ServerState) -> Vec<Task> {
        Vec::new()
    }
    /// TCP listeners this module serves: (what, for logs and errors;
    /// address). Bound at start, which fails naming them if one can't be.
    fn listeners(&self, _config: &Config) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// A connection accepted on listener `index` (of `listeners`); runs in
    /// its own task for as long as the connection lives.
    async fn accept(
        &self,
        _state: &ServerState,
        _index: usize,
        _socket: tokio::net::TcpStream,
        _peer: std::net::SocketAddr,
    ) {
    }
    async fn handle_iq(&self, _cx: &Cx<'_>, _iq: &Iq) -> IqResult {
        Err(StanzaError::new(Condition::FeatureNotImplemented))
    }
    /// A stanza at one of the hooks this module declared.
    async fn on_stanza(
        &self,
        _hook: Hook,
        _cx: &Cx<'_>,
        _s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        Ok(Flow::Continue)
    }
    /// An event this module declared; `session` is the session it is about
    /// (None for events that belong to no session).
    async fn on_event(
        &self,
        _state: &ServerState,
        _session: Option<&Arc<SessionHandle>>,
        _event: &Event<'_>,
    ) {
    }
    /// Whether this module's services keep each entity (`name@service`,
    /// e.g. a room) in memory: in a cluster, an entity's stanzas are then
    /// all handled on one node, its owner (`Routing::owner`).
    fn one_writer_per_entity(&self) -> bool {
        false
    }
    /// A stanza addressed to one of this module's services (`from` is
    /// stamped). An error is returned to the sender.
    async fn service_stanza(
        &self,
        _state: &ServerState,
        _stanza: Element,
    ) -> Result<(), StanzaError> {
        Err(StanzaError::new(Condition::ServiceUnavailable))
    }
    /// XEP-0030 items this module lists for an account (`owner`), as seen
    /// by the requesting session.
    async fn account_items(
        &self,
        _cx: &Cx<'_>,
        _owner: &BareJid,
    ) -> Result<Vec<Element>, StanzaError> {
        Ok(Vec::new())
    }
    /// disco#info of a node of an account, if this module owns `node`.
    async fn account_node_info(
        &self,
        _cx: &Cx<'_>,
        _owner: &BareJid,
        _node: &str,
    ) -> Option<IqResult> {
        None
    }
}

pub struct Modules {
    list: Vec<Arc<dyn Module>>,
    /// (namespace, element) → module; a handful of entries, scanned linearly.
    iq: Vec<(PayloadKey, usize)>,
    hooks: hooks::Table<Hook>,
    events: hooks::Table<EventKind>,
    /// Service domain → module.
    services: Vec<(Service, usize)>,
    /// Every module's server disco#info forms (fixed by the configuration).
    forms: Vec<Element>,
    shared: Shared,
}

impl Modules {
    /// Register `list`. Panics on a conflict (two modules claiming one IQ
    /// payload or service domain, a missing dependency): a programming
    /// error found at start.
    pub fn new(config: &Config, list: Vec<Arc<dyn Module>>) -> Self {
        let mut iq: Vec<(PayloadKey, usize)> = Vec::new();
        let mut hooks = hooks::Table::default();
        let mut events = hooks::Table::default();
        let mut services: Vec<(Service, usize)> = Vec::new();
        let mut shared = Shared::default();
        let mut forms = Vec::new();
        for (i, m) in list.iter().enumerate() {
            forms.extend(m.server_info_forms(config));
            for key in m.iq_payloads() {
                assert!(
                    iq.iter().all(|(k, _)| k != key),
                    "two modules claim IQ payload {key:?}"
                );
                iq.push((*key, i));
            }
            for (h, prio) in m.hooks() {
                hooks.add(*h, *prio, i);
            }
            for (e, prio) in m.events() {
                events.add(*e, *prio, i);
            }
            for s in m.services(config) {
                assert!(
                    services.iter().all(|(t, _)| t.domain != s.domain),
                    "two services on {}",
                    s.domain
                );
                services.push((s, i));
            }
            for d in m.depends() {
                assert!(
                    list.iter().any(|o| o.name() == *d),
                    "module {} needs module {d}",
                    m.name()
                );
            }
            m.clone().provide(&mut shared);
        }
        Modules {
            list,
            iq,
            hooks,
            events,
            services,
            forms,
            shared,
        }
    }

    /// The modules natter runs.
    pub fn standard(config: &Config) -> Self {
        Self::with(config, Vec::new())
    }

    /// The standard modules and `extra` (tests, embedders).
    pub fn with(config: &Config, extra: Vec<Arc<dyn Module>>) -> Self {
        let mut list: Vec<Arc<dyn Module>> = vec![
            Arc::new(cluster::ClusterGate),
            Arc::new(disco::Disco),
            Arc::new(ping::Ping),
            Arc::new(roster::Roster::default()),
            Arc::new(presence::Presence),
            Arc::new(message::Messages),
            Arc::new(multicast::Multicast),
            Arc::new(mam::Mam::default()),
            Arc::new(offline::Offline::default()),
            Arc::new(carbons::Carbons),
            Arc::new(vcard::VCard),
            Arc::new(register::Register),
            Arc::new(version::Version),
            Arc::new(blocking::Blocking::default()),
            Arc::new(pep::Pep::default()),
            Arc::new(last::Last::default()),
            Arc::new(private::Private),
            Arc::new(host_meta::HostMeta),
            Arc::new(contact::ContactAddresses),
            Arc::new(extdisco::ExtDisco::default()),
            Arc::new(component::Components::default()),
            Arc::new(muc::Muc::default()),
            Arc::new(upload::Uploads::new(config)),
            Arc::new(stories::Stories::default()),
            Arc::new(push::Push::default()),
            Arc::new(s2s::S2s::default()),
        ];
        list.extend(extra);
        Self::new(config, list)
    }

    /// An interface some module provides (see `api`).
    pub fn api<T: ?Sized + Send + Sync + 'static>(&self) -> Arc<T> {
        self.shared.get::<T>().unwrap_or_else(|| {
            panic!(
                "no module provides {} (a missing module in Modules::with)",
                std::any::type_name::<T>()
            )
        })
    }

    /// The same, when the interface is optional.
    pub fn try_api<T: ?Sized + Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.shared.get::<T>()
    }

    fn sorted<T: Ord + Copy + 'static>(
        &self,
        f: impl Fn(&Arc<dyn Module>) -> &'static [T],
    ) -> Vec<T> {
        let mut v: Vec<T> = self.list.iter().flat_map(&f).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn features(&self) -> Vec<&'static str> {
        self.sorted(|m| m.features())
    }

    pub fn account_features(&self) -> Vec<&'static str> {
        self.sorted(|m| m.account_features())
    }

    /// In registration order (clients take the first as the main one).
    pub fn identities(&self) -> Vec<Identity> {
        self.in_order(|m| m.identities())
    }

    pub fn account_identities(&self) -> Vec<Identity> {
        self.in_order(|m| m.account_identities())
    }

    fn in_order<T: PartialEq + Copy + 'static>(
        &self,
        f: impl Fn(&Arc<dyn Module>) -> &'static [T],
    ) -> Vec<T> {
        let mut v: Vec<T> = Vec::new();
        for x in self.list.iter().flat_map(&f) {
            if !v.contains(x) {
                v.push(*x);
            }
        }
        v
    }

    /// XEP-0128 forms in the server's disco#info.
    pub fn server_info_forms(&self) -> &[Element] {
        &self.forms
    }

    /// XEP-0115 `<c/>` of the server, for stream features.
    pub fn caps_element(&self) -> Element {
        disco::caps_element(self)
    }

    pub fn stream_features(&self) -> Vec<Element> {
        self.list.iter().flat_map(|m| m.stream_features()).collect()
    }

    /// Every module's `prepare`, in order; the first error stops.
    pub fn prepare(&self, config: &Config) -> anyhow::Result<()> {
        self.list.iter().try_for_each(|m| m.prepare(config))
    }

    /// Every module's HTTP routes, merged.
    pub fn http(&self) -> axum::Router<ServerState> {
        self.list
            .iter()
            .filter_map(|m| m.http())
            .fold(axum::Router::new(), |r, m| r.merge(m))
    }

    /// Every module's background tasks.
    pub fn tasks(&self, state: &ServerState) -> Vec<Task> {
        self.list.iter().flat_map(|m| m.tasks(state)).collect()
    }

    /// Every module's listeners: (module, index in its list, what, address).
    pub fn listeners(&self, config: &Config) -> Vec<(usize, usize, &'static str, String)> {
        let mut out = Vec::new();
        for (m, module) in self.list.iter().enumerate() {
            for (i, (what, addr)) in module.listeners(config).into_iter().enumerate() {
                out.push((m, i, what, addr));
            }
        }
        out
    }

    /// The module at `index` in registration order.
    pub fn module(&self, index: usize) -> &Arc<dyn Module> {
        &self.list[index]
    }

    /// The services hosted here (server disco#items).
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().map(|(s, _)| s)
    }

    /// The module serving `domain`, if it is a service domain.
    fn service(&self, domain: &str) -> Option<&Arc<dyn Module>> {
        self.services
            .iter()
            .find(|(s, _)| s.domain == domain)
            .map(|(_, i)| &self.list[*i])
    }

    /// Whether `domain` is a service hosted here.
    pub fn is_service(&self, domain: &str) -> bool {
        self.service(domain).is_some()
    }

    /// Hand `stanza` to the service of its `to` domain, if there is one
    /// (None: not a service). In a cluster, an entity of a service that
    /// keeps it in memory is served by its owner node: the stanza goes
    /// there, and its errors come back from there.
    pub async fn to_service(
        &self,
        state: &ServerState,
        stanza: Element,
    ) -> Option<Result<(), StanzaError>> {
        let (to, m) = self.service_for(&stanza)?;
        if m.one_writer_per_entity() && to.node().is_some() {
            if let (Some(owner), Some(c)) =
                (state.routing.owner(to.bare().as_str()), &state.cluster)
            {
                // Boxed: a NATS request's state is over 1 KiB, and it would
                // otherwise be part of every routed stanza's future.
                let r = crate::cluster::routing::forward_to_service(state, c, &owner, &stanza);
                return Some(Box::pin(r).await);
            }
        }
        Some(m.service_stanza(state, stanza).await)
    }

    /// `to_service` on this node, whoever owns the entity (a stanza
    /// another node forwarded here as the owner: never forwarded again).
    pub async fn to_service_here(
        &self,
        state: &ServerState,
        stanza: Element,
    ) -> Option<Result<(), StanzaError>> {
        let (_, m) = self.service_for(&stanza)?;
        Some(m.service_stanza(state, stanza).await)
    }

    /// The stanza's `to` and the module serving its domain, if a service.
    fn service_for(&self, stanza: &Element) -> Option<(Jid, &Arc<dyn Module>)> {
        let to = stanza.attr("to").and_then(|t| Jid::new(t).ok())?;
        let m = self.service(to.domain().as_str())?;
        Some((to, m))
    }

    /// Run the stanza hooks at `hook`, in priority order, until one stops.
    pub async fn run(
        &self,
        hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        for i in self.hooks.at(hook) {
            if self.list[i].on_stanza(hook, cx, s).await? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Tell every listener of `event`'s kind, in priority order.
    pub async fn emit(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        for i in self.events.at(event.kind()) {
            self.list[i].on_event(state, session, event).await;
        }
    }

    /// Every module's disco#items for an account.
    pub async fn account_items(
        &self,
        cx: &Cx<'_>,
        owner: &BareJid,
    ) -> Result<Vec<Element>, StanzaError> {
        let mut items = Vec::new();
        for m in &self.list {
            items.extend(m.account_items(cx, owner).await?);
        }
        Ok(items)
    }

    /// disco#info of an account's node, from the module that owns it.
    pub async fn account_node_info(&self, cx: &Cx<'_>, owner: &BareJid, node: &str) -> IqResult {
        for m in &self.list {
            if let Some(r) = m.account_node_info(cx, owner, node).await {
                return r;
            }
        }
        Err(StanzaError::new(Condition::ItemNotFound))
    }

    fn iq_module(&self, payload: &Element) -> Option<&Arc<dyn Module>> {
        self.iq
            .iter()
            .find(|((ns, name), _)| *ns == payload.ns && *name == payload.name)
            .map(|(_, i)| &self.list[*i])
    }
}

/// Handle one stanza from a bound session. `from` is already stamped.
pub async fn dispatch(cx: &Cx<'_>, stanza: Element) {
    if let Err(e) = route(cx, &stanza).await {
        cx.state.metrics.stanza_error(&e);
        // Never answer an error with an error (RFC 6120 §8.3.1).
        if stanza.attr("type") != Some("error") {
            cx.session.send(e.reply_to(&stanza));
        }
    }
}

/// Pre-route hooks, then services, then the core routes by kind.
async fn route(cx: &Cx<'_>, stanza: &Element) -> Result<(), StanzaError> {
    let Some(kind) = Kind::of(stanza) else {
        return Ok(());
    };
    let modules = &cx.state.modules;
    if kind == Kind::Iq && matches!(stanza.attr("type"), Some("result" | "error")) {
        // Answers to the server's own requests are consumed here.
        let s = HookStanza::new(stanza, None);
        if modules.run(Hook::IqReply, cx, &s).await? == Flow::Stop {
            return Ok(());
        }
    }
    let to = parse_to(stanza)?;
    if pre_route(cx, kind, stanza, to.as_ref()).await? == Flow::Stop {
        return Ok(());
    }
    // Checked on the parsed `to` first: most stanzas are not for a service,
    // and handing one over takes a copy.
    if to
        .as_ref()
        .is_some_and(|t| modules.is_service(t.domain().as_str()))
    {
        if let Some(r) = modules.to_service(cx.state, stanza.clone()).await {
            return r;
        }
    }
    // Messages and presence to remote domains go through their modules
    // (archive, carbons, roster), which hand them to `api::Remote`.
    if kind == Kind::Iq {
        if let Some(remote) = to.as_ref().and_then(|t| remote_for(cx.state, t)) {
            return remote.send(cx.state, stanza);
        }
    }
    match kind {
        Kind::Iq => handle_iq(cx, stanza, to).await,
        Kind::Message | Kind::Presence => {
            modules
                .run(Hook::Route(kind), cx, &HookStanza::new(stanza, to.as_ref()))
                .await?;
            Ok(())
        }
    }
}

async fn pre_route(
    cx: &Cx<'_>,
    kind: Kind,
    stanza: &Element,
    to: Option<&Jid>,
) -> Result<Flow, StanzaError> {
    let s = HookStanza::new(stanza, to);
    cx.state.modules.run(Hook::PreRoute(kind), cx, &s).await
}

/// Route messages from one session in order, as `dispatch` would one by
/// one, but letting the message router write them durably together (one
/// group commit). Returns each message's outcome, in order.
pub async fn dispatch_messages(cx: &Cx<'_>, msgs: Vec<Element>) -> Vec<Result<(), StanzaError>> {
    let modules = &cx.state.modules;
    let Some(batch) = modules.try_api::<dyn api::MessageBatch>() else {
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            out.push(route(cx, &m).await);
        }
        return out;
    };
    // Pre-route and services first; what is left goes as one batch.
    let mut out: Vec<Option<Result<(), StanzaError>>> = Vec::with_capacity(msgs.len());
    let mut rest = Vec::with_capacity(msgs.len());
    for m in msgs {
        let to = match parse_to(&m) {
            Ok(t) => t,
            Err(e) => {
                out.push(Some(Err(e)));
                continue;
            }
        };
        match pre_route(cx, Kind::Message, &m, to.as_ref()).await {
            Err(e) => out.push(Some(Err(e))),
            Ok(Flow::Stop) => out.push(Some(Ok(()))),
            Ok(Flow::Continue) => {
                let served = match &to {
                    Some(t) if modules.is_service(t.domain().as_str()) => {
                        modules.to_service(cx.state, m).await
                    }
                    _ => {
                        rest.push((m, to));
                        None
                    }
                };
                out.push(served);
            }
        }
    }
    let mut routed = batch.route_many(cx, rest).await.into_iter();
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| routed.next().expect("one result per message")))
        .collect()
}

/// XEP-0191: whether presence (or a PEP notification) from `from` may
/// reach session `to` (always, when no block list module is loaded).
pub async fn presence_allowed(state: &ServerState, from: &Jid, to: &SessionHandle) -> bool {
    match state.modules.try_api::<dyn api::Blocklist>() {
        Some(b) => b.presence_allowed(state, from, to).await,
        None => true,
    }
}

/// XEP-0191: whether presence from `from` may go to `to`, a JID without a
/// session here (a remote contact).
pub async fn presence_allowed_to(state: &ServerState, from: &Jid, to: &Jid) -> bool {
    match state.modules.try_api::<dyn api::Blocklist>() {
        Some(b) => b.allowed(state, from, to).await,
        None => true,
    }
}

/// Federation, when `to` is a domain neither served nor a service here
/// and s2s runs (RFC 6120 §10.4: a remote domain).
pub fn remote_for(state: &ServerState, to: &Jid) -> Option<Arc<dyn api::Remote>> {
    let d = to.domain().as_str();
    if state.serves(d) || state.modules.is_service(d) {
        return None;
    }
    state
        .modules
        .try_api::<dyn api::Remote>()
        .filter(|r| r.enabled(state))
}

/// Parse the `to` of a stanza; None when absent.
pub fn parse_to(stanza: &Element) -> Result<Option<Jid>, StanzaError> {
    stanza
        .attr("to")
        .map(|t| Jid::new(t).map_err(|_| StanzaError::new(Condition::JidMalformed)))
        .transpose()
}

async fn handle_iq(cx: &Cx<'_>, stanza: &Element, to: Option<Jid>) -> Result<(), StanzaError> {
    let kind = match stanza.attr("type") {
        Some("get") => IqType::Get,
        Some("set") => IqType::Set,
        // Replies to the server's own IQs were consumed by `Hook::IqReply`;
        // replies addressed to another entity are routed like any IQ.
        Some("result") | Some("error") => {
            if let Some(Ok(to)) = to.map(Jid::try_into_full) {
                if cx.state.serves(to.domain().as_str()) {
                    route_to_full(cx, &to, stanza.clone());
                }
            }
            return Ok(());
        }
        _ => {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "missing or invalid iq type",
            ))
        }
    };
    if stanza.attr("id").is_none() || stanza.children().count() != 1 {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "an iq get/set needs an id and exactly one payload",
        ));
    }
    let from = cx.session.jid.clone();
    let target = match to {
        None => Target::Server(from.domain().to_string()),
        Some(to) if !cx.state.serves(to.domain().as_str()) => {
            return Err(StanzaError::new(Condition::RemoteServerNotFound))
        }
        Some(to) => match to.try_into_full() {
            Ok(full) => {
                // Only the addressed resource can answer; the server relays.
                if route_to_full(cx, &full, stanza.clone()) {
                    return Ok(());
                }
                return Err(StanzaError::new(Condition::ServiceUnavailable));
            }
            Err(bare) if bare.node().is_none() => Target::Server(bare.to_string()),
            Err(bare) => Target::Account(bare),
        },
    };
    let payload = stanza.children().next().expect("checked above");
    let Some(module) = cx.state.modules.iq_module(payload) else {
        return Err(StanzaError::new(Condition::ServiceUnavailable));
    };
    let iq = Iq {
        stanza: stanza.clone(),
        kind,
        from,
        target,
    };
    let payload = module.handle_iq(cx, &iq).await?;
    let mut reply = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("id", stanza.attr("id").unwrap_or_default())
        .with_attr("to", cx.session.jid.to_string());
    if let Some(to) = stanza.attr("to") {
        reply.set_attr("from", to);
    }
    if let Some(p) = payload {
        reply.append_child(p);
    }
    cx.session.send(reply);
    let close = cx.session.take_close_after_reply();
    if let Some(err) = close {
        cx.session.close(err);
    }
    Ok(())
}

/// Deliver to one connected resource, if it is here.
pub fn route_to_full(cx: &Cx<'_>, to: &FullJid, stanza: Element) -> bool {
    match cx.state.routing.session(to) {
        Some(h) => h.send(stanza),
        None => false,
    }
}

/// An IQ result/error/get built by the server.
pub fn iq(kind: &str, id: &str, from: &str, to: &str) -> Element {
    Element::new("iq", NS_CLIENT)
        .with_attr("type", kind)
        .with_attr("id", id)
        .with_attr("from", from)
        .with_attr("to", to)
}

/// A fresh random id for stanzas the server originates.
pub fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}
