//! natter's storage layer.
//!
//! One trait per aggregate ([`AccountStore`], [`RosterStore`], [`ProfileStore`],
//! [`ArchiveStore`], [`OfflineStore`], [`PepStore`], [`BlockStore`], [`KvStore`],
//! [`RoomStore`], [`UploadStore`], plus [`Lifecycle`]), shaped by the data natter keeps rather than a
//! generic key-value interface, so each backend can use real tables, indexes, foreign
//! keys and transactions. [`Store`] is their sum, what the server holds as
//! `Arc<dyn Store>`; [`prelude`] brings every trait into scope. SQLite
//! ([`sqlite::SqliteStore`]) is the embedded backend, PostgreSQL ([`postgres::PgStore`])
//! the one N nodes share; both pass [`testsuite::conformance`].
//!
//! Users are identified by their bare JID string (`local@domain`), already normalized by
//! the caller; the store never re-normalizes.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

mod batch;
pub mod files;
mod health;
pub mod postgres;
mod sql;
mod sql_impls;
pub mod sqlite;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

/// SCRAM credentials for one hash function (RFC 5802): never the password itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

/// Credentials of an account for every SCRAM variant natter offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountCredentials {
    pub sha1: StoredCredentials,
    pub sha256: StoredCredentials,
}

/// Roster subscription state (RFC 6121 2.1.2.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Subscription {
    #[default]
    None,
    To,
    From,
    Both,
}

impl Subscription {
    /// The value of the `subscription` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }
}

impl fmt::Display for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `subscription` value other than none/to/from/both.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid roster subscription value {0:?}")]
pub struct InvalidSubscription(pub String);

impl FromStr for Subscription {
    type Err = InvalidSubscription;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Subscription::None),
            "to" => Ok(Subscription::To),
            "from" => Ok(Subscription::From),
            "both" => Ok(Subscription::Both),
            other => Err(InvalidSubscription(other.to_owned())),
        }
    }
}

/// One entry of a user's roster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterItem {
    /// Contact bare JID.
    pub jid: String,
    pub name: Option<String>,
    pub subscription: Subscription,
    /// Outbound subscribe pending (`ask='subscribe'`).
    pub ask: bool,
    /// Inbound subscribe request awaiting the user's approval (RFC 6121 3.1.3).
    pub pending_in: bool,
    /// Pre-approved (RFC 6121 3.4).
    pub approved: bool,
    /// Group names in client order. The store drops duplicates (keeping the first).
    pub groups: Vec<String>,
}

impl RosterItem {
    /// An item with no name, no groups, subscription `none` and no flags.
    pub fn new(jid: impl Into<String>) -> Self {
        RosterItem {
            jid: jid.into(),
            name: None,
            subscription: Subscription::None,
            ask: false,
            pending_in: false,
            approved: false,
            groups: Vec::new(),
        }
    }
}

/// A message to append to an archive (XEP-0313).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewArchiveEntry {
    /// Bare JID of the account whose archive this goes to.
    pub owner: String,
    /// Bare JID of the other party.
    pub with: String,
    /// The serialized stanza.
    pub stanza: String,
    /// Sent by `owner` (rather than received).
    pub outgoing: bool,
}

/// A message in an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedMessage {
    /// The server-assigned stanza-id (XEP-0359): opaque, unique within the owner's archive.
    pub id: String,
    pub owner: String,
    pub with: String,
    /// When it was archived, unix microseconds. Never decreases in archive order.
    pub ts_micros: i64,
    pub outgoing: bool,
    pub stanza: String,
}

/// An archive query (XEP-0313 filters + XEP-0059 RSM paging). All filters combine (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveQuery {
    /// Only messages with this bare JID (exact match).
    pub with: Option<String>,
    /// Only messages archived at or after this time (unix microseconds, inclusive).
    pub start_micros: Option<i64>,
    /// Only messages archived at or before this time (unix microseconds, inclusive).
    pub end_micros: Option<i64>,
    /// RSM `<after/>`: the page right after (newer than) this id.
    pub after_id: Option<String>,
    /// RSM `<before>id</before>`: the page right before (older than) this id.
    pub before_id: Option<String>,
    /// RSM `<before/>` with no id: the last page.
    pub last_page: bool,
    /// Only these ids (XEP-0313 `ids` field). Unknown ids are simply not returned.
    pub ids: Option<Vec<String>>,
    /// Page size. 0 returns no items (only `count`/`complete`).
    pub max: usize,
}

/// One page of archive results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivePage {
    /// Always oldest → newest, whichever way the query pages.
    pub items: Vec<ArchivedMessage>,
    /// No more matching items in the paging direction (newer for forward paging, older for
    /// backward paging).
    pub complete: bool,
    /// Number of messages matching the filters, ignoring paging (RSM `<count/>`).
    /// Only computed for `max == 0` (the XEP-0059 way to ask for a count): it walks
    /// every matching row, which a page query must not do on a large archive.
    pub count: Option<u64>,
}

/// MAM preferences (XEP-0313 `<prefs/>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MamPrefs {
    /// `"always"`, `"never"` or `"roster"`.
    pub default: String,
    /// JIDs to always archive, sorted, no duplicates.
    pub always: Vec<String>,
    /// JIDs never to archive, sorted, no duplicates.
    pub never: Vec<String>,
}

impl Default for MamPrefs {
    fn default() -> Self {
        MamPrefs {
            default: "always".into(),
            always: Vec::new(),
            never: Vec::new(),
        }
    }
}

/// The values [`MamPrefs::default`] may take.
pub const MAM_DEFAULT_MODES: [&str; 3] = ["always", "never", "roster"];

/// A queued offline message (XEP-0160).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfflineMessage {
    /// Queue position: grows with every push and is never reused.
    pub seq: u64,
    pub stanza: String,
    /// Stanza-id of the archived copy, if it was archived.
    pub archive_id: Option<String>,
    /// When it was queued, unix microseconds.
    pub ts_micros: i64,
    /// Its place in the user's acceptance order: the queue is read in
    /// `ord` order (then `seq`), whenever a row was inserted.
    pub ord: i64,
}

/// Configuration of a PEP node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PepNodeConfig {
    /// e.g. `"presence"`, `"open"`, `"whitelist"`, `"roster"` (not interpreted by the store).
    pub access_model: String,
    /// Items kept; publishing beyond it drops the oldest. 0 keeps none (transient node);
    /// use `u32::MAX` for "max".
    pub max_items: u32,
    /// e.g. `"publishers"`, `"open"` (not interpreted by the store).
    pub publish_model: String,
    /// `pubsub#persist_items`.
    pub persist_items: bool,
    /// `pubsub#send_last_published_item`, e.g. `"on_sub_and_presence"`, `"never"` (not
    /// interpreted by the store).
    pub send_last_published_item: String,
    /// `pubsub#notify_retract`.
    pub notify_retract: bool,
    /// `pubsub#notify_delete`.
    pub notify_delete: bool,
    /// `pubsub#item_expire`: items older than this many seconds are not returned and
    /// are listed by `pep_expired`; 0 = never.
    pub item_expire_secs: u64,
}

impl Default for PepNodeConfig {
    /// XEP-0163's defaults: presence access, one item, persistent, last item sent on
    /// subscription and presence, retractions and deletion notified.
    fn default() -> Self {
        PepNodeConfig {
            access_model: "presence".into(),
            max_items: 1,
            publish_model: "publishers".into(),
            persist_items: true,
            send_last_published_item: "on_sub_and_presence".into(),
            notify_retract: true,
            notify_delete: true,
            item_expire_secs: 0,
        }
    }
}

/// A published PEP item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PepItem {
    pub id: String,
    /// The serialized item payload.
    pub payload: String,
    /// When it was (last) published, unix microseconds.
    pub published_micros: i64,
}

/// A PEP item past its node's `item_expire`, with where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PepExpiredItem {
    pub owner: String,
    pub node: String,
    pub item: PepItem,
}

/// A finished upload (XEP-0363): the slot's metadata and the content hash of
/// its bytes in blob storage. Blobs are content-addressed: several slots may
/// share one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    /// The slot id (random, unguessable; in the GET URL).
    pub slot: String,
    /// Bare JID of the uploader.
    pub owner: String,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
    pub filename: String,
    /// Unix seconds.
    pub created: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing to create already exists (e.g. duplicate account).
    #[error("already exists")]
    Conflict,
    /// The account (or roster item) the operation needs does not exist.
    #[error("not found")]
    NotFound,
    /// The backend failed (I/O, corruption, pool closed, …). Message only, so callers don't
    /// depend on the backend's error types.
    #[error("storage backend error: {0}")]
    Backend(String),
    /// Applying schema migrations failed (including a database newer than this binary).
    #[error("storage schema migration failed: {0}")]
    Migration(String),
    /// A per-user limit would be exceeded (e.g. the offline queue is full, a key-value
    /// entry is too large).
    #[error("quota exceeded")]
    QuotaExceeded,
    /// The store refuses a value (e.g. an unknown MAM default mode).
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Largest value [`KvStore::kv_put`] takes, in bytes.
pub const KV_MAX_VALUE_BYTES: usize = 64 * 1024;
/// Largest namespace or key [`KvStore`] takes, in bytes.
pub const KV_MAX_KEY_BYTES: usize = 1024;

/// Largest room document [`RoomStore::room_put`] takes, in bytes.
pub const ROOM_MAX_DOC_BYTES: usize = 1024 * 1024;

/// Checks a key-value entry against the limits every backend enforces.
pub(crate) fn kv_check(namespace: &str, key: &str, value: Option<&str>) -> Result<(), StoreError> {
    if namespace.len() > KV_MAX_KEY_BYTES || key.len() > KV_MAX_KEY_BYTES {
        return Err(StoreError::Invalid(format!(
            "key-value namespace or key longer than {KV_MAX_KEY_BYTES} bytes"
        )));
    }
    match value {
        Some(v) if v.len() > KV_MAX_VALUE_BYTES => Err(StoreError::QuotaExceeded),
        _ => Ok(()),
    }
}

/// Sees every call through an [`Observed`] store: the operation (the method's name), how
/// long it took, and whether the backend failed (`Backend`/`Migration` errors; refusals
/// like `NotFound` are answers, not failures).
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, op: &'static str, took: std::time::Duration, backend_failed: bool);
}

impl<O: Observer> Observer for std::sync::Arc<O> {
    fn observe(&self, op: &'static str, took: std::time::Duration, backend_failed: bool) {
        (**self).observe(op, took, backend_failed)
    }
}

/// A [`Store`] that reports every call of the inner store to an [`Observer`] (metrics).
/// Its forwarding methods are generated with the traits, so a new store method needs no
/// third copy here.
pub struct Observed<O> {
    inner: std::sync::Arc<dyn Store>,
    observer: O,
}

impl<O: Observer> Observed<O> {
    pub fn new(inner: std::sync::Arc<dyn Store>, observer: O) -> Self {
        Observed { inner, observer }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let r = call.await;
        let failed = matches!(
            &r,
            Err(StoreError::Backend(_)) | Err(StoreError::Migration(_))
        );
        self.observer.observe(op, start.elapsed(), failed);
        r
    }
}

/// Declares the aggregate traits and, from the same signatures, [`Observed`]'s forwarding
/// impls (each method timed under its own name).
macro_rules! aggregates {
    ($(
        $(#[$tmeta:meta])*
        pub trait $name:ident {
            $(
                $(#[$mmeta:meta])*
                async fn $m:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;
            )*
        }
    )*) => {
        $(
            $(#[$tmeta])*
            #[async_trait::async_trait]
            pub trait $name: Send + Sync {
                $(
                    $(#[$mmeta])*
                    async fn $m(&self $(, $arg: $ty)*) -> $ret;
                )*
            }

            #[async_trait::async_trait]
            impl<O: Observer> $name for Observed<O> {
                $(
                    async fn $m(&self $(, $arg: $ty)*) -> $ret {
                        self.timed(stringify!($m), self.inner.$m($($arg),*)).await
                    }
                )*
            }
        )*
    };
}

// Operations on a user that must exist (writes of user-owned data) return
// `StoreError::NotFound` when the account doesn't; read operations return empty values
// instead.
aggregates! {
    /// Accounts: SCRAM credentials and deletion tombstones.
    pub trait AccountStore {
        /// Creates an account. [`StoreError::Conflict`] if it already exists.
        async fn create_account(&self, user: &str, creds: &AccountCredentials) -> Result<(), StoreError>;
        async fn credentials(&self, user: &str) -> Result<Option<AccountCredentials>, StoreError>;
        /// Replaces the credentials. [`StoreError::NotFound`] if there is no such account.
        async fn set_credentials(&self, user: &str, creds: &AccountCredentials) -> Result<(), StoreError>;
        /// Deletes the account and everything it owns (roster, vcard, last activity,
        /// archive, MAM prefs, offline queue, PEP nodes, blocklist, key-value entries,
        /// uploads) in one transaction, and records a tombstone (user, deleted_at unix
        /// seconds). Upload blobs stay until blob garbage collection finds them
        /// unreferenced ([`UploadStore::blob_referenced`]).
        /// [`StoreError::NotFound`] if there is no such account.
        async fn delete_account(&self, user: &str) -> Result<(), StoreError>;
        /// Bare JIDs of all accounts, or of those in `domain`, sorted.
        async fn list_accounts(&self, domain: Option<&str>) -> Result<Vec<String>, StoreError>;
        /// Unix seconds when `user` was last deleted, if ever (used to refuse
        /// re-registration for a while). Kept when the account is re-created.
        async fn deleted_at(&self, user: &str) -> Result<Option<i64>, StoreError>;
    }

    /// Rosters (RFC 6121) with versioning (XEP-0237).
    ///
    /// The version is a per-user counter bumped on every change. It is 0 for a new
    /// account (and for unknown users). A re-created account continues above the version
    /// the deleted one reached, so stale client caches never match.
    pub trait RosterStore {
        /// The roster version and all items, sorted by contact JID, read consistently.
        async fn roster(&self, user: &str) -> Result<(u64, Vec<RosterItem>), StoreError>;
        async fn roster_item(&self, user: &str, contact: &str) -> Result<Option<RosterItem>, StoreError>;
        async fn roster_version(&self, user: &str) -> Result<u64, StoreError>;
        /// Inserts or replaces the item for `item.jid` (groups included) and returns the
        /// new version. An identical item is a no-op returning the current version
        /// unchanged. [`StoreError::NotFound`] if the account doesn't exist.
        async fn put_roster_item(&self, user: &str, item: &RosterItem) -> Result<u64, StoreError>;
        /// Removes the item and returns the new version. [`StoreError::NotFound`] if the
        /// account or the item doesn't exist (RFC 6121 2.5.3 wants item-not-found then).
        async fn remove_roster_item(&self, user: &str, contact: &str) -> Result<u64, StoreError>;
    }

    /// What others see of an account: the vCard-temp (XEP-0054, the serialized
    /// `<vCard/>`) and last activity (XEP-0012, unix seconds + status text).
    pub trait ProfileStore {
        async fn vcard(&self, user: &str) -> Result<Option<String>, StoreError>;
        /// [`StoreError::NotFound`] if the account doesn't exist.
        async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StoreError>;
        /// [`StoreError::NotFound`] if the account doesn't exist.
        async fn set_last_activity(&self, user: &str, at: i64, status: &str) -> Result<(), StoreError>;
        async fn last_activity(&self, user: &str) -> Result<Option<(i64, String)>, StoreError>;
    }

    /// The message archive (XEP-0313) and its preferences.
    ///
    /// Ordered by an internal sequence that only grows (the paging key); clients only see
    /// the opaque stanza-ids.
    pub trait ArchiveStore {
        /// Appends `entries` in one durable transaction and returns their stanza-ids in
        /// order. Each entry gets a fresh unguessable stanza-id (creation time + 64 random
        /// bits, so ids sort by time and index inserts stay local) and a timestamp no older
        /// than any this node archived. All or nothing: [`StoreError::NotFound`] if any
        /// owner has no account. Concurrent calls may be committed together (group
        /// commit); each call returns only once its entries are committed.
        async fn archive_append(&self, entries: &[NewArchiveEntry]) -> Result<Vec<String>, StoreError>;
        /// One page of `owner`'s archive. Without `after_id`/`before_id`/`last_page` it
        /// is the first (oldest) page; `after_id` pages forward; `before_id`/`last_page`
        /// page backward (the newest `max` matches older than `before_id`, or overall).
        /// `after_id` together with `before_id` (or `last_page`) bounds both sides and
        /// pages backward. Items are always returned oldest → newest.
        /// [`StoreError::NotFound`] if `after_id`/`before_id` is not in the owner's
        /// archive (XEP-0313 item-not-found).
        async fn archive_query(&self, owner: &str, q: &ArchiveQuery) -> Result<ArchivePage, StoreError>;
        async fn archive_get(&self, owner: &str, id: &str) -> Result<Option<ArchivedMessage>, StoreError>;
        /// Restoring a backup: inserts messages exactly as given (id, `with`, timestamp,
        /// direction, stanza) after the owners' existing ones, in one transaction. Give
        /// each owner's messages oldest first. All or nothing: [`StoreError::NotFound`] if
        /// an owner has no account, [`StoreError::Conflict`] if an id is already in its
        /// owner's archive.
        async fn archive_import(&self, msgs: &[ArchivedMessage]) -> Result<(), StoreError>;
        /// Deletes messages archived before `older_than_micros` (of `owner`, or of
        /// everyone) and returns how many. May commit in several chunks.
        async fn archive_prune(&self, owner: Option<&str>, older_than_micros: i64) -> Result<u64, StoreError>;
        /// The user's preferences; [`MamPrefs::default`] if never set (or no such user).
        async fn mam_prefs(&self, user: &str) -> Result<MamPrefs, StoreError>;
        /// Replaces the preferences. Duplicate JIDs within a list are dropped.
        /// [`StoreError::Invalid`] for a default outside [`MAM_DEFAULT_MODES`],
        /// [`StoreError::NotFound`] if the account doesn't exist.
        async fn set_mam_prefs(&self, user: &str, prefs: &MamPrefs) -> Result<(), StoreError>;
    }

    /// Offline messages (XEP-0160): a queue per user, stored until delivered.
    pub trait OfflineStore {
        /// Queues a stanza durably (group-committed like
        /// [`ArchiveStore::archive_append`]) at acceptance position `ord` and returns its
        /// seq. [`StoreError::QuotaExceeded`] if the user already has `limit` queued,
        /// [`StoreError::NotFound`] if the account doesn't exist.
        async fn offline_push(&self, user: &str, stanza: &str, archive_id: Option<&str>, limit: usize, ord: i64) -> Result<u64, StoreError>;
        /// Up to `max` queued messages in acceptance order (`ord`, then `seq`). Doesn't
        /// remove them.
        async fn offline_fetch(&self, user: &str, max: usize) -> Result<Vec<OfflineMessage>, StoreError>;
        /// Removes the user's messages with these seqs (after delivery); returns how
        /// many. By seq, not by range: a message requeued with an early `ord` can sit
        /// between delivered ones in the order and must stay.
        async fn offline_delete(&self, user: &str, seqs: &[u64]) -> Result<u64, StoreError>;
        async fn offline_count(&self, user: &str) -> Result<u64, StoreError>;
    }

    /// PEP (XEP-0163/0223): pubsub nodes owned by an account.
    pub trait PepStore {
        async fn pep_node(&self, owner: &str, node: &str) -> Result<Option<PepNodeConfig>, StoreError>;
        /// Creates the node or replaces its configuration; lowering `max_items` drops the
        /// oldest items beyond it. [`StoreError::NotFound`] if the account doesn't exist.
        async fn pep_create_or_configure(&self, owner: &str, node: &str, cfg: &PepNodeConfig) -> Result<(), StoreError>;
        /// Inserts the item, or replaces the item with the same id (which becomes the
        /// newest); then drops the oldest items beyond the node's `max_items`.
        /// [`StoreError::NotFound`] if the node doesn't exist (create it first).
        async fn pep_publish(&self, owner: &str, node: &str, item_id: &str, payload: &str) -> Result<(), StoreError>;
        /// Items newest first: only those in `ids` if given, at most `max` if given.
        /// Empty for an unknown node.
        async fn pep_items(&self, owner: &str, node: &str, max: Option<usize>, ids: Option<&[String]>) -> Result<Vec<PepItem>, StoreError>;
        /// Whether the item existed.
        async fn pep_retract(&self, owner: &str, node: &str, item_id: &str) -> Result<bool, StoreError>;
        /// Deletes the node with its items; whether it existed.
        async fn pep_delete_node(&self, owner: &str, node: &str) -> Result<bool, StoreError>;
        /// The owner's node names, sorted.
        async fn pep_nodes(&self, owner: &str) -> Result<Vec<String>, StoreError>;
        /// Items whose node's `item_expire` has passed at `now_micros`, soonest expired
        /// first, at most `limit`, across all accounts (the expiry sweep; whoever deletes
        /// one with `pep_retract` owns its clean-up).
        async fn pep_expired(&self, now_micros: i64, limit: usize) -> Result<Vec<PepExpiredItem>, StoreError>;
        /// The node's affiliations (XEP-0060 §8.9) as (jid, affiliation), sorted by jid.
        async fn pep_affiliations(&self, owner: &str, node: &str) -> Result<Vec<(String, String)>, StoreError>;
        /// Sets one affiliation; `None` removes it. [`StoreError::NotFound`] if the node
        /// doesn't exist.
        async fn pep_set_affiliation(&self, owner: &str, node: &str, jid: &str, affiliation: Option<&str>) -> Result<(), StoreError>;
    }

    /// Privacy: blocked JIDs (XEP-0191), as given by the client (bare, full or domain).
    pub trait BlockStore {
        /// The blocked JIDs, sorted.
        async fn blocklist(&self, user: &str) -> Result<Vec<String>, StoreError>;
        /// Adds the JIDs (already blocked ones are fine). [`StoreError::NotFound`] if the
        /// account doesn't exist.
        async fn block(&self, user: &str, jids: &[String]) -> Result<(), StoreError>;
        /// Removes the JIDs (unknown ones are fine), or all with `None`.
        /// [`StoreError::NotFound`] if the account doesn't exist.
        async fn unblock(&self, user: &str, jids: Option<&[String]>) -> Result<(), StoreError>;
    }

    /// Small per-user values for modules that need no tables of their own (XEP-0049
    /// private XML storage): `(user, namespace, key) → value`, deleted with the account.
    pub trait KvStore {
        async fn kv_get(&self, user: &str, namespace: &str, key: &str) -> Result<Option<String>, StoreError>;
        /// Inserts or replaces the value. [`StoreError::QuotaExceeded`] for a value over
        /// [`KV_MAX_VALUE_BYTES`], [`StoreError::Invalid`] for a namespace or key over
        /// [`KV_MAX_KEY_BYTES`], [`StoreError::NotFound`] if the account doesn't exist.
        async fn kv_put(&self, user: &str, namespace: &str, key: &str, value: &str) -> Result<(), StoreError>;
        /// Whether the entry existed.
        async fn kv_delete(&self, user: &str, namespace: &str, key: &str) -> Result<bool, StoreError>;
    }

    /// Multi-user chat rooms (XEP-0045): each room's state as one document the MUC
    /// module owns (configuration, affiliations, subject; JSON), the room's archive
    /// (each message stored once per room, not once per member) and each member's
    /// positions in it. Rooms are not accounts: `room` is the room's bare JID.
    pub trait RoomStore {
        /// Creates or replaces the room's document. [`StoreError::QuotaExceeded`] over
        /// [`ROOM_MAX_DOC_BYTES`].
        async fn room_put(&self, room: &str, doc: &str) -> Result<(), StoreError>;
        async fn room_get(&self, room: &str) -> Result<Option<String>, StoreError>;
        /// Bare JIDs of the rooms whose domain is `service`, sorted.
        async fn room_list(&self, service: &str) -> Result<Vec<String>, StoreError>;
        /// Deletes the room with its archive and positions; whether it existed.
        async fn room_delete(&self, room: &str) -> Result<bool, StoreError>;
        /// Appends `(with, stanza)` entries (with = the sender's bare real JID) to the
        /// room's archive in one durable transaction and returns their stanza-ids in
        /// order: the same id scheme and never-decreasing timestamps as
        /// [`ArchiveStore::archive_append`]. [`StoreError::NotFound`] if there is no
        /// such room.
        async fn room_archive_append(&self, room: &str, entries: &[(String, String)]) -> Result<Vec<String>, StoreError>;
        /// One page of the room's archive, with exactly the semantics of
        /// [`ArchiveStore::archive_query`] (filters, RSM paging, count, complete);
        /// items have `owner` = the room, `outgoing` = false.
        async fn room_archive_query(&self, room: &str, q: &ArchiveQuery) -> Result<ArchivePage, StoreError>;
        async fn room_archive_get(&self, room: &str, id: &str) -> Result<Option<ArchivedMessage>, StoreError>;
        /// Replaces the stanza of an archived message (a retraction or moderation
        /// leaves a tombstone in its place); whether it existed.
        async fn room_archive_replace(&self, room: &str, id: &str, stanza: &str) -> Result<bool, StoreError>;
        /// Moves `member`'s position of `kind` ("received" or "displayed", XEP-0333) to
        /// the archived message `id`, only forward (an older id than the current
        /// position is a no-op). Returns whether it moved. [`StoreError::NotFound`] if
        /// `id` is not in the room's archive; [`StoreError::Invalid`] for another kind.
        async fn room_set_position(&self, room: &str, member: &str, kind: &str, id: &str) -> Result<bool, StoreError>;
        /// Every member's position of `kind` as (member, stanza-id), sorted by member.
        async fn room_positions(&self, room: &str, kind: &str) -> Result<Vec<(String, String)>, StoreError>;
        /// The members whose position of `kind` is at or after the archived message
        /// `id` (in archive order, not id order), sorted. [`StoreError::NotFound`] if
        /// `id` is not in the room's archive.
        async fn room_members_past(&self, room: &str, kind: &str, id: &str) -> Result<Vec<String>, StoreError>;
    }

    /// HTTP File Upload (XEP-0363) slots whose bytes are stored, and the
    /// references they hold on content-addressed blobs.
    pub trait UploadStore {
        /// Records a finished upload. [`StoreError::Conflict`] if the slot exists,
        /// [`StoreError::NotFound`] if the owner has no account,
        /// [`StoreError::Invalid`] for a size over `i64::MAX`.
        async fn upload_put(&self, upload: &Upload) -> Result<(), StoreError>;
        async fn upload_get(&self, slot: &str) -> Result<Option<Upload>, StoreError>;
        /// Deletes the slot; returns whether it existed.
        async fn upload_delete(&self, slot: &str) -> Result<bool, StoreError>;
        /// Bytes `owner` uploaded at or after `since` (unix seconds), and in total.
        async fn upload_usage(&self, owner: &str, since: i64) -> Result<(u64, u64), StoreError>;
        /// Bytes of all uploads (a global quota).
        async fn upload_total(&self) -> Result<u64, StoreError>;
        /// `owner`'s uploads, oldest first (by `created`, then `slot`).
        async fn uploads_of(&self, owner: &str) -> Result<Vec<Upload>, StoreError>;
        /// Whether any slot refers to the blob (blob garbage collection asks before
        /// deleting one).
        async fn blob_referenced(&self, sha256: &str) -> Result<bool, StoreError>;
        /// Uploads created before `before` (unix seconds), at most `limit`, oldest first
        /// (by `created`, then `slot`; expiry).
        async fn uploads_before(&self, before: i64, limit: usize) -> Result<Vec<Upload>, StoreError>;
    }
}

/// Health and shutdown of the backend as a whole.
#[async_trait::async_trait]
pub trait Lifecycle: Send + Sync {
    /// Reachability check for /ready and start-up.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Whether writes succeed now (for /ready): the outcome of the latest write when it is
    /// recent, otherwise of a small probe write. Err while writes fail (full disk, I/O
    /// errors, database unreachable), naming the cause; Ok again once a write succeeds.
    async fn writable(&self) -> Result<(), StoreError>;
    /// Flush and close (graceful shutdown). Later calls fail with [`StoreError::Backend`].
    async fn close(&self);
}

#[async_trait::async_trait]
impl<O: Observer> Lifecycle for Observed<O> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn writable(&self) -> Result<(), StoreError> {
        self.timed("writable", self.inner.writable()).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// The whole storage interface used by the server core: every aggregate. Implemented for
/// any type implementing them all, so a backend implements the aggregates and call sites
/// hold an `Arc<dyn Store>` (with [`prelude`] in scope for the methods).
pub trait Store:
    AccountStore
    + RosterStore
    + ProfileStore
    + ArchiveStore
    + OfflineStore
    + PepStore
    + BlockStore
    + KvStore
    + RoomStore
    + UploadStore
    + Lifecycle
    + 'static
{
}

impl<T> Store for T where
    T: AccountStore
        + RosterStore
        + ProfileStore
        + ArchiveStore
        + OfflineStore
        + PepStore
        + BlockStore
        + KvStore
        + RoomStore
        + UploadStore
        + Lifecycle
        + 'static
{
}

/// The store traits, for `use natter_store::prelude::*;` where store methods are called.
pub mod prelude {
    pub use crate::{
        AccountStore, ArchiveStore, BlockStore, KvStore, Lifecycle, OfflineStore, PepStore,
        ProfileStore, RoomStore, RosterStore, Store, UploadStore,
    };
}

/// The domain part of a bare JID (`local@domain`); a JID without `@` is all domain.
pub(crate) fn domain_of(user: &str) -> &str {
    user.rsplit_once('@').map_or(user, |(_, d)| d)
}

/// Current time in unix seconds.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Current time in unix microseconds.
pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Groups with duplicates removed, first occurrence wins (a roster group is a set).
pub(crate) fn dedup_groups(groups: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(groups.len());
    for g in groups {
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_round_trip() {
        for s in [
            Subscription::None,
            Subscription::To,
            Subscription::From,
            Subscription::Both,
        ] {
            assert_eq!(s.as_str().parse::<Subscription>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(
            "remove".parse::<Subscription>(),
            Err(InvalidSubscription("remove".into()))
        );
    }

    #[test]
    fn domain_and_groups() {
        assert_eq!(domain_of("alice@example.com"), "example.com");
        assert_eq!(domain_of("example.com"), "example.com");
        let g = dedup_groups(&["b".into(), "a".into(), "b".into()]);
        assert_eq!(g, vec!["b".to_string(), "a".to_string()]);
    }
}
