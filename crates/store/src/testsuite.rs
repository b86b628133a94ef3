//! Backend-independent conformance suite: every [`Store`] implementation must pass
//! [`conformance`]. Enable the `testsuite` feature to use it from other crates.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::{
    AccountCredentials, ArchivePage, ArchiveQuery, ArchivedMessage, MamPrefs, NewArchiveEntry,
    PepNodeConfig, RosterItem, Store, StoreError, StoredCredentials, Subscription, Upload,
};

/// Distinct, recognizable credentials for `tag`.
pub fn credentials(tag: u8) -> AccountCredentials {
    let one = |len: usize, base: u8, iterations: u32| StoredCredentials {
        salt: vec![base; 16],
        iterations,
        stored_key: vec![base.wrapping_add(1); len],
        server_key: vec![base.wrapping_add(2); len],
    };
    AccountCredentials {
        sha1: one(20, tag, 4096),
        sha256: one(32, tag.wrapping_add(100), 4096 + u32::from(tag)),
    }
}

fn item(jid: &str, sub: Subscription, groups: &[&str]) -> RosterItem {
    RosterItem {
        subscription: sub,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..RosterItem::new(jid)
    }
}

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@other.org";
const NOBODY: &str = "nobody@example.com";

/// Runs the whole suite against `store`, which must be empty. Panics on the first failure.
pub async fn conformance(store: &dyn Store) {
    store.ping().await.expect("ping");
    empty_store(store).await;
    accounts(store).await;
    roster(store).await;
    concurrent_roster_writes(store).await;
    vcard_and_last_activity(store).await;
    archive(store).await;
    archive_concurrency(store).await;
    mam_prefs(store).await;
    offline(store).await;
    pep(store).await;
    pep_expiry_and_affiliations(store).await;
    blocking(store).await;
    kv(store).await;
    rooms(store).await;
    uploads(store).await;
    populate_alice(store).await;
    delete_cascades(store).await;
}

async fn empty_store(store: &dyn Store) {
    assert!(store.list_accounts(None).await.unwrap().is_empty());
    assert_eq!(store.credentials(NOBODY).await.unwrap(), None);
    assert_eq!(store.deleted_at(NOBODY).await.unwrap(), None);
    assert_eq!(store.roster(NOBODY).await.unwrap(), (0, vec![]));
    assert_eq!(store.roster_version(NOBODY).await.unwrap(), 0);
    assert_eq!(store.roster_item(NOBODY, BOB).await.unwrap(), None);
    assert_eq!(store.vcard(NOBODY).await.unwrap(), None);
    assert_eq!(store.last_activity(NOBODY).await.unwrap(), None);
    let page = store.archive_query(NOBODY, &query(10)).await.unwrap();
    assert!(page.items.is_empty() && page.complete, "{page:?}");
    assert_count(&page, 0);
    assert_eq!(store.archive_get(NOBODY, "x").await.unwrap(), None);
    assert_eq!(store.mam_prefs(NOBODY).await.unwrap(), MamPrefs::default());
    assert_eq!(store.offline_count(NOBODY).await.unwrap(), 0);
    assert!(store.offline_fetch(NOBODY, 10).await.unwrap().is_empty());
    assert_eq!(store.offline_delete(NOBODY, &[1, 2]).await.unwrap(), 0);
    assert_eq!(store.pep_node(NOBODY, "n").await.unwrap(), None);
    assert!(store.pep_nodes(NOBODY).await.unwrap().is_empty());
    assert!(store
        .pep_items(NOBODY, "n", None, None)
        .await
        .unwrap()
        .is_empty());
    assert!(!store.pep_retract(NOBODY, "n", "i").await.unwrap());
    assert!(!store.pep_delete_node(NOBODY, "n").await.unwrap());
    assert!(store.blocklist(NOBODY).await.unwrap().is_empty());
    assert_eq!(store.upload_get("slot").await.unwrap(), None);
    assert!(!store.upload_delete("slot").await.unwrap());
    assert_eq!(store.upload_usage(NOBODY, 0).await.unwrap(), (0, 0));
    assert_eq!(store.upload_total().await.unwrap(), 0);
    assert!(store.uploads_of(NOBODY).await.unwrap().is_empty());
    assert!(!store.blob_referenced(SHA_A).await.unwrap());
    assert!(store.uploads_before(i64::MAX, 10).await.unwrap().is_empty());
}

async fn accounts(store: &dyn Store) {
    store.create_account(ALICE, &credentials(1)).await.unwrap();
    store.create_account(BOB, &credentials(2)).await.unwrap();
    store.create_account(CAROL, &credentials(3)).await.unwrap();

    let dup = store.create_account(ALICE, &credentials(9)).await;
    assert!(matches!(dup, Err(StoreError::Conflict)), "{dup:?}");
    // The failed duplicate must not have touched the original.
    assert_eq!(
        store.credentials(ALICE).await.unwrap(),
        Some(credentials(1))
    );
    assert_eq!(store.credentials(BOB).await.unwrap(), Some(credentials(2)));

    // Round trip of unusual values: empty salt, max iterations, arbitrary bytes.
    let mut odd = credentials(4);
    odd.sha1.salt = Vec::new();
    odd.sha1.iterations = u32::MAX;
    odd.sha256.stored_key = (0..=255).collect();
    store.set_credentials(ALICE, &odd).await.unwrap();
    assert_eq!(store.credentials(ALICE).await.unwrap(), Some(odd));
    store.set_credentials(ALICE, &credentials(5)).await.unwrap();
    assert_eq!(
        store.credentials(ALICE).await.unwrap(),
        Some(credentials(5))
    );
    assert_eq!(store.credentials(BOB).await.unwrap(), Some(credentials(2)));

    let missing = store.set_credentials(NOBODY, &credentials(1)).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    assert_eq!(store.credentials(NOBODY).await.unwrap(), None);

    assert_eq!(
        store.list_accounts(None).await.unwrap(),
        vec![ALICE, BOB, CAROL]
    );
    assert_eq!(
        store.list_accounts(Some("example.com")).await.unwrap(),
        vec![ALICE, BOB]
    );
    assert_eq!(
        store.list_accounts(Some("other.org")).await.unwrap(),
        vec![CAROL]
    );
    // Exact domain match only.
    assert!(store
        .list_accounts(Some("ample.com"))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .list_accounts(Some("sub.example.com"))
        .await
        .unwrap()
        .is_empty());
}

async fn roster(store: &dyn Store) {
    assert_eq!(store.roster(ALICE).await.unwrap(), (0, vec![]));
    assert_eq!(store.roster_version(ALICE).await.unwrap(), 0);

    // Insert with groups; order as sent is kept.
    let mut bob = item(BOB, Subscription::Both, &["Work", "Friends"]);
    bob.name = Some("Bob".into());
    let v1 = store.put_roster_item(ALICE, &bob).await.unwrap();
    assert!(v1 > 0);
    assert_eq!(store.roster_version(ALICE).await.unwrap(), v1);
    assert_eq!(
        store.roster_item(ALICE, BOB).await.unwrap(),
        Some(bob.clone())
    );

    // Identical put is a no-op and keeps the version.
    assert_eq!(store.put_roster_item(ALICE, &bob).await.unwrap(), v1);

    // Upsert replaces the groups (and everything else) rather than merging.
    bob.groups = vec!["Family".into()];
    bob.name = None;
    bob.subscription = Subscription::To;
    let v2 = store.put_roster_item(ALICE, &bob).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(
        store.roster_item(ALICE, BOB).await.unwrap(),
        Some(bob.clone())
    );
    bob.groups.clear();
    let v3 = store.put_roster_item(ALICE, &bob).await.unwrap();
    assert!(v3 > v2);
    assert_eq!(
        store.roster_item(ALICE, BOB).await.unwrap(),
        Some(bob.clone())
    );

    // Duplicate groups collapse to the first occurrence.
    let dup = item("dup@remote.net", Subscription::None, &["B", "A", "B"]);
    let v4 = store.put_roster_item(ALICE, &dup).await.unwrap();
    assert!(v4 > v3);
    assert_eq!(
        store
            .roster_item(ALICE, "dup@remote.net")
            .await
            .unwrap()
            .unwrap()
            .groups,
        vec!["B", "A"]
    );

    // Every subscription state and flag round-trips, including an empty name.
    let mut version = v4;
    let mut flagged = Vec::new();
    for (i, sub) in [
        Subscription::None,
        Subscription::To,
        Subscription::From,
        Subscription::Both,
    ]
    .into_iter()
    .enumerate()
    {
        let it = RosterItem {
            jid: format!("c{i}@remote.net"),
            name: (i == 0).then(String::new),
            subscription: sub,
            ask: i % 2 == 0,
            pending_in: i % 3 == 0,
            approved: i == 3,
            groups: vec![format!("g{i}"), "Shared".into()],
        };
        let v = store.put_roster_item(ALICE, &it).await.unwrap();
        assert!(v > version, "roster version must grow: {v} after {version}");
        version = v;
        assert_eq!(
            store.roster_item(ALICE, &it.jid).await.unwrap(),
            Some(it.clone())
        );
        flagged.push(it);
    }

    // Full roster: same version, sorted by contact JID.
    let mut expected = vec![bob.clone(), dup.clone()];
    expected[1].groups = vec!["B".into(), "A".into()];
    expected.extend(flagged);
    expected.sort_by(|a, b| a.jid.cmp(&b.jid));
    assert_eq!(
        store.roster(ALICE).await.unwrap(),
        (version, expected.clone())
    );

    // Rosters are per user.
    assert_eq!(store.roster(BOB).await.unwrap(), (0, vec![]));
    assert_eq!(store.roster_item(BOB, BOB).await.unwrap(), None);

    // Writes for unknown users fail; the contact needs no account.
    let r = store.put_roster_item(NOBODY, &bob).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(store.roster(NOBODY).await.unwrap(), (0, vec![]));

    // Removal bumps the version and takes the groups along.
    let v = store
        .remove_roster_item(ALICE, "dup@remote.net")
        .await
        .unwrap();
    assert!(v > version);
    version = v;
    assert_eq!(
        store.roster_item(ALICE, "dup@remote.net").await.unwrap(),
        None
    );
    let missing = store.remove_roster_item(ALICE, "dup@remote.net").await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    let missing = store.remove_roster_item(NOBODY, BOB).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
    assert_eq!(store.roster_version(ALICE).await.unwrap(), version);

    // Re-adding after removal starts with fresh groups.
    let again = item("dup@remote.net", Subscription::None, &[]);
    let v = store.put_roster_item(ALICE, &again).await.unwrap();
    assert!(v > version);
    assert_eq!(
        store.roster_item(ALICE, "dup@remote.net").await.unwrap(),
        Some(again)
    );

    // Bob gets a roster too, referencing Alice, for the deletion checks.
    let to_alice = item(ALICE, Subscription::Both, &["Friends"]);
    store.put_roster_item(BOB, &to_alice).await.unwrap();
}

async fn concurrent_roster_writes(store: &dyn Store) {
    let start = store.roster_version(CAROL).await.unwrap();
    let put = |n: u32| async move {
        store
            .put_roster_item(
                CAROL,
                &item(&format!("p{n}@remote.net"), Subscription::None, &["G"]),
            )
            .await
            .unwrap()
    };
    let (a, b, c, d, e, f) = tokio::join!(put(1), put(2), put(3), put(4), put(5), put(6));
    let mut got = vec![a, b, c, d, e, f];
    got.sort_unstable();
    assert_eq!(got, (start + 1..=start + 6).collect::<Vec<_>>());
    let (v, items) = store.roster(CAROL).await.unwrap();
    assert_eq!((v, items.len()), (start + 6, 6));
}

async fn vcard_and_last_activity(store: &dyn Store) {
    assert_eq!(store.vcard(ALICE).await.unwrap(), None);
    let card = "<vCard xmlns='vcard-temp'><FN>Alice \u{1F600} &amp; co</FN></vCard>";
    store.set_vcard(ALICE, card).await.unwrap();
    assert_eq!(store.vcard(ALICE).await.unwrap().as_deref(), Some(card));
    store
        .set_vcard(ALICE, "<vCard xmlns='vcard-temp'/>")
        .await
        .unwrap();
    assert_eq!(
        store.vcard(ALICE).await.unwrap().as_deref(),
        Some("<vCard xmlns='vcard-temp'/>")
    );
    store.set_vcard(BOB, card).await.unwrap();
    let r = store.set_vcard(NOBODY, card).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(store.vcard(NOBODY).await.unwrap(), None);

    assert_eq!(store.last_activity(ALICE).await.unwrap(), None);
    store
        .set_last_activity(ALICE, 1_700_000_000, "Gone fishing")
        .await
        .unwrap();
    assert_eq!(
        store.last_activity(ALICE).await.unwrap(),
        Some((1_700_000_000, "Gone fishing".into()))
    );
    store
        .set_last_activity(ALICE, 1_700_000_100, "")
        .await
        .unwrap();
    assert_eq!(
        store.last_activity(ALICE).await.unwrap(),
        Some((1_700_000_100, String::new()))
    );
    let r = store.set_last_activity(NOBODY, 1, "x").await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
}

// ---- helpers for the archive tests

fn query(max: usize) -> ArchiveQuery {
    ArchiveQuery {
        max,
        ..ArchiveQuery::default()
    }
}

fn entry(owner: &str, with: &str, stanza: &str, outgoing: bool) -> NewArchiveEntry {
    NewArchiveEntry {
        owner: owner.into(),
        with: with.into(),
        stanza: stanza.into(),
        outgoing,
    }
}

/// Backends may count only for max=0; when they do give a count it must be right.
fn assert_count(page: &ArchivePage, n: usize) {
    if let Some(c) = page.count {
        assert_eq!(c, n as u64, "RSM count");
    }
}

fn ids_of(items: &[ArchivedMessage]) -> Vec<String> {
    items.iter().map(|m| m.id.clone()).collect()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Polls all futures concurrently on the current task (no `'static` needed, no extra
/// dependency) and returns their outputs in order.
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// A user's or a room's archive, which answer queries alike.
#[derive(Clone, Copy, Debug)]
enum Archive<'a> {
    User(&'a str),
    Room(&'a str),
}

impl Archive<'_> {
    fn owner(&self) -> &str {
        match self {
            Archive::User(o) | Archive::Room(o) => o,
        }
    }

    async fn query(&self, store: &dyn Store, q: &ArchiveQuery) -> Result<ArchivePage, StoreError> {
        match self {
            Archive::User(owner) => store.archive_query(owner, q).await,
            Archive::Room(room) => store.room_archive_query(room, q).await,
        }
    }

    async fn get(&self, store: &dyn Store, id: &str) -> Option<ArchivedMessage> {
        match self {
            Archive::User(owner) => store.archive_get(owner, id).await,
            Archive::Room(room) => store.room_archive_get(room, id).await,
        }
        .unwrap()
    }
}

/// Pages through `q` in the given direction and returns all items oldest → newest,
/// checking the per-page invariants on the way.
async fn page_all(
    store: &dyn Store,
    a: Archive<'_>,
    q: &ArchiveQuery,
    backward: bool,
    expected: &[ArchivedMessage],
) {
    let max = q.max;
    assert!(max > 0);
    let mut q = q.clone();
    let mut pages: Vec<Vec<ArchivedMessage>> = Vec::new();
    loop {
        let page = a.query(store, &q).await.unwrap();
        assert_count(&page, expected.len());
        assert!(page.items.len() <= max);
        let seen: usize = pages.iter().map(Vec::len).sum::<usize>() + page.items.len();
        assert_eq!(
            page.complete,
            seen == expected.len(),
            "complete flag after {seen} of {} (backward: {backward})",
            expected.len()
        );
        if !page.complete {
            assert_eq!(page.items.len(), max, "only the last page may be short");
        }
        let done = page.complete;
        if backward {
            q.before_id = page.items.first().map(|m| m.id.clone());
            q.last_page = false;
        } else {
            q.after_id = page.items.last().map(|m| m.id.clone());
        }
        pages.push(page.items);
        if done {
            break;
        }
        assert!(pages.len() <= expected.len() + 1, "paging does not end");
    }
    if backward {
        pages.reverse();
    }
    let all: Vec<ArchivedMessage> = pages.into_iter().flatten().collect();
    assert_eq!(ids_of(&all), ids_of(expected));
    assert_eq!(all, expected);
}

/// Which archived messages a filter keeps (the test's model of the query).
type Keep = Box<dyn Fn(&ArchivedMessage) -> bool>;

const DAVE: &str = "dave@remote.net";

/// The conversation partners of the 30 messages [`check_archive`] expects, in turn.
const PARTNERS: [&str; 3] = [ALICE, CAROL, DAVE];

/// A message body with characters to escape and outside the BMP.
fn numbered_stanza(n: usize) -> String {
    format!(
        "<message xmlns='jabber:client' type='chat'>\
         <body>m{n} \u{e9}&amp;&lt;\u{1F600}</body></message>"
    )
}

/// Waits a few ms before each epoch of appends but the first, so that the epochs are
/// apart in time (for the time filters).
async fn epoch_starts(epoch: usize) {
    if epoch > 0 {
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Stanza-ids: distinct, opaque, long enough to carry 128 random bits.
fn assert_distinct_ids<'a>(ids: impl Iterator<Item = &'a String>, n: usize) {
    let mut distinct: Vec<&String> = ids.collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), n, "stanza-ids not unique");
    for id in &distinct {
        assert!(id.len() >= 22 && id.is_ascii(), "stanza-id {id:?}");
    }
}

/// What the users' and the rooms' archives answer alike: archive `a` holds the 30
/// messages `ids` (`numbered_stanza(n)` with `PARTNERS[n % 3]`), appended between
/// `before` and `after` in three epochs of 10 a few ms apart; `foreign` are ids of
/// `other`. Contents, `archive_get`, paging both ways, RSM cursors and count, every
/// filter. Returns the messages.
async fn check_archive(
    store: &dyn Store,
    a: Archive<'_>,
    ids: &[String],
    other: Archive<'_>,
    foreign: &[String],
    (before, after): (i64, i64),
) -> Vec<ArchivedMessage> {
    // The whole archive in one page, in append order, with monotonic timestamps.
    let page = a.query(store, &query(100)).await.unwrap();
    assert!(page.complete);
    assert_count(&page, 30);
    let all = page.items;
    assert_eq!(ids_of(&all), ids);
    for (n, m) in all.iter().enumerate() {
        assert_eq!(m.owner, a.owner());
        assert_eq!(m.with, PARTNERS[n % 3]);
        assert!(m
            .stanza
            .contains(&format!("<body>m{n} \u{e9}&amp;&lt;\u{1F600}</body>")));
        assert!((before..=after).contains(&m.ts_micros), "timestamp {m:?}");
        assert_eq!(a.get(store, &m.id).await.as_ref(), Some(m));
        // Ids are per archive.
        assert_eq!(other.get(store, &m.id).await, None);
    }
    for w in all.windows(2) {
        assert!(w[0].ts_micros <= w[1].ts_micros, "timestamps go back");
    }
    // The epochs are apart in time.
    assert!(all[9].ts_micros < all[10].ts_micros && all[19].ts_micros < all[20].ts_micros);

    // Paging both ways, with a short last page (7) and an exact fit (10, 30, 1).
    for max in [7, 10, 30, 1, 1000] {
        page_all(store, a, &query(max), false, &all).await;
        let mut q = query(max);
        q.last_page = true;
        page_all(store, a, &q, true, &all).await;
    }

    // First and last pages explicitly.
    let first = a.query(store, &query(5)).await.unwrap();
    assert_eq!(first.items, all[..5]);
    assert!(!first.complete);
    let mut q = query(5);
    q.last_page = true;
    let lastp = a.query(store, &q).await.unwrap();
    assert_eq!(lastp.items, all[25..]);
    assert!(!lastp.complete);

    // after/before a given id.
    let mut q = query(4);
    q.after_id = Some(all[10].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[11..15]);
    assert!(!p.complete);
    q.after_id = Some(all[26].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[27..]);
    assert!(p.complete);
    q.after_id = Some(all[29].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert!(p.items.is_empty() && p.complete);
    let mut q = query(4);
    q.before_id = Some(all[10].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[6..10]);
    assert!(!p.complete);
    q.before_id = Some(all[3].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[..3]);
    assert!(p.complete);
    q.before_id = Some(all[0].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert!(p.items.is_empty() && p.complete);
    // before_id wins over last_page (it is a more precise <before/>).
    q.before_id = Some(all[4].id.clone());
    q.last_page = true;
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[..4]);
    assert!(p.complete);
    // Both bounds: the newest items between them.
    let mut q = query(3);
    q.after_id = Some(all[10].id.clone());
    q.before_id = Some(all[20].id.clone());
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[17..20]);
    assert!(!p.complete);
    q.max = 100;
    let p = a.query(store, &q).await.unwrap();
    assert_eq!(p.items, all[11..20]);
    assert!(p.complete);

    // max = 0: nothing but the count and whether there is anything.
    let p = a.query(store, &query(0)).await.unwrap();
    assert!(p.items.is_empty() && !p.complete);
    assert_eq!(p.count, Some(30), "max=0 must give the count");
    let mut q = query(0);
    q.with = Some("nobody@nowhere".into());
    let p = a.query(store, &q).await.unwrap();
    assert!(p.items.is_empty() && p.complete);
    assert_eq!(p.count, Some(0), "max=0 must give the count");

    // Unknown cursors, and cursors from another archive, are item-not-found.
    for cursor in ["no-such-id".to_string(), foreign[0].clone()] {
        let mut q = query(5);
        q.after_id = Some(cursor.clone());
        let r = a.query(store, &q).await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
        let mut q = query(5);
        q.before_id = Some(cursor);
        let r = a.query(store, &q).await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    }

    // Filters, alone and combined, each paged both ways.
    let t10 = all[10].ts_micros;
    let t19 = all[19].ts_micros;
    let some_ids: Vec<String> = [3, 4, 8, 12, 13, 20, 27, 29]
        .iter()
        .map(|&i| all[i].id.clone())
        .collect();
    let filters: Vec<(ArchiveQuery, Keep)> = vec![
        (
            ArchiveQuery {
                with: Some(CAROL.into()),
                ..query(3)
            },
            Box::new(|m| m.with == CAROL),
        ),
        (
            ArchiveQuery {
                start_micros: Some(t10),
                ..query(4)
            },
            Box::new(move |m| m.ts_micros >= t10),
        ),
        (
            ArchiveQuery {
                end_micros: Some(t19),
                ..query(6)
            },
            Box::new(move |m| m.ts_micros <= t19),
        ),
        (
            ArchiveQuery {
                start_micros: Some(t10),
                end_micros: Some(t19),
                ..query(3)
            },
            Box::new(move |m| (t10..=t19).contains(&m.ts_micros)),
        ),
        (
            ArchiveQuery {
                with: Some(DAVE.into()),
                start_micros: Some(t10),
                end_micros: Some(t19),
                ..query(2)
            },
            Box::new(move |m| m.with == DAVE && (t10..=t19).contains(&m.ts_micros)),
        ),
        (
            ArchiveQuery {
                ids: Some(some_ids.clone()),
                ..query(3)
            },
            Box::new({
                let some_ids = some_ids.clone();
                move |m| some_ids.contains(&m.id)
            }),
        ),
        (
            ArchiveQuery {
                ids: Some(
                    some_ids
                        .iter()
                        .cloned()
                        .chain(["unknown".to_string(), foreign[1].clone()])
                        .collect(),
                ),
                with: Some(ALICE.into()),
                start_micros: Some(t10),
                ..query(1)
            },
            Box::new({
                let some_ids = some_ids.clone();
                move |m| some_ids.contains(&m.id) && m.with == ALICE && m.ts_micros >= t10
            }),
        ),
    ];
    for (q, keep) in &filters {
        let expected: Vec<ArchivedMessage> = all.iter().filter(|m| keep(m)).cloned().collect();
        assert!(!expected.is_empty() && expected.len() < all.len(), "{q:?}");
        page_all(store, a, q, false, &expected).await;
        let mut back = q.clone();
        back.last_page = true;
        page_all(store, a, &back, true, &expected).await;
        // A cursor that doesn't itself match the filter still positions the page.
        let pivot = &all[15];
        let mut fwd = q.clone();
        fwd.after_id = Some(pivot.id.clone());
        fwd.max = 1000;
        let p = a.query(store, &fwd).await.unwrap();
        let newer: Vec<_> = all[16..].iter().filter(|m| keep(m)).cloned().collect();
        assert_eq!(p.items, newer, "{fwd:?}");
        assert!(p.complete);
        assert_count(&p, expected.len());
        let mut bwd = q.clone();
        bwd.before_id = Some(pivot.id.clone());
        bwd.max = 1000;
        let p = a.query(store, &bwd).await.unwrap();
        let older: Vec<_> = all[..15].iter().filter(|m| keep(m)).cloned().collect();
        assert_eq!(p.items, older, "{bwd:?}");
        assert!(p.complete);
    }
    // Empty results: an empty id list, a time range with nothing in it, an unknown peer.
    for q in [
        ArchiveQuery {
            ids: Some(vec![]),
            ..query(10)
        },
        ArchiveQuery {
            start_micros: Some(after + 1_000_000),
            ..query(10)
        },
        ArchiveQuery {
            end_micros: Some(before - 1),
            ..query(10)
        },
        ArchiveQuery {
            start_micros: Some(t19),
            end_micros: Some(t10),
            ..query(10)
        },
        ArchiveQuery {
            with: Some("alice@example.co".into()),
            ..query(10)
        },
    ] {
        let p = a.query(store, &q).await.unwrap();
        assert!(p.items.is_empty() && p.complete, "{q:?}");
        assert_count(&p, 0);
        let mut back = q.clone();
        back.last_page = true;
        let p = a.query(store, &back).await.unwrap();
        assert!(p.items.is_empty() && p.complete, "{back:?}");
    }
    all
}

async fn archive(store: &dyn Store) {
    assert!(store.archive_append(&[]).await.unwrap().is_empty());
    let empty = store.archive_query(BOB, &query(10)).await.unwrap();
    assert!(empty.items.is_empty() && empty.complete);
    assert_count(&empty, 0);
    let mut last = query(10);
    last.last_page = true;
    let empty = store.archive_query(BOB, &last).await.unwrap();
    assert!(empty.items.is_empty() && empty.complete);

    // 30 messages for Bob in three epochs a few ms apart (for time filters); some calls
    // also archive the other side's copy in Alice's archive.
    let before = now_micros();
    let mut bob_ids = Vec::new();
    let mut alice_ids = Vec::new();
    for epoch in 0..3 {
        epoch_starts(epoch).await;
        for i in 0..10 {
            let n = epoch * 10 + i;
            let with = PARTNERS[n % 3];
            let stanza = numbered_stanza(n);
            if with == ALICE {
                let ids = store
                    .archive_append(&[
                        entry(BOB, ALICE, &stanza, n % 2 == 0),
                        entry(ALICE, BOB, &stanza, n % 2 != 0),
                    ])
                    .await
                    .unwrap();
                assert_eq!(ids.len(), 2);
                bob_ids.push(ids[0].clone());
                alice_ids.push(ids[1].clone());
            } else {
                let ids = store
                    .archive_append(&[entry(BOB, with, &stanza, n % 2 == 0)])
                    .await
                    .unwrap();
                assert_eq!(ids.len(), 1);
                bob_ids.push(ids[0].clone());
            }
        }
    }
    let after = now_micros();

    assert_distinct_ids(bob_ids.iter().chain(&alice_ids), 40);
    let (bob, alice) = (Archive::User(BOB), Archive::User(ALICE));
    let all = check_archive(store, bob, &bob_ids, alice, &alice_ids, (before, after)).await;
    // Directions as given.
    for (n, m) in all.iter().enumerate() {
        assert_eq!(m.outgoing, n % 2 == 0);
    }
    let alice_page = store.archive_query(ALICE, &query(100)).await.unwrap();
    assert_eq!(ids_of(&alice_page.items), alice_ids);
    assert!(alice_page.items.iter().all(|m| m.with == BOB));
    let t10 = all[10].ts_micros;
    let t19 = all[19].ts_micros;

    // Appends for unknown accounts fail as a whole, without storing the valid part.
    let r = store
        .archive_append(&[entry(NOBODY, BOB, "<message/>", true)])
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let r = store
        .archive_append(&[
            entry(BOB, NOBODY, "<message/>", false),
            entry(NOBODY, BOB, "<message/>", true),
        ])
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let p = store.archive_query(BOB, &query(0)).await.unwrap();
    assert_count(&p, 30);

    // Big appends (more than one INSERT's worth in SQLite) are all-or-nothing too.
    const BULK: &str = "bulk@remote.net";
    let mut bulk: Vec<NewArchiveEntry> = (0..1200)
        .map(|i| entry(CAROL, BULK, &format!("<b{i}/>"), i % 3 == 0))
        .collect();
    bulk.push(entry(NOBODY, BULK, "<b/>", true));
    let r = store.archive_append(&bulk).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let bulk_q = ArchiveQuery {
        with: Some(BULK.into()),
        ..query(2000)
    };
    assert_count(&store.archive_query(CAROL, &bulk_q).await.unwrap(), 0);
    bulk.pop();
    let ids = store.archive_append(&bulk).await.unwrap();
    let p = store.archive_query(CAROL, &bulk_q).await.unwrap();
    assert_eq!(ids_of(&p.items), ids);
    assert!(p
        .items
        .iter()
        .enumerate()
        .all(|(i, m)| m.stanza == format!("<b{i}/>") && m.outgoing == (i % 3 == 0)));

    // A failing call next to good ones (likely in the same group commit) fails alone.
    let good = |n: usize| async move {
        let e = entry(
            BOB,
            DAVE,
            &format!("<message><body>g{n}</body></message>"),
            true,
        );
        store.archive_append(&[e]).await
    };
    let bad = async {
        let e = entry(NOBODY, DAVE, "<message/>", true);
        store.archive_append(&[e]).await
    };
    let (g1, b, g2) = tokio::join!(good(1), bad, good(2));
    assert!(matches!(b, Err(StoreError::NotFound)), "{b:?}");
    let (g1, g2) = (g1.unwrap().remove(0), g2.unwrap().remove(0));
    assert_eq!(
        store.archive_get(BOB, &g1).await.unwrap().unwrap().stanza,
        "<message><body>g1</body></message>"
    );
    assert_eq!(
        store.archive_get(BOB, &g2).await.unwrap().unwrap().stanza,
        "<message><body>g2</body></message>"
    );
    let mut q = query(100);
    q.after_id = Some(all[29].id.clone());
    let p = store.archive_query(BOB, &q).await.unwrap();
    let mut got = ids_of(&p.items);
    got.sort();
    let mut want = vec![g1, g2];
    want.sort();
    assert_eq!(got, want);
    let extra = p.items;

    // Pruning by age: per owner, then globally.
    let before_prune = store.archive_query(ALICE, &query(100)).await.unwrap().items;
    let n = store.archive_prune(Some(BOB), t10).await.unwrap();
    assert_eq!(n, 10);
    let p = store.archive_query(BOB, &query(100)).await.unwrap();
    let mut expected: Vec<ArchivedMessage> = all[10..].to_vec();
    expected.extend(extra.iter().cloned());
    assert_eq!(p.items, expected);
    assert_eq!(store.archive_get(BOB, &all[9].id).await.unwrap(), None);
    // Pruned cursors are item-not-found.
    let mut q = query(5);
    q.after_id = Some(all[0].id.clone());
    assert!(matches!(
        store.archive_query(BOB, &q).await,
        Err(StoreError::NotFound)
    ));
    // Alice's archive is untouched by Bob's prune.
    assert_eq!(
        store.archive_query(ALICE, &query(100)).await.unwrap().items,
        before_prune
    );
    assert_eq!(store.archive_prune(Some(BOB), t10).await.unwrap(), 0);
    assert_eq!(
        store.archive_prune(Some(NOBODY), i64::MAX).await.unwrap(),
        0
    );
    let alice_old = before_prune.iter().filter(|m| m.ts_micros < t19).count();
    let bob_old = all[10..].iter().filter(|m| m.ts_micros < t19).count();
    let n = store.archive_prune(None, t19).await.unwrap();
    assert_eq!(n as usize, alice_old + bob_old);
    let p = store.archive_query(BOB, &query(100)).await.unwrap();
    assert!(p.items.iter().all(|m| m.ts_micros >= t19));
    assert_eq!(p.items.len(), 30 + 2 - 10 - bob_old);
    let p = store.archive_query(ALICE, &query(100)).await.unwrap();
    assert_eq!(p.items.len(), before_prune.len() - alice_old);
    assert_eq!(store.archive_prune(None, t19).await.unwrap(), 0);
    // A restore imports one account's history after another's, so across owners the
    // archive order is not time order: the global prune still finds every old row.
    let imported = |owner: &str, ts: i64| ArchivedMessage {
        id: format!("restored-{ts}"),
        owner: owner.into(),
        with: "carol@example.net".into(),
        ts_micros: ts,
        outgoing: false,
        stanza: format!("<message><body>{ts}</body></message>"),
    };
    let alice_new: Vec<ArchivedMessage> = (0..5).map(|i| imported(ALICE, 2_000 + i)).collect();
    let bob_old: Vec<ArchivedMessage> = (0..5).map(|i| imported(BOB, 1_000 + i)).collect();
    store.archive_import(&alice_new).await.unwrap();
    store.archive_import(&bob_old).await.unwrap();
    assert_eq!(store.archive_prune(None, 1_500).await.unwrap(), 5);
    for m in &bob_old {
        assert_eq!(store.archive_get(BOB, &m.id).await.unwrap(), None);
    }
    assert!(store
        .archive_get(ALICE, &alice_new[0].id)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.archive_prune(None, 2_500).await.unwrap(), 5);
    assert_eq!(store.archive_prune(None, t19).await.unwrap(), 0);
    // Paging still works over what's left.
    let left = store.archive_query(BOB, &query(100)).await.unwrap().items;
    page_all(store, Archive::User(BOB), &query(3), false, &left).await;
    let mut q = query(3);
    q.last_page = true;
    page_all(store, Archive::User(BOB), &q, true, &left).await;
    // Older history restored after newer messages reads in time order, before them, and
    // pages and filters by time like the rest.
    let older: Vec<ArchivedMessage> = (0..4).map(|i| imported(BOB, 500 + i)).collect();
    store.archive_import(&older).await.unwrap();
    let with_older = store.archive_query(BOB, &query(100)).await.unwrap().items;
    assert_eq!(with_older[..4], older[..]);
    assert_eq!(with_older[4..], left[..]);
    page_all(store, Archive::User(BOB), &query(3), false, &with_older).await;
    let mut q = query(3);
    q.last_page = true;
    page_all(store, Archive::User(BOB), &q, true, &with_older).await;
    let mut q = query(100);
    q.end_micros = Some(502);
    let p = store.archive_query(BOB, &q).await.unwrap();
    assert_eq!(p.items[..], older[..3]);
}

/// 1,000 concurrent appends (each archiving both sides of a message) all complete with
/// distinct ids, in a consistent order; a few failing calls among them fail alone.
async fn archive_concurrency(store: &dyn Store) {
    const CALLS: usize = 1000;
    const PEER: &str = "conc@remote.net";
    let start = Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let owner = if i % 100 == 99 { NOBODY } else { BOB };
            let entries = vec![
                entry(
                    CAROL,
                    PEER,
                    &format!("<message><body>c{i}</body></message>"),
                    true,
                ),
                entry(
                    owner,
                    PEER,
                    &format!("<message><body>c{i}</body></message>"),
                    false,
                ),
            ];
            async move { store.archive_append(&entries).await }
        })
        .collect();
    let results = join_all(calls).await;
    let elapsed = start.elapsed();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "archive_append: {CALLS} concurrent calls ({ok} ok, 2 entries each) in {elapsed:?}: \
         {:.0} calls/s, {:.0} messages/s",
        CALLS as f64 / elapsed.as_secs_f64(),
        (2 * ok) as f64 / elapsed.as_secs_f64(),
    );

    let mut by_id = std::collections::HashMap::new();
    for (i, r) in results.into_iter().enumerate() {
        if i % 100 == 99 {
            assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
            continue;
        }
        let ids = r.unwrap();
        assert_eq!(ids.len(), 2);
        for id in ids {
            assert!(by_id.insert(id, i).is_none(), "duplicate stanza-id");
        }
    }
    assert_eq!(by_id.len(), 2 * (CALLS - CALLS / 100));

    // Each archive holds exactly the successful calls, and both archives list the calls
    // in the same order (each call committed atomically, calls serialized).
    let filter = |max| ArchiveQuery {
        with: Some(PEER.into()),
        ..query(max)
    };
    let carol = store.archive_query(CAROL, &filter(10_000)).await.unwrap();
    let bob = store.archive_query(BOB, &filter(10_000)).await.unwrap();
    assert_eq!(carol.items.len(), CALLS - CALLS / 100);
    assert_eq!(bob.items.len(), CALLS - CALLS / 100);
    let order = |items: &[ArchivedMessage]| -> Vec<usize> {
        items
            .iter()
            .map(|m| {
                let i = by_id[&m.id];
                assert_eq!(m.stanza, format!("<message><body>c{i}</body></message>"));
                i
            })
            .collect()
    };
    assert_eq!(order(&carol.items), order(&bob.items));
    for w in carol.items.windows(2) {
        assert!(w[0].ts_micros <= w[1].ts_micros);
    }
    page_all(
        store,
        Archive::User(CAROL),
        &filter(97),
        false,
        &carol.items,
    )
    .await;
    let mut q = filter(97);
    q.last_page = true;
    page_all(store, Archive::User(CAROL), &q, true, &carol.items).await;

    // Sequential appends land in call order.
    let mut seq_ids = Vec::new();
    for i in 0..20 {
        let ids = store
            .archive_append(&[entry(CAROL, PEER, &format!("<s{i}/>"), true)])
            .await
            .unwrap();
        seq_ids.extend(ids);
    }
    let mut q = filter(100);
    q.after_id = Some(carol.items.last().unwrap().id.clone());
    let p = store.archive_query(CAROL, &q).await.unwrap();
    assert_eq!(ids_of(&p.items), seq_ids);
    assert!(p.complete);
    assert_count(&p, CALLS - CALLS / 100 + 20);
}

async fn mam_prefs(store: &dyn Store) {
    assert_eq!(store.mam_prefs(BOB).await.unwrap(), MamPrefs::default());
    assert_eq!(MamPrefs::default().default, "always");
    let prefs = MamPrefs {
        default: "roster".into(),
        always: vec![DAVE.into(), CAROL.into(), DAVE.into()],
        never: vec!["spam@remote.net".into()],
    };
    store.set_mam_prefs(BOB, &prefs).await.unwrap();
    assert_eq!(
        store.mam_prefs(BOB).await.unwrap(),
        MamPrefs {
            default: "roster".into(),
            always: vec![CAROL.into(), DAVE.into()],
            never: vec!["spam@remote.net".into()],
        }
    );
    // Replaced as a whole.
    let prefs = MamPrefs {
        default: "never".into(),
        always: vec![],
        never: vec![CAROL.into()],
    };
    store.set_mam_prefs(BOB, &prefs).await.unwrap();
    assert_eq!(store.mam_prefs(BOB).await.unwrap(), prefs);
    store
        .set_mam_prefs(BOB, &MamPrefs::default())
        .await
        .unwrap();
    assert_eq!(store.mam_prefs(BOB).await.unwrap(), MamPrefs::default());
    // Per user.
    assert_eq!(store.mam_prefs(CAROL).await.unwrap(), MamPrefs::default());

    let bad = MamPrefs {
        default: "sometimes".into(),
        ..MamPrefs::default()
    };
    let r = store.set_mam_prefs(BOB, &bad).await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    assert_eq!(store.mam_prefs(BOB).await.unwrap(), MamPrefs::default());
    let r = store.set_mam_prefs(NOBODY, &prefs).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(store.mam_prefs(NOBODY).await.unwrap(), MamPrefs::default());
}

async fn offline(store: &dyn Store) {
    assert_eq!(store.offline_count(BOB).await.unwrap(), 0);
    let before = now_micros();
    let mut seqs = Vec::new();
    for i in 0..5 {
        let archive_id = (i % 2 == 0).then(|| format!("arch{i}"));
        let seq = store
            .offline_push(
                BOB,
                &format!("<message><body>o{i}</body></message>"),
                archive_id.as_deref(),
                5,
                100 + i,
            )
            .await
            .unwrap();
        seqs.push(seq);
    }
    let after = now_micros();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let full = store.offline_push(BOB, "<message/>", None, 5, 1).await;
    assert!(matches!(full, Err(StoreError::QuotaExceeded)), "{full:?}");
    // A larger limit admits more; limit 0 admits nothing.
    let zero = store.offline_push(CAROL, "<message/>", None, 0, 1).await;
    assert!(matches!(zero, Err(StoreError::QuotaExceeded)), "{zero:?}");
    assert_eq!(store.offline_count(BOB).await.unwrap(), 5);
    assert_eq!(store.offline_count(CAROL).await.unwrap(), 0);

    let all = store.offline_fetch(BOB, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    for (i, m) in all.iter().enumerate() {
        assert_eq!(m.seq, seqs[i]);
        assert_eq!(m.ord, 100 + i as i64);
        assert_eq!(m.stanza, format!("<message><body>o{i}</body></message>"));
        assert_eq!(m.archive_id, (i % 2 == 0).then(|| format!("arch{i}")));
        assert!((before..=after).contains(&m.ts_micros), "{m:?}");
    }
    assert!(all.windows(2).all(|w| w[0].ts_micros <= w[1].ts_micros));
    assert_eq!(store.offline_fetch(BOB, 2).await.unwrap(), all[..2]);
    assert!(store.offline_fetch(BOB, 0).await.unwrap().is_empty());
    // Fetching doesn't remove.
    assert_eq!(store.offline_count(BOB).await.unwrap(), 5);

    // Delivered: the first two go, by seq.
    assert_eq!(store.offline_delete(BOB, &seqs[..2]).await.unwrap(), 2);
    assert_eq!(store.offline_delete(BOB, &seqs[..2]).await.unwrap(), 0);
    assert_eq!(store.offline_delete(BOB, &[]).await.unwrap(), 0);
    assert_eq!(store.offline_fetch(BOB, 100).await.unwrap(), all[2..]);
    // Per user: Carol's seqs don't touch Bob's queue.
    assert_eq!(store.offline_delete(CAROL, &seqs).await.unwrap(), 0);
    assert_eq!(store.offline_count(BOB).await.unwrap(), 3);

    // Requeued (issue 9): a message accepted before the queued ones, pushed again
    // after them, is read first; seqs still grow and are never reused.
    let early = store
        .offline_push(BOB, "<early/>", None, 5, 50)
        .await
        .unwrap();
    assert!(early > seqs[4]);
    let queue_order = || async {
        store
            .offline_fetch(BOB, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(queue_order().await, [early, seqs[2], seqs[3], seqs[4]]);
    // Deleting the first two in that order leaves exactly the others, though one
    // left has a lower seq than one deleted.
    assert_eq!(
        store.offline_delete(BOB, &[early, seqs[2]]).await.unwrap(),
        2
    );
    let left = queue_order().await;
    assert_eq!(left, [seqs[3], seqs[4]]);
    assert_eq!(store.offline_delete(BOB, &left).await.unwrap(), 2);
    let s2 = store
        .offline_push(BOB, "<later/>", None, 5, 1)
        .await
        .unwrap();
    assert!(s2 > early);
    assert_eq!(store.offline_count(BOB).await.unwrap(), 1);
    assert_eq!(store.offline_delete(BOB, &[s2]).await.unwrap(), 1);

    // Concurrent pushes (likely one group commit) respect the quota exactly, and failures
    // don't affect the others.
    let pushes: Vec<_> = (0..10)
        .map(|i| {
            let user = if i == 4 { NOBODY } else { CAROL };
            async move {
                store
                    .offline_push(user, &format!("<c{i}/>"), None, 3, i)
                    .await
            }
        })
        .collect();
    let results = join_all(pushes).await;
    assert!(
        matches!(results[4], Err(StoreError::NotFound)),
        "{:?}",
        results[4]
    );
    let ok: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(ok.len(), 3, "{results:?}");
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Err(StoreError::QuotaExceeded)))
            .count(),
        6,
        "{results:?}"
    );
    let queued = store.offline_fetch(CAROL, 10).await.unwrap();
    assert_eq!(queued.iter().map(|m| m.seq).collect::<Vec<_>>(), ok);
    assert_eq!(store.offline_delete(CAROL, &ok).await.unwrap(), 3);

    let r = store.offline_push(NOBODY, "<message/>", None, 10, 1).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(store.offline_count(NOBODY).await.unwrap(), 0);
}

fn node_cfg(max_items: u32) -> PepNodeConfig {
    PepNodeConfig {
        max_items,
        ..PepNodeConfig::default()
    }
}

async fn pep_ids(store: &dyn Store, owner: &str, node: &str) -> Vec<String> {
    store
        .pep_items(owner, node, None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect()
}

async fn pep(store: &dyn Store) {
    const AVATAR: &str = "urn:xmpp:avatar:metadata";
    const BOOKMARKS: &str = "urn:xmpp:bookmarks:1";
    assert_eq!(store.pep_node(BOB, AVATAR).await.unwrap(), None);
    let r = store.pep_publish(BOB, AVATAR, "a", "<x/>").await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let r = store
        .pep_create_or_configure(NOBODY, AVATAR, &node_cfg(1))
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert!(store.pep_nodes(NOBODY).await.unwrap().is_empty());

    // max_items 1: the newest item replaces the previous one.
    store
        .pep_create_or_configure(BOB, AVATAR, &node_cfg(1))
        .await
        .unwrap();
    assert_eq!(
        store.pep_node(BOB, AVATAR).await.unwrap(),
        Some(node_cfg(1))
    );
    assert!(pep_ids(store, BOB, AVATAR).await.is_empty());
    store
        .pep_publish(BOB, AVATAR, "a", "<info id='a'/>")
        .await
        .unwrap();
    store
        .pep_publish(BOB, AVATAR, "b", "<info id='b'/>")
        .await
        .unwrap();
    assert_eq!(pep_ids(store, BOB, AVATAR).await, vec!["b"]);

    // max_items 3, including a re-publish moving an item to the front.
    let before = now_micros();
    store
        .pep_create_or_configure(BOB, BOOKMARKS, &node_cfg(3))
        .await
        .unwrap();
    for id in ["1", "2", "3", "4"] {
        store
            .pep_publish(BOB, BOOKMARKS, id, &format!("<conference name='{id}'/>"))
            .await
            .unwrap();
    }
    assert_eq!(pep_ids(store, BOB, BOOKMARKS).await, vec!["4", "3", "2"]);
    store
        .pep_publish(BOB, BOOKMARKS, "2", "<conference name='two \u{1F600}'/>")
        .await
        .unwrap();
    assert_eq!(pep_ids(store, BOB, BOOKMARKS).await, vec!["2", "4", "3"]);
    store
        .pep_publish(BOB, BOOKMARKS, "5", "<conference name='5'/>")
        .await
        .unwrap();
    let items = store.pep_items(BOB, BOOKMARKS, None, None).await.unwrap();
    assert_eq!(
        items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec!["5", "2", "4"]
    );
    assert_eq!(items[1].payload, "<conference name='two \u{1F600}'/>");
    let after = now_micros();
    for w in items.windows(2) {
        assert!(w[0].published_micros >= w[1].published_micros);
    }
    assert!(items
        .iter()
        .all(|i| (before..=after).contains(&i.published_micros)));

    // Selecting by count and by id.
    let two = store
        .pep_items(BOB, BOOKMARKS, Some(2), None)
        .await
        .unwrap();
    assert_eq!(two, items[..2]);
    assert!(store
        .pep_items(BOB, BOOKMARKS, Some(0), None)
        .await
        .unwrap()
        .is_empty());
    let wanted = vec!["4".to_string(), "3".to_string(), "5".to_string()];
    let by_id = store
        .pep_items(BOB, BOOKMARKS, None, Some(&wanted))
        .await
        .unwrap();
    assert_eq!(by_id, vec![items[0].clone(), items[2].clone()]);
    let by_id = store
        .pep_items(BOB, BOOKMARKS, Some(1), Some(&wanted))
        .await
        .unwrap();
    assert_eq!(by_id, vec![items[0].clone()]);
    assert!(store
        .pep_items(BOB, BOOKMARKS, None, Some(&[]))
        .await
        .unwrap()
        .is_empty());

    // Reconfiguring down trims; the config is replaced.
    let cfg = PepNodeConfig {
        access_model: "whitelist".into(),
        max_items: 2,
        publish_model: "open".into(),
        persist_items: false,
        send_last_published_item: "never".into(),
        notify_retract: false,
        notify_delete: false,
        item_expire_secs: 0,
    };
    store
        .pep_create_or_configure(BOB, BOOKMARKS, &cfg)
        .await
        .unwrap();
    assert_eq!(store.pep_node(BOB, BOOKMARKS).await.unwrap(), Some(cfg));
    assert_eq!(pep_ids(store, BOB, BOOKMARKS).await, vec!["5", "2"]);
    let big = node_cfg(u32::MAX);
    store
        .pep_create_or_configure(BOB, BOOKMARKS, &big)
        .await
        .unwrap();
    assert_eq!(store.pep_node(BOB, BOOKMARKS).await.unwrap(), Some(big));
    assert_eq!(pep_ids(store, BOB, BOOKMARKS).await, vec!["5", "2"]);

    // Retraction.
    assert!(store.pep_retract(BOB, BOOKMARKS, "5").await.unwrap());
    assert!(!store.pep_retract(BOB, BOOKMARKS, "5").await.unwrap());
    assert!(!store.pep_retract(BOB, "no-such-node", "2").await.unwrap());
    assert_eq!(pep_ids(store, BOB, BOOKMARKS).await, vec!["2"]);

    // A transient node (max_items 0) keeps nothing.
    store
        .pep_create_or_configure(BOB, "transient", &node_cfg(0))
        .await
        .unwrap();
    store
        .pep_publish(BOB, "transient", "t", "<t/>")
        .await
        .unwrap();
    assert!(pep_ids(store, BOB, "transient").await.is_empty());

    // Nodes are per owner.
    store
        .pep_create_or_configure(CAROL, AVATAR, &node_cfg(5))
        .await
        .unwrap();
    store
        .pep_publish(CAROL, AVATAR, "a", "<carol/>")
        .await
        .unwrap();
    assert_eq!(pep_ids(store, BOB, AVATAR).await, vec!["b"]);
    assert_eq!(
        store.pep_items(CAROL, AVATAR, None, None).await.unwrap()[0].payload,
        "<carol/>"
    );
    assert_eq!(
        store.pep_nodes(BOB).await.unwrap(),
        vec!["transient", AVATAR, BOOKMARKS]
    );

    // Deleting a node takes its items; re-creating it starts empty.
    assert!(store.pep_delete_node(BOB, BOOKMARKS).await.unwrap());
    assert!(!store.pep_delete_node(BOB, BOOKMARKS).await.unwrap());
    assert_eq!(store.pep_node(BOB, BOOKMARKS).await.unwrap(), None);
    assert!(pep_ids(store, BOB, BOOKMARKS).await.is_empty());
    let r = store.pep_publish(BOB, BOOKMARKS, "x", "<x/>").await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    store
        .pep_create_or_configure(BOB, BOOKMARKS, &node_cfg(10))
        .await
        .unwrap();
    assert!(pep_ids(store, BOB, BOOKMARKS).await.is_empty());
    assert_eq!(
        store.pep_nodes(BOB).await.unwrap(),
        vec!["transient", AVATAR, BOOKMARKS]
    );
    assert_eq!(store.pep_nodes(CAROL).await.unwrap(), vec![AVATAR]);
}

/// `pubsub#item_expire` (hidden from reads once due, listed for the sweep, kept over a
/// restart because it is stored) and whitelist affiliations.
async fn pep_expiry_and_affiliations(store: &dyn Store) {
    const STORIES: &str = "urn:xmpp:pubsub-stories:0";
    let expiring = |secs| PepNodeConfig {
        max_items: 30,
        item_expire_secs: secs,
        ..PepNodeConfig::default()
    };
    store
        .pep_create_or_configure(CAROL, STORIES, &expiring(3600))
        .await
        .unwrap();
    assert_eq!(
        store.pep_node(CAROL, STORIES).await.unwrap(),
        Some(expiring(3600))
    );
    store
        .pep_publish(CAROL, STORIES, "s1", "<s1/>")
        .await
        .unwrap();
    store
        .pep_publish(CAROL, STORIES, "s2", "<s2/>")
        .await
        .unwrap();
    let items = store.pep_items(CAROL, STORIES, None, None).await.unwrap();
    assert_eq!(items.len(), 2);
    let now = items[0].published_micros;
    // Nothing is due now; an hour later both are, oldest first, with where they live.
    assert!(store.pep_expired(now, 10).await.unwrap().is_empty());
    let due = store.pep_expired(now + 3_601_000_000, 10).await.unwrap();
    let ids: Vec<&str> = due.iter().map(|e| e.item.id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2"]);
    assert!(due.iter().all(|e| e.owner == CAROL && e.node == STORIES));
    assert_eq!(due[0].item.payload, "<s1/>");
    assert_eq!(
        store
            .pep_expired(now + 3_601_000_000, 1)
            .await
            .unwrap()
            .len(),
        1
    );
    // Nodes without item_expire never expire.
    assert!(store
        .pep_expired(i64::MAX, 100)
        .await
        .unwrap()
        .iter()
        .all(|e| e.node == STORIES));
    // Reconfiguring applies to the items already there: with 1 s, they are due
    // within a second and then hidden from reads.
    store
        .pep_create_or_configure(CAROL, STORIES, &expiring(1))
        .await
        .unwrap();
    assert_eq!(
        store.pep_expired(now + 1_100_000, 10).await.unwrap().len(),
        2
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(pep_ids(store, CAROL, STORIES).await.is_empty());
    assert!(store
        .pep_items(CAROL, STORIES, Some(1), Some(&["s2".to_string()]))
        .await
        .unwrap()
        .is_empty());
    // The sweep's delete is the usual retraction; a second one finds nothing.
    assert!(store.pep_retract(CAROL, STORIES, "s1").await.unwrap());
    assert!(!store.pep_retract(CAROL, STORIES, "s1").await.unwrap());
    // Back to no expiry: the remaining item is readable again and no longer due.
    store
        .pep_create_or_configure(CAROL, STORIES, &expiring(0))
        .await
        .unwrap();
    assert_eq!(pep_ids(store, CAROL, STORIES).await, vec!["s2"]);
    assert!(store.pep_expired(i64::MAX, 10).await.unwrap().is_empty());

    // Affiliations: per node, sorted, replaced, removed; none for an unknown node.
    assert!(store
        .pep_affiliations(CAROL, STORIES)
        .await
        .unwrap()
        .is_empty());
    for jid in [BOB, "zed@remote.net", "amy@remote.net"] {
        store
            .pep_set_affiliation(CAROL, STORIES, jid, Some("member"))
            .await
            .unwrap();
    }
    store
        .pep_set_affiliation(CAROL, STORIES, "zed@remote.net", Some("outcast"))
        .await
        .unwrap();
    store
        .pep_set_affiliation(CAROL, STORIES, "amy@remote.net", None)
        .await
        .unwrap();
    assert_eq!(
        store.pep_affiliations(CAROL, STORIES).await.unwrap(),
        vec![
            (BOB.to_string(), "member".to_string()),
            ("zed@remote.net".to_string(), "outcast".to_string())
        ]
    );
    let r = store
        .pep_set_affiliation(CAROL, "no-such-node", BOB, Some("member"))
        .await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    // Deleting the node takes its affiliations.
    assert!(store.pep_delete_node(CAROL, STORIES).await.unwrap());
    store
        .pep_create_or_configure(CAROL, STORIES, &expiring(0))
        .await
        .unwrap();
    assert!(store
        .pep_affiliations(CAROL, STORIES)
        .await
        .unwrap()
        .is_empty());
    assert!(store.pep_delete_node(CAROL, STORIES).await.unwrap());
}

async fn blocking(store: &dyn Store) {
    assert!(store.blocklist(BOB).await.unwrap().is_empty());
    let jids = |list: &[&str]| list.iter().map(|j| j.to_string()).collect::<Vec<_>>();
    store
        .block(
            BOB,
            &jids(&[
                "spam@remote.net",
                "evil.example",
                "spam@remote.net",
                "x@y.z/res",
            ]),
        )
        .await
        .unwrap();
    assert_eq!(
        store.blocklist(BOB).await.unwrap(),
        vec!["evil.example", "spam@remote.net", "x@y.z/res"]
    );
    store
        .block(BOB, &jids(&["evil.example", DAVE]))
        .await
        .unwrap();
    store.block(BOB, &[]).await.unwrap();
    assert_eq!(
        store.blocklist(BOB).await.unwrap(),
        vec![DAVE, "evil.example", "spam@remote.net", "x@y.z/res"]
    );
    store
        .unblock(BOB, Some(&jids(&["evil.example", "never@blocked.net"])))
        .await
        .unwrap();
    assert_eq!(
        store.blocklist(BOB).await.unwrap(),
        vec![DAVE, "spam@remote.net", "x@y.z/res"]
    );
    store.unblock(BOB, Some(&[])).await.unwrap();
    assert_eq!(store.blocklist(BOB).await.unwrap().len(), 3);
    // Per user.
    store.block(CAROL, &jids(&[DAVE])).await.unwrap();
    store.unblock(BOB, None).await.unwrap();
    assert!(store.blocklist(BOB).await.unwrap().is_empty());
    assert_eq!(store.blocklist(CAROL).await.unwrap(), vec![DAVE]);
    store.unblock(CAROL, None).await.unwrap();

    let r = store.block(NOBODY, &jids(&[DAVE])).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let r = store.unblock(NOBODY, None).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert!(store.blocklist(NOBODY).await.unwrap().is_empty());
}

async fn kv(store: &dyn Store) {
    const NS: &str = "jabber:iq:private";
    assert_eq!(store.kv_get(BOB, NS, "a").await.unwrap(), None);
    store.kv_put(BOB, NS, "a", "<a xmlns='a'/>").await.unwrap();
    store.kv_put(BOB, NS, "b", "<b xmlns='b'/>").await.unwrap();
    store.kv_put(BOB, "other", "a", "other ns").await.unwrap();
    store.kv_put(CAROL, NS, "a", "carol's").await.unwrap();
    assert_eq!(
        store.kv_get(BOB, NS, "a").await.unwrap().as_deref(),
        Some("<a xmlns='a'/>")
    );
    // Replacing, per user and per namespace.
    store
        .kv_put(BOB, NS, "a", "<a xmlns='a'>2</a>")
        .await
        .unwrap();
    assert_eq!(
        store.kv_get(BOB, NS, "a").await.unwrap().as_deref(),
        Some("<a xmlns='a'>2</a>")
    );
    assert_eq!(
        store.kv_get(BOB, "other", "a").await.unwrap().as_deref(),
        Some("other ns")
    );
    assert_eq!(
        store.kv_get(CAROL, NS, "a").await.unwrap().as_deref(),
        Some("carol's")
    );
    // Empty and non-ASCII values and keys round-trip.
    store.kv_put(BOB, NS, "é", "").await.unwrap();
    assert_eq!(
        store.kv_get(BOB, NS, "é").await.unwrap().as_deref(),
        Some("")
    );

    // The size limit: the largest value fits, one byte more is refused and changes nothing.
    let big = "x".repeat(crate::KV_MAX_VALUE_BYTES);
    store.kv_put(BOB, NS, "big", &big).await.unwrap();
    assert_eq!(
        store.kv_get(BOB, NS, "big").await.unwrap(),
        Some(big.clone())
    );
    let r = store.kv_put(BOB, NS, "big", &format!("{big}y")).await;
    assert!(matches!(r, Err(StoreError::QuotaExceeded)), "{r:?}");
    assert_eq!(store.kv_get(BOB, NS, "big").await.unwrap(), Some(big));
    let long_key = "k".repeat(crate::KV_MAX_KEY_BYTES + 1);
    let r = store.kv_put(BOB, NS, &long_key, "v").await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    let r = store.kv_put(BOB, &long_key, "k", "v").await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");

    assert!(store.kv_delete(BOB, NS, "big").await.unwrap());
    assert!(!store.kv_delete(BOB, NS, "big").await.unwrap());
    assert_eq!(store.kv_get(BOB, NS, "big").await.unwrap(), None);
    assert!(store.kv_delete(BOB, NS, "b").await.unwrap());
    assert!(store.kv_delete(BOB, NS, "é").await.unwrap());
    assert!(store.kv_delete(BOB, "other", "a").await.unwrap());
    assert!(store.kv_delete(CAROL, NS, "a").await.unwrap());
    // Bob keeps "a" (checked gone only for deleted accounts).
    assert!(store.kv_get(BOB, NS, "a").await.unwrap().is_some());

    let r = store.kv_put(NOBODY, NS, "a", "v").await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(store.kv_get(NOBODY, NS, "a").await.unwrap(), None);
    assert!(!store.kv_delete(NOBODY, NS, "a").await.unwrap());
}

const ROOM: &str = "team@conference.example.com";
const ROOM2: &str = "other@conference.example.com";
const ROOM3: &str = "lobby@muc.other.org";
const NO_ROOM: &str = "none@conference.example.com";
const DISPLAYED: &str = "displayed";
const RECEIVED: &str = "received";

fn says(with: &str, stanza: &str) -> (String, String) {
    (with.to_owned(), stanza.to_owned())
}

fn assert_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>) {
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
}

/// Multi-user chat rooms: documents, the room archive (the users' archive semantics,
/// checked by the same code), replacing messages, member positions, deletion.
async fn rooms(store: &dyn Store) {
    // An unknown room: empty reads, refused writes.
    assert_eq!(store.room_get(NO_ROOM).await.unwrap(), None);
    assert!(store
        .room_list("conference.example.com")
        .await
        .unwrap()
        .is_empty());
    assert!(!store.room_delete(NO_ROOM).await.unwrap());
    let p = store.room_archive_query(NO_ROOM, &query(10)).await.unwrap();
    assert!(p.items.is_empty() && p.complete, "{p:?}");
    assert_eq!(store.room_archive_get(NO_ROOM, "x").await.unwrap(), None);
    assert!(!store
        .room_archive_replace(NO_ROOM, "x", "<m/>")
        .await
        .unwrap());
    assert_not_found(
        store
            .room_archive_append(NO_ROOM, &[says(ALICE, "<m/>")])
            .await,
    );
    assert_not_found(store.room_archive_append(NO_ROOM, &[]).await);
    assert!(store
        .room_positions(NO_ROOM, DISPLAYED)
        .await
        .unwrap()
        .is_empty());
    assert_not_found(
        store
            .room_set_position(NO_ROOM, ALICE, DISPLAYED, "x")
            .await,
    );
    assert_not_found(store.room_members_past(NO_ROOM, RECEIVED, "x").await);

    // Documents: created, replaced, listed by exact service.
    store.room_put(ROOM, r#"{"v":1}"#).await.unwrap();
    assert_eq!(
        store.room_get(ROOM).await.unwrap().as_deref(),
        Some(r#"{"v":1}"#)
    );
    let doc = r#"{"v":2,"subject":"caf\u00e9 \ud83d\ude00 é😀"}"#;
    store.room_put(ROOM, doc).await.unwrap();
    assert_eq!(store.room_get(ROOM).await.unwrap().as_deref(), Some(doc));
    store.room_put(ROOM3, "{}").await.unwrap();
    store.room_put(ROOM2, "{}").await.unwrap();
    assert_eq!(
        store.room_list("conference.example.com").await.unwrap(),
        vec![ROOM2, ROOM]
    );
    assert_eq!(store.room_list("muc.other.org").await.unwrap(), vec![ROOM3]);
    for service in [
        "example.com",
        "conference.example.co",
        "onference.example.com",
    ] {
        assert!(
            store.room_list(service).await.unwrap().is_empty(),
            "{service}"
        );
    }
    // Rooms are not accounts.
    assert!(!store
        .list_accounts(None)
        .await
        .unwrap()
        .contains(&ROOM.to_owned()));
    // The document size limit.
    let big = "x".repeat(crate::ROOM_MAX_DOC_BYTES);
    store.room_put(ROOM3, &big).await.unwrap();
    assert_eq!(
        store.room_get(ROOM3).await.unwrap().map(|d| d.len()),
        Some(big.len())
    );
    let r = store.room_put(ROOM3, &format!("{big}x")).await;
    assert!(matches!(r, Err(StoreError::QuotaExceeded)), "{r:?}");
    let r = store.room_put(NO_ROOM, &format!("{big}x")).await;
    assert!(matches!(r, Err(StoreError::QuotaExceeded)), "{r:?}");
    assert_eq!(store.room_get(NO_ROOM).await.unwrap(), None);
    store.room_put(ROOM3, "{}").await.unwrap();

    // The archive: 30 messages in three epochs a few ms apart, from the partners in
    // turn, appended in calls of 1 to 4 entries; a few in another room between them.
    assert!(store
        .room_archive_append(ROOM, &[])
        .await
        .unwrap()
        .is_empty());
    let before = now_micros();
    let mut ids = Vec::new();
    let mut ids2 = Vec::new();
    for epoch in 0..3 {
        epoch_starts(epoch).await;
        let mut n = epoch * 10;
        for size in 1..=4 {
            let entries: Vec<_> = (n..n + size)
                .map(|n| says(PARTNERS[n % 3], &numbered_stanza(n)))
                .collect();
            let got = store.room_archive_append(ROOM, &entries).await.unwrap();
            assert_eq!(got.len(), size);
            ids.extend(got);
            n += size;
        }
        let got = store
            .room_archive_append(ROOM2, &[says(BOB, &format!("<o{epoch}/>"))])
            .await
            .unwrap();
        ids2.extend(got);
    }
    let after = now_micros();
    assert_distinct_ids(ids.iter().chain(&ids2), 33);
    let (room, room2) = (Archive::Room(ROOM), Archive::Room(ROOM2));
    let all = check_archive(store, room, &ids, room2, &ids2, (before, after)).await;
    assert!(all.iter().all(|m| !m.outgoing));
    // Room archives and users' archives are apart.
    assert_eq!(store.archive_get(ROOM, &all[0].id).await.unwrap(), None);
    assert_eq!(store.room_archive_get(BOB, &all[0].id).await.unwrap(), None);

    // Replacing a message (a retraction's tombstone) keeps its place, id and time.
    assert!(store
        .room_archive_replace(ROOM, &all[5].id, "<tombstone/>")
        .await
        .unwrap());
    let replaced = store
        .room_archive_get(ROOM, &all[5].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        replaced,
        ArchivedMessage {
            stanza: "<tombstone/>".into(),
            ..all[5].clone()
        }
    );
    let mut q = query(1);
    q.after_id = Some(all[4].id.clone());
    let p = store.room_archive_query(ROOM, &q).await.unwrap();
    assert_eq!(p.items, vec![replaced]);
    assert!(!store
        .room_archive_replace(ROOM, "unknown", "<t/>")
        .await
        .unwrap());
    assert!(!store
        .room_archive_replace(ROOM2, &all[6].id, "<t/>")
        .await
        .unwrap());
    assert_eq!(
        store
            .room_archive_get(ROOM, &all[6].id)
            .await
            .unwrap()
            .as_ref(),
        Some(&all[6])
    );

    room_positions(store, &all, &ids2).await;
    room_appends(store).await;

    // Deleting a room takes its archive and positions with it, and nothing else.
    let positions2 = store.room_positions(ROOM2, DISPLAYED).await.unwrap();
    assert!(!positions2.is_empty());
    let archive2 = store
        .room_archive_query(ROOM2, &query(1000))
        .await
        .unwrap()
        .items;
    assert!(store.room_delete(ROOM).await.unwrap());
    assert!(!store.room_delete(ROOM).await.unwrap());
    assert_eq!(store.room_get(ROOM).await.unwrap(), None);
    assert_eq!(
        store.room_list("conference.example.com").await.unwrap(),
        vec![ROOM2]
    );
    let p = store.room_archive_query(ROOM, &query(0)).await.unwrap();
    assert_eq!(p.count, Some(0));
    assert_eq!(
        store.room_archive_get(ROOM, &all[0].id).await.unwrap(),
        None
    );
    for kind in [DISPLAYED, RECEIVED] {
        assert!(store.room_positions(ROOM, kind).await.unwrap().is_empty());
    }
    assert_not_found(store.room_members_past(ROOM, DISPLAYED, &all[0].id).await);
    assert_not_found(
        store
            .room_archive_append(ROOM, &[says(ALICE, "<m/>")])
            .await,
    );
    assert_eq!(
        store.room_positions(ROOM2, DISPLAYED).await.unwrap(),
        positions2
    );
    assert_eq!(
        store
            .room_archive_query(ROOM2, &query(1000))
            .await
            .unwrap()
            .items,
        archive2
    );
    // Created again, it starts empty.
    store.room_put(ROOM, "{}").await.unwrap();
    let p = store.room_archive_query(ROOM, &query(0)).await.unwrap();
    assert_eq!(p.count, Some(0));
    assert!(store
        .room_positions(ROOM, DISPLAYED)
        .await
        .unwrap()
        .is_empty());
    assert!(store.room_delete(ROOM3).await.unwrap());
    assert_eq!(store.room_get(ROOM2).await.unwrap().as_deref(), Some("{}"));
}

/// Member positions in `ROOM`'s archive `all` (`foreign`: ids of `ROOM2`'s).
async fn room_positions(store: &dyn Store, all: &[ArchivedMessage], foreign: &[String]) {
    let id = |n: usize| all[n].id.as_str();
    // Moves `member`'s position of `kind` in ROOM to the message with id `to`.
    let set = |member: &'static str, kind: &'static str, to: &str| {
        let to = to.to_owned();
        async move { store.room_set_position(ROOM, member, kind, &to).await }
    };
    let moved = |member, kind, n| {
        let set = &set;
        async move { set(member, kind, id(n)).await.unwrap() }
    };
    let positions =
        |kind: &'static str| async move { store.room_positions(ROOM, kind).await.unwrap() };
    // `(member, n)` as positions at message n.
    let at = |v: &[(&str, usize)]| -> Vec<(String, String)> {
        v.iter()
            .map(|&(m, n)| (m.to_owned(), all[n].id.clone()))
            .collect()
    };
    let past = |kind: &'static str, to: &str| {
        let to = to.to_owned();
        async move { store.room_members_past(ROOM, kind, &to).await }
    };

    // Bad kinds and ids.
    for kind in ["read", "", "Displayed"] {
        let r = set(ALICE, kind, id(3)).await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
        let r = store.room_positions(ROOM, kind).await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
        let r = past(kind, id(3)).await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    }
    for bad in ["unknown", foreign[0].as_str()] {
        assert_not_found(set(ALICE, DISPLAYED, bad).await);
        assert_not_found(past(DISPLAYED, bad).await);
    }
    assert!(positions(DISPLAYED).await.is_empty());
    assert!(past(DISPLAYED, id(0)).await.unwrap().is_empty());

    // Only forward.
    assert!(moved(ALICE, DISPLAYED, 10).await);
    assert!(!moved(ALICE, DISPLAYED, 10).await);
    assert!(!moved(ALICE, DISPLAYED, 3).await);
    assert_eq!(positions(DISPLAYED).await, at(&[(ALICE, 10)]));
    assert!(moved(ALICE, DISPLAYED, 20).await);
    assert_eq!(positions(DISPLAYED).await, at(&[(ALICE, 20)]));
    // Kinds and rooms are apart.
    assert!(positions(RECEIVED).await.is_empty());
    assert!(moved(ALICE, RECEIVED, 2).await);
    assert_eq!(positions(RECEIVED).await, at(&[(ALICE, 2)]));
    let r = store.room_set_position(ROOM2, ALICE, DISPLAYED, &foreign[0]);
    assert!(r.await.unwrap());
    assert_eq!(positions(DISPLAYED).await, at(&[(ALICE, 20)]));
    // A replaced (retracted) message is a position like any other.
    assert!(moved(DAVE, RECEIVED, 5).await);

    for (member, n) in [(CAROL, 5), (BOB, 15), (DAVE, 29)] {
        assert!(moved(member, DISPLAYED, n).await);
    }
    assert_eq!(
        positions(DISPLAYED).await,
        at(&[(ALICE, 20), (BOB, 15), (CAROL, 5), (DAVE, 29)])
    );
    assert_eq!(positions(RECEIVED).await, at(&[(ALICE, 2), (DAVE, 5)]));
    for (kind, n, members) in [
        (DISPLAYED, 0, &[ALICE, BOB, CAROL, DAVE][..]),
        (DISPLAYED, 5, &[ALICE, BOB, CAROL, DAVE]),
        (DISPLAYED, 6, &[ALICE, BOB, DAVE]),
        (DISPLAYED, 15, &[ALICE, BOB, DAVE]),
        (DISPLAYED, 16, &[ALICE, DAVE]),
        (DISPLAYED, 21, &[DAVE]),
        (RECEIVED, 3, &[DAVE]),
        (RECEIVED, 6, &[]),
    ] {
        assert_eq!(past(kind, id(n)).await.unwrap(), members, "{kind} {n}");
    }

    // Archive order, not id order: ids made within one microsecond sort randomly, so a
    // big append has some out of id order (where it has none, there is nothing to see).
    let big: Vec<_> = (0..400).map(|i| says(CAROL, &format!("<p{i}/>"))).collect();
    let got = store.room_archive_append(ROOM, &big).await.unwrap();
    if let Some(i) = got.windows(2).position(|w| w[0] > w[1]) {
        let (older, newer) = (&got[i], &got[i + 1]);
        assert!(set(ALICE, RECEIVED, newer).await.unwrap());
        // `older` has the greater id but comes before `newer`: not a move forward.
        assert!(!set(ALICE, RECEIVED, older).await.unwrap());
        assert_eq!(
            positions(RECEIVED).await[0],
            (ALICE.to_owned(), newer.clone())
        );
        assert_eq!(past(RECEIVED, older).await.unwrap(), vec![ALICE]);
        assert!(set(BOB, RECEIVED, older).await.unwrap());
        assert_eq!(past(RECEIVED, newer).await.unwrap(), vec![ALICE]);
    } else {
        println!(
            "room positions: no ids out of order in {} appends",
            got.len()
        );
    }
}

/// Room appends in bulk, next to failing ones and to users' archive appends.
async fn room_appends(store: &dyn Store) {
    // More than one INSERT's worth, in order.
    let bulk: Vec<_> = (0..1200).map(|i| says(DAVE, &format!("<b{i}/>"))).collect();
    let ids = store.room_archive_append(ROOM2, &bulk).await.unwrap();
    let q = ArchiveQuery {
        with: Some(DAVE.into()),
        ..query(2000)
    };
    let p = store.room_archive_query(ROOM2, &q).await.unwrap();
    assert_eq!(ids_of(&p.items), ids);
    assert!(p
        .items
        .iter()
        .enumerate()
        .all(|(i, m)| m.stanza == format!("<b{i}/>") && m.owner == ROOM2 && !m.outgoing));

    // In one group commit with users' appends and a failing room append: each lands in
    // its own archive, the failing one fails alone, timestamps never go back.
    let last = p.items.last().unwrap().clone();
    let room = |n: usize| async move {
        store
            .room_archive_append(ROOM2, &[says(CAROL, &format!("<g{n}/>"))])
            .await
    };
    let user = |n: usize| async move {
        store
            .archive_append(&[entry(CAROL, ROOM2, &format!("<u{n}/>"), true)])
            .await
    };
    let stray = [says(CAROL, "<x/>")];
    let (r1, u1, bad, r2, u2) = tokio::join!(
        room(1),
        user(1),
        store.room_archive_append(NO_ROOM, &stray),
        room(2),
        user(2)
    );
    assert_not_found(bad);
    let mut q = query(100);
    q.after_id = Some(last.id.clone());
    let p = store.room_archive_query(ROOM2, &q).await.unwrap();
    assert_eq!(p.items.len(), 2);
    assert!(p.items.iter().all(|m| m.ts_micros >= last.ts_micros));
    for (r, n) in [(r1, 1), (r2, 2)] {
        let id = r.unwrap().remove(0);
        let m = store.room_archive_get(ROOM2, &id).await.unwrap().unwrap();
        assert_eq!(m.stanza, format!("<g{n}/>"));
        assert!(p.items.contains(&m));
        assert_eq!(store.archive_get(CAROL, &id).await.unwrap(), None);
    }
    for (u, n) in [(u1, 1), (u2, 2)] {
        let id = u.unwrap().remove(0);
        let m = store.archive_get(CAROL, &id).await.unwrap().unwrap();
        assert_eq!((m.stanza, m.outgoing), (format!("<u{n}/>"), true));
        assert!(m.ts_micros >= last.ts_micros);
        assert_eq!(store.room_archive_get(ROOM2, &id).await.unwrap(), None);
    }
    assert_eq!(store.room_get(NO_ROOM).await.unwrap(), None);
}

/// Blob hashes (lowercase hex SHA-256): of "a", "b", "c", "d" and "" (empty bytes).
const SHA_A: &str = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
const SHA_B: &str = "3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
const SHA_C: &str = "2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6";
const SHA_D: &str = "18ac3e7343f016890c510e93f935261169d9e3f565436429830faf0934f4f8e4";
const SHA_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn upload(slot: &str, owner: &str, sha256: &str, size: u64, created: i64) -> Upload {
    Upload {
        slot: slot.to_owned(),
        owner: owner.to_owned(),
        sha256: sha256.to_owned(),
        size,
        content_type: "image/png".to_owned(),
        filename: format!("{slot}.png"),
        created,
    }
}

fn slots_of(uploads: &[Upload]) -> Vec<&str> {
    uploads.iter().map(|u| u.slot.as_str()).collect()
}

/// HTTP File Upload: slots and their errors, usage and the total for quotas, listing,
/// blob references (two slots sharing a blob), expiry order and limit. Leaves Bob
/// `b2` (blob B) and Carol `c1` (blob C).
async fn uploads(store: &dyn Store) {
    let b1 = upload("b1", BOB, SHA_A, 100, 1_000);
    let b2 = Upload {
        content_type: "text/plain; charset=utf-8".into(),
        filename: "r\u{e9}sum\u{e9} \u{1F600}.txt".into(),
        ..upload("b2", BOB, SHA_B, 20, 2_000)
    };
    // The same bytes as b1: one blob, two slots. Older than b2, so time order is not
    // slot order.
    let b3 = upload("b3", BOB, SHA_A, 100, 1_200);
    let c1 = upload("c1", CAROL, SHA_C, 7, 1_500);
    // Empty, and created in the same second as b1: the slot orders them.
    let b0 = Upload {
        content_type: String::new(),
        filename: String::new(),
        ..upload("b0", BOB, SHA_EMPTY, 0, 1_000)
    };
    // Not in time order, so the order must come from `created`.
    for u in [&b3, &c1, &b1, &b2, &b0] {
        store.upload_put(u).await.unwrap();
    }
    for u in [&b0, &b1, &b2, &b3, &c1] {
        assert_eq!(store.upload_get(&u.slot).await.unwrap().as_ref(), Some(u));
    }

    // A taken slot, by its owner or anyone else, changes nothing.
    for dup in [
        upload("b1", BOB, SHA_B, 5, 9_000),
        upload("b1", CAROL, SHA_C, 5, 9_000),
    ] {
        let r = store.upload_put(&dup).await;
        assert!(matches!(r, Err(StoreError::Conflict)), "{r:?}");
    }
    assert_eq!(store.upload_get("b1").await.unwrap(), Some(b1.clone()));
    // An owner without an account.
    assert_not_found(
        store
            .upload_put(&upload("n1", NOBODY, SHA_D, 5, 1_000))
            .await,
    );
    assert_eq!(store.upload_get("n1").await.unwrap(), None);
    assert!(!store.blob_referenced(SHA_D).await.unwrap());
    // Sizes: up to i64::MAX round-trips, more is refused.
    let max = upload("max", CAROL, SHA_D, i64::MAX as u64, 1_000);
    store.upload_put(&max).await.unwrap();
    assert_eq!(store.upload_get("max").await.unwrap(), Some(max));
    assert!(store.upload_delete("max").await.unwrap());
    for size in [i64::MAX as u64 + 1, u64::MAX] {
        let r = store
            .upload_put(&upload("big", CAROL, SHA_D, size, 1_000))
            .await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
        assert_eq!(store.upload_get("big").await.unwrap(), None);
    }

    // Usage: at or after `since`, and in total.
    for (since, recent) in [
        (0, 220),
        (1_000, 220),
        (1_001, 120),
        (1_200, 120),
        (1_201, 20),
        (2_000, 20),
        (2_001, 0),
    ] {
        assert_eq!(
            store.upload_usage(BOB, since).await.unwrap(),
            (recent, 220),
            "{since}"
        );
    }
    assert_eq!(store.upload_usage(CAROL, 0).await.unwrap(), (7, 7));
    assert_eq!(store.upload_usage(NOBODY, 0).await.unwrap(), (0, 0));
    assert_eq!(store.upload_total().await.unwrap(), 227);

    // Listing, oldest first.
    assert_eq!(
        store.uploads_of(BOB).await.unwrap(),
        [b0.clone(), b1.clone(), b3.clone(), b2.clone()]
    );
    assert_eq!(
        store.uploads_of(CAROL).await.unwrap(),
        std::slice::from_ref(&c1)
    );
    assert!(store.uploads_of(NOBODY).await.unwrap().is_empty());

    // Expiry: strictly before, oldest first, at most `limit`.
    assert_eq!(
        store.uploads_before(i64::MAX, 100).await.unwrap(),
        [b0.clone(), b1.clone(), b3.clone(), c1.clone(), b2.clone()]
    );
    for (before, limit, slots) in [
        (1_500, 100, &["b0", "b1", "b3"][..]),
        (1_501, 100, &["b0", "b1", "b3", "c1"]),
        (1_000, 100, &[]),
        (1_001, 100, &["b0", "b1"]),
        (i64::MAX, 2, &["b0", "b1"]),
        (i64::MAX, 3, &["b0", "b1", "b3"]),
        (i64::MAX, 0, &[]),
        (i64::MAX, usize::MAX, &["b0", "b1", "b3", "c1", "b2"]),
    ] {
        let got = store.uploads_before(before, limit).await.unwrap();
        assert_eq!(slots_of(&got), slots, "before {before}, limit {limit}");
    }

    // Blob references: A by two slots, until both are gone.
    for sha in [SHA_A, SHA_B, SHA_C, SHA_EMPTY] {
        assert!(store.blob_referenced(sha).await.unwrap(), "{sha}");
    }
    assert!(!store.blob_referenced(SHA_D).await.unwrap());
    assert!(store.upload_delete("b1").await.unwrap());
    assert!(!store.upload_delete("b1").await.unwrap());
    assert_eq!(store.upload_get("b1").await.unwrap(), None);
    assert!(store.blob_referenced(SHA_A).await.unwrap());
    assert!(store.upload_delete("b3").await.unwrap());
    assert!(!store.blob_referenced(SHA_A).await.unwrap());
    assert!(store.upload_delete("b0").await.unwrap());
    assert!(!store.blob_referenced(SHA_EMPTY).await.unwrap());
    assert!(!store.upload_delete("nope").await.unwrap());
    assert!(store.blob_referenced(SHA_B).await.unwrap());

    // Deletions show in usage, totals and listings.
    assert_eq!(store.upload_usage(BOB, 0).await.unwrap(), (20, 20));
    assert_eq!(store.upload_total().await.unwrap(), 27);
    assert_eq!(
        store.uploads_of(BOB).await.unwrap(),
        std::slice::from_ref(&b2)
    );
    assert_eq!(store.uploads_before(i64::MAX, 100).await.unwrap(), [c1, b2]);
}

/// Gives Alice something in every new table, for the deletion checks.
async fn populate_alice(store: &dyn Store) {
    store
        .archive_append(&[
            entry(
                ALICE,
                BOB,
                "<message><body>for the cascade</body></message>",
                true,
            ),
            entry(
                BOB,
                ALICE,
                "<message><body>for the cascade</body></message>",
                false,
            ),
        ])
        .await
        .unwrap();
    assert!(!store
        .archive_query(ALICE, &query(1))
        .await
        .unwrap()
        .items
        .is_empty());
    store
        .set_mam_prefs(
            ALICE,
            &MamPrefs {
                default: "roster".into(),
                always: vec![BOB.into()],
                never: vec![DAVE.into()],
            },
        )
        .await
        .unwrap();
    store
        .offline_push(ALICE, "<message/>", Some("x"), 10, 1)
        .await
        .unwrap();
    store
        .pep_create_or_configure(ALICE, "n", &node_cfg(5))
        .await
        .unwrap();
    store.pep_publish(ALICE, "n", "i", "<i/>").await.unwrap();
    store.block(ALICE, &[DAVE.to_string()]).await.unwrap();
    store
        .kv_put(
            ALICE,
            "jabber:iq:private",
            "storage:rosternotes",
            "<storage/>",
        )
        .await
        .unwrap();
    // One blob shared with Bob's b2, one of her own.
    for u in [
        upload("a1", ALICE, SHA_B, 30, 4_000),
        upload("a2", ALICE, SHA_D, 40, 5_000),
    ] {
        store.upload_put(&u).await.unwrap();
    }
    assert_eq!(store.upload_usage(ALICE, 0).await.unwrap(), (70, 70));
}

/// Everything of `user` in the new tables is gone.
async fn assert_no_feature_data(store: &dyn Store, user: &str) {
    let p = store.archive_query(user, &query(10)).await.unwrap();
    assert!(p.items.is_empty() && p.complete, "{p:?}");
    assert_count(&p, 0);
    assert_eq!(store.mam_prefs(user).await.unwrap(), MamPrefs::default());
    assert_eq!(store.offline_count(user).await.unwrap(), 0);
    assert!(store.pep_nodes(user).await.unwrap().is_empty());
    assert_eq!(store.pep_node(user, "n").await.unwrap(), None);
    assert!(store
        .pep_items(user, "n", None, None)
        .await
        .unwrap()
        .is_empty());
    assert!(store.blocklist(user).await.unwrap().is_empty());
    assert_eq!(
        store
            .kv_get(user, "jabber:iq:private", "storage:rosternotes")
            .await
            .unwrap(),
        None
    );
    assert!(store.uploads_of(user).await.unwrap().is_empty());
    assert_eq!(store.upload_usage(user, 0).await.unwrap(), (0, 0));
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn delete_cascades(store: &dyn Store) {
    let last_version = store.roster_version(ALICE).await.unwrap();
    assert!(last_version > 0);
    let uploaded = store.upload_total().await.unwrap();
    let before = unix_now();
    store.delete_account(ALICE).await.unwrap();
    let after = unix_now();

    assert_eq!(store.credentials(ALICE).await.unwrap(), None);
    assert_eq!(store.roster(ALICE).await.unwrap(), (0, vec![]));
    assert_eq!(store.roster_item(ALICE, BOB).await.unwrap(), None);
    assert_eq!(store.vcard(ALICE).await.unwrap(), None);
    assert_eq!(store.last_activity(ALICE).await.unwrap(), None);
    assert_no_feature_data(store, ALICE).await;
    assert_eq!(store.list_accounts(None).await.unwrap(), vec![BOB, CAROL]);
    assert_eq!(
        store.list_accounts(Some("example.com")).await.unwrap(),
        vec![BOB]
    );
    let at = store.deleted_at(ALICE).await.unwrap().expect("tombstone");
    assert!(
        (before..=after).contains(&at),
        "{before} <= {at} <= {after}"
    );
    assert_eq!(store.deleted_at(BOB).await.unwrap(), None);

    // Other users' data is untouched, including Bob's roster item for Alice.
    assert_eq!(store.credentials(BOB).await.unwrap(), Some(credentials(2)));
    assert!(store.vcard(BOB).await.unwrap().is_some());
    let (_, bobs) = store.roster(BOB).await.unwrap();
    assert_eq!(
        bobs.iter().map(|i| i.jid.as_str()).collect::<Vec<_>>(),
        vec![ALICE]
    );
    // Bob's copy of their conversation stays.
    let q = ArchiveQuery {
        with: Some(ALICE.into()),
        last_page: true,
        ..query(1)
    };
    let p = store.archive_query(BOB, &q).await.unwrap();
    assert_eq!(
        p.items[0].stanza,
        "<message><body>for the cascade</body></message>"
    );
    assert_eq!(store.pep_nodes(CAROL).await.unwrap().len(), 1);
    // Alice's uploads are gone; the blob she shared with Bob is still referenced, hers
    // alone is not (blob garbage collection may delete it).
    for slot in ["a1", "a2"] {
        assert_eq!(store.upload_get(slot).await.unwrap(), None);
    }
    assert_eq!(store.upload_total().await.unwrap(), uploaded - 70);
    assert!(store.blob_referenced(SHA_B).await.unwrap());
    assert!(!store.blob_referenced(SHA_D).await.unwrap());
    assert_eq!(slots_of(&store.uploads_of(BOB).await.unwrap()), ["b2"]);

    let again = store.delete_account(ALICE).await;
    assert!(matches!(again, Err(StoreError::NotFound)), "{again:?}");
    let never = store.delete_account(NOBODY).await;
    assert!(matches!(never, Err(StoreError::NotFound)), "{never:?}");
    assert_eq!(store.deleted_at(NOBODY).await.unwrap(), None);

    // Re-registration: a clean account that keeps the tombstone, and whose roster
    // version continues above the old one so cached client rosters can't match.
    store.create_account(ALICE, &credentials(7)).await.unwrap();
    assert_eq!(
        store.credentials(ALICE).await.unwrap(),
        Some(credentials(7))
    );
    assert_eq!(store.deleted_at(ALICE).await.unwrap(), Some(at));
    let (v, items) = store.roster(ALICE).await.unwrap();
    assert!(items.is_empty());
    assert!(v > last_version, "{v} must exceed {last_version}");
    assert_eq!(store.vcard(ALICE).await.unwrap(), None);
    assert_no_feature_data(store, ALICE).await;
    let v2 = store
        .put_roster_item(ALICE, &item(BOB, Subscription::None, &[]))
        .await
        .unwrap();
    assert!(v2 > v);

    // Deleting again moves the tombstone forward (never backwards).
    store.delete_account(ALICE).await.unwrap();
    let at2 = store.deleted_at(ALICE).await.unwrap().unwrap();
    assert!(at2 >= at);
    store.create_account(ALICE, &credentials(8)).await.unwrap();
    assert!(store.roster_version(ALICE).await.unwrap() > v2);
}

/// The PostgreSQL server tests create their databases on (env `NATTER_TEST_PG_URL`).
pub fn pg_server_url() -> String {
    std::env::var("NATTER_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh PostgreSQL database `natter_test_<random>` for one test; [`PgTestDb::drop_now`]
/// drops it. Creating it panics with the cause when the server is unreachable: a
/// PostgreSQL test must fail then, never pass without having run.
pub struct PgTestDb {
    server: String,
    pub name: String,
    /// The URL of the new database.
    pub url: String,
}

impl PgTestDb {
    pub async fn create() -> PgTestDb {
        let server = pg_server_url();
        let name = format!("natter_test_{:016x}", rand::random::<u64>());
        if let Err(e) = crate::postgres::create_database(&server, &name).await {
            panic!(
                "PostgreSQL tests need a server (NATTER_TEST_PG_URL, default \
                 postgres://postgres@127.0.0.1:5432/postgres) where they may create \
                 databases: {e}"
            );
        }
        let url = crate::postgres::with_database(&server, &name);
        PgTestDb { server, name, url }
    }

    pub async fn drop_now(self) {
        if let Err(e) = crate::postgres::drop_database(&self.server, &self.name).await {
            panic!("dropping test database {}: {e}", self.name);
        }
    }
}
