//! Archive paging on a large archive (XEP-0313), straight through the store
//! API — no server, no network: what a MAM page query costs the database.
//!
//! ```text
//! cargo run --release -p natter-store --example archive_bench -- [ROWS] [DB_PATH]
//! ```
//!
//! Fills one account's archive with ROWS messages (default 10,000,000) with
//! 100 conversation partners, in `archive_append` batches of 5,000 (one
//! transaction each, as the group-commit writer would), then times page
//! queries of 50: first page, last page, a page after / before an id in the
//! middle, with a `with` filter, with a time range, and single lookups. An
//! existing DB_PATH with the rows already in it is reused (no refill).
//! Each figure is the median of 21 runs (after one warm-up).

use natter_store::prelude::*;
use natter_store::sqlite::SqliteStore;
use natter_store::{AccountCredentials, ArchiveQuery, NewArchiveEntry, StoredCredentials};
use std::time::{Duration, Instant};

const OWNER: &str = "big@bench.local";
const PARTNERS: usize = 100;
const BATCH: usize = 5_000;
const PAGE: usize = 50;
const RUNS: usize = 21;

fn creds() -> AccountCredentials {
    let c = StoredCredentials {
        salt: vec![0; 16],
        iterations: 4096,
        stored_key: vec![0; 32],
        server_key: vec![0; 32],
    };
    AccountCredentials {
        sha1: c.clone(),
        sha256: c,
    }
}

fn stanza(n: usize, with: &str) -> String {
    format!(
        "<message xmlns='jabber:client' from='{with}/phone' to='{OWNER}/laptop' type='chat' \
         id='m{n:08}'><body>message number {n}: the quick brown fox jumps over the lazy dog \
         and keeps running far away</body><markable xmlns='urn:xmpp:chat-markers:0'/>\
         <origin-id xmlns='urn:xmpp:sid:0' id='o{n:08}'/></message>"
    )
}

fn partner(i: usize) -> String {
    format!("friend{}@bench.local", i % PARTNERS)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn time<F, Fut>(label: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let _ = f().await;
    let mut samples = Vec::with_capacity(RUNS);
    let mut items = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        items = f().await;
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "| {label} | {items} | {} | {} |",
        ms(samples[RUNS / 2]),
        ms(samples[RUNS * 9 / 10])
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rows: usize = args
        .next()
        .map(|a| a.replace('_', "").parse().expect("ROWS must be a number"))
        .unwrap_or(10_000_000);
    let path = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("natter-archive-bench-{rows}.db")));
    let store = SqliteStore::open(&path, false).await.expect("open store");

    if store.credentials(OWNER).await.unwrap().is_none() {
        store.create_account(OWNER, &creds()).await.unwrap();
    }
    let have = store
        .archive_query(OWNER, &ArchiveQuery::default())
        .await
        .unwrap()
        .count
        .unwrap_or(0) as usize;
    let t = Instant::now();
    let mut n = have;
    while n < rows {
        let k = BATCH.min(rows - n);
        let entries: Vec<NewArchiveEntry> = (n..n + k)
            .map(|i| {
                let with = partner(i);
                NewArchiveEntry {
                    owner: OWNER.into(),
                    stanza: stanza(i, &with),
                    with,
                    outgoing: i % 2 == 0,
                }
            })
            .collect();
        store.archive_append(&entries).await.expect("append");
        n += k;
        if n % 1_000_000 < BATCH {
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "{n} rows, {:.0} s, {:.0} rows/s",
                secs,
                (n - have) as f64 / secs
            );
        }
    }
    if n > have {
        let secs = t.elapsed().as_secs_f64();
        println!(
            "filled {} rows in {:.0} s ({:.0} rows/s)",
            n - have,
            secs,
            (n - have) as f64 / secs
        );
    }
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "archive of {OWNER}: {rows} messages, {} partners, database {:.1} GiB ({})",
        PARTNERS,
        size as f64 / (1u64 << 30) as f64,
        path.display()
    );

    // Cursors in the middle of the archive, and a time window there.
    let page = |q: ArchiveQuery| ArchiveQuery { max: PAGE, ..q };
    let first = store
        .archive_query(OWNER, &page(Default::default()))
        .await
        .unwrap();
    let last = store
        .archive_query(
            OWNER,
            &page(ArchiveQuery {
                last_page: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let (t0, t1) = (first.items[0].ts_micros, last.items[PAGE - 1].ts_micros);
    let mid_ts = t0 + (t1 - t0) / 2;
    let mid = store
        .archive_query(
            OWNER,
            &page(ArchiveQuery {
                start_micros: Some(mid_ts),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let mid_id = mid.items[0].id.clone();
    let with = partner(7);

    println!();
    println!("| query (page of {PAGE}) | items | median | p90 |");
    println!("| --- | --- | --- | --- |");
    let run = |q: ArchiveQuery| {
        let store = &store;
        async move { store.archive_query(OWNER, &q).await.unwrap().items.len() }
    };
    time("first page", || run(page(Default::default()))).await;
    time("last page (`<before/>`)", || {
        run(page(ArchiveQuery {
            last_page: true,
            ..Default::default()
        }))
    })
    .await;
    time("page after an id in the middle", || {
        run(page(ArchiveQuery {
            after_id: Some(mid_id.clone()),
            ..Default::default()
        }))
    })
    .await;
    time("page before an id in the middle", || {
        run(page(ArchiveQuery {
            before_id: Some(mid_id.clone()),
            ..Default::default()
        }))
    })
    .await;
    time("`with` filter, last page", || {
        run(page(ArchiveQuery {
            with: Some(with.clone()),
            last_page: true,
            ..Default::default()
        }))
    })
    .await;
    time("`with` filter, after an id in the middle", || {
        run(page(ArchiveQuery {
            with: Some(with.clone()),
            after_id: Some(mid_id.clone()),
            ..Default::default()
        }))
    })
    .await;
    time("`start` in the middle, first page", || {
        run(page(ArchiveQuery {
            start_micros: Some(mid_ts),
            ..Default::default()
        }))
    })
    .await;
    time("`with` + `start`/`end` window", || {
        run(page(ArchiveQuery {
            with: Some(with.clone()),
            start_micros: Some(mid_ts),
            end_micros: Some(mid_ts + (t1 - t0) / 100),
            ..Default::default()
        }))
    })
    .await;
    time("count only (`max` 0)", || run(ArchiveQuery::default())).await;
    time("`ids` lookup of one message", || {
        run(ArchiveQuery {
            ids: Some(vec![mid_id.clone()]),
            max: 1,
            ..Default::default()
        })
    })
    .await;
    time("archive_get by id", || async {
        usize::from(store.archive_get(OWNER, &mid_id).await.unwrap().is_some())
    })
    .await;
    store.close().await;
}
