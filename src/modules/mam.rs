//! XEP-0313 Message Archive Management (`urn:xmpp:mam:2` and `#extended`),
//! with XEP-0059 Result Set Management paging, XEP-0441 preferences
//! (still in the `urn:xmpp:mam:2` namespace) and XEP-0359 stanza-ids.
//!
//! Archiving happens in `message::route`: every 1:1 message with content
//! (see [`archivable`]) is appended for both parties in one durable
//! `Store::archive_append` before it is routed; this module decides who
//! keeps a copy ([`archive_entries`]) and answers queries, preferences and
//! metadata. A user's archive is readable by that user only.
//!
//! Paging: RSM `<after/>` and the form's `after-id` page forward; RSM
//! `<before/>` (empty: the last page) pages backward; `before-id` alone
//! bounds a forward query. `<first/>`/`<last/>` are the oldest and newest
//! item of the page whatever the order (`<flip-page/>` only reverses the
//! order the results are sent in), so `<before>first</before>` and
//! `<after>last</after>` always reach the neighbouring pages.

use super::cache::UserCache;
pub use super::vocab::{
    delay, has_content, is_wrapper, now_micros, parse_stamp, stamp, stanza_id, stanza_id_of,
};
use super::vocab::{has_hint, NS_FORWARD, NS_SID};
use super::{api, Event, EventKind, Shared, Task};
use super::{Cx, Iq, IqResult, IqType, Module, Target};
use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, Jid};
use natter_store::{ArchiveQuery, ArchivedMessage, MamPrefs, NewArchiveEntry, StoreError};
use natter_xml::{Element, NS_CLIENT};
use std::sync::Arc;
use std::time::Duration;

pub const NS: &str = "urn:xmpp:mam:2";
pub const NS_EXTENDED: &str = "urn:xmpp:mam:2#extended";
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";
pub const NS_DATA: &str = "jabber:x:data";

/// Page size when the client gives no `<max/>`.
pub const DEFAULT_PAGE: usize = 50;
/// Largest page sent for one query, whatever the client asks.
pub const MAX_PAGE: usize = 250;
/// How often the retention task prunes the archive.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Archive preferences are read for both parties of every message, so they
/// are cached per user (see `cache`); `set_prefs` is the only writer.
#[derive(Default)]
pub struct Mam {
    prefs: UserCache<MamPrefs>,
    /// Serializes preference changes so the cache ends with the store's value.
    write: tokio::sync::Mutex<()>,
}

#[async_trait]
impl Module for Mam {
    fn name(&self) -> &'static str {
        "mam"
    }
    fn features(&self) -> &'static [&'static str] {
        // XEP-0359: the server stamps stanza-ids. The archive is the
        // account's, but profanity looks for mam:2 on the domain only.
        &[NS, NS_SID]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[(EventKind::Closed, 0), (EventKind::StoredDataChanged, 0)]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<Mam>(self.clone());
        shared.provide::<dyn api::Archive>(self);
    }
    fn tasks(&self, state: &ServerState) -> Vec<Task> {
        vec![Box::pin(retention_task(state.clone()))]
    }
    fn account_features(&self) -> &'static [&'static str] {
        &[NS, NS_EXTENDED, NS_SID]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query"), (NS, "prefs"), (NS, "metadata")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if !iq.is_own_account() {
            return Err(match iq.target {
                // Someone else's archive (XEP-0313, Security Considerations).
                Target::Account(_) => StanzaError::with_text(
                    Condition::Forbidden,
                    "an archive is readable by its owner only",
                ),
                Target::Server(_) => StanzaError::new(Condition::ServiceUnavailable),
            });
        }
        let p = iq.payload();
        match (p.name.as_str(), iq.kind) {
            ("query", IqType::Get) => Ok(Some(query_form())),
            ("query", IqType::Set) => query(cx, p, iq.stanza.attr("to")).await,
            ("prefs", IqType::Get) => {
                let prefs = prefs_of(cx.state, &cx.session.bare).await?;
                Ok(Some(prefs_element(&prefs)))
            }
            ("prefs", IqType::Set) => set_prefs(cx, p).await,
            ("metadata", IqType::Get) => metadata(cx).await,
            _ => Err(StanzaError::new(Condition::BadRequest)),
        }
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        match (event, session) {
            (Event::Closed, Some(h)) => {
                self.prefs
                    .forget_unless_online(&*state.routing, &h.bare, h.id);
            }
            (Event::StoredDataChanged { user, module }, _) if *module == self.name() => {
                self.prefs.forget(user);
            }
            _ => {}
        }
    }
}

#[async_trait]
impl api::Archive for Mam {
    fn has_content(&self, msg: &Element) -> bool {
        has_content(msg)
    }
    fn archivable(&self, msg: &Element, kind: &str) -> bool {
        archivable(msg, kind)
    }
    async fn entries(
        &self,
        state: &ServerState,
        from: &BareJid,
        to: &BareJid,
        xml: &str,
    ) -> Result<(Vec<NewArchiveEntry>, Option<usize>, Option<usize>), StanzaError> {
        Ok(archive_entries(state, from, to, xml).await?)
    }
    fn stanza_id(&self, id: &str, by: &BareJid) -> Element {
        stanza_id(id, by)
    }
}

/// `user`'s archive preferences, from the cache or loaded into it.
async fn prefs_of(state: &ServerState, user: &BareJid) -> Result<Arc<MamPrefs>, StoreError> {
    let mam = state.modules.api::<Mam>();
    let cache = &mam.prefs;
    if let Some(p) = cache.get(user) {
        return Ok(p);
    }
    let load = cache.load(user);
    let loaded = Arc::new(state.store.mam_prefs(user.as_str()).await?);
    Ok(load.fill(&*state.routing, loaded))
}

// ---------------------------------------------------------------------------
// What is archived
// ---------------------------------------------------------------------------

/// Messages kept in both parties' archives: chat/normal with content, not
/// hinted `<no-store/>`/`<no-permanent-store/>`, and not a carbon or an
/// archive result someone sends around.
pub fn archivable(msg: &Element, kind: &str) -> bool {
    matches!(kind, "chat" | "normal")
        && !has_hint(msg, "no-store")
        && !has_hint(msg, "no-permanent-store")
        && !is_wrapper(msg)
        && has_content(msg)
}

/// Whether `owner`'s preferences keep messages exchanged with `other`.
async fn keeps(state: &ServerState, owner: &BareJid, other: &BareJid) -> Result<bool, StoreError> {
    // A remote user's archive is their own server's business.
    if !state.serves(owner.domain().as_str()) {
        return Ok(false);
    }
    let prefs = prefs_of(state, owner).await?;
    let other = other.as_str();
    if prefs.never.iter().any(|j| j == other) {
        return Ok(false);
    }
    if prefs.always.iter().any(|j| j == other) {
        return Ok(true);
    }
    Ok(match prefs.default.as_str() {
        "never" => false,
        "roster" => {
            owner.as_str() == other
                || state
                    .store
                    .roster_item(owner.as_str(), other)
                    .await?
                    .is_some()
        }
        _ => true,
    })
}

/// Which archive entries a message from `sender` to `recipient` makes, per
/// their preferences: (entries, index of the sender's entry, index of the
/// recipient's). A message to oneself is archived once.
pub async fn archive_entries(
    state: &ServerState,
    sender: &BareJid,
    recipient: &BareJid,
    stanza: &str,
) -> Result<(Vec<NewArchiveEntry>, Option<usize>, Option<usize>), StoreError> {
    // `as_str().to_owned()`, not `to_string()`: Display grows the string
    // piece by piece.
    let mut entries = Vec::with_capacity(2);
    let mut sent = None;
    let mut received = None;
    if keeps(state, sender, recipient).await? {
        sent = Some(entries.len());
        entries.push(NewArchiveEntry {
            owner: sender.as_str().to_owned(),
            with: recipient.as_str().to_owned(),
            stanza: stanza.to_owned(),
            outgoing: true,
        });
    }
    if sender == recipient {
        return Ok((entries, sent, sent));
    }
    if keeps(state, recipient, sender).await? {
        received = Some(entries.len());
        entries.push(NewArchiveEntry {
            owner: recipient.as_str().to_owned(),
            with: sender.as_str().to_owned(),
            stanza: stanza.to_owned(),
            outgoing: false,
        });
    }
    Ok((entries, sent, received))
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

fn bad(text: &str) -> StanzaError {
    StanzaError::with_text(Condition::BadRequest, text)
}

fn not_found() -> StanzaError {
    StanzaError::with_text(Condition::ItemNotFound, "no such message in the archive")
}

/// The query form (XEP-0313 "Retrieving form fields"), for `<query/>` gets.
fn query_form() -> Element {
    let field = |var: &str, kind: &str| {
        Element::new("field", NS_DATA)
            .with_attr("var", var)
            .with_attr("type", kind)
    };
    let form = Element::new("x", NS_DATA)
        .with_attr("type", "form")
        .with_child(
            field("FORM_TYPE", "hidden").with_child(Element::new("value", NS_DATA).with_text(NS)),
        )
        .with_child(field("with", "jid-single"))
        .with_child(field("start", "text-single"))
        .with_child(field("end", "text-single"))
        .with_child(field("before-id", "text-single"))
        .with_child(field("after-id", "text-single"))
        .with_child(
            field("ids", "list-multi").with_child(
                Element::new("validate", "http://jabber.org/protocol/xdata-validate")
                    .with_attr("datatype", "xs:string")
                    .with_child(Element::new(
                        "open",
                        "http://jabber.org/protocol/xdata-validate",
                    )),
            ),
        );
    Element::new("query", NS).with_child(form)
}

/// A parsed query: the form filters and the RSM request.
#[derive(Debug, Default)]
struct Request {
    with: Option<String>,
    start: Option<i64>,
    end: Option<i64>,
    before_id: Option<String>,
    after_id: Option<String>,
    ids: Option<Vec<String>>,
    max: usize,
    rsm_after: Option<String>,
    /// `Some(None)`: `<before/>` (the last page).
    rsm_before: Option<Option<String>>,
    flip: bool,
}

fn parse_request(q: &Element, queue_cap: usize) -> Result<Request, StanzaError> {
    let mut r = Request {
        max: DEFAULT_PAGE,
        ..Default::default()
    };
    if let Some(x) = q.get_child("x", NS_DATA) {
        for field in x.children().filter(|c| c.is("field", NS_DATA)) {
            let values: Vec<String> = field
                .children()
                .filter(|v| v.is("value", NS_DATA))
                .map(|v| v.text().trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            let one = values.first().cloned();
            match field.attr("var").unwrap_or_default() {
                "FORM_TYPE" => {
                    if one.as_deref().is_some_and(|v| v != NS) {
                        return Err(bad("FORM_TYPE must be urn:xmpp:mam:2"));
                    }
                }
                "with" => {
                    if let Some(v) = one {
                        // Archives keep the other party's bare JID: a full
                        // JID matches its bare JID's messages.
                        let j = Jid::new(&v).map_err(|_| {
                            StanzaError::with_text(Condition::JidMalformed, "bad 'with' JID")
                        })?;
                        r.with = Some(j.to_bare().to_string());
                    }
                }
                "start" => {
                    if let Some(v) = one {
                        r.start = Some(parse_stamp(&v).ok_or_else(|| bad("bad 'start' time"))?);
                    }
                }
                "end" => {
                    if let Some(v) = one {
                        r.end = Some(parse_stamp(&v).ok_or_else(|| bad("bad 'end' time"))?);
                    }
                }
                "before-id" => r.before_id = one,
                "after-id" => r.after_id = one,
                "ids" => {
                    let mut ids = values;
                    ids.sort_unstable();
                    ids.dedup();
                    r.ids = Some(ids);
                }
                other => {
                    return Err(StanzaError::with_text(
                        Condition::FeatureNotImplemented,
                        format!("unsupported query field {other:?}"),
                    ))
                }
            }
        }
    }
    if let Some(set) = q.get_child("set", NS_RSM) {
        if set.get_child("index", NS_RSM).is_some() {
            return Err(StanzaError::with_text(
                Condition::FeatureNotImplemented,
                "RSM <index/> is not supported; page with <after/> and <before/>",
            ));
        }
        if let Some(m) = set.child_text("max", NS_RSM) {
            r.max = m.trim().parse().map_err(|_| bad("bad RSM <max/>"))?;
        }
        if let Some(a) = set.child_text("after", NS_RSM) {
            let a = a.trim().to_string();
            if a.is_empty() {
                return Err(bad("empty RSM <after/>"));
            }
            r.rsm_after = Some(a);
        }
        if let Some(b) = set.get_child("before", NS_RSM) {
            let b = b.text().trim().to_string();
            r.rsm_before = Some((!b.is_empty()).then_some(b));
        }
    }
    r.max = r.max.min(MAX_PAGE).min((queue_cap / 2).max(1));
    r.flip = q.get_child("flip-page", NS).is_some();
    if let Some(ids) = &r.ids {
        r.max = r.max.max(ids.len().min(MAX_PAGE));
    }
    Ok(r)
}

/// Whose archive a query reads: a user's, or a room's (XEP-0045 rooms
/// keep one archive each, see `muc`). Same paging either way.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    User(&'a str),
    Room(&'a str),
}

impl Source<'_> {
    async fn page(
        self,
        state: &ServerState,
        q: &ArchiveQuery,
    ) -> Result<natter_store::ArchivePage, StoreError> {
        match self {
            Source::User(owner) => state.store.archive_query(owner, q).await,
            Source::Room(room) => state.store.room_archive_query(room, q).await,
        }
    }

    async fn get(
        self,
        state: &ServerState,
        id: &str,
    ) -> Result<Option<ArchivedMessage>, StoreError> {
        match self {
            Source::User(owner) => state.store.archive_get(owner, id).await,
            Source::Room(room) => state.store.room_archive_get(room, id).await,
        }
    }
}

/// The archive ids among `ids` in archive order; item-not-found if any is unknown.
async fn ordered(
    state: &ServerState,
    owner: Source<'_>,
    ids: Vec<String>,
) -> Result<Vec<String>, StanzaError> {
    let n = ids.len();
    let q = ArchiveQuery {
        ids: Some(ids),
        max: n,
        ..Default::default()
    };
    let page = owner.page(state, &q).await?;
    if page.items.len() != n {
        return Err(not_found());
    }
    Ok(page.items.into_iter().map(|m| m.id).collect())
}

/// One page (oldest → newest), whether the page reaches the end of the
/// result set in its direction, the count if known, and the index of its
/// first item if known.
struct Page {
    items: Vec<ArchivedMessage>,
    complete: bool,
    count: Option<u64>,
    index: Option<u64>,
}

fn store_err(e: StoreError) -> StanzaError {
    match e {
        StoreError::NotFound => not_found(),
        e => e.into(),
    }
}

async fn run_query(
    state: &ServerState,
    owner: Source<'_>,
    r: Request,
) -> Result<Page, StanzaError> {
    if let Some(ids) = &r.ids {
        if !ids.is_empty() {
            ordered(state, owner, ids.clone()).await?;
        }
    }
    // The lower bound: the later of after-id and RSM <after/>.
    let lower = match (r.after_id.clone(), r.rsm_after.clone()) {
        (Some(a), Some(b)) if a != b => ordered(state, owner, vec![a, b]).await?.pop(),
        (a, b) => a.or(b),
    };
    // The upper bound: the earlier of before-id and RSM <before>id</before>.
    let upper = match (r.before_id.clone(), r.rsm_before.clone().flatten()) {
        (Some(a), Some(b)) if a != b => ordered(state, owner, vec![a, b]).await?.into_iter().next(),
        (a, b) => a.or(b),
    };
    // Bounds the wrong way round select nothing.
    if let (Some(l), Some(u)) = (&lower, &upper) {
        let empty = l == u || ordered(state, owner, vec![l.clone(), u.clone()]).await?[0] != *l;
        if empty {
            return Ok(Page {
                items: Vec::new(),
                complete: true,
                count: None,
                index: None,
            });
        }
    }
    let id_filters = r.before_id.is_some() || r.after_id.is_some();
    let base = ArchiveQuery {
        with: r.with.clone(),
        start_micros: r.start,
        end_micros: r.end,
        ids: r.ids.clone().filter(|i| !i.is_empty()),
        max: r.max,
        ..Default::default()
    };
    let backward = r.rsm_before.is_some();
    if backward || upper.is_none() {
        let q = ArchiveQuery {
            after_id: lower.clone(),
            before_id: upper.clone(),
            last_page: backward && upper.is_none(),
            ..base
        };
        let page = owner.page(state, &q).await.map_err(store_err)?;
        let count = page.count.filter(|_| !id_filters);
        // RSM index only where it is free: a forward page from the start.
        // (Not on the last page either: slixmpp's reverse iterator, used by
        // poezio, stops when index + items = count, i.e. after that page.)
        let index = (!backward && lower.is_none()).then_some(0);
        return Ok(Page {
            items: page.items,
            complete: page.complete,
            count,
            index,
        });
    }
    // Forward, bounded above by before-id: walk forward up to the bound.
    let upper = upper.expect("checked");
    let bound = owner.get(state, &upper).await?.ok_or_else(not_found)?;
    let end = Some(r.end.map_or(bound.ts_micros, |e| e.min(bound.ts_micros)));
    let mut items: Vec<ArchivedMessage> = Vec::new();
    let mut cursor = lower.clone();
    let complete = 'walk: loop {
        let q = ArchiveQuery {
            after_id: cursor.clone(),
            end_micros: end,
            max: r.max + 1 - items.len(),
            ..base.clone()
        };
        let page = owner.page(state, &q).await.map_err(store_err)?;
        cursor = page.items.last().map(|m| m.id.clone());
        for m in page.items {
            if m.id == upper {
                break 'walk true;
            }
            items.push(m);
            if items.len() > r.max {
                items.truncate(r.max);
                break 'walk false;
            }
        }
        if page.complete || cursor.is_none() {
            break true;
        }
    };
    Ok(Page {
        items,
        complete,
        count: None,
        index: lower.is_none().then_some(0),
    })
}

/// The forwarded result message for one archived item.
fn result_message(to: &str, queryid: Option<&str>, m: &ArchivedMessage) -> Option<Element> {
    let limits = natter_xml::Limits {
        max_stanza_bytes: usize::MAX,
        max_depth: usize::MAX,
        max_attrs: usize::MAX,
        max_elements: usize::MAX,
    };
    let original = match natter_xml::parse_frame(m.stanza.as_bytes(), &limits) {
        Ok(el) => el,
        Err(e) => {
            tracing::error!(id = %m.id, error = %e, "archived stanza does not parse");
            return None;
        }
    };
    let mut result = Element::new("result", NS).with_attr("id", m.id.clone());
    if let Some(q) = queryid {
        result.set_attr("queryid", q);
    }
    result.append_child(
        Element::new("forwarded", NS_FORWARD)
            .with_child(delay(m.ts_micros, None))
            .with_child(original),
    );
    Some(
        Element::new("message", NS_CLIENT)
            .with_attr("to", to)
            .with_attr("id", super::new_id())
            .with_child(result),
    )
}

async fn query(cx: &Cx<'_>, q: &Element, archive: Option<&str>) -> IqResult {
    // XEP-0313 business rules (user archives): a client that catches up from the archive before it
    // comes online does not need the offline queue as well.
    cx.state
        .modules
        .emit(cx.state, Some(cx.session), &Event::ArchiveQueried)
        .await;
    let owner = Source::User(cx.session.bare.as_str());
    query_archive(cx.state, owner, cx.session, q, archive).await
}

/// Answer a XEP-0313 query on `owner`'s archive for `session`: the results
/// go to it as messages (from `archive` when given), the `<fin/>` is the
/// IQ's answer. Authorization is the caller's.
pub async fn query_archive(
    state: &ServerState,
    owner: Source<'_>,
    session: &SessionHandle,
    q: &Element,
    archive: Option<&str>,
) -> IqResult {
    let r = parse_request(q, state.config.c2s.max_queue)?;
    let flip = r.flip;
    let page = run_query(state, owner, r).await?;
    let to = session.jid.to_string();
    let queryid = q.attr("queryid");
    let send = |m: &ArchivedMessage| {
        if let Some(mut msg) = result_message(&to, queryid, m) {
            // From the archive as addressed (none: the user's own account).
            if let Some(a) = archive {
                msg.set_attr("from", a);
            }
            session.send(msg);
        }
    };
    if flip {
        page.items.iter().rev().for_each(send);
    } else {
        page.items.iter().for_each(send);
    }
    let mut set = Element::new("set", NS_RSM);
    if let (Some(first), Some(last)) = (page.items.first(), page.items.last()) {
        let mut f = Element::new("first", NS_RSM).with_text(first.id.clone());
        if let Some(i) = page.index {
            f.set_attr("index", i.to_string());
        }
        set.append_child(f);
        set.append_child(Element::new("last", NS_RSM).with_text(last.id.clone()));
    }
    if let Some(c) = page.count {
        set.append_child(Element::new("count", NS_RSM).with_text(c.to_string()));
    }
    Ok(Some(
        Element::new("fin", NS)
            .with_attr("complete", if page.complete { "true" } else { "false" })
            .with_child(set),
    ))
}

// ---------------------------------------------------------------------------
// Preferences and metadata
// ---------------------------------------------------------------------------

fn prefs_element(p: &MamPrefs) -> Element {
    let list = |name: &str, jids: &[String]| {
        let mut e = Element::new(name, NS);
        for j in jids {
            e.append_child(Element::new("jid", NS).with_text(j.clone()));
        }
        e
    };
    Element::new("prefs", NS)
        .with_attr("default", p.default.clone())
        .with_child(list("always", &p.always))
        .with_child(list("never", &p.never))
}

fn jid_list(prefs: &Element, name: &str) -> Result<Vec<String>, StanzaError> {
    let Some(list) = prefs.get_child(name, NS) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for j in list.children().filter(|c| c.is("jid", NS)) {
        let jid = Jid::new(j.text().trim())
            .map_err(|_| StanzaError::with_text(Condition::JidMalformed, "bad JID in prefs"))?;
        // Archives match the other party's bare JID.
        out.push(jid.to_bare().to_string());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

async fn set_prefs(cx: &Cx<'_>, p: &Element) -> IqResult {
    let default = p.attr("default").unwrap_or_default();
    if !natter_store::MAM_DEFAULT_MODES.contains(&default) {
        return Err(bad("default must be always, never or roster"));
    }
    let prefs = MamPrefs {
        default: default.to_string(),
        always: jid_list(p, "always")?,
        never: jid_list(p, "never")?,
    };
    let user = &cx.session.bare;
    let mam = cx.state.modules.api::<Mam>();
    let _w = mam.write.lock().await;
    cx.state.store.set_mam_prefs(user.as_str(), &prefs).await?;
    let stored = Arc::new(cx.state.store.mam_prefs(user.as_str()).await?);
    mam.prefs.set(user, stored.clone());
    super::cluster::stored_data_changed(cx.state, mam.name(), user).await;
    Ok(Some(prefs_element(&stored)))
}

async fn metadata(cx: &Cx<'_>) -> IqResult {
    let owner = cx.session.bare.as_str();
    let one = |last_page| ArchiveQuery {
        max: 1,
        last_page,
        ..Default::default()
    };
    let first = cx.state.store.archive_query(owner, &one(false)).await?;
    let last = cx.state.store.archive_query(owner, &one(true)).await?;
    let mut md = Element::new("metadata", NS);
    if let (Some(f), Some(l)) = (first.items.first(), last.items.last()) {
        for (name, m) in [("start", f), ("end", l)] {
            md.append_child(
                Element::new(name, NS)
                    .with_attr("id", m.id.clone())
                    .with_attr("timestamp", stamp(m.ts_micros)),
            );
        }
    }
    Ok(Some(md))
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// Delete archived messages older than `store.archive_retention_days`, at
/// start and then hourly, until shutdown. Returns at once when retention
/// is 0 (keep forever).
async fn retention_task(state: ServerState) {
    let days = state.config.store.archive_retention_days;
    if days == 0 {
        return;
    }
    let keep = i64::from(days) * 86_400 * 1_000_000;
    loop {
        let cutoff = now_micros() - keep;
        let prune = state.store.archive_prune(None, cutoff);
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = prune => match r {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, days, "archive retention: old messages deleted"),
                Err(e) => tracing::error!(error = %e, "archive retention: pruning failed"),
            },
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::vocab::{NS_CHATSTATES, NS_HINTS};

    fn msg(children: &[Element]) -> Element {
        let mut m = Element::new("message", NS_CLIENT).with_attr("type", "chat");
        for c in children {
            m.append_child(c.clone());
        }
        m
    }

    #[test]
    fn archivable_content() {
        let body = Element::new("body", NS_CLIENT).with_text("hi");
        let active = Element::new("active", NS_CHATSTATES);
        let received = Element::new("received", "urn:xmpp:receipts").with_attr("id", "x");
        let displayed = Element::new("displayed", "urn:xmpp:chat-markers:0").with_attr("id", "x");
        let no_store = Element::new("no-store", NS_HINTS);
        let store = Element::new("store", NS_HINTS);
        assert!(archivable(&msg(std::slice::from_ref(&body)), "chat"));
        assert!(archivable(&msg(&[body.clone(), active.clone()]), "normal"));
        assert!(archivable(&msg(&[received]), "chat"));
        assert!(archivable(&msg(&[displayed]), "chat"));
        assert!(!archivable(&msg(std::slice::from_ref(&active)), "chat"));
        assert!(archivable(&msg(&[active, store]), "chat"));
        assert!(!archivable(&msg(&[body.clone(), no_store]), "chat"));
        assert!(!archivable(&msg(std::slice::from_ref(&body)), "headline"));
        assert!(!archivable(&msg(&[body]), "groupchat"));
    }

    #[test]
    fn stamps_round_trip() {
        let t = 1_700_000_000_123_456;
        assert_eq!(stamp(t), "2023-11-14T22:13:20.123456Z");
        assert_eq!(parse_stamp(&stamp(t)), Some(t));
        assert_eq!(
            parse_stamp("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(parse_stamp("yesterday"), None);
    }

    #[test]
    fn request_parsing() {
        let q = Element::new("query", NS)
            .with_child(
                Element::new("x", NS_DATA).with_child(
                    Element::new("field", NS_DATA)
                        .with_attr("var", "with")
                        .with_child(Element::new("value", NS_DATA).with_text("a@b/c")),
                ),
            )
            .with_child(
                Element::new("set", NS_RSM)
                    .with_child(Element::new("max", NS_RSM).with_text("1000"))
                    .with_child(Element::new("before", NS_RSM)),
            );
        let r = parse_request(&q, 1000).unwrap();
        assert_eq!(r.with.as_deref(), Some("a@b"));
        assert_eq!(r.max, MAX_PAGE);
        assert_eq!(r.rsm_before, Some(None));
        let bad_field = Element::new("query", NS).with_child(
            Element::new("x", NS_DATA).with_child(
                Element::new("field", NS_DATA)
                    .with_attr("var", "fulltext")
                    .with_child(Element::new("value", NS_DATA).with_text("x")),
            ),
        );
        assert_eq!(
            parse_request(&bad_field, 1000).unwrap_err().condition,
            Condition::FeatureNotImplemented
        );
    }
}
