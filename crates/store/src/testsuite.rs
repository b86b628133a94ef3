//! Backend-independent conformance suite: every [`Store`] implementation must pass
//! [`conformance`]. Enable the `testsuite` feature to use it from other crates.

use crate::{AccountCredentials, RosterItem, Store, StoreError, StoredCredentials, Subscription};

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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn delete_cascades(store: &dyn Store) {
    let last_version = store.roster_version(ALICE).await.unwrap();
    assert!(last_version > 0);
    let before = unix_now();
    store.delete_account(ALICE).await.unwrap();
    let after = unix_now();

    assert_eq!(store.credentials(ALICE).await.unwrap(), None);
    assert_eq!(store.roster(ALICE).await.unwrap(), (0, vec![]));
    assert_eq!(store.roster_item(ALICE, BOB).await.unwrap(), None);
    assert_eq!(store.vcard(ALICE).await.unwrap(), None);
    assert_eq!(store.last_activity(ALICE).await.unwrap(), None);
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
