//! XEP-0045 Multi-User Chat on `<muc.subdomain>.<domain>` (default
//! `conference.<domain>`), with WhatsApp-style member semantics on top.
//!
//! A room is a list of members (affiliations) plus whoever is joined now
//! (occupants). Its durable state is one document in the store
//! (`RoomStore::room_put`: configuration, affiliations, subject, reserved
//! nicks, offline opt-ins) and its archive (`room_archive_*`: each message
//! stored once per room). Occupants live in memory on the node serving the
//! room (see ARCHITECTURE.md, "Group chats", for the cluster story).
//!
//! Member delivery: a `groupchat` message goes to every joined occupant;
//! a member who is not joined gets it at their bare JID when they opted in
//! (the registration form's `{http://tigase.org/protocol/muc}offline`
//! field, as Siskin and Prosody's mod_muc_offline_delivery do) — live to
//! their available resources or into their offline queue — and otherwise
//! finds it in the room's archive (XEP-0313 on the room JID) from their
//! last read position when they rejoin.
//!
//! Also here: configuration forms (muc#owner), affiliations and roles with
//! several items per muc#admin IQ, mediated and direct (XEP-0249)
//! invitations that make the invitee a member, nick registration (§7.10),
//! XEP-0410 self-ping, XEP-0421 occupant ids, retraction (XEP-0424) and
//! moderation (XEP-0425) leaving tombstones in the archive, and XEP-0333
//! markers kept as per-member positions, answered by a small query of
//! natter's own (`urn:natter:muc:read:0`, see [`read_receipt`]).
//!
//! Ordering: every operation on a room holds that room's lock, so each
//! member sees a room's messages in archive order; rooms do not wait for
//! each other.

use super::{api, new_id, parse_to, vocab, Cx, Event, EventKind, Flow, Hook, HookStanza, Kind};
use super::{mam, Module, Service};
use crate::config::Config;
use crate::error::{Condition, StanzaError};
use crate::router::{Outbound, SessionHandle};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_store::StoreError;
use natter_xml::{Element, NS_CLIENT};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
pub const NS_USER: &str = "http://jabber.org/protocol/muc#user";
pub const NS_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
pub const NS_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const NS_ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
const NS_ROOMINFO: &str = "http://jabber.org/protocol/muc#roominfo";
const NS_REGISTER: &str = "jabber:iq:register";
const NS_REGISTER_FORM: &str = "http://jabber.org/protocol/muc#register";
pub const NS_CONFERENCE: &str = "jabber:x:conference";
pub const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
pub const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
pub const NS_MARKERS: &str = "urn:xmpp:chat-markers:0";
const NS_PING: &str = "urn:xmpp:ping";
const NS_SELF_PING: &str = "http://jabber.org/protocol/muc#self-ping-optimization";
/// "Who has read up to message X": natter's own small query.
pub const NS_READ: &str = "urn:natter:muc:read:0";
/// The registration field a client sets to get messages while not joined.
pub const OFFLINE_FIELD: &str = "{http://tigase.org/protocol/muc}offline";
const VCARD: &str = "vcard-temp";
/// Bytes of presence payload (show, status, caps, …) a room keeps per
/// occupant.
const MAX_KEPT_PRESENCE: usize = 16 * 1024;
/// Copies a fan-out queues before it yields to other tasks.
const FAN_OUT_SLICE: usize = 64;

// ---------------------------------------------------------------------------
// The room document (durable)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    fn name(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "outcast" => Affiliation::Outcast,
            "none" => Affiliation::None,
            "member" => Affiliation::Member,
            "admin" => Affiliation::Admin,
            "owner" => Affiliation::Owner,
            _ => return None,
        })
    }
    fn is_member(self) -> bool {
        self >= Affiliation::Member
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    None,
    Visitor,
    Participant,
    Moderator,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Visitor => "visitor",
            Role::Participant => "participant",
            Role::Moderator => "moderator",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Role::None,
            "visitor" => Role::Visitor,
            "participant" => Role::Participant,
            "moderator" => Role::Moderator,
            _ => return None,
        })
    }
}

/// Room configuration (muc#roomconfig). The defaults are WhatsApp's
/// groups: persistent, members-only, non-anonymous, archived.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    pub name: String,
    pub description: String,
    pub persistent: bool,
    pub members_only: bool,
    pub moderated: bool,
    pub password: String,
    pub public: bool,
    /// Real JIDs visible to everyone (non-anonymous) rather than moderators.
    pub whois_anyone: bool,
    pub max_users: usize,
    pub archived: bool,
    pub allow_invites: bool,
    pub change_subject: bool,
    pub allow_pm: bool,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            name: String::new(),
            description: String::new(),
            persistent: true,
            members_only: true,
            moderated: false,
            password: String::new(),
            public: false,
            whois_anyone: true,
            max_users: 1024,
            archived: true,
            allow_invites: false,
            change_subject: true,
            allow_pm: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    pub affiliation: Affiliation,
    /// The reserved nick (XEP-0045 §7.10), if any.
    #[serde(default)]
    pub nick: Option<String>,
    #[serde(default)]
    pub reason: String,
    /// Opted in to getting messages at the bare JID while not joined.
    #[serde(default)]
    pub offline: bool,
}

impl Member {
    fn new(affiliation: Affiliation) -> Self {
        Member {
            affiliation,
            nick: None,
            reason: String::new(),
            offline: false,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Doc {
    pub config: RoomConfig,
    /// Bare JID → affiliation (never `None`: those are removed).
    pub members: BTreeMap<String, Member>,
    pub subject: String,
    pub subject_by: String,
    /// Salt of the XEP-0421 occupant ids (random per room).
    pub salt: String,
    /// The room's vCard (avatar), serialized.
    pub vcard: String,
}

impl Doc {
    fn affiliation(&self, bare: &str) -> Affiliation {
        self.members
            .get(bare)
            .map_or(Affiliation::None, |m| m.affiliation)
    }
    /// Whether a member other than `bare` reserved `nick`.
    fn reserved_by_other(&self, nick: &str, bare: &BareJid) -> bool {
        self.members
            .iter()
            .any(|(j, m)| m.nick.as_deref() == Some(nick) && *j != bare.as_str())
    }
    fn member_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.affiliation.is_member())
            .count()
    }
}

// ---------------------------------------------------------------------------
// Live state (this node)
// ---------------------------------------------------------------------------

struct Occupant {
    bare: BareJid,
    /// The sessions joined under this nick (one user may join from several).
    sessions: Vec<FullJid>,
    role: Role,
    /// The occupant's latest presence as broadcast (show/status/caps).
    presence: Vec<Element>,
    /// Token bucket for messages: (tokens, last refill).
    bucket: (f64, Instant),
}

struct Room {
    jid: BareJid,
    doc: Doc,
    /// Nick → occupant.
    occupants: BTreeMap<String, Occupant>,
    /// Whether the document is in the store (persistent rooms).
    stored: bool,
}

impl Room {
    fn nick_of(&self, full: &FullJid) -> Option<&str> {
        self.occupants
            .iter()
            .find(|(_, o)| o.sessions.contains(full))
            .map(|(n, _)| n.as_str())
    }
    fn occupant_id(&self, bare: &BareJid) -> String {
        let mut h = Sha256::new();
        h.update(self.doc.salt.as_bytes());
        h.update(bare.as_str().as_bytes());
        let d = h.finalize();
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &d[..18])
    }
    fn role_for(&self, aff: Affiliation) -> Role {
        match aff {
            Affiliation::Owner | Affiliation::Admin => Role::Moderator,
            Affiliation::Member => Role::Participant,
            Affiliation::None if self.doc.config.moderated => Role::Visitor,
            Affiliation::None => Role::Participant,
            Affiliation::Outcast => Role::None,
        }
    }
    fn is_moderator(&self, full: &FullJid) -> bool {
        self.nick_of(full)
            .and_then(|n| self.occupants.get(n))
            .is_some_and(|o| o.role == Role::Moderator)
    }
    /// Every session of every occupant, with whether it sees real JIDs.
    fn audience(&self) -> Vec<(FullJid, bool)> {
        let whois = self.doc.config.whois_anyone;
        self.occupants
            .values()
            .flat_map(|o| {
                let sees = whois || o.role == Role::Moderator;
                o.sessions.iter().map(move |s| (s.clone(), sees))
            })
            .collect()
    }
}

impl Occupant {
    /// The real JID shown to those who may see it: the full JID of its
    /// (first) session, as XEP-0045 §7.2.3 has it; the bare JID once no
    /// session is left.
    fn real_jid(&self) -> String {
        self.sessions
            .first()
            .map_or_else(|| self.bare.to_string(), |s| s.to_string())
    }
}

type RoomRef = Arc<tokio::sync::Mutex<Room>>;

#[derive(Default)]
pub struct Muc {
    /// Rooms loaded on this node: those with occupants, and temporary ones.
    rooms: Mutex<HashMap<BareJid, RoomRef>>,
    /// Session → the rooms it is joined to (to leave them when it goes).
    joined: Mutex<HashMap<FullJid, HashSet<BareJid>>>,
}

fn send(state: &ServerState, to: &FullJid, el: &Element) {
    if state.serves(to.domain().as_str()) {
        state.routing.deliver(to, &Outbound::new(el, 0));
    } else if let Some(remote) = state.modules.try_api::<dyn api::Remote>() {
        // An occupant on another server: over federation, addressed to it.
        let mut el = el.clone();
        el.set_attr("to", to.to_string());
        if let Err(e) = remote.send(state, &el) {
            tracing::debug!(%to, error = ?e.condition, "room stanza not sent to a remote occupant");
        }
    }
}

fn err(c: Condition, text: &str) -> StanzaError {
    StanzaError::with_text(c, text)
}

fn store_err(e: StoreError) -> StanzaError {
    match e {
        StoreError::NotFound => StanzaError::new(Condition::ItemNotFound),
        StoreError::QuotaExceeded => err(Condition::ResourceConstraint, "room too large"),
        e => e.into(),
    }
}

#[async_trait]
impl Module for Muc {
    fn name(&self) -> &'static str {
        "muc"
    }
    fn services(&self, config: &Config) -> Vec<Service> {
        if !config.muc.enabled {
            return Vec::new();
        }
        Service::per_domain(
            &config.domains,
            &config.muc.subdomain,
            ("conference", "text", "Group chats"),
        )
    }
    /// Direct invitations (XEP-0249) are 1:1 messages: seen on their way.
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::PreRoute(Kind::Message), 10)]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[
            (EventKind::Unavailable, 0),
            (EventKind::Closed, 0),
            (EventKind::RemoteSessionGone, 0),
        ]
    }
    fn one_writer_per_entity(&self) -> bool {
        // A room's occupants and order live in memory: one node per room.
        true
    }
    fn provide(self: Arc<Self>, shared: &mut super::Shared) {
        shared.provide::<Muc>(self);
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        if let (Some(x), Some(to)) = (s.stanza.get_child("x", NS_CONFERENCE), s.to) {
            if let Some(room) = x.attr("jid") {
                self.direct_invite(cx, room, &to.to_bare()).await;
            }
        }
        Ok(Flow::Continue)
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        _event: &Event<'_>,
    ) {
        // A session that went unavailable or away (here, or on another
        // node of the cluster) leaves its rooms. A parked one (XEP-0198)
        // stays joined until its resumption times out and it closes.
        let Some(h) = session else { return };
        let rooms = self.joined.lock().remove(&h.jid).unwrap_or_default();
        for room in rooms {
            let Some(r) = self.loaded(&room) else {
                continue;
            };
            let mut r = r.lock().await;
            self.leave(state, &mut r, &h.jid, None);
            self.unload_if_idle(&r);
        }
    }
    async fn service_stanza(
        &self,
        state: &ServerState,
        stanza: Element,
    ) -> Result<(), StanzaError> {
        let to = parse_to(&stanza)?.ok_or_else(|| StanzaError::new(Condition::BadRequest))?;
        let from: FullJid = match stanza.attr("from").map(str::parse::<FullJid>) {
            Some(Ok(f)) => f,
            _ => return Err(StanzaError::new(Condition::BadRequest)),
        };
        let kind = stanza.name.as_str();
        let Some(node) = to.node() else {
            return match kind {
                "iq" => self.service_iq(state, &from, &to, &stanza).await,
                _ => Err(StanzaError::new(Condition::ServiceUnavailable)),
            };
        };
        let room_jid = BareJid::new(&format!("{node}@{}", to.domain()))
            .map_err(|_| StanzaError::new(Condition::JidMalformed))?;
        let nick = to.resource().map(|r| r.as_str().to_string());
        match (kind, nick) {
            ("presence", Some(nick)) => {
                self.presence(state, &from, &room_jid, &nick, &stanza).await
            }
            ("presence", None) => Err(err(Condition::JidMalformed, "join with room@service/nick")),
            ("message", None) => self.room_message(state, &from, &room_jid, stanza).await,
            ("message", Some(nick)) => {
                self.private_message(state, &from, &room_jid, &nick, stanza)
                    .await
            }
            ("iq", None) => self.room_iq(state, &from, &room_jid, &stanza).await,
            ("iq", Some(nick)) => {
                self.occupant_iq(state, &from, &room_jid, &nick, &stanza)
                    .await
            }
            _ => Ok(()),
        }
    }
}

impl Muc {
    fn loaded(&self, room: &BareJid) -> Option<RoomRef> {
        self.rooms.lock().get(room).cloned()
    }

    /// The room, loaded from the store if needed; None if it does not exist.
    async fn room(
        &self,
        state: &ServerState,
        jid: &BareJid,
    ) -> Result<Option<RoomRef>, StanzaError> {
        if let Some(r) = self.loaded(jid) {
            return Ok(Some(r));
        }
        let Some(doc) = state
            .store
            .room_get(jid.as_str())
            .await
            .map_err(store_err)?
        else {
            return Ok(None);
        };
        let doc: Doc = serde_json::from_str(&doc).map_err(|e| {
            tracing::error!(room = %jid, error = %e, "room document does not parse");
            StanzaError::new(Condition::InternalServerError)
        })?;
        let room = Arc::new(tokio::sync::Mutex::new(Room {
            jid: jid.clone(),
            doc,
            occupants: BTreeMap::new(),
            stored: true,
        }));
        // Another task may have loaded it meanwhile: keep the first.
        Ok(Some(
            self.rooms.lock().entry(jid.clone()).or_insert(room).clone(),
        ))
    }

    /// Drop an empty persistent room from memory (it is in the store); an
    /// empty temporary room is gone.
    fn unload_if_idle(&self, room: &Room) {
        if room.occupants.is_empty() {
            self.rooms.lock().remove(&room.jid);
        }
    }

    async fn save(&self, state: &ServerState, room: &mut Room) -> Result<(), StanzaError> {
        if !room.doc.config.persistent {
            if room.stored {
                state
                    .store
                    .room_delete(room.jid.as_str())
                    .await
                    .map_err(store_err)?;
                room.stored = false;
            }
            return Ok(());
        }
        let doc = serde_json::to_string(&room.doc)
            .map_err(|_| StanzaError::new(Condition::InternalServerError))?;
        state
            .store
            .room_put(room.jid.as_str(), &doc)
            .await
            .map_err(store_err)?;
        room.stored = true;
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Presence: join, change, leave
    // -----------------------------------------------------------------------

    async fn presence(
        &self,
        state: &ServerState,
        from: &FullJid,
        room_jid: &BareJid,
        nick: &str,
        p: &Element,
    ) -> Result<(), StanzaError> {
        let kind = p.attr("type").unwrap_or("available");
        if kind == "error" {
            // An occupant's client refused something the room sent: it is
            // gone (XEP-0045 §7.2.x, "ghost" users).
            self.depart(state, room_jid, from, None).await;
            return Ok(());
        }
        if kind == "unavailable" {
            let status = p.child_text("status", NS_CLIENT);
            self.depart(state, room_jid, from, status.as_deref()).await;
            return Ok(());
        }
        if kind != "available" {
            return Err(err(
                Condition::BadRequest,
                "presence type not used in rooms",
            ));
        }
        if nick.trim().is_empty() {
            return Err(err(Condition::JidMalformed, "empty nickname"));
        }
        let (room, created) = match self.room(state, room_jid).await? {
            Some(r) => (r, false),
            None => (self.create(state, from, room_jid).await?, true),
        };
        let mut r = room.lock().await;
        let r = &mut *r;
        let result = self.join(state, r, from, nick, p, created).await;
        if result.is_err() {
            self.unload_if_idle(r);
        }
        result
    }

    async fn create(
        &self,
        state: &ServerState,
        from: &FullJid,
        room_jid: &BareJid,
    ) -> Result<RoomRef, StanzaError> {
        if !state.serves(from.domain().as_str()) {
            return Err(err(Condition::NotAllowed, "only local users create rooms"));
        }
        let owner = from.to_bare();
        let max = state.config.muc.max_rooms_per_user;
        let owned = self
            .rooms_owned(state, room_jid.domain().as_str(), &owner)
            .await?;
        if owned >= max {
            return Err(err(
                Condition::PolicyViolation,
                &format!("you own {max} rooms already"),
            ));
        }
        let mut doc = Doc {
            config: RoomConfig {
                max_users: state.config.muc.max_members,
                ..RoomConfig::default()
            },
            salt: new_id(),
            ..Doc::default()
        };
        doc.members
            .insert(owner.to_string(), Member::new(Affiliation::Owner));
        let mut room = Room {
            jid: room_jid.clone(),
            doc,
            occupants: BTreeMap::new(),
            stored: false,
        };
        self.save(state, &mut room).await?;
        let room = Arc::new(tokio::sync::Mutex::new(room));
        Ok(self
            .rooms
            .lock()
            .entry(room_jid.clone())
            .or_insert(room)
            .clone())
    }

    /// Rooms on `service` that `owner` owns.
    async fn rooms_owned(
        &self,
        state: &ServerState,
        service: &str,
        owner: &BareJid,
    ) -> Result<usize, StanzaError> {
        let mut n = 0;
        for jid in state.store.room_list(service).await.map_err(store_err)? {
            let Ok(bare) = BareJid::new(&jid) else {
                continue;
            };
            if let Some(r) = self.room(state, &bare).await? {
                let r = r.lock().await;
                if r.doc.affiliation(owner.as_str()) == Affiliation::Owner {
                    n += 1;
                }
                self.unload_if_idle(&r);
            }
        }
        Ok(n)
    }

    #[allow(clippy::too_many_arguments)]
    async fn join(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        nick: &str,
        p: &Element,
        created: bool,
    ) -> Result<(), StanzaError> {
        let bare = from.to_bare();
        let extra: Vec<Element> = presence_payload(p);
        // The room keeps this presence for as long as the occupant stays:
        // bounded in bytes, like the number of rooms a session joins.
        let kept: usize = extra.iter().map(|e| e.to_string().len()).sum();
        if kept > MAX_KEPT_PRESENCE {
            return Err(err(
                Condition::PolicyViolation,
                &format!("presence payload over {MAX_KEPT_PRESENCE} bytes"),
            ));
        }
        if let Some(current) = r.nick_of(from).map(str::to_string) {
            if current == nick {
                // A presence update.
                if let Some(o) = r.occupants.get_mut(nick) {
                    o.presence = extra;
                }
                self.broadcast_presence(state, r, nick, &[], None);
                return Ok(());
            }
            return self.change_nick(state, r, from, &current, nick, extra);
        }
        let aff = r.doc.affiliation(bare.as_str());
        if aff == Affiliation::Outcast {
            return Err(err(Condition::Forbidden, "you are banned from this room"));
        }
        let max_joined = state.config.muc.max_joined_per_session;
        if self
            .joined
            .lock()
            .get(from)
            .is_some_and(|j| j.len() >= max_joined)
        {
            return Err(err(
                Condition::PolicyViolation,
                &format!("a session may be in {max_joined} rooms at most"),
            ));
        }
        if r.doc.config.members_only && !aff.is_member() {
            return Err(StanzaError::with_text(
                Condition::RegistrationRequired,
                "members only",
            ));
        }
        let x = p.get_child("x", NS_MUC);
        if !r.doc.config.password.is_empty() && !aff.is_member() {
            let given = x
                .and_then(|x| x.child_text("password", NS_MUC))
                .unwrap_or_default();
            if given != r.doc.config.password {
                return Err(err(Condition::NotAuthorized, "password required"));
            }
        }
        if let Some(o) = r.occupants.get(nick) {
            if o.bare != bare {
                return Err(err(Condition::Conflict, "nickname in use"));
            }
        }
        if r.doc.reserved_by_other(nick, &bare) {
            return Err(err(
                Condition::Conflict,
                "nickname reserved by another member",
            ));
        }
        let others = r.occupants.values().filter(|o| o.bare != bare).count();
        if !r.occupants.contains_key(nick)
            && others >= r.doc.config.max_users
            && aff < Affiliation::Admin
        {
            return Err(err(Condition::ServiceUnavailable, "room is full"));
        }
        let role = r.role_for(aff);
        // Existing occupants' presence to the newcomer, first.
        let sees = r.doc.config.whois_anyone || role == Role::Moderator;
        for (n, o) in &r.occupants {
            let el = self.occupant_presence(r, n, o, from, sees, &[]);
            send(state, from, &el);
        }
        let occupant = r
            .occupants
            .entry(nick.to_string())
            .or_insert_with(|| Occupant {
                bare: bare.clone(),
                sessions: Vec::new(),
                role,
                presence: Vec::new(),
                bucket: (state.config.muc.burst as f64, Instant::now()),
            });
        occupant.sessions.push(from.clone());
        occupant.presence = extra;
        self.joined
            .lock()
            .entry(from.clone())
            .or_default()
            .insert(r.jid.clone());
        let mut codes = vec!["110"];
        if r.doc.config.whois_anyone {
            codes.push("100");
        }
        if r.doc.config.archived {
            codes.push("170");
        }
        if created {
            codes.push("201");
        }
        self.broadcast_presence(state, r, nick, &codes, Some(from));
        // History (XEP-0045 §7.2.15), then the subject.
        if r.doc.config.archived {
            let wanted = history_wanted(x, state.config.muc.history);
            self.send_history(state, r, from, wanted).await;
        }
        let mut subject = Element::new("message", NS_CLIENT)
            .with_attr("type", "groupchat")
            .with_attr("id", new_id())
            .with_attr(
                "from",
                if r.doc.subject_by.is_empty() {
                    r.jid.to_string()
                } else {
                    format!("{}/{}", r.jid, r.doc.subject_by)
                },
            )
            .with_attr("to", from.to_string());
        subject.append_child(Element::new("subject", NS_CLIENT).with_text(r.doc.subject.clone()));
        send(state, from, &subject);
        Ok(())
    }

    async fn send_history(&self, state: &ServerState, r: &Room, to: &FullJid, wanted: History) {
        let last = |max| natter_store::ArchiveQuery {
            last_page: true,
            max,
            ..Default::default()
        };
        let q = match wanted {
            History::Last(0) => return,
            History::Last(n) => last(n),
            History::Since(t) => natter_store::ArchiveQuery {
                start_micros: Some(t),
                max: mam::MAX_PAGE,
                ..Default::default()
            },
            History::Unread => {
                let read = state
                    .store
                    .room_positions(r.jid.as_str(), "displayed")
                    .await
                    .ok()
                    .and_then(|p| p.into_iter().find(|(m, _)| m == to.to_bare().as_str()));
                match read {
                    Some((_, id)) => natter_store::ArchiveQuery {
                        after_id: Some(id),
                        max: mam::MAX_PAGE,
                        ..Default::default()
                    },
                    None => last(state.config.muc.history),
                }
            }
        };
        let page = match state.store.room_archive_query(r.jid.as_str(), &q).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(room = %r.jid, error = %e, "room history unavailable");
                return;
            }
        };
        for m in page.items {
            let Ok(mut el) =
                natter_xml::parse_frame(m.stanza.as_bytes(), &natter_xml::Limits::default())
            else {
                continue;
            };
            el.set_attr("to", to.to_string());
            el.append_child(vocab::stanza_id(&m.id, &r.jid));
            el.append_child(vocab::delay(m.ts_micros, Some(r.jid.as_str())));
            send(state, to, &el);
        }
    }

    fn change_nick(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        old: &str,
        new: &str,
        extra: Vec<Element>,
    ) -> Result<(), StanzaError> {
        if r.occupants.contains_key(new) {
            return Err(err(Condition::Conflict, "nickname in use"));
        }
        let bare = from.to_bare();
        if r.doc.reserved_by_other(new, &bare) {
            return Err(err(
                Condition::Conflict,
                "nickname reserved by another member",
            ));
        }
        // Unavailable with 303 under the old nick, then available under the new.
        let occ = r.occupants.remove(old).expect("nick_of found it");
        let audience = r.audience();
        for (to, sees) in audience.iter().chain(
            occ.sessions
                .iter()
                .map(|s| (s.clone(), true))
                .collect::<Vec<_>>()
                .iter(),
        ) {
            let mut el = self.occupant_presence(r, old, &occ, to, *sees, &["303"]);
            el.set_attr("type", "unavailable");
            if let Some(item) = el
                .get_child_mut("x", NS_USER)
                .and_then(|x| x.get_child_mut("item", NS_USER))
            {
                item.set_attr("nick", new);
            }
            if occ.sessions.contains(to) {
                if let Some(x) = el.get_child_mut("x", NS_USER) {
                    x.append_child(Element::new("status", NS_USER).with_attr("code", "110"));
                }
            }
            send(state, to, &el);
        }
        let mut occ = occ;
        occ.presence = extra;
        r.occupants.insert(new.to_string(), occ);
        self.broadcast_presence(state, r, new, &[], Some(from));
        Ok(())
    }

    /// `from` leaves `room_jid`, if it is there.
    async fn depart(
        &self,
        state: &ServerState,
        room_jid: &BareJid,
        from: &FullJid,
        status: Option<&str>,
    ) {
        if let Some(r) = self.loaded(room_jid) {
            let mut r = r.lock().await;
            self.leave(state, &mut r, from, status);
            self.forget(from, room_jid);
            self.unload_if_idle(&r);
        }
    }

    /// `from` leaves: unavailable to everyone (with 110 to itself).
    fn leave(&self, state: &ServerState, r: &mut Room, from: &FullJid, status: Option<&str>) {
        let Some(nick) = r.nick_of(from).map(str::to_string) else {
            return;
        };
        let occ = r.occupants.get_mut(&nick).expect("nick_of found it");
        occ.sessions.retain(|s| s != from);
        if !occ.sessions.is_empty() {
            // Other sessions of this user stay under the nick.
            let mut el = Element::new("presence", NS_CLIENT)
                .with_attr("from", format!("{}/{nick}", r.jid))
                .with_attr("to", from.to_string())
                .with_attr("type", "unavailable");
            el.append_child(
                Element::new("x", NS_USER)
                    .with_child(Element::new("item", NS_USER).with_attr("role", "none"))
                    .with_child(Element::new("status", NS_USER).with_attr("code", "110")),
            );
            send(state, from, &el);
            return;
        }
        let occ = r.occupants.remove(&nick).expect("present");
        self.gone(state, r, &nick, &occ, from, &[], status, None);
    }

    /// Tell everyone, and the occupant's session `me`, that `occ` left.
    #[allow(clippy::too_many_arguments)]
    fn gone(
        &self,
        state: &ServerState,
        r: &Room,
        nick: &str,
        occ: &Occupant,
        me: &FullJid,
        codes: &[&str],
        status: Option<&str>,
        reason: Option<&str>,
    ) {
        let mut targets = r.audience();
        for s in &occ.sessions {
            targets.push((s.clone(), true));
        }
        if !occ.sessions.contains(me) {
            targets.push((me.clone(), true));
        }
        for (to, sees) in targets {
            let mine = to.to_bare() == occ.bare;
            let mut el = Element::new("presence", NS_CLIENT)
                .with_attr("from", format!("{}/{nick}", r.jid))
                .with_attr("to", to.to_string())
                .with_attr("type", "unavailable");
            if let Some(s) = status {
                el.append_child(Element::new("status", NS_CLIENT).with_text(s));
            }
            let mut item = Element::new("item", NS_USER)
                .with_attr("affiliation", r.doc.affiliation(occ.bare.as_str()).name())
                .with_attr("role", "none");
            if sees {
                item.set_attr("jid", occ.real_jid());
            }
            if let Some(reason) = reason {
                item.append_child(Element::new("reason", NS_USER).with_text(reason));
            }
            let mut x = Element::new("x", NS_USER).with_child(item);
            for c in codes.iter().copied().chain(mine.then_some("110")) {
                x.append_child(Element::new("status", NS_USER).with_attr("code", c));
            }
            el.append_child(x);
            el.append_child(
                Element::new("occupant-id", NS_OCCUPANT_ID)
                    .with_attr("id", r.occupant_id(&occ.bare)),
            );
            send(state, &to, &el);
        }
        for s in &occ.sessions {
            if let Some(set) = self.joined.lock().get_mut(s) {
                set.remove(&r.jid);
            }
        }
    }

    fn forget(&self, from: &FullJid, room: &BareJid) {
        let mut joined = self.joined.lock();
        if let Some(set) = joined.get_mut(from) {
            set.remove(room);
            if set.is_empty() {
                joined.remove(from);
            }
        }
    }

    /// One occupant's presence as `to` sees it.
    fn occupant_presence(
        &self,
        r: &Room,
        nick: &str,
        o: &Occupant,
        to: &FullJid,
        sees: bool,
        codes: &[&str],
    ) -> Element {
        let mut el = Element::new("presence", NS_CLIENT)
            .with_attr("from", format!("{}/{nick}", r.jid))
            .with_attr("to", to.to_string());
        for c in &o.presence {
            el.append_child(c.clone());
        }
        let mut item = Element::new("item", NS_USER)
            .with_attr("affiliation", r.doc.affiliation(o.bare.as_str()).name())
            .with_attr("role", o.role.name());
        if sees {
            item.set_attr("jid", o.real_jid());
        }
        let mut x = Element::new("x", NS_USER).with_child(item);
        for c in codes {
            x.append_child(Element::new("status", NS_USER).with_attr("code", *c));
        }
        el.append_child(x);
        el.append_child(
            Element::new("occupant-id", NS_OCCUPANT_ID).with_attr("id", r.occupant_id(&o.bare)),
        );
        el
    }

    /// `nick`'s presence to every occupant; `self_codes` go to the
    /// occupant's own sessions only (110 is always there).
    fn broadcast_presence(
        &self,
        state: &ServerState,
        r: &Room,
        nick: &str,
        self_codes: &[&str],
        _joining: Option<&FullJid>,
    ) {
        let Some(o) = r.occupants.get(nick) else {
            return;
        };
        for (to, sees) in r.audience() {
            let mine = o.sessions.contains(&to);
            let codes: &[&str] = if mine {
                if self_codes.is_empty() {
                    &["110"]
                } else {
                    self_codes
                }
            } else {
                &[]
            };
            let el = self.occupant_presence(r, nick, o, &to, sees || mine, codes);
            send(state, &to, &el);
        }
    }

    // -----------------------------------------------------------------------
    // Messages
    // -----------------------------------------------------------------------

    async fn room_message(
        &self,
        state: &ServerState,
        from: &FullJid,
        room_jid: &BareJid,
        msg: Element,
    ) -> Result<(), StanzaError> {
        let kind = msg.attr("type").unwrap_or("normal");
        if kind == "error" {
            self.depart(state, room_jid, from, None).await;
            return Ok(());
        }
        let room = self
            .room(state, room_jid)
            .await?
            .ok_or_else(|| err(Condition::ItemNotFound, "no such room"))?;
        let mut r = room.lock().await;
        let r = &mut *r;
        if let Some(x) = msg.get_child("x", NS_USER) {
            if let Some(invite) = x.get_child("invite", NS_USER) {
                let result = self.mediated_invite(state, r, from, invite, &msg).await;
                self.unload_if_idle(r);
                return result;
            }
        }
        if kind != "groupchat" {
            self.unload_if_idle(r);
            return Err(err(
                Condition::BadRequest,
                "send type='groupchat' to the room",
            ));
        }
        let Some(nick) = r.nick_of(from).map(str::to_string) else {
            self.unload_if_idle(r);
            return Err(err(Condition::NotAcceptable, "join the room first"));
        };
        let role = r.occupants[&nick].role;
        if role < Role::Participant {
            return Err(err(Condition::Forbidden, "you have no voice in this room"));
        }
        // Rate (per occupant, token bucket).
        {
            let per_sec = state.config.muc.messages_per_minute as f64 / 60.0;
            let burst = state.config.muc.burst as f64;
            let o = r.occupants.get_mut(&nick).expect("found");
            let now = Instant::now();
            let (tokens, last) = o.bucket;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * per_sec).min(burst);
            if tokens < 1.0 {
                o.bucket = (tokens, now);
                return Err(StanzaError::with_text(
                    Condition::PolicyViolation,
                    "too many messages; slow down",
                )
                .with_type(crate::error::ErrorType::Wait));
            }
            o.bucket = (tokens - 1.0, now);
        }
        // A subject change: <subject/> and no body.
        if let Some(subject) = msg.get_child("subject", NS_CLIENT) {
            if msg.get_child("body", NS_CLIENT).is_none() {
                if !(role == Role::Moderator || r.doc.config.change_subject) {
                    return Err(err(
                        Condition::Forbidden,
                        "only moderators change the subject",
                    ));
                }
                r.doc.subject = subject.text();
                r.doc.subject_by = nick.clone();
                self.save(state, r).await?;
                let mut out = Element::new("message", NS_CLIENT)
                    .with_attr("type", "groupchat")
                    .with_attr("id", msg.attr("id").unwrap_or_default().to_string())
                    .with_attr("from", format!("{}/{nick}", r.jid));
                out.append_child(subject.clone());
                self.fan_out(state, r, &out).await;
                return Ok(());
            }
        }
        if let Some(retract) = msg.get_child("retract", NS_RETRACT) {
            let id = retract.attr("id").unwrap_or_default().to_string();
            let original = state
                .store
                .room_archive_get(r.jid.as_str(), &id)
                .await
                .map_err(store_err)?;
            let Some(original) = original else {
                return Err(err(Condition::ItemNotFound, "no such message"));
            };
            if original.with != from.to_bare().as_str() {
                return Err(err(
                    Condition::Forbidden,
                    "only the author retracts a message",
                ));
            }
            let tomb = tombstone(&original.stanza, None);
            state
                .store
                .room_archive_replace(r.jid.as_str(), &id, &tomb)
                .await
                .map_err(store_err)?;
            if let Some(files) = state.modules.try_api::<dyn api::Files>() {
                files
                    .message_removed(state, &original.stanza, &from.to_bare())
                    .await;
            }
        }
        let mut out = msg.clone();
        out.remove_attr("to");
        out.set_attr("from", format!("{}/{nick}", r.jid));
        // Server-only elements a client may not forge.
        out.retain_children(|c| {
            !c.is("stanza-id", vocab::NS_SID) && !c.is("occupant-id", NS_OCCUPANT_ID)
        });
        out.append_child(
            Element::new("occupant-id", NS_OCCUPANT_ID)
                .with_attr("id", r.occupant_id(&from.to_bare())),
        );
        // Markers move the sender's position.
        for marker in ["received", "displayed"] {
            if let Some(m) = msg.get_child(marker, NS_MARKERS) {
                if let Some(id) = m.attr("id") {
                    match state
                        .store
                        .room_set_position(r.jid.as_str(), from.to_bare().as_str(), marker, id)
                        .await
                    {
                        Ok(_) | Err(StoreError::NotFound) => {}
                        Err(e) => return Err(store_err(e)),
                    }
                }
            }
        }
        let archive = r.doc.config.archived
            && (vocab::has_content(&out)
                || msg.get_child("displayed", NS_MARKERS).is_some()
                || msg.get_child("received", NS_MARKERS).is_some());
        let mut stanza_id = None;
        if archive {
            // Self-contained (namespace declared), as the user archive keeps them.
            let stored = out.to_string();
            let ids = state
                .store
                .room_archive_append(r.jid.as_str(), &[(from.to_bare().to_string(), stored)])
                .await
                .map_err(store_err)?;
            stanza_id = ids.into_iter().next();
        }
        if let Some(id) = &stanza_id {
            out.append_child(vocab::stanza_id(id, &r.jid));
        }
        self.fan_out(state, r, &out).await;
        if vocab::has_content(&msg) {
            self.to_absent_members(state, r, &out).await;
        }
        Ok(())
    }

    /// One message to every joined session.
    async fn fan_out(&self, state: &ServerState, r: &Room, out: &Element) {
        for (i, (to, _)) in r.audience().into_iter().enumerate() {
            let mut el = out.clone();
            el.set_attr("to", to.to_string());
            send(state, &to, &el);
            // A 1,024-member room is a thousand queue pushes: let other
            // tasks on this worker run in between.
            if i % FAN_OUT_SLICE == FAN_OUT_SLICE - 1 {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Members not joined now: at their bare JID if they opted in (live or
    /// offline queue, which emits `OfflineQueued`), else the archive keeps
    /// it for them and `GroupMessageMissed` tells listeners (push).
    async fn to_absent_members(&self, state: &ServerState, r: &Room, out: &Element) {
        let present: HashSet<&str> = r.occupants.values().map(|o| o.bare.as_str()).collect();
        let offline = state.modules.try_api::<dyn api::OfflineQueue>();
        for (jid, m) in &r.doc.members {
            if !m.affiliation.is_member() || present.contains(jid.as_str()) {
                continue;
            }
            let Ok(bare) = BareJid::new(jid) else {
                continue;
            };
            if !state.serves(bare.domain().as_str()) {
                continue;
            }
            let mut el = out.clone();
            el.set_attr("to", jid.clone());
            match (&offline, m.offline) {
                (Some(offline), true) => {
                    let limit = state.config.store.offline_limit;
                    if let Err(e) = offline
                        .deliver(state, &bare, None, &el, None, limit, None)
                        .await
                    {
                        tracing::info!(room = %r.jid, member = %jid, error = ?e.condition, "group message not delivered to absent member");
                    }
                }
                _ => {
                    let ev = Event::GroupMessageMissed {
                        user: &bare,
                        room: &r.jid,
                        stanza: &el,
                    };
                    state.modules.emit(state, None, &ev).await;
                }
            }
        }
    }

    async fn private_message(
        &self,
        state: &ServerState,
        from: &FullJid,
        room_jid: &BareJid,
        nick: &str,
        msg: Element,
    ) -> Result<(), StanzaError> {
        if msg.attr("type") == Some("error") {
            return Ok(());
        }
        let room = self
            .loaded(room_jid)
            .ok_or_else(|| err(Condition::ItemNotFound, "no such occupant"))?;
        let r = room.lock().await;
        let sender = r
            .nick_of(from)
            .map(str::to_string)
            .ok_or_else(|| err(Condition::NotAcceptable, "join the room first"))?;
        if !r.doc.config.allow_pm && !r.is_moderator(from) {
            return Err(err(
                Condition::Forbidden,
                "private messages are off in this room",
            ));
        }
        let target = r
            .occupants
            .get(nick)
            .ok_or_else(|| err(Condition::ItemNotFound, "no such occupant"))?;
        for to in &target.sessions {
            let mut el = msg.clone();
            el.set_attr("from", format!("{}/{sender}", r.jid));
            el.set_attr("to", to.to_string());
            el.retain_children(|c| !c.is("x", NS_USER));
            el.append_child(Element::new("x", NS_USER));
            send(state, to, &el);
        }
        Ok(())
    }

    async fn mediated_invite(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        invite: &Element,
        msg: &Element,
    ) -> Result<(), StanzaError> {
        let to: BareJid = invite
            .attr("to")
            .and_then(|t| t.parse::<Jid>().ok())
            .map(|j| j.to_bare())
            .ok_or_else(|| err(Condition::JidMalformed, "invite needs a 'to'"))?;
        let inviter = from.to_bare();
        self.admit(state, r, &inviter, &to).await?;
        let reason = invite.child_text("reason", NS_USER);
        let mut inv = Element::new("invite", NS_USER).with_attr("from", inviter.to_string());
        if let Some(reason) = &reason {
            inv.append_child(Element::new("reason", NS_USER).with_text(reason.clone()));
        }
        let mut x = Element::new("x", NS_USER).with_child(inv);
        if !r.doc.config.password.is_empty() {
            x.append_child(
                Element::new("password", NS_USER).with_text(r.doc.config.password.clone()),
            );
        }
        let mut out = Element::new("message", NS_CLIENT)
            .with_attr("from", r.jid.to_string())
            .with_attr("to", to.to_string())
            .with_attr("id", msg.attr("id").map_or_else(new_id, str::to_string))
            .with_child(x);
        let mut direct = Element::new("x", NS_CONFERENCE).with_attr("jid", r.jid.to_string());
        if let Some(reason) = reason {
            direct.set_attr("reason", reason);
        }
        out.append_child(direct);
        if state.serves(to.domain().as_str()) {
            if let Some(offline) = state.modules.try_api::<dyn api::OfflineQueue>() {
                offline
                    .deliver(
                        state,
                        &to,
                        None,
                        &out,
                        None,
                        state.config.store.offline_limit,
                        None,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// `inviter` invites `invitee`: in a members-only room the invitee
    /// becomes a member, if the inviter may invite.
    async fn admit(
        &self,
        state: &ServerState,
        r: &mut Room,
        inviter: &BareJid,
        invitee: &BareJid,
    ) -> Result<(), StanzaError> {
        let aff = r.doc.affiliation(inviter.as_str());
        let present = r.occupants.values().any(|o| o.bare == *inviter);
        if !present && !aff.is_member() {
            return Err(err(Condition::NotAcceptable, "join the room first"));
        }
        if !r.doc.config.members_only {
            return Ok(());
        }
        if aff < Affiliation::Admin && !r.doc.config.allow_invites {
            return Err(err(Condition::Forbidden, "only admins invite to this room"));
        }
        match r.doc.affiliation(invitee.as_str()) {
            Affiliation::Outcast => Err(err(Condition::Forbidden, "that user is banned")),
            a if a.is_member() => Ok(()),
            _ => {
                if r.doc.member_count() >= state.config.muc.max_members {
                    return Err(err(
                        Condition::PolicyViolation,
                        "the room has as many members as it may",
                    ));
                }
                r.doc
                    .members
                    .insert(invitee.to_string(), Member::new(Affiliation::Member));
                self.save(state, r).await
            }
        }
    }

    async fn direct_invite(&self, cx: &Cx<'_>, room: &str, invitee: &BareJid) {
        let Ok(room_jid) = BareJid::new(room) else {
            return;
        };
        if !self
            .services(&cx.state.config)
            .iter()
            .any(|s| s.domain == room_jid.domain().as_str())
        {
            return;
        }
        let Ok(Some(r)) = self.room(cx.state, &room_jid).await else {
            return;
        };
        let mut r = r.lock().await;
        if let Err(e) = self
            .admit(cx.state, &mut r, &cx.session.bare, invitee)
            .await
        {
            tracing::debug!(room, error = ?e.condition, "direct invitation did not make a member");
        }
        self.unload_if_idle(&r);
    }

    // -----------------------------------------------------------------------
    // IQs
    // -----------------------------------------------------------------------

    async fn service_iq(
        &self,
        state: &ServerState,
        from: &FullJid,
        to: &Jid,
        iq: &Element,
    ) -> Result<(), StanzaError> {
        let Some(payload) = iq.children().next() else {
            return Err(StanzaError::new(Condition::BadRequest));
        };
        let get = iq.attr("type") == Some("get");
        let result = if get
            && payload.is("query", vocab::NS_DISCO_INFO)
            && payload.attr("node").is_none()
        {
            let mut q = Element::new("query", vocab::NS_DISCO_INFO).with_child(
                Element::new("identity", vocab::NS_DISCO_INFO)
                    .with_attr("category", "conference")
                    .with_attr("type", "text")
                    .with_attr("name", "Group chats"),
            );
            for f in [
                vocab::NS_DISCO_INFO,
                vocab::NS_DISCO_ITEMS,
                NS_MUC,
                NS_REGISTER,
                NS_OCCUPANT_ID,
                NS_RETRACT,
                NS_MODERATE,
                vocab::NS_MAM,
                NS_READ,
                NS_PING,
            ] {
                q.append_child(Element::new("feature", vocab::NS_DISCO_INFO).with_attr("var", f));
            }
            q
        } else if get && payload.is("query", vocab::NS_DISCO_ITEMS) {
            let mut q = Element::new("query", vocab::NS_DISCO_ITEMS);
            let mut names: BTreeMap<String, String> = BTreeMap::new();
            for jid in state
                .store
                .room_list(to.domain().as_str())
                .await
                .map_err(store_err)?
            {
                let Ok(bare) = BareJid::new(&jid) else {
                    continue;
                };
                if let Some(r) = self.room(state, &bare).await? {
                    let r = r.lock().await;
                    if r.doc.config.public {
                        names.insert(jid.clone(), r.doc.config.name.clone());
                    }
                    self.unload_if_idle(&r);
                }
            }
            let temporary: Vec<RoomRef> = self.rooms.lock().values().cloned().collect();
            for r in temporary {
                let r = r.lock().await;
                if r.doc.config.public && !r.doc.config.persistent && r.jid.domain() == to.domain()
                {
                    names.insert(r.jid.to_string(), r.doc.config.name.clone());
                }
            }
            for (jid, name) in names {
                let mut item = Element::new("item", vocab::NS_DISCO_ITEMS).with_attr("jid", jid);
                if !name.is_empty() {
                    item.set_attr("name", name);
                }
                q.append_child(item);
            }
            q
        } else if payload.is("ping", NS_PING) {
            return reply(state, from, iq, None);
        } else {
            return Err(StanzaError::new(Condition::FeatureNotImplemented));
        };
        reply(state, from, iq, Some(result))
    }

    async fn room_iq(
        &self,
        state: &ServerState,
        from: &FullJid,
        room_jid: &BareJid,
        iq: &Element,
    ) -> Result<(), StanzaError> {
        let kind = iq.attr("type").unwrap_or_default();
        if matches!(kind, "result" | "error") {
            return Ok(());
        }
        let Some(payload) = iq.children().next() else {
            return Err(StanzaError::new(Condition::BadRequest));
        };
        let get = kind == "get";
        let room = self
            .room(state, room_jid)
            .await?
            .ok_or_else(|| err(Condition::ItemNotFound, "no such room"))?;
        let mut r = room.lock().await;
        let r = &mut *r;
        let bare = from.to_bare();
        let aff = r.doc.affiliation(bare.as_str());
        let result = match (payload.name.as_str(), payload.ns.as_str(), get) {
            ("query", vocab::NS_DISCO_INFO, true) => {
                let insider = aff.is_member() || !r.doc.config.members_only;
                Ok(Some(room_info(r, insider && aff != Affiliation::Outcast)))
            }
            ("query", vocab::NS_DISCO_ITEMS, true) => {
                let mut q = Element::new("query", vocab::NS_DISCO_ITEMS);
                if !r.doc.config.members_only || aff.is_member() {
                    for nick in r.occupants.keys() {
                        q.append_child(
                            Element::new("item", vocab::NS_DISCO_ITEMS)
                                .with_attr("jid", format!("{}/{nick}", r.jid)),
                        );
                    }
                }
                Ok(Some(q))
            }
            ("query", NS_OWNER, _) => self.owner_iq(state, r, from, payload, get).await,
            ("query", NS_ADMIN, _) => self.admin_iq(state, r, from, payload, get).await,
            ("query", NS_REGISTER, _) => self.register_iq(state, r, from, payload, get).await,
            ("query", mam::NS, false) => {
                let present = r.nick_of(from).is_some();
                let allowed = aff.is_member()
                    || (present && !r.doc.config.members_only)
                    || (r.doc.config.public && !r.doc.config.members_only);
                if aff == Affiliation::Outcast || !allowed {
                    Err(err(
                        Condition::Forbidden,
                        "only members read this room's archive",
                    ))
                } else {
                    let session = state
                        .routing
                        .session(from)
                        .ok_or_else(|| StanzaError::new(Condition::RecipientUnavailable))?;
                    let room = r.jid.to_string();
                    mam::query_archive(
                        state,
                        mam::Source::Room(&room),
                        &session,
                        payload,
                        Some(&room),
                    )
                    .await
                }
            }
            ("moderate", NS_MODERATE, false) => self.moderate(state, r, from, payload).await,
            ("read", NS_READ, true) => read_receipt(state, r, &bare, payload).await,
            ("vCard", VCARD, true) => Ok(Some(if r.doc.vcard.is_empty() {
                Element::new("vCard", VCARD)
            } else {
                natter_xml::parse_frame(r.doc.vcard.as_bytes(), &natter_xml::Limits::default())
                    .unwrap_or_else(|_| Element::new("vCard", VCARD))
            })),
            ("vCard", VCARD, false) => {
                if aff != Affiliation::Owner {
                    Err(err(
                        Condition::Forbidden,
                        "only owners set the room's avatar",
                    ))
                } else {
                    r.doc.vcard = payload.to_string();
                    self.save(state, r).await.map(|_| None)
                }
            }
            ("ping", NS_PING, true) => Ok(None),
            _ => Err(StanzaError::new(Condition::FeatureNotImplemented)),
        };
        self.unload_if_idle(r);
        reply(state, from, iq, result?)
    }

    /// IQs to room/nick: XEP-0410 self-ping is answered here.
    async fn occupant_iq(
        &self,
        state: &ServerState,
        from: &FullJid,
        room_jid: &BareJid,
        nick: &str,
        iq: &Element,
    ) -> Result<(), StanzaError> {
        if matches!(iq.attr("type"), Some("result" | "error")) {
            return Ok(());
        }
        let room = self
            .loaded(room_jid)
            .ok_or_else(|| err(Condition::NotAcceptable, "not joined"))?;
        let r = room.lock().await;
        let mine = r.nick_of(from) == Some(nick);
        let is_ping = iq.children().next().is_some_and(|p| p.is("ping", NS_PING));
        if is_ping && mine {
            return reply(state, from, iq, None);
        }
        if r.nick_of(from).is_none() {
            return Err(err(Condition::NotAcceptable, "not joined"));
        }
        if !r.occupants.contains_key(nick) {
            return Err(err(Condition::ItemNotFound, "no such occupant"));
        }
        // IQs between occupants would need id rewriting to route the answer
        // back; not offered (clients then ask the real JID, when visible).
        Err(StanzaError::new(Condition::FeatureNotImplemented))
    }

    async fn owner_iq(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        q: &Element,
        get: bool,
    ) -> Result<Option<Element>, StanzaError> {
        if r.doc.affiliation(from.to_bare().as_str()) != Affiliation::Owner {
            return Err(err(Condition::Forbidden, "only owners configure the room"));
        }
        if get {
            return Ok(Some(
                Element::new("query", NS_OWNER).with_child(config_form(&r.doc.config)),
            ));
        }
        if let Some(destroy) = q.get_child("destroy", NS_OWNER) {
            let reason = destroy.child_text("reason", NS_OWNER);
            for (nick, occ) in std::mem::take(&mut r.occupants) {
                for s in &occ.sessions {
                    let mut x = Element::new("x", NS_USER).with_child(
                        Element::new("item", NS_USER)
                            .with_attr("affiliation", "none")
                            .with_attr("role", "none"),
                    );
                    let mut d = Element::new("destroy", NS_USER);
                    if let Some(alt) = destroy.attr("jid") {
                        d.set_attr("jid", alt);
                    }
                    if let Some(reason) = &reason {
                        d.append_child(Element::new("reason", NS_USER).with_text(reason.clone()));
                    }
                    x.append_child(d);
                    let el = Element::new("presence", NS_CLIENT)
                        .with_attr("from", format!("{}/{nick}", r.jid))
                        .with_attr("to", s.to_string())
                        .with_attr("type", "unavailable")
                        .with_child(x);
                    send(state, s, &el);
                    self.forget(s, &r.jid);
                }
            }
            state
                .store
                .room_delete(r.jid.as_str())
                .await
                .map_err(store_err)?;
            r.stored = false;
            self.rooms.lock().remove(&r.jid);
            return Ok(None);
        }
        let Some(x) = q.get_child("x", vocab::NS_DATA) else {
            // An empty set: accept the defaults (instant room).
            return Ok(None);
        };
        match x.attr("type") {
            Some("cancel") => return Ok(None),
            Some("submit") => {}
            _ => return Err(err(Condition::BadRequest, "submit a form of type 'submit'")),
        }
        let before = r.doc.config.clone();
        apply_form(&mut r.doc.config, x, state.config.muc.max_members)?;
        self.save(state, r).await?;
        // Status codes for changes that occupants should know (§10.2.1).
        let mut codes = Vec::new();
        if before.whois_anyone != r.doc.config.whois_anyone {
            codes.push(if r.doc.config.whois_anyone {
                "172"
            } else {
                "173"
            });
        }
        if before.archived != r.doc.config.archived {
            codes.push(if r.doc.config.archived { "170" } else { "171" });
        }
        codes.push("104");
        let mut x = Element::new("x", NS_USER);
        for c in codes {
            x.append_child(Element::new("status", NS_USER).with_attr("code", c));
        }
        let note = Element::new("message", NS_CLIENT)
            .with_attr("type", "groupchat")
            .with_attr("from", r.jid.to_string())
            .with_attr("id", new_id())
            .with_child(x);
        self.fan_out(state, r, &note).await;
        // Members-only now: non-members leave (321).
        if r.doc.config.members_only && !before.members_only {
            self.drop_non_members(state, r);
        }
        Ok(None)
    }

    fn drop_non_members(&self, state: &ServerState, r: &mut Room) {
        let out: Vec<String> = r
            .occupants
            .iter()
            .filter(|(_, o)| !r.doc.affiliation(o.bare.as_str()).is_member())
            .map(|(n, _)| n.clone())
            .collect();
        for nick in out {
            if let Some(occ) = r.occupants.remove(&nick) {
                let me = occ.sessions[0].clone();
                self.gone(state, r, &nick, &occ, &me, &["321"], None, None);
            }
        }
    }

    async fn admin_iq(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        q: &Element,
        get: bool,
    ) -> Result<Option<Element>, StanzaError> {
        let me = from.to_bare();
        let my_aff = r.doc.affiliation(me.as_str());
        let moderator = r.is_moderator(from) || my_aff >= Affiliation::Admin;
        let items: Vec<&Element> = q.children().filter(|c| c.is("item", NS_ADMIN)).collect();
        if items.is_empty() {
            return Err(err(Condition::BadRequest, "no item"));
        }
        if get {
            // Lists: members see the member list (WhatsApp: everyone sees the
            // group's members; OMEMO clients need it), moderators see all.
            let mut out = Element::new("query", NS_ADMIN);
            for item in items {
                if let Some(aff) = item.attr("affiliation").and_then(Affiliation::parse) {
                    let allowed = match aff {
                        Affiliation::Member | Affiliation::Admin | Affiliation::Owner => {
                            my_aff.is_member() || moderator
                        }
                        _ => my_aff >= Affiliation::Admin,
                    };
                    if !allowed {
                        return Err(err(Condition::Forbidden, "not allowed to see that list"));
                    }
                    for (jid, m) in r.doc.members.iter().filter(|(_, m)| m.affiliation == aff) {
                        let mut it = Element::new("item", NS_ADMIN)
                            .with_attr("affiliation", aff.name())
                            .with_attr("jid", jid.clone());
                        if let Some(n) = &m.nick {
                            it.set_attr("nick", n.clone());
                        }
                        if !m.reason.is_empty() {
                            it.append_child(
                                Element::new("reason", NS_ADMIN).with_text(m.reason.clone()),
                            );
                        }
                        out.append_child(it);
                    }
                } else if let Some(role) = item.attr("role").and_then(Role::parse) {
                    if !moderator {
                        return Err(err(Condition::Forbidden, "only moderators list roles"));
                    }
                    for (nick, o) in r.occupants.iter().filter(|(_, o)| o.role == role) {
                        out.append_child(
                            Element::new("item", NS_ADMIN)
                                .with_attr("role", role.name())
                                .with_attr("nick", nick.clone())
                                .with_attr("jid", o.bare.to_string())
                                .with_attr(
                                    "affiliation",
                                    r.doc.affiliation(o.bare.as_str()).name(),
                                ),
                        );
                    }
                } else {
                    return Err(err(
                        Condition::BadRequest,
                        "item needs an affiliation or a role",
                    ));
                }
            }
            return Ok(Some(out));
        }
        // Check every item first: all or nothing.
        enum Change {
            Aff(BareJid, Affiliation, String),
            Role(String, Role, String),
        }
        let mut changes = Vec::new();
        for item in &items {
            let reason = item.child_text("reason", NS_ADMIN).unwrap_or_default();
            if let Some(aff) = item.attr("affiliation") {
                let aff = Affiliation::parse(aff)
                    .ok_or_else(|| err(Condition::BadRequest, "unknown affiliation"))?;
                let jid = match (item.attr("jid"), item.attr("nick")) {
                    (Some(j), _) => j
                        .parse::<Jid>()
                        .map_err(|_| StanzaError::new(Condition::JidMalformed))?
                        .to_bare(),
                    (None, Some(n)) => r
                        .occupants
                        .get(n)
                        .map(|o| o.bare.clone())
                        .ok_or_else(|| err(Condition::ItemNotFound, "no such occupant"))?,
                    _ => return Err(err(Condition::BadRequest, "item needs a jid")),
                };
                let current = r.doc.affiliation(jid.as_str());
                // Owners change anything; admins only below admin, to below admin.
                let ok = my_aff == Affiliation::Owner
                    || (my_aff == Affiliation::Admin
                        && current < Affiliation::Admin
                        && aff < Affiliation::Admin);
                if !ok {
                    return Err(err(
                        Condition::NotAllowed,
                        "you may not change that affiliation",
                    ));
                }
                changes.push(Change::Aff(jid, aff, reason));
            } else if let Some(role) = item.attr("role") {
                let role =
                    Role::parse(role).ok_or_else(|| err(Condition::BadRequest, "unknown role"))?;
                let nick = item
                    .attr("nick")
                    .ok_or_else(|| err(Condition::BadRequest, "item needs a nick"))?;
                let target = r
                    .occupants
                    .get(nick)
                    .ok_or_else(|| err(Condition::ItemNotFound, "no such occupant"))?;
                let target_aff = r.doc.affiliation(target.bare.as_str());
                let ok = moderator
                    && target_aff <= my_aff
                    && (target_aff < Affiliation::Admin || my_aff == Affiliation::Owner)
                    && (role != Role::Moderator || my_aff >= Affiliation::Admin);
                if !ok {
                    return Err(err(Condition::NotAllowed, "you may not change that role"));
                }
                changes.push(Change::Role(nick.to_string(), role, reason));
            } else {
                return Err(err(
                    Condition::BadRequest,
                    "item needs an affiliation or a role",
                ));
            }
        }
        // The last owner cannot step down (the room would have none).
        let mut after = r.doc.members.clone();
        for c in &changes {
            if let Change::Aff(j, a, _) = c {
                if *a == Affiliation::None {
                    after.remove(j.as_str());
                } else {
                    after
                        .entry(j.to_string())
                        .or_insert_with(|| Member::new(*a))
                        .affiliation = *a;
                }
            }
        }
        if !after.values().any(|m| m.affiliation == Affiliation::Owner) {
            return Err(err(Condition::Conflict, "a room needs an owner"));
        }
        if after.values().filter(|m| m.affiliation.is_member()).count()
            > state.config.muc.max_members
            && after.len() > r.doc.members.len()
        {
            return Err(err(
                Condition::PolicyViolation,
                "the room has as many members as it may",
            ));
        }
        for c in &changes {
            if let Change::Aff(j, a, reason) = c {
                if let Some(m) = after.get_mut(j.as_str()) {
                    m.reason = reason.clone();
                }
                let _ = a;
            }
        }
        r.doc.members = after;
        self.save(state, r).await?;
        for c in changes {
            match c {
                Change::Aff(jid, aff, reason) => {
                    let nicks: Vec<String> = r
                        .occupants
                        .iter()
                        .filter(|(_, o)| o.bare == jid)
                        .map(|(n, _)| n.clone())
                        .collect();
                    for nick in nicks {
                        let removed = aff == Affiliation::Outcast
                            || (r.doc.config.members_only && !aff.is_member());
                        if removed {
                            let occ = r.occupants.remove(&nick).expect("listed");
                            let code = if aff == Affiliation::Outcast {
                                "301"
                            } else {
                                "321"
                            };
                            let me = occ.sessions[0].clone();
                            self.gone(
                                state,
                                r,
                                &nick,
                                &occ,
                                &me,
                                &[code],
                                None,
                                Some(&reason).filter(|s| !s.is_empty()).map(|s| s.as_str()),
                            );
                        } else {
                            let role = r.role_for(aff);
                            if let Some(o) = r.occupants.get_mut(&nick) {
                                o.role = role;
                            }
                            self.broadcast_presence(state, r, &nick, &[], None);
                        }
                    }
                }
                Change::Role(nick, role, reason) => {
                    if role == Role::None {
                        if let Some(occ) = r.occupants.remove(&nick) {
                            let me = occ.sessions[0].clone();
                            self.gone(
                                state,
                                r,
                                &nick,
                                &occ,
                                &me,
                                &["307"],
                                None,
                                Some(&reason).filter(|s| !s.is_empty()).map(|s| s.as_str()),
                            );
                        }
                    } else {
                        if let Some(o) = r.occupants.get_mut(&nick) {
                            o.role = role;
                        }
                        self.broadcast_presence(state, r, &nick, &[], None);
                    }
                }
            }
        }
        Ok(None)
    }

    async fn register_iq(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        q: &Element,
        get: bool,
    ) -> Result<Option<Element>, StanzaError> {
        let bare = from.to_bare();
        let aff = r.doc.affiliation(bare.as_str());
        if aff == Affiliation::Outcast {
            return Err(err(Condition::Forbidden, "you are banned from this room"));
        }
        if r.doc.config.members_only && !aff.is_member() {
            return Err(StanzaError::with_text(
                Condition::RegistrationRequired,
                "members only: ask an admin to add you",
            ));
        }
        let member = r.doc.members.get(bare.as_str());
        if get {
            let mut query = Element::new("query", NS_REGISTER);
            if let Some(n) = member.and_then(|m| m.nick.clone()) {
                query.append_child(Element::new("registered", NS_REGISTER));
                query.append_child(Element::new("username", NS_REGISTER).with_text(n));
            }
            let form = Element::new("x", vocab::NS_DATA)
                .with_attr("type", "form")
                .with_child(hidden_form_type(NS_REGISTER_FORM))
                .with_child(field(
                    "muc#register_roomnick",
                    "text-single",
                    "Nickname",
                    &[member.and_then(|m| m.nick.clone()).unwrap_or_default()],
                ))
                .with_child(field(
                    OFFLINE_FIELD,
                    "boolean",
                    "Receive messages while not joined",
                    &[if member.is_some_and(|m| m.offline) {
                        "1".into()
                    } else {
                        "0".into()
                    }],
                ));
            query.append_child(form);
            return Ok(Some(query));
        }
        if q.get_child("remove", NS_REGISTER).is_some() {
            if aff == Affiliation::Owner {
                return Err(err(Condition::NotAllowed, "an owner cannot unregister"));
            }
            r.doc.members.remove(bare.as_str());
            self.save(state, r).await?;
            return Ok(None);
        }
        let x = q
            .get_child("x", vocab::NS_DATA)
            .ok_or_else(|| err(Condition::BadRequest, "submit the registration form"))?;
        let values = form_values(x);
        let nick = values
            .get("muc#register_roomnick")
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_default();
        if nick.trim().is_empty() {
            return Err(err(Condition::NotAcceptable, "a nickname is required"));
        }
        if r.doc.reserved_by_other(&nick, &bare)
            || r.occupants.get(&nick).is_some_and(|o| o.bare != bare)
        {
            return Err(err(Condition::Conflict, "nickname in use"));
        }
        let offline = values
            .get(OFFLINE_FIELD)
            .and_then(|v| v.first())
            .is_some_and(|v| v == "1" || v == "true");
        if !aff.is_member() && r.doc.member_count() >= state.config.muc.max_members {
            return Err(err(
                Condition::PolicyViolation,
                "the room has as many members as it may",
            ));
        }
        let m = r
            .doc
            .members
            .entry(bare.to_string())
            .or_insert_with(|| Member::new(Affiliation::Member));
        m.nick = Some(nick);
        m.offline = offline;
        self.save(state, r).await?;
        Ok(None)
    }

    async fn moderate(
        &self,
        state: &ServerState,
        r: &mut Room,
        from: &FullJid,
        m: &Element,
    ) -> Result<Option<Element>, StanzaError> {
        let nick = r.nick_of(from).map(str::to_string);
        if !r.is_moderator(from) {
            return Err(err(Condition::Forbidden, "only moderators moderate"));
        }
        let id = m
            .attr("id")
            .ok_or_else(|| err(Condition::BadRequest, "moderate needs an id"))?;
        if m.get_child("retract", NS_RETRACT).is_none() {
            return Err(err(Condition::BadRequest, "only retraction is supported"));
        }
        let reason = m.child_text("reason", NS_MODERATE);
        let original = state
            .store
            .room_archive_get(r.jid.as_str(), id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| err(Condition::ItemNotFound, "no such message"))?;
        let by = format!("{}/{}", r.jid, nick.unwrap_or_default());
        let tomb = tombstone(&original.stanza, Some(&by));
        state
            .store
            .room_archive_replace(r.jid.as_str(), id, &tomb)
            .await
            .map_err(store_err)?;
        let author = BareJid::new(&original.with).ok();
        if let (Some(files), Some(author)) = (state.modules.try_api::<dyn api::Files>(), author) {
            files
                .message_removed(state, &original.stanza, &author)
                .await;
        }
        let mut moderated = Element::new("moderated", NS_MODERATE)
            .with_attr("by", by)
            .with_child(
                Element::new("occupant-id", NS_OCCUPANT_ID)
                    .with_attr("id", r.occupant_id(&from.to_bare())),
            );
        let _ = &mut moderated;
        let mut retract = Element::new("retract", NS_RETRACT)
            .with_attr("id", id)
            .with_child(moderated);
        if let Some(reason) = reason {
            retract.append_child(Element::new("reason", NS_RETRACT).with_text(reason));
        }
        let mut out = Element::new("message", NS_CLIENT)
            .with_attr("type", "groupchat")
            .with_attr("from", r.jid.to_string())
            .with_attr("id", new_id())
            .with_child(retract);
        let stored = out.to_string();
        if r.doc.config.archived {
            if let Some(sid) = state
                .store
                .room_archive_append(r.jid.as_str(), &[(r.jid.to_string(), stored)])
                .await
                .map_err(store_err)?
                .into_iter()
                .next()
            {
                out.append_child(vocab::stanza_id(&sid, &r.jid));
            }
        }
        self.fan_out(state, r, &out).await;
        self.to_absent_members(state, r, &out).await;
        Ok(None)
    }
}

/// The IQ result to `from`.
fn reply(
    state: &ServerState,
    from: &FullJid,
    iq: &Element,
    payload: Option<Element>,
) -> Result<(), StanzaError> {
    let mut res = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("to", from.to_string());
    if let Some(to) = iq.attr("to") {
        res.set_attr("from", to);
    }
    if let Some(id) = iq.attr("id") {
        res.set_attr("id", id);
    }
    if let Some(p) = payload {
        res.append_child(p);
    }
    send(state, from, &res);
    Ok(())
}

/// What of a presence an occupant's presence carries: show, status,
/// priority-free extensions (caps, vCard avatar hash), not MUC's own.
fn presence_payload(p: &Element) -> Vec<Element> {
    p.children()
        .filter(|c| {
            !(c.ns == NS_MUC
                || c.ns == NS_USER
                || c.is("priority", NS_CLIENT)
                || c.ns == NS_OCCUPANT_ID
                || c.name == "error")
        })
        .cloned()
        .collect()
}

/// Which history a joining client gets (XEP-0045 §7.2.15).
#[derive(Debug, PartialEq)]
enum History {
    /// `maxstanzas`, `maxchars='0'` (none) or the default: the last N.
    Last(usize),
    /// `since` / `seconds`: what was archived from then on (at most a page).
    Since(i64),
    /// No `<history/>`: for a member who has read before, what came after
    /// their last displayed marker (WhatsApp: the chat opens where you
    /// left it), at most a page; else the last `muc.history`.
    Unread,
}

fn history_wanted(x: Option<&Element>, default: usize) -> History {
    let Some(h) = x.and_then(|x| x.get_child("history", NS_MUC)) else {
        return History::Unread;
    };
    let number = |a: &str| h.attr(a).and_then(|v| v.trim().parse::<i64>().ok());
    if number("maxchars") == Some(0) {
        return History::Last(0);
    }
    if let Some(n) = number("maxstanzas") {
        return History::Last((n.max(0) as usize).min(mam::MAX_PAGE));
    }
    if let Some(since) = h.attr("since").and_then(vocab::parse_stamp) {
        return History::Since(since);
    }
    if let Some(secs) = number("seconds") {
        return History::Since(vocab::now_micros() - secs.max(0).saturating_mul(1_000_000));
    }
    History::Last(default)
}

/// The archived copy of a retracted message: who, when, not what.
fn tombstone(original: &str, by: Option<&str>) -> String {
    let limits = natter_xml::Limits::default();
    let orig = natter_xml::parse_frame(original.as_bytes(), &limits).ok();
    let mut el = Element::new("message", NS_CLIENT).with_attr("type", "groupchat");
    if let Some(o) = &orig {
        for a in ["from", "id"] {
            if let Some(v) = o.attr(a) {
                el.set_attr(a, v);
            }
        }
        if let Some(oid) = o.get_child("occupant-id", NS_OCCUPANT_ID) {
            el.append_child(oid.clone());
        }
    }
    let mut retracted =
        Element::new("retracted", NS_RETRACT).with_attr("stamp", vocab::stamp(vocab::now_micros()));
    if let Some(by) = by {
        retracted.append_child(Element::new("moderated", NS_MODERATE).with_attr("by", by));
    }
    el.append_child(retracted);
    el.to_string()
}

/// "Read by N of M": who of the room's members has displayed (read) or
/// received message `id` or a later one.
async fn read_receipt(
    state: &ServerState,
    r: &Room,
    asker: &BareJid,
    q: &Element,
) -> Result<Option<Element>, StanzaError> {
    if !r.doc.affiliation(asker.as_str()).is_member() {
        return Err(err(
            Condition::Forbidden,
            "only members ask who read a message",
        ));
    }
    let id = q
        .attr("id")
        .ok_or_else(|| err(Condition::BadRequest, "which message: id"))?;
    let members: Vec<&String> = r
        .doc
        .members
        .iter()
        .filter(|(_, m)| m.affiliation.is_member())
        .map(|(j, _)| j)
        .collect();
    let mut out = Element::new("read", NS_READ)
        .with_attr("id", id)
        .with_attr("members", members.len().to_string());
    for kind in ["displayed", "received"] {
        let past = state
            .store
            .room_members_past(r.jid.as_str(), kind, id)
            .await
            .map_err(store_err)?;
        let past: Vec<String> = past
            .into_iter()
            .filter(|j| r.doc.affiliation(j).is_member())
            .collect();
        out.set_attr(kind, past.len().to_string());
        for j in past {
            out.append_child(Element::new(kind, NS_READ).with_attr("jid", j));
        }
    }
    Ok(Some(out))
}

/// disco#info of a room; the subject and occupant count only for those
/// who may read the room (`insider`).
fn room_info(r: &Room, insider: bool) -> Element {
    let c = &r.doc.config;
    let mut q = Element::new("query", vocab::NS_DISCO_INFO).with_child(
        Element::new("identity", vocab::NS_DISCO_INFO)
            .with_attr("category", "conference")
            .with_attr("type", "text")
            .with_attr(
                "name",
                if c.name.is_empty() {
                    r.jid
                        .node()
                        .map(|n| n.as_str())
                        .unwrap_or_default()
                        .to_string()
                } else {
                    c.name.clone()
                },
            ),
    );
    let mut features = vec![
        NS_MUC,
        NS_REGISTER,
        NS_OCCUPANT_ID,
        NS_RETRACT,
        NS_MODERATE,
        NS_READ,
        NS_SELF_PING,
        "muc_stable_id",
        VCARD,
    ];
    features.push(if c.persistent {
        "muc_persistent"
    } else {
        "muc_temporary"
    });
    features.push(if c.members_only {
        "muc_membersonly"
    } else {
        "muc_open"
    });
    features.push(if c.moderated {
        "muc_moderated"
    } else {
        "muc_unmoderated"
    });
    features.push(if c.whois_anyone {
        "muc_nonanonymous"
    } else {
        "muc_semianonymous"
    });
    features.push(if c.password.is_empty() {
        "muc_unsecured"
    } else {
        "muc_passwordprotected"
    });
    features.push(if c.public { "muc_public" } else { "muc_hidden" });
    if c.archived {
        features.push(vocab::NS_MAM);
    }
    for f in features {
        q.append_child(Element::new("feature", vocab::NS_DISCO_INFO).with_attr("var", f));
    }
    let mut form = Element::new("x", vocab::NS_DATA)
        .with_attr("type", "result")
        .with_child(hidden_form_type(NS_ROOMINFO))
        .with_child(field(
            "muc#roominfo_description",
            "text-single",
            "Description",
            std::slice::from_ref(&c.description),
        ))
        .with_child(field(
            "muc#roomconfig_roomname",
            "text-single",
            "Name",
            std::slice::from_ref(&c.name),
        ));
    if insider {
        form.append_child(field(
            "muc#roominfo_subject",
            "text-single",
            "Subject",
            std::slice::from_ref(&r.doc.subject),
        ));
        form.append_child(field(
            "muc#roominfo_occupants",
            "text-single",
            "Occupants",
            &[r.occupants.len().to_string()],
        ));
    }
    q.append_child(form);
    q
}

fn hidden_form_type(ns: &str) -> Element {
    Element::new("field", vocab::NS_DATA)
        .with_attr("var", "FORM_TYPE")
        .with_attr("type", "hidden")
        .with_child(Element::new("value", vocab::NS_DATA).with_text(ns))
}

fn field(var: &str, kind: &str, label: &str, values: &[String]) -> Element {
    let mut f = Element::new("field", vocab::NS_DATA)
        .with_attr("var", var)
        .with_attr("type", kind)
        .with_attr("label", label);
    for v in values {
        f.append_child(Element::new("value", vocab::NS_DATA).with_text(v.clone()));
    }
    f
}

fn bool_value(b: bool) -> Vec<String> {
    vec![if b { "1" } else { "0" }.into()]
}

fn config_form(c: &RoomConfig) -> Element {
    let whois = if c.whois_anyone {
        "anyone"
    } else {
        "moderators"
    };
    let mut whois_field = field(
        "muc#roomconfig_whois",
        "list-single",
        "Who may see real JIDs",
        &[whois.into()],
    );
    for o in ["moderators", "anyone"] {
        whois_field.append_child(
            Element::new("option", vocab::NS_DATA)
                .with_child(Element::new("value", vocab::NS_DATA).with_text(o)),
        );
    }
    Element::new("x", vocab::NS_DATA)
        .with_attr("type", "form")
        .with_child(hidden_form_type(NS_ROOMCONFIG))
        .with_child(field(
            "muc#roomconfig_roomname",
            "text-single",
            "Name",
            std::slice::from_ref(&c.name),
        ))
        .with_child(field(
            "muc#roomconfig_roomdesc",
            "text-single",
            "Description",
            std::slice::from_ref(&c.description),
        ))
        .with_child(field(
            "muc#roomconfig_persistentroom",
            "boolean",
            "Persistent",
            &bool_value(c.persistent),
        ))
        .with_child(field(
            "muc#roomconfig_membersonly",
            "boolean",
            "Members only",
            &bool_value(c.members_only),
        ))
        .with_child(field(
            "muc#roomconfig_moderatedroom",
            "boolean",
            "Moderated",
            &bool_value(c.moderated),
        ))
        .with_child(field(
            "muc#roomconfig_passwordprotectedroom",
            "boolean",
            "Password protected",
            &bool_value(!c.password.is_empty()),
        ))
        .with_child(field(
            "muc#roomconfig_roomsecret",
            "text-private",
            "Password",
            std::slice::from_ref(&c.password),
        ))
        .with_child(field(
            "muc#roomconfig_publicroom",
            "boolean",
            "Listed in the directory",
            &bool_value(c.public),
        ))
        .with_child(whois_field)
        .with_child(field(
            "muc#roomconfig_maxusers",
            "text-single",
            "Most occupants",
            &[c.max_users.to_string()],
        ))
        .with_child(field(
            "muc#roomconfig_enablearchiving",
            "boolean",
            "Archived",
            &bool_value(c.archived),
        ))
        .with_child(field("mam", "boolean", "Archived", &bool_value(c.archived)))
        .with_child(field(
            "muc#roomconfig_allowinvites",
            "boolean",
            "Members may invite",
            &bool_value(c.allow_invites),
        ))
        .with_child(field(
            "muc#roomconfig_changesubject",
            "boolean",
            "Occupants may change the subject",
            &bool_value(c.change_subject),
        ))
        .with_child(field(
            "muc#roomconfig_allowpm",
            "list-single",
            "Private messages",
            &[if c.allow_pm { "anyone" } else { "moderators" }.into()],
        ))
}

fn form_values(x: &Element) -> HashMap<String, Vec<String>> {
    x.children()
        .filter(|f| f.is("field", vocab::NS_DATA))
        .filter_map(|f| {
            let var = f.attr("var")?.to_string();
            let vals = f
                .children()
                .filter(|v| v.is("value", vocab::NS_DATA))
                .map(|v| v.text())
                .collect();
            Some((var, vals))
        })
        .collect()
}

fn apply_form(c: &mut RoomConfig, x: &Element, max_members: usize) -> Result<(), StanzaError> {
    let values = form_values(x);
    let one = |k: &str| {
        values
            .get(k)
            .and_then(|v| v.first())
            .map(|s| s.trim().to_string())
    };
    let boolean = |k: &str| -> Result<Option<bool>, StanzaError> {
        match one(k).as_deref() {
            None => Ok(None),
            Some("1" | "true") => Ok(Some(true)),
            Some("0" | "false") => Ok(Some(false)),
            Some(_) => Err(err(
                Condition::NotAcceptable,
                &format!("{k}: not a boolean"),
            )),
        }
    };
    if let Some(t) = values.get("FORM_TYPE").and_then(|v| v.first()) {
        if t != NS_ROOMCONFIG {
            return Err(err(
                Condition::BadRequest,
                "FORM_TYPE must be muc#roomconfig",
            ));
        }
    }
    if let Some(v) = one("muc#roomconfig_roomname") {
        c.name = v;
    }
    if let Some(v) = one("muc#roomconfig_roomdesc") {
        c.description = v;
    }
    if let Some(v) = boolean("muc#roomconfig_persistentroom")? {
        c.persistent = v;
    }
    if let Some(v) = boolean("muc#roomconfig_membersonly")? {
        c.members_only = v;
    }
    if let Some(v) = boolean("muc#roomconfig_moderatedroom")? {
        c.moderated = v;
    }
    let protect = boolean("muc#roomconfig_passwordprotectedroom")?;
    if let Some(v) = one("muc#roomconfig_roomsecret") {
        c.password = v;
    }
    if protect == Some(false) {
        c.password.clear();
    }
    if protect == Some(true) && c.password.is_empty() {
        return Err(err(
            Condition::NotAcceptable,
            "a password-protected room needs muc#roomconfig_roomsecret",
        ));
    }
    if let Some(v) = boolean("muc#roomconfig_publicroom")? {
        c.public = v;
    }
    match one("muc#roomconfig_whois").as_deref() {
        None => {}
        Some("anyone") => c.whois_anyone = true,
        Some("moderators") => c.whois_anyone = false,
        Some(_) => {
            return Err(err(
                Condition::NotAcceptable,
                "muc#roomconfig_whois: anyone or moderators",
            ))
        }
    }
    if let Some(v) = one("muc#roomconfig_maxusers") {
        let n = match v.as_str() {
            "" | "none" => max_members,
            v => v.parse::<usize>().map_err(|_| {
                err(
                    Condition::NotAcceptable,
                    "muc#roomconfig_maxusers: a number",
                )
            })?,
        };
        if n == 0 || n > max_members {
            return Err(err(
                Condition::NotAcceptable,
                &format!("muc#roomconfig_maxusers: 1 to {max_members}"),
            ));
        }
        c.max_users = n;
    }
    if let Some(v) = boolean("muc#roomconfig_enablearchiving")?.or(boolean("mam")?) {
        c.archived = v;
    }
    if let Some(v) = boolean("muc#roomconfig_allowinvites")? {
        c.allow_invites = v;
    }
    if let Some(v) = boolean("muc#roomconfig_changesubject")? {
        c.change_subject = v;
    }
    match one("muc#roomconfig_allowpm").as_deref() {
        None => {}
        Some("anyone" | "participants") => c.allow_pm = true,
        Some("moderators" | "none") => c.allow_pm = false,
        Some(_) => {
            return Err(err(
                Condition::NotAcceptable,
                "muc#roomconfig_allowpm: anyone or moderators",
            ))
        }
    }
    Ok(())
}
