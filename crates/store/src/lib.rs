//! natter's storage layer.
//!
//! The [`Store`] trait is shaped by the data natter keeps (accounts, rosters, vCards, …),
//! not a generic key-value interface, so each backend can use real tables, indexes,
//! foreign keys and transactions. SQLite ([`sqlite::SqliteStore`]) is the embedded backend;
//! PostgreSQL will implement the same trait and must pass the same
//! [`testsuite::conformance`] suite.
//!
//! Users are identified by their bare JID string (`local@domain`), already normalized by
//! the caller; the store never re-normalizes.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

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
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The storage interface used by the server core.
///
/// Operations on a user that must exist (writes of user-owned data) return
/// [`StoreError::NotFound`] when the account doesn't; read operations return empty values
/// instead.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- accounts

    /// Creates an account. [`StoreError::Conflict`] if it already exists.
    async fn create_account(
        &self,
        user: &str,
        creds: &AccountCredentials,
    ) -> Result<(), StoreError>;
    async fn credentials(&self, user: &str) -> Result<Option<AccountCredentials>, StoreError>;
    /// Replaces the credentials. [`StoreError::NotFound`] if there is no such account.
    async fn set_credentials(
        &self,
        user: &str,
        creds: &AccountCredentials,
    ) -> Result<(), StoreError>;
    /// Deletes the account and everything it owns (roster, vcard, last activity; later
    /// archive etc.) in one transaction, and records a tombstone (user, deleted_at unix
    /// seconds). [`StoreError::NotFound`] if there is no such account.
    async fn delete_account(&self, user: &str) -> Result<(), StoreError>;
    /// Bare JIDs of all accounts, or of those in `domain`, sorted.
    async fn list_accounts(&self, domain: Option<&str>) -> Result<Vec<String>, StoreError>;
    /// Unix seconds when `user` was last deleted, if ever (used to refuse re-registration
    /// for a while). Kept when the account is re-created.
    async fn deleted_at(&self, user: &str) -> Result<Option<i64>, StoreError>;

    // ---- roster (RFC 6121) with versioning (XEP-0237)
    //
    // The version is a per-user counter bumped on every change. It is 0 for a new account
    // (and for unknown users). A re-created account continues above the version the deleted
    // one reached, so stale client caches never match.

    /// The roster version and all items, sorted by contact JID, read consistently.
    async fn roster(&self, user: &str) -> Result<(u64, Vec<RosterItem>), StoreError>;
    async fn roster_item(
        &self,
        user: &str,
        contact: &str,
    ) -> Result<Option<RosterItem>, StoreError>;
    async fn roster_version(&self, user: &str) -> Result<u64, StoreError>;
    /// Inserts or replaces the item for `item.jid` (groups included) and returns the new
    /// version. An identical item is a no-op returning the current version unchanged.
    /// [`StoreError::NotFound`] if the account doesn't exist.
    async fn put_roster_item(&self, user: &str, item: &RosterItem) -> Result<u64, StoreError>;
    /// Removes the item and returns the new version. [`StoreError::NotFound`] if the account
    /// or the item doesn't exist (RFC 6121 2.5.3 wants item-not-found then).
    async fn remove_roster_item(&self, user: &str, contact: &str) -> Result<u64, StoreError>;

    // ---- vCard-temp (XEP-0054): the serialized <vCard/> XML

    async fn vcard(&self, user: &str) -> Result<Option<String>, StoreError>;
    /// [`StoreError::NotFound`] if the account doesn't exist.
    async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StoreError>;

    // ---- last activity (XEP-0012): unix seconds + status text

    /// [`StoreError::NotFound`] if the account doesn't exist.
    async fn set_last_activity(&self, user: &str, at: i64, status: &str) -> Result<(), StoreError>;
    async fn last_activity(&self, user: &str) -> Result<Option<(i64, String)>, StoreError>;

    // ---- lifecycle

    /// Reachability check for /ready and start-up.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Flush and close (graceful shutdown). Later calls fail with [`StoreError::Backend`].
    async fn close(&self);
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
