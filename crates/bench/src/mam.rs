//! `mam`: archive paging (XEP-0313 `urn:xmpp:mam:2` with XEP-0059 RSM).
//! O owners user(offset) .. user(offset+O-1); unless `--no-fill`, they log
//! in with presence and user(offset+O) sends each of them N numbered chat
//! messages, which every server archives for the owner, and each owner
//! waits until it got them all. Then the owners page their own archives,
//! one query at a time each, all owners at once, until Q queries are done.
//! A walk is: the last page (`<before/>`), up to K pages backward
//! (`<before>first</before>`), then forward again from the oldest page
//! reached (`<after>last</after>`), which must give the same pages as on
//! the way back.
//!
//! Measured: per query, from sending the IQ to the `<iq type='result'/>`
//! with `<fin/>` (all results arrive before it). Checked: every page has
//! the page size of results unless the server says the walk reached the
//! end of the archive (`complete`, or a short page), RSM `<first/>` and
//! `<last/>` are the page's first and last result, no result id comes
//! twice in a walk's backward pages, and each forward page is the backward
//! page it must be.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use natter_xml::{escape_text, NS_CLIENT};

use crate::chat::{new_hist, setup, Then};
use crate::net::need_files;
use crate::offline::{parse_body, send_numbered};
use crate::xmpp::{stanza_error, Conn};
use crate::{now_ns, register_all, report_cpu, Ctx};

pub const NS_MAM: &str = "urn:xmpp:mam:2";
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";

#[derive(clap::Args)]
pub struct MamArgs {
    /// Archive owners: accounts offset .. offset+O-1 (offset+O sends the fill messages).
    #[arg(long, default_value_t = 1)]
    pub owners: u64,
    /// Messages sent to each owner first (archived for it).
    #[arg(long, default_value_t = 1000)]
    pub fill: u64,
    /// Page the archives as they are: no fill messages, no presence.
    #[arg(long)]
    pub no_fill: bool,
    /// Queries (pages) in total over all owners.
    #[arg(long, default_value_t = 1000)]
    pub queries: u64,
    /// Pages walked backward after the last page, then as many forward.
    #[arg(long, default_value_t = 5)]
    pub pages: u64,
    /// RSM <max/>: results per page.
    #[arg(long, default_value_t = 50)]
    pub page_size: usize,
    /// Padding added to every fill message body, in bytes.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Seconds allowed for the fill (sending and receiving).
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Also print the results as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Problems described per owner in the report.
const SHOW: usize = 5;

#[derive(Clone, Copy)]
enum Kind {
    Last = 0,
    Back = 1,
    Fwd = 2,
}

enum Cursor<'a> {
    /// `<before/>`: the last page.
    Last,
    Before(&'a str),
    After(&'a str),
}

struct Page {
    ids: Vec<String>,
    complete: bool,
    first: Option<String>,
    last: Option<String>,
}

struct OwnerResult {
    /// Latency in µs per kind of query.
    hist: [Histogram<u64>; 3],
    pages: u64,
    items: u64,
    walks: u64,
    /// Pages that walked back to the start of the archive.
    starts: u64,
    /// Fewer results than the page size without the end of the archive.
    short: u64,
    /// More results than the page size.
    long: u64,
    /// Result ids seen twice in a walk's backward pages.
    dup: u64,
    /// RSM first/last not the page's first/last result.
    rsm: u64,
    /// Forward pages that are not the backward page they must be.
    chain: u64,
    /// IQ errors (the owner stops querying).
    errors: u64,
    details: Vec<String>,
    failure: Option<String>,
}

pub async fn run(ctx: Arc<Ctx>, register: bool, a: MamArgs) -> anyhow::Result<()> {
    if a.owners == 0 || a.queries == 0 || a.page_size == 0 {
        bail!("--owners, --queries and --page-size must be at least 1");
    }
    if a.fill > 1 << 28 {
        bail!("--fill must be at most 2^28");
    }
    if a.timeout.is_nan() || a.timeout <= 0.0 {
        bail!("--timeout must be positive");
    }
    need_files(a.owners, &format!("{} owners", a.owners))?;
    let o = a.owners;
    let fill = if a.no_fill { 0 } else { a.fill };
    if register {
        let n = if fill > 0 { o + 1 } else { o };
        register_all(&ctx, (0..n).map(|i| ctx.offset + i).collect()).await?;
    }

    eprintln!("logging in {o} archive owners");
    let then = if fill > 0 {
        Then::Presence
    } else {
        Then::Nothing
    };
    let mut owners = setup(&ctx, (0..o).map(|i| ctx.offset + i).collect(), then).await?;
    if fill > 0 {
        owners = fill_archives(&ctx, owners, fill, &a).await?;
    }

    eprintln!(
        "{} queries of {} results: last page, up to {} back, as many forward",
        a.queries, a.page_size, a.pages
    );
    let tickets = Arc::new(AtomicU64::new(0));
    let t0 = now_ns();
    let cpu0 = ctx.server_cpu();
    let mut tasks = Vec::new();
    for c in owners {
        tasks.push(tokio::spawn(owner(
            c,
            a.page_size,
            a.pages,
            tickets.clone(),
            a.queries,
            ctx.target.step_timeout,
        )));
    }
    let mut rs = Vec::new();
    for t in tasks {
        rs.push(t.await.context("owner task")?);
    }
    let secs = (now_ns() - t0) as f64 / 1e9;
    let cpu = cpu0.zip(ctx.server_cpu()).map(|(a, b)| b - a);

    let mut hist = [new_hist(), new_hist(), new_hist()];
    let mut all = new_hist();
    let (mut pages, mut items, mut walks, mut starts) = (0, 0, 0, 0);
    let (mut short, mut long, mut dup, mut rsm, mut chain, mut errors) = (0, 0, 0, 0, 0, 0);
    let mut failures = 0;
    for (i, r) in rs.iter().enumerate() {
        let user = ctx.user(ctx.offset + i as u64);
        for (h, rh) in hist.iter_mut().zip(&r.hist) {
            h.add(rh).ok();
            all.add(rh).ok();
        }
        pages += r.pages;
        items += r.items;
        walks += r.walks;
        starts += r.starts;
        short += r.short;
        long += r.long;
        dup += r.dup;
        rsm += r.rsm;
        chain += r.chain;
        errors += r.errors;
        for d in &r.details {
            eprintln!("{user}: {d}");
        }
        if let Some(f) = &r.failure {
            failures += 1;
            eprintln!("{user}: session failed: {f}");
        }
    }
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rate = pages as f64 / secs.max(1e-9);
    println!(
        "queries: {o} owners | {pages} pages in {secs:.2} s = {rate:.0} pages/s, {items} results = \
         {:.0} results/s | walks {walks} (reached the archive start {starts}) | short pages {short} | \
         oversized pages {long} | duplicate ids {dup} | RSM first/last mismatches {rsm} | \
         forward≠backward pages {chain} | IQ errors {errors}",
        items as f64 / secs.max(1e-9)
    );
    println!(
        "latency ms: all p50 {:.2} p99 {:.2} max {:.2} (n={}) | last page p50 {:.2} p99 {:.2} | \
         backward p50 {:.2} p99 {:.2} | forward p50 {:.2} p99 {:.2}",
        q(&all, 0.5),
        q(&all, 0.99),
        all.max() as f64 / 1000.0,
        all.len(),
        q(&hist[0], 0.5),
        q(&hist[0], 0.99),
        q(&hist[1], 0.5),
        q(&hist[1], 0.99),
        q(&hist[2], 0.5),
        q(&hist[2], 0.99),
    );
    let per_cpu = report_cpu(cpu, secs, pages as f64, "pages");
    if a.json {
        let j = serde_json::json!({
            "scenario": "mam",
            "owners": o,
            "fill": fill,
            "page_size": a.page_size,
            "pages_back": a.pages,
            "queries": a.queries,
            "pages": pages,
            "results": items,
            "seconds": secs,
            "pages_per_s": rate,
            "results_per_s": items as f64 / secs.max(1e-9),
            "walks": walks,
            "archive_starts": starts,
            "short_pages": short,
            "oversized_pages": long,
            "duplicate_ids": dup,
            "rsm_mismatches": rsm,
            "chain_breaks": chain,
            "iq_errors": errors,
            "failed_sessions": failures,
            "p50_ms": q(&all, 0.5),
            "p99_ms": q(&all, 0.99),
            "max_ms": all.max() as f64 / 1000.0,
            "last_p50_ms": q(&hist[0], 0.5),
            "last_p99_ms": q(&hist[0], 0.99),
            "back_p50_ms": q(&hist[1], 0.5),
            "back_p99_ms": q(&hist[1], 0.99),
            "fwd_p50_ms": q(&hist[2], 0.5),
            "fwd_p99_ms": q(&hist[2], 0.99),
            "server_cpu_s": cpu,
            "pages_per_cpu_s": per_cpu,
        });
        println!("{j}");
    }
    if pages == 0 {
        bail!("no query was answered");
    }
    Ok(())
}

/// user(offset+O) sends `n` messages to each owner's session; each owner
/// reads until it has them all (or the timeout).
async fn fill_archives(
    ctx: &Arc<Ctx>,
    owners: Vec<Conn>,
    n: u64,
    a: &MamArgs,
) -> anyhow::Result<Vec<Conn>> {
    let o = owners.len() as u64;
    let mut filler = setup(ctx, vec![ctx.offset + o], Then::Presence)
        .await?
        .pop()
        .context("filler session")?;
    let nonce: u64 = rand::random();
    let timeout = Duration::from_secs_f64(a.timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    let jids: Vec<String> = owners.iter().map(|c| c.jid.clone()).collect();
    eprintln!(
        "filling: {n} messages to each of {o} owners from {}",
        ctx.user(ctx.offset + o)
    );
    let t0 = now_ns();
    let mut receivers = Vec::new();
    for mut c in owners {
        receivers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                let el = match tokio::time::timeout_at(deadline, c.next()).await {
                    Ok(r) => r?,
                    Err(_) => break,
                };
                if el.is("message", NS_CLIENT) {
                    if parse_body(&el).is_some_and(|(x, _)| x == nonce) {
                        got += 1;
                    }
                } else {
                    c.answer_iq(&el).await?;
                }
            }
            anyhow::Ok((c, got))
        }));
    }
    let pad = "x".repeat(a.body_bytes);
    let domain = ctx.target.domain.clone();
    let sender = tokio::spawn(async move {
        let mut errors = 0;
        for to in &jids {
            errors += send_numbered(&mut filler, &domain, to, nonce, n, &pad, timeout).await?;
        }
        filler.close().await;
        anyhow::Ok(errors)
    });
    let errors = sender.await.context("filler task")??;
    let mut out = Vec::new();
    let mut short = 0;
    for r in receivers {
        let (c, got) = r.await.context("owner task")??;
        if got < n {
            short += 1;
            eprintln!("{}: got {got} of the {n} fill messages", c.jid);
        }
        out.push(c);
    }
    let secs = (now_ns() - t0) as f64 / 1e9;
    println!(
        "filled: {o} owners × {n} messages in {secs:.2} s = {:.0} msgs/s (sent, archived, \
         delivered); error replies {errors}; owners short of messages {short}",
        (o * n) as f64 / secs.max(1e-9)
    );
    Ok(out)
}

async fn owner(
    mut c: Conn,
    size: usize,
    back: u64,
    tickets: Arc<AtomicU64>,
    total: u64,
    timeout: Duration,
) -> OwnerResult {
    let mut r = OwnerResult {
        hist: [new_hist(), new_hist(), new_hist()],
        pages: 0,
        items: 0,
        walks: 0,
        starts: 0,
        short: 0,
        long: 0,
        dup: 0,
        rsm: 0,
        chain: 0,
        errors: 0,
        details: Vec::new(),
        failure: None,
    };
    let mut n = 0u64;
    let take = || tickets.fetch_add(1, Ordering::Relaxed) < total;
    'walks: loop {
        r.walks += 1;
        // Backward: pages[0] is the last page, pages[i] the one before pages[i-1].
        let mut pages: Vec<Vec<String>> = Vec::new();
        let mut seen = HashSet::new();
        let mut at_start = false;
        while pages.len() as u64 <= back && !at_start {
            if !take() {
                break 'walks;
            }
            let (kind, cursor) = match pages.last() {
                None => (Kind::Last, Cursor::Last),
                Some(p) => (Kind::Back, Cursor::Before(&p[0])),
            };
            n += 1;
            let page = match query(&mut c, n, size, cursor, timeout, &mut r, kind).await {
                Ok(Some(p)) => p,
                Ok(None) => break 'walks,
                Err(e) => {
                    r.failure = Some(format!("{e:#}"));
                    return r;
                }
            };
            at_start = page.complete || page.ids.len() < size;
            if page.ids.len() < size && !page.complete {
                r.short += 1;
                r.note(format!(
                    "query {n}: {} results of {size} without complete='true'",
                    page.ids.len()
                ));
            }
            for id in &page.ids {
                if !seen.insert(id.clone()) {
                    r.dup += 1;
                    r.note(format!(
                        "query {n}: result id {id} already seen in this walk"
                    ));
                }
            }
            if page.ids.is_empty() {
                break;
            }
            pages.push(page.ids);
        }
        if at_start {
            r.starts += 1;
        }
        // Forward from the oldest page reached: must give pages[j] again.
        for j in (0..pages.len().saturating_sub(1)).rev() {
            if !take() {
                break 'walks;
            }
            n += 1;
            let after = pages[j + 1].last().map(String::as_str).unwrap_or("");
            let cursor = Cursor::After(after);
            let page = match query(&mut c, n, size, cursor, timeout, &mut r, Kind::Fwd).await {
                Ok(Some(p)) => p,
                Ok(None) => break 'walks,
                Err(e) => {
                    r.failure = Some(format!("{e:#}"));
                    return r;
                }
            };
            if page.ids != pages[j] {
                r.chain += 1;
                let same = page.ids.iter().zip(&pages[j]).take_while(|(a, b)| a == b);
                r.note(format!(
                    "query {n}: forward page after {after} has {} results, the backward page \
                     {} ({} equal at the start; first ids {:?} vs {:?})",
                    page.ids.len(),
                    pages[j].len(),
                    same.count(),
                    page.ids.first(),
                    pages[j].first()
                ));
            }
        }
    }
    c.close().await;
    r
}

impl OwnerResult {
    fn note(&mut self, s: String) {
        if self.details.len() < SHOW {
            self.details.push(s);
        }
    }
}

/// One MAM query; `None` after an IQ error (counted and noted). Records the
/// latency and the page-level checks (size, RSM first/last) in `r`.
async fn query(
    c: &mut Conn,
    n: u64,
    size: usize,
    cursor: Cursor<'_>,
    timeout: Duration,
    r: &mut OwnerResult,
    kind: Kind,
) -> anyhow::Result<Option<Page>> {
    let qid = format!("mam{n}");
    let mut iq = format!(
        "<iq type='set' id='{qid}'><query xmlns='{NS_MAM}' queryid='{qid}'>\
         <set xmlns='{NS_RSM}'><max>{size}</max>"
    );
    match cursor {
        Cursor::Last => iq.push_str("<before/>"),
        Cursor::Before(id) => {
            iq.push_str("<before>");
            escape_text(id, &mut iq);
            iq.push_str("</before>");
        }
        Cursor::After(id) => {
            iq.push_str("<after>");
            escape_text(id, &mut iq);
            iq.push_str("</after>");
        }
    }
    iq.push_str("</set></query></iq>");
    let t0 = now_ns();
    c.send(&iq).await?;
    let mut ids = Vec::new();
    let fin = c
        .wait_iq_with(&qid, "MAM query result", timeout, |el| {
            if let Some(res) = el
                .get_child("result", NS_MAM)
                .filter(|res| el.is("message", NS_CLIENT) && res.attr("queryid") == Some(&qid))
            {
                ids.push(res.attr("id").unwrap_or_default().to_string());
            }
        })
        .await?;
    let us = (now_ns() - t0) / 1000;
    if fin.attr("type") != Some("result") {
        r.errors += 1;
        r.note(format!("query {n}: error {}", stanza_error(&fin)));
        return Ok(None);
    }
    r.hist[kind as usize].saturating_record(us.max(1));
    r.pages += 1;
    r.items += ids.len() as u64;
    let f = fin.get_child("fin", NS_MAM);
    let set = f.and_then(|f| f.get_child("set", NS_RSM));
    let page = Page {
        complete: f.and_then(|f| f.attr("complete")) == Some("true"),
        first: set.and_then(|s| s.child_text("first", NS_RSM)),
        last: set.and_then(|s| s.child_text("last", NS_RSM)),
        ids,
    };
    if f.is_none() {
        r.note(format!("query {n}: result without <fin/>"));
    }
    if page.ids.len() > size {
        r.long += 1;
        r.note(format!(
            "query {n}: {} results for max {size}",
            page.ids.len()
        ));
    }
    if !page.ids.is_empty()
        && (page.first.as_ref() != page.ids.first() || page.last.as_ref() != page.ids.last())
    {
        r.rsm += 1;
        r.note(format!(
            "query {n}: RSM first/last {:?}/{:?}, results {:?}..{:?}",
            page.first,
            page.last,
            page.ids.first(),
            page.ids.last()
        ));
    }
    Ok(Some(page))
}
