//! `natter backup FILE` / `natter restore FILE`: the whole store as one
//! XEP-0227 (v1.1) portable export document.
//!
//! ```xml
//! <server-data xmlns='urn:xmpp:pie:0'>
//!   <host jid='example.org'>
//!     <user name='alice'>
//!       <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'>…</scram-credentials>
//!       <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-256'>…</scram-credentials>
//!       <query xmlns='jabber:iq:roster'>…items…</query>
//!       <presence xmlns='jabber:client' type='subscribe' …/>   (pending inbound requests)
//!       <vCard xmlns='vcard-temp'>…</vCard>
//!       <offline-messages><message xmlns='jabber:client'>…</message></offline-messages>
//!       <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>…node configs…</pubsub>
//!       <pubsub xmlns='http://jabber.org/protocol/pubsub'>…items…</pubsub>
//!       <archive xmlns='urn:xmpp:pie:0#mam'><result xmlns='urn:xmpp:mam:2' id='…'>
//!         <forwarded xmlns='urn:xmpp:forward:0'><delay stamp='…'/><message …/></forwarded>
//!       </result>…</archive>
//!       <prefs xmlns='urn:xmpp:mam:2' …/>  <blocklist xmlns='urn:xmpp:blocking'>…</blocklist>
//!       <last xmlns='urn:natter:backup:0' at='…' status='…'/>
//!       <uploads xmlns='urn:natter:backup:0'><upload slot='…' sha256='…' size='…'
//!         type='…' name='…' created='…'/>…</uploads>
//!     </user>
//!   </host>
//! </server-data>
//! ```
//!
//! Only SCRAM keys are exported, never passwords (there are none). What
//! XEP-0227 has no place for (an archived message's direction and peer,
//! last activity) rides in elements of natter's own namespace, which other
//! importers ignore; restore derives them when they are absent.
//!
//! Uploads (XEP-0363) are recorded by slot and content hash; the bytes
//! themselves are copied only with `--blobs DIR` (`backup_blobs`,
//! `restore_blobs`): a content-addressed tree `DIR/ab/cd/<sha256>` that a
//! later backup into the same DIR only adds to. Restoring without it
//! expects the blob store to hold the bytes already (the same S3 bucket,
//! or a copy of `data_dir/blobs`).
//!
//! Backup reads through the `Store` trait user by user, so it works while
//! the server runs (SQLite WAL: readers don't block the writer). Restore
//! refuses to overwrite: every account in the file must be new.

use crate::modules::upload::blobs::BlobStore;
use crate::progress::{Progress, Unit};
use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::StreamExt;
use natter_store::{
    AccountCredentials, ArchiveQuery, ArchivedMessage, MamPrefs, PepNodeConfig, RosterItem, Store,
    StoredCredentials, Subscription,
};
use natter_xml::{DocError, DocEvent, DocumentReader, Element, NS_CLIENT};
use std::io::{BufRead, Write};
use std::path::Path;

pub const NS_PIE: &str = "urn:xmpp:pie:0";
pub const NS_SCRAM: &str = "urn:xmpp:pie:0#scram";
pub const NS_PIE_MAM: &str = "urn:xmpp:pie:0#mam";
pub const NS_NATTER: &str = "urn:natter:backup:0";
const NS_ROSTER: &str = "jabber:iq:roster";
const NS_VCARD: &str = "vcard-temp";
const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const NS_PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const NS_DATA: &str = "jabber:x:data";
const NS_BLOCKING: &str = "urn:xmpp:blocking";

/// Archive rows read (and imported) per store call.
const PAGE: usize = 500;

/// What a backup or restore moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub accounts: usize,
    pub roster_items: usize,
    pub vcards: usize,
    pub archived: usize,
    pub offline: usize,
    pub pep_items: usize,
    pub uploads: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accounts, {} roster items, {} vCards, {} archived messages, \
             {} offline messages, {} PEP items, {} uploads",
            self.accounts,
            self.roster_items,
            self.vcards,
            self.archived,
            self.offline,
            self.pep_items,
            self.uploads
        )
    }
}

fn micros_to_stamp(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn stamp_to_micros(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.timestamp_micros())
}

fn parse_xml(text: &str) -> anyhow::Result<Element> {
    let limits = natter_xml::Limits {
        max_stanza_bytes: text.len().max(1),
        max_depth: 256,
        max_attrs: 256,
        max_elements: usize::MAX,
    };
    natter_xml::parse_frame(text.as_bytes(), &limits).map_err(|e| anyhow::anyhow!("{e}"))
}

// ---------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------

fn scram_element(mechanism: &str, c: &StoredCredentials) -> Element {
    Element::new("scram-credentials", NS_SCRAM)
        .with_attr("mechanism", mechanism)
        .with_child(Element::new("iter-count", NS_SCRAM).with_text(c.iterations.to_string()))
        .with_child(Element::new("salt", NS_SCRAM).with_text(B64.encode(&c.salt)))
        .with_child(Element::new("server-key", NS_SCRAM).with_text(B64.encode(&c.server_key)))
        .with_child(Element::new("stored-key", NS_SCRAM).with_text(B64.encode(&c.stored_key)))
}

fn roster_element(items: &[RosterItem]) -> Element {
    let mut q = Element::new("query", NS_ROSTER);
    for i in items {
        let mut it = Element::new("item", NS_ROSTER)
            .with_attr("jid", &i.jid)
            .with_attr("subscription", i.subscription.as_str());
        if let Some(n) = &i.name {
            it.set_attr("name", n);
        }
        if i.ask {
            it.set_attr("ask", "subscribe");
        }
        if i.approved {
            it.set_attr("approved", "true");
        }
        for g in &i.groups {
            it.append_child(Element::new("group", NS_ROSTER).with_text(g));
        }
        q.append_child(it);
    }
    q
}

/// One `<user/>` element with everything the account owns except its
/// archive, which [`export_archive`] streams page by page.
async fn export_user(store: &dyn Store, user: &str, sum: &mut Summary) -> anyhow::Result<Element> {
    let (local, _) = user.split_once('@').unwrap_or(("", user));
    let mut u = Element::new("user", NS_PIE).with_attr("name", local);
    let Some(creds) = store.credentials(user).await? else {
        bail!("{user} vanished during the backup");
    };
    u.append_child(scram_element("SCRAM-SHA-1", &creds.sha1));
    u.append_child(scram_element("SCRAM-SHA-256", &creds.sha256));

    let (_, roster) = store.roster(user).await?;
    sum.roster_items += roster.len();
    u.append_child(roster_element(&roster));
    // XEP-0227 §4.8: incoming subscription requests awaiting approval.
    for i in roster.iter().filter(|i| i.pending_in) {
        u.append_child(
            Element::new("presence", NS_CLIENT)
                .with_attr("from", &i.jid)
                .with_attr("to", user)
                .with_attr("type", "subscribe"),
        );
    }

    if let Some(v) = store.vcard(user).await? {
        match parse_xml(&v) {
            Ok(el) => {
                u.append_child(el);
                sum.vcards += 1;
            }
            Err(e) => tracing::warn!(%user, error = %e, "vCard is not well-formed; skipped"),
        }
    }

    if let Some((at, status)) = store.last_activity(user).await? {
        u.append_child(
            Element::new("last", NS_NATTER)
                .with_attr("at", at.to_string())
                .with_attr("status", status),
        );
    }

    let offline = store.offline_fetch(user, usize::MAX).await?;
    if !offline.is_empty() {
        let mut o = Element::new("offline-messages", NS_PIE);
        for m in &offline {
            match parse_xml(&m.stanza) {
                Ok(el) => {
                    o.append_child(el);
                    sum.offline += 1;
                }
                Err(e) => tracing::warn!(%user, error = %e, "offline stanza unreadable; skipped"),
            }
        }
        u.append_child(o);
    }

    let nodes = store.pep_nodes(user).await?;
    if !nodes.is_empty() {
        let mut owner = Element::new("pubsub", NS_PUBSUB_OWNER);
        let mut items = Element::new("pubsub", NS_PUBSUB);
        for node in &nodes {
            let Some(cfg) = store.pep_node(user, node).await? else {
                continue;
            };
            let field = |var: &str, v: String| {
                Element::new("field", NS_DATA)
                    .with_attr("var", var)
                    .with_child(Element::new("value", NS_DATA).with_text(v))
            };
            let max = if cfg.max_items == u32::MAX {
                "max".to_string()
            } else {
                cfg.max_items.to_string()
            };
            let x = Element::new("x", NS_DATA)
                .with_attr("type", "submit")
                .with_child(field(
                    "FORM_TYPE",
                    "http://jabber.org/protocol/pubsub#node_config".into(),
                ))
                .with_child(field("pubsub#access_model", cfg.access_model.clone()))
                .with_child(field("pubsub#publish_model", cfg.publish_model.clone()))
                .with_child(field("pubsub#max_items", max))
                .with_child(field("pubsub#persist_items", flag(cfg.persist_items)))
                .with_child(field(
                    "pubsub#send_last_published_item",
                    cfg.send_last_published_item.clone(),
                ))
                .with_child(field("pubsub#notify_retract", flag(cfg.notify_retract)))
                .with_child(field("pubsub#notify_delete", flag(cfg.notify_delete)))
                .with_child(field(
                    "pubsub#item_expire",
                    cfg.item_expire_secs.to_string(),
                ));
            owner.append_child(
                Element::new("configure", NS_PUBSUB_OWNER)
                    .with_attr("node", node)
                    .with_child(x),
            );
            let mut its = Element::new("items", NS_PUBSUB).with_attr("node", node);
            // Newest first from the store; oldest first in the file.
            for it in store.pep_items(user, node, None, None).await?.iter().rev() {
                let mut item = Element::new("item", NS_PUBSUB).with_attr("id", &it.id);
                match parse_xml(&it.payload) {
                    Ok(p) => item.append_child(p),
                    Err(e) => {
                        tracing::warn!(%user, %node, error = %e, "PEP payload unreadable; skipped");
                        continue;
                    }
                }
                its.append_child(item);
                sum.pep_items += 1;
            }
            items.append_child(its);
        }
        u.append_child(owner);
        u.append_child(items);
    }

    let prefs = store.mam_prefs(user).await?;
    if prefs != MamPrefs::default() {
        let list = |name: &str, jids: &[String]| {
            let mut l = Element::new(name, NS_MAM);
            for j in jids {
                l.append_child(Element::new("jid", NS_MAM).with_text(j));
            }
            l
        };
        u.append_child(
            Element::new("prefs", NS_MAM)
                .with_attr("default", &prefs.default)
                .with_child(list("always", &prefs.always))
                .with_child(list("never", &prefs.never)),
        );
    }

    let blocked = store.blocklist(user).await?;
    if !blocked.is_empty() {
        let mut b = Element::new("blocklist", NS_BLOCKING);
        for j in blocked {
            b.append_child(Element::new("item", NS_BLOCKING).with_attr("jid", j));
        }
        u.append_child(b);
    }
    let uploads = store.uploads_of(user).await?;
    if !uploads.is_empty() {
        let mut e = Element::new("uploads", NS_NATTER);
        for up in &uploads {
            e.append_child(
                Element::new("upload", NS_NATTER)
                    .with_attr("slot", &up.slot)
                    .with_attr("sha256", &up.sha256)
                    .with_attr("size", up.size.to_string())
                    .with_attr("type", &up.content_type)
                    .with_attr("name", &up.filename)
                    .with_attr("created", up.created.to_string()),
            );
        }
        sum.uploads += uploads.len();
        u.append_child(e);
    }
    sum.accounts += 1;
    Ok(u)
}

/// The account's `<archive/>`, written to `out` one page of the store at a
/// time: a user with a huge archive costs one page of memory, not the archive.
async fn export_archive(
    store: &dyn Store,
    user: &str,
    out: &mut Counting<'_>,
    sum: &mut Summary,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    write!(out, "<archive xmlns='{NS_PIE_MAM}'>")?;
    let mut after: Option<String> = None;
    let mut s = String::new();
    loop {
        let q = ArchiveQuery {
            after_id: after.clone(),
            max: PAGE,
            ..Default::default()
        };
        let page = store.archive_query(user, &q).await?;
        s.clear();
        for m in &page.items {
            let msg = match parse_xml(&m.stanza) {
                Ok(el) => el,
                Err(e) => {
                    tracing::warn!(%user, id = %m.id, error = %e, "archived stanza unreadable; skipped");
                    continue;
                }
            };
            Element::new("result", NS_MAM)
                .with_attr("id", &m.id)
                .with_child(
                    Element::new("forwarded", NS_FORWARD)
                        .with_child(
                            Element::new("delay", NS_DELAY)
                                .with_attr("stamp", micros_to_stamp(m.ts_micros)),
                        )
                        .with_child(msg),
                )
                .with_child(
                    Element::new("entry", NS_NATTER)
                        .with_attr("with", &m.with)
                        .with_attr("outgoing", if m.outgoing { "true" } else { "false" })
                        .with_attr("ts", m.ts_micros.to_string()),
                )
                .write_to(&mut s, NS_PIE_MAM, false);
            sum.archived += 1;
        }
        out.write_all(s.as_bytes())?;
        progress.update(sum.accounts as u64, || export_detail(sum, out.bytes));
        match page.items.last() {
            Some(last) if !page.complete => after = Some(last.id.clone()),
            _ => break,
        }
    }
    write!(out, "</archive>")?;
    Ok(())
}

fn export_detail(sum: &Summary, bytes: u64) -> String {
    format!("{} messages, {} MB written", sum.archived, bytes >> 20)
}

/// A writer that counts what went through it (for progress).
struct Counting<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write the whole store to `out` as a XEP-0227 document, user by user.
pub async fn export(
    store: &dyn Store,
    out: &mut dyn Write,
    progress: &mut Progress,
) -> anyhow::Result<Summary> {
    let mut sum = Summary::default();
    let accounts = store.list_accounts(None).await?;
    let mut by_host: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for a in &accounts {
        let host = a.rsplit_once('@').map_or(a.as_str(), |(_, d)| d);
        by_host.entry(host).or_default().push(a);
    }
    let out = &mut Counting {
        inner: out,
        bytes: 0,
    };
    writeln!(out, "<?xml version='1.0' encoding='UTF-8'?>")?;
    writeln!(out, "<server-data xmlns='{NS_PIE}'>")?;
    for (host, users) in by_host {
        let mut h = String::new();
        natter_xml::escape_attr(host, &mut h);
        writeln!(out, "<host jid='{h}'>")?;
        for user in users {
            let el = match export_user(store, user, &mut sum).await {
                Ok(el) => el,
                // Deleted between the listing and now: not part of the backup.
                Err(_) if store.credentials(user).await?.is_none() => continue,
                Err(e) => return Err(e.context(format!("exporting {user}"))),
            };
            // The children one by one, then the archive streamed into the
            // same element: never the whole account as one string.
            let mut s = String::from("<user name='");
            natter_xml::escape_attr(el.attr("name").unwrap_or_default(), &mut s);
            s.push_str("'>");
            for c in el.children() {
                c.write_to(&mut s, NS_PIE, false);
            }
            out.write_all(s.as_bytes())?;
            export_archive(store, user, out, &mut sum, progress)
                .await
                .with_context(|| format!("exporting the archive of {user}"))?;
            writeln!(out, "</user>")?;
            progress.update(sum.accounts as u64, || export_detail(&sum, out.bytes));
        }
        writeln!(out, "</host>")?;
    }
    writeln!(out, "</server-data>")?;
    out.flush()?;
    progress.finish(sum.accounts as u64, || export_detail(&sum, out.bytes));
    Ok(sum)
}

/// `natter backup FILE`: written to a temporary file (mode 0600) and renamed
/// into place, so FILE is either the old content or a complete backup.
pub async fn backup_to_file(store: &dyn Store, path: &Path) -> anyhow::Result<Summary> {
    use std::os::unix::fs::OpenOptionsExt;
    let accounts = store.list_accounts(None).await?.len() as u64;
    let mut progress = Progress::new("backup", Unit::Accounts, accounts);
    let tmp = path.with_extension("partial");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let r = export(store, &mut w, &mut progress).await;
    let done = r.and_then(|sum| {
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(sum)
    });
    if done.is_err() {
        progress.abandon();
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Where `--blobs DIR` keeps a blob: DIR/ab/cd/<sha256>.
fn blob_copy_path(dir: &Path, sha256: &str) -> std::path::PathBuf {
    dir.join(&sha256[0..2]).join(&sha256[2..4]).join(sha256)
}

/// `natter backup FILE --blobs DIR`: copy the bytes of every upload into
/// DIR, verified against their hash; blobs DIR holds already are kept (a
/// content address never changes). Returns (blobs copied, bytes copied).
pub async fn backup_blobs(
    store: &dyn Store,
    blobs: &dyn BlobStore,
    dir: &Path,
) -> anyhow::Result<(usize, u64)> {
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let (mut copied, mut bytes) = (0, 0);
    for user in store.list_accounts(None).await? {
        for up in store.uploads_of(&user).await? {
            let dest = blob_copy_path(dir, &up.sha256);
            if tokio::fs::try_exists(&dest).await? {
                continue;
            }
            let Some(mut stream) = blobs.read(&up.sha256, 0..up.size).await? else {
                bail!("the blob {} of an upload of {user} is missing", up.sha256);
            };
            natter_store::files::create_dir(dest.parent().expect("blob paths have a parent"))?;
            let tmp = dest.with_extension("partial");
            let mut f = tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .await
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut hash = sha2::Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hash.update(&chunk);
                f.write_all(&chunk).await?;
            }
            f.sync_all().await?;
            if hex::encode(hash.finalize()) != up.sha256 {
                let _ = tokio::fs::remove_file(&tmp).await;
                bail!("the blob {} does not match its hash: not copied", up.sha256);
            }
            tokio::fs::rename(&tmp, &dest).await?;
            copied += 1;
            bytes += up.size;
        }
    }
    Ok((copied, bytes))
}

/// `natter restore FILE --blobs DIR`: put the blobs of DIR that restored
/// uploads refer to into the blob store, verified against their hash.
/// Returns (blobs copied, bytes copied).
pub async fn restore_blobs(
    store: &dyn Store,
    blobs: &dyn BlobStore,
    dir: &Path,
) -> anyhow::Result<(usize, u64)> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let (mut copied, mut bytes) = (0, 0);
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let mut entries = tokio::fs::read_dir(&d)
            .await
            .with_context(|| format!("cannot read {}", d.display()))?;
        while let Some(entry) = entries.next_entry().await? {
            if entry.file_type().await?.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let sha256 = entry.file_name().to_string_lossy().to_string();
            if !crate::modules::upload::blobs::is_blob_key(&sha256)
                || !store.blob_referenced(&sha256).await?
            {
                continue;
            }
            let mut f = tokio::fs::File::open(entry.path()).await?;
            let mut w = blobs.writer(&format!("restore-{sha256}")).await?;
            let mut hash = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let written: anyhow::Result<u64> = async {
                let mut n_total = 0u64;
                loop {
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                    w.write(bytes::Bytes::copy_from_slice(&buf[..n])).await?;
                    n_total += n as u64;
                }
                Ok(n_total)
            }
            .await;
            let ok = written.is_ok() && hex::encode(hash.finalize()) == sha256;
            if !ok {
                w.abort().await;
                written?;
                bail!(
                    "{} does not match its hash: not restored",
                    entry.path().display()
                );
            }
            w.commit(&sha256).await?;
            copied += 1;
            bytes += written.unwrap_or_default();
        }
    }
    Ok((copied, bytes))
}

// ---------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------

fn scram_from(el: &Element) -> anyhow::Result<StoredCredentials> {
    let text = |n: &str| {
        el.child_text(n, NS_SCRAM)
            .with_context(|| format!("scram-credentials without <{n}/>"))
    };
    let b64 = |n: &str| -> anyhow::Result<Vec<u8>> {
        B64.decode(text(n)?.trim())
            .with_context(|| format!("scram-credentials <{n}/> is not base64"))
    };
    Ok(StoredCredentials {
        iterations: text("iter-count")?
            .trim()
            .parse()
            .context("scram-credentials <iter-count/> is not a number")?,
        salt: b64("salt")?,
        server_key: b64("server-key")?,
        stored_key: b64("stored-key")?,
    })
}

async fn credentials_of(user_el: &Element) -> anyhow::Result<AccountCredentials> {
    let mut sha1 = None;
    let mut sha256 = None;
    for c in user_el
        .children()
        .filter(|c| c.is("scram-credentials", NS_SCRAM))
    {
        match c.attr("mechanism") {
            Some("SCRAM-SHA-1") => sha1 = Some(scram_from(c)?),
            Some("SCRAM-SHA-256") => sha256 = Some(scram_from(c)?),
            _ => {}
        }
    }
    if let (Some(sha1), Some(sha256)) = (sha1, sha256) {
        return Ok(AccountCredentials { sha1, sha256 });
    }
    // Exports from other servers may carry only a password (discouraged by
    // XEP-0227 1.1, still seen) or one SCRAM hash; a password is enough.
    if let Some(pw) = user_el.attr("password") {
        let pw = pw.to_string();
        return tokio::task::spawn_blocking(move || crate::accounts::derive(&pw, 0))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"));
    }
    bail!("needs SCRAM-SHA-1 and SCRAM-SHA-256 credentials (or a password)")
}

fn roster_items(user_el: &Element) -> anyhow::Result<Vec<RosterItem>> {
    let pending: Vec<String> = user_el
        .children()
        .filter(|c| c.is("presence", NS_CLIENT) && c.attr("type") == Some("subscribe"))
        .filter_map(|c| c.attr("from").map(bare))
        .collect();
    let mut out: Vec<RosterItem> = Vec::new();
    if let Some(q) = user_el.get_child("query", NS_ROSTER) {
        for it in q.children().filter(|c| c.is("item", NS_ROSTER)) {
            let jid = it
                .attr("jid")
                .context("roster item without jid")?
                .to_string();
            let subscription: Subscription = it
                .attr("subscription")
                .unwrap_or("none")
                .parse()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            out.push(RosterItem {
                pending_in: pending.contains(&jid),
                name: it.attr("name").map(str::to_string),
                subscription,
                ask: it.attr("ask") == Some("subscribe"),
                approved: it.attr("approved") == Some("true"),
                groups: it
                    .children()
                    .filter(|g| g.is("group", NS_ROSTER))
                    .map(Element::text)
                    .collect(),
                jid,
            });
        }
    }
    // A request from someone not (yet) in the roster.
    for p in pending {
        if !out.iter().any(|i| i.jid == p) {
            out.push(RosterItem {
                pending_in: true,
                ..RosterItem::new(p)
            });
        }
    }
    Ok(out)
}

fn bare(j: &str) -> String {
    j.split('/').next().unwrap_or(j).to_string()
}

fn archived_from(owner: &str, res: &Element) -> anyhow::Result<ArchivedMessage> {
    let id = res.attr("id").context("archive result without id")?;
    let fwd = res
        .get_child("forwarded", NS_FORWARD)
        .context("archive result without <forwarded/>")?;
    let msg = fwd
        .get_child("message", NS_CLIENT)
        .context("archive result without a message")?;
    let entry = res.get_child("entry", NS_NATTER);
    let ts = entry
        .and_then(|e| e.attr("ts"))
        .and_then(|t| t.parse().ok())
        .or_else(|| {
            fwd.get_child("delay", NS_DELAY)
                .and_then(|d| d.attr("stamp"))
                .and_then(stamp_to_micros)
        })
        .context("archive result without a timestamp")?;
    let from = msg.attr("from").map(bare).unwrap_or_default();
    let to = msg.attr("to").map(bare).unwrap_or_default();
    let outgoing = match entry.and_then(|e| e.attr("outgoing")) {
        Some(v) => v == "true",
        None => from == owner,
    };
    let with = match entry.and_then(|e| e.attr("with")) {
        Some(w) => w.to_string(),
        None if outgoing => to,
        None => from,
    };
    Ok(ArchivedMessage {
        id: id.to_string(),
        owner: owner.to_string(),
        with,
        ts_micros: ts,
        outgoing,
        stanza: msg.to_string(),
    })
}

/// A data-form boolean.
fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_string()
}

fn pep_config(configure: &Element) -> PepNodeConfig {
    let mut cfg = PepNodeConfig::default();
    if let Some(x) = configure.get_child("x", NS_DATA) {
        for f in x.children().filter(|f| f.is("field", NS_DATA)) {
            let v = f.child_text("value", NS_DATA).unwrap_or_default();
            let on = matches!(v.as_str(), "1" | "true");
            match f.attr("var") {
                Some("pubsub#access_model") => cfg.access_model = v,
                Some("pubsub#publish_model") => {
                    // Backups of natter before issue 10 packed the options here:
                    // "publishers;persist_items=0;send_last_published_item=never;…".
                    let mut parts = v.split(';');
                    cfg.publish_model = parts.next().unwrap_or_default().to_string();
                    for kv in parts {
                        match kv.split_once('=') {
                            Some(("persist_items", o)) => cfg.persist_items = o != "0",
                            Some(("send_last_published_item", o)) => {
                                cfg.send_last_published_item = o.to_string()
                            }
                            Some(("notify_retract", o)) => cfg.notify_retract = o != "0",
                            Some(("notify_delete", o)) => cfg.notify_delete = o != "0",
                            _ => {}
                        }
                    }
                }
                Some("pubsub#max_items") => {
                    cfg.max_items = if v == "max" {
                        u32::MAX
                    } else {
                        v.parse().unwrap_or(cfg.max_items)
                    }
                }
                Some("pubsub#persist_items") => cfg.persist_items = on,
                Some("pubsub#send_last_published_item") => cfg.send_last_published_item = v,
                Some("pubsub#notify_retract") => cfg.notify_retract = on,
                Some("pubsub#notify_delete") => cfg.notify_delete = on,
                Some("pubsub#item_expire") => {
                    cfg.item_expire_secs = v.parse().unwrap_or(cfg.item_expire_secs)
                }
                _ => {}
            }
        }
    }
    cfg
}

/// Everything of one account but its credentials, offline queue and
/// archive (which [`UserImport`] writes as they stream by). `u` holds the
/// account's other children, each small.
async fn import_rest(
    store: &dyn Store,
    user: &str,
    u: &Element,
    sum: &mut Summary,
) -> anyhow::Result<()> {
    for item in roster_items(u)? {
        store.put_roster_item(user, &item).await?;
        sum.roster_items += 1;
    }
    if let Some(v) = u.get_child("vCard", NS_VCARD) {
        store.set_vcard(user, &v.to_string()).await?;
        sum.vcards += 1;
    }
    if let Some(l) = u.get_child("last", NS_NATTER) {
        let at = l.attr("at").and_then(|a| a.parse().ok()).unwrap_or(0);
        store
            .set_last_activity(user, at, l.attr("status").unwrap_or(""))
            .await?;
    }
    if let Some(owner) = u.get_child("pubsub", NS_PUBSUB_OWNER) {
        for c in owner
            .children()
            .filter(|c| c.is("configure", NS_PUBSUB_OWNER))
        {
            if let Some(node) = c.attr("node") {
                store
                    .pep_create_or_configure(user, node, &pep_config(c))
                    .await?;
            }
        }
    }
    if let Some(ps) = u.get_child("pubsub", NS_PUBSUB) {
        for items in ps.children().filter(|c| c.is("items", NS_PUBSUB)) {
            let Some(node) = items.attr("node") else {
                continue;
            };
            if store.pep_node(user, node).await?.is_none() {
                store
                    .pep_create_or_configure(user, node, &pep_config(&Element::new("x", "")))
                    .await?;
            }
            for it in items.children().filter(|c| c.is("item", NS_PUBSUB)) {
                let (Some(id), Some(payload)) = (it.attr("id"), it.children().next()) else {
                    continue;
                };
                store
                    .pep_publish(user, node, id, &payload.to_string())
                    .await?;
                sum.pep_items += 1;
            }
        }
    }
    if let Some(p) = u.get_child("prefs", NS_MAM) {
        let list = |name: &str| -> Vec<String> {
            p.get_child(name, NS_MAM)
                .map(|l| {
                    l.children()
                        .filter(|j| j.is("jid", NS_MAM))
                        .map(Element::text)
                        .collect()
                })
                .unwrap_or_default()
        };
        let prefs = MamPrefs {
            default: p.attr("default").unwrap_or("always").to_string(),
            always: list("always"),
            never: list("never"),
        };
        store.set_mam_prefs(user, &prefs).await?;
    }
    if let Some(b) = u.get_child("blocklist", NS_BLOCKING) {
        let jids: Vec<String> = b
            .children()
            .filter_map(|i| i.attr("jid").map(str::to_string))
            .collect();
        store.block(user, &jids).await?;
    }
    if let Some(ups) = u.get_child("uploads", NS_NATTER) {
        for e in ups.children().filter(|c| c.is("upload", NS_NATTER)) {
            let attr = |a: &str| e.attr(a).unwrap_or_default().to_string();
            let up = natter_store::Upload {
                slot: attr("slot"),
                owner: user.to_string(),
                sha256: attr("sha256"),
                size: attr("size").parse().context("an upload's size")?,
                content_type: attr("type"),
                filename: attr("name"),
                created: attr("created").parse().context("an upload's created")?,
            };
            if !crate::modules::upload::blobs::is_blob_key(&up.sha256) || up.slot.is_empty() {
                bail!("an upload of {user} lacks its slot or SHA-256");
            }
            store.upload_put(&up).await?;
            sum.uploads += 1;
        }
    }
    Ok(())
}

/// Reading limits for a backup: the document may be any size; one element
/// built at a time (a roster, a vCard, one archived message) at most 64 MiB.
fn backup_limits() -> natter_xml::Limits {
    natter_xml::Limits {
        max_stanza_bytes: 64 << 20,
        max_depth: 256,
        max_attrs: 256,
        max_elements: usize::MAX,
    }
}

/// Walks `<server-data><host><user>` of a XEP-0227 document, checking each
/// host against the served domains; the caller reads each user's children.
struct BackupReader<'d, R> {
    doc: DocumentReader<R>,
    /// Namespace of the root: `urn:xmpp:pie:0`, or that of an older draft
    /// (…xep-0227.html#ns), whose elements have the same shape.
    ns: String,
    host: String,
    domains: &'d [String],
}

impl<'d, R: BufRead> BackupReader<'d, R> {
    fn open(input: R, domains: &'d [String]) -> anyhow::Result<Self> {
        let mut doc = DocumentReader::new(input, backup_limits());
        let root = loop {
            match doc.next_event().map_err(|e| doc_error(e, doc.position()))? {
                Some(DocEvent::Start(root)) => break root,
                Some(_) => {}
                None => bail!("the backup is empty"),
            }
        };
        if root.name != "server-data" {
            bail!(
                "not a XEP-0227 export: the root element is <{}/>",
                root.name
            );
        }
        Ok(BackupReader {
            doc,
            ns: root.ns,
            host: String::new(),
            domains,
        })
    }

    fn next_event(&mut self) -> anyhow::Result<Option<DocEvent>> {
        let at = self.doc.position();
        self.doc.next_event().map_err(|e| doc_error(e, at))
    }

    fn read_subtree(&mut self, el: Element) -> anyhow::Result<Element> {
        let at = self.doc.position();
        self.doc.read_subtree(el).map_err(|e| doc_error(e, at))
    }

    fn skip_subtree(&mut self) -> anyhow::Result<()> {
        let at = self.doc.position();
        self.doc.skip_subtree().map_err(|e| doc_error(e, at))
    }

    /// Up to the next `<user/>`: its bare JID, with the reader inside it.
    fn next_user(&mut self) -> anyhow::Result<Option<(String, Element)>> {
        while let Some(ev) = self.next_event()? {
            let DocEvent::Start(el) = ev else { continue };
            let ours = el.ns == self.ns;
            match self.doc.depth() {
                2 if ours && el.name == "host" => {
                    let h = el.attr("jid").context("<host/> without jid")?;
                    if !self.domains.iter().any(|d| d == h) {
                        bail!("the backup has accounts of {h:?}, which this server does not serve (add it to `domains`)");
                    }
                    self.host = h.to_string();
                }
                3 if ours && el.name == "user" => {
                    let name = el.attr("name").context("<user/> without name")?;
                    let jid = jid::BareJid::new(&format!("{name}@{}", self.host))
                        .with_context(|| format!("invalid user {name:?} on {}", self.host))?;
                    return Ok(Some((jid.to_string(), el)));
                }
                _ => self.skip_subtree()?,
            }
        }
        Ok(None)
    }

    /// `el` in `urn:xmpp:pie:0` if it is in the root's (older) namespace.
    fn pie(&self, mut el: Element) -> Element {
        if self.ns != NS_PIE {
            renamespace(&mut el, &self.ns);
        }
        el
    }
}

fn doc_error(e: DocError, at: u64) -> anyhow::Error {
    match e {
        DocError::Io(e) => anyhow::Error::new(e).context("cannot read the backup"),
        DocError::Xml(e) => {
            anyhow::anyhow!("the backup is not a well-formed XML document (near byte {at}): {e}")
        }
    }
}

/// Map elements of an older XEP-0227 namespace to `urn:xmpp:pie:0`.
fn renamespace(e: &mut Element, old: &str) {
    if e.ns == old {
        e.ns = NS_PIE.to_string();
    }
    for c in e.children_mut() {
        renamespace(c, old);
    }
}

/// Whether the `<user/>` children read so far are enough to create the account.
fn has_credentials(u: &Element) -> bool {
    let scram = |m: &str| {
        u.children()
            .any(|c| c.is("scram-credentials", NS_SCRAM) && c.attr("mechanism") == Some(m))
    };
    u.attr("password").is_some() || (scram("SCRAM-SHA-1") && scram("SCRAM-SHA-256"))
}

/// One account being restored as its `<user/>` streams by. Its small
/// children collect in `rest`; offline and archived messages are written as
/// they come, in pages, once the account exists (credentials come first in
/// natter's and most exports; until they do, messages wait in memory).
struct UserImport<'s> {
    store: &'s dyn Store,
    user: String,
    rest: Element,
    created: bool,
    archive: Vec<ArchivedMessage>,
    offline: Vec<String>,
}

impl UserImport<'_> {
    /// Create the account if its credentials have been read (or `now`),
    /// then write what waited for it.
    async fn create(&mut self, now: bool, sum: &mut Summary) -> anyhow::Result<bool> {
        if !self.created && (now || has_credentials(&self.rest)) {
            let creds = credentials_of(&self.rest).await?;
            self.store.create_account(&self.user, &creds).await?;
            sum.accounts += 1;
            self.created = true;
            for m in std::mem::take(&mut self.offline) {
                // Exported in queue order: keep it (`ord` grows with each).
                self.store
                    .offline_push(&self.user, &m, None, usize::MAX, sum.offline as i64 + 1)
                    .await?;
                sum.offline += 1;
            }
            if self.archive.len() >= PAGE {
                self.flush_archive(sum).await?;
            }
        }
        Ok(self.created)
    }

    async fn push_offline(&mut self, stanza: String, sum: &mut Summary) -> anyhow::Result<()> {
        if self.create(false, sum).await? {
            self.store
                .offline_push(
                    &self.user,
                    &stanza,
                    None,
                    usize::MAX,
                    sum.offline as i64 + 1,
                )
                .await?;
            sum.offline += 1;
        } else {
            self.offline.push(stanza);
        }
        Ok(())
    }

    async fn push_archived(&mut self, m: ArchivedMessage, sum: &mut Summary) -> anyhow::Result<()> {
        self.archive.push(m);
        if self.archive.len() >= PAGE && self.create(false, sum).await? {
            self.flush_archive(sum).await?;
        }
        Ok(())
    }

    async fn flush_archive(&mut self, sum: &mut Summary) -> anyhow::Result<()> {
        self.store.archive_import(&self.archive).await?;
        sum.archived += self.archive.len();
        self.archive.clear();
        Ok(())
    }

    async fn finish(mut self, sum: &mut Summary) -> anyhow::Result<()> {
        self.create(true, sum).await?;
        self.flush_archive(sum).await?;
        import_rest(self.store, &self.user, &self.rest, sum).await
    }
}

/// Restore one `<user/>` whose start tag `start` was just read.
async fn import_user<R: BufRead>(
    store: &dyn Store,
    r: &mut BackupReader<'_, R>,
    user: String,
    start: Element,
    sum: &mut Summary,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let mut u = UserImport {
        store,
        user,
        rest: r.pie(start),
        created: false,
        archive: Vec::new(),
        offline: Vec::new(),
    };
    // Children of <user/> until its end tag.
    while let Some(ev) = r.next_event()? {
        let el = match ev {
            DocEvent::Start(el) => r.pie(el),
            DocEvent::End => return u.finish(sum).await,
            DocEvent::Text(_) => continue,
        };
        let (item, item_ns) = if el.is("archive", NS_PIE_MAM) {
            ("result", NS_MAM)
        } else if el.is("offline-messages", NS_PIE) {
            ("message", NS_CLIENT)
        } else {
            let el = r.read_subtree(el)?;
            u.rest.append_child(r.pie(el));
            continue;
        };
        // A container of messages: one message built at a time.
        while let Some(ev) = r.next_event()? {
            let el = match ev {
                DocEvent::Start(el) if el.is(item, item_ns) => r.read_subtree(el)?,
                DocEvent::Start(_) => {
                    r.skip_subtree()?;
                    continue;
                }
                DocEvent::End => break,
                DocEvent::Text(_) => continue,
            };
            if item == "result" {
                u.push_archived(archived_from(&u.user, &el)?, sum).await?;
            } else {
                u.push_offline(el.to_string(), sum).await?;
            }
            progress.update(r.doc.position(), || restore_detail(sum));
        }
    }
    bail!("the backup ends inside a <user/>")
}

fn restore_detail(sum: &Summary) -> String {
    format!(
        "{} accounts, {} messages",
        sum.accounts,
        sum.archived + sum.offline
    )
}

/// `natter restore FILE`: load a XEP-0227 document into `store`, streaming
/// (memory does not grow with the file). Every account in it must be new
/// (restore into a fresh data directory); hosts must be in `domains`.
///
/// Two passes: the first reads the whole file to check it is well-formed
/// and that every account is new and of a served domain, so a bad file
/// changes nothing; the second writes each account as it is read.
pub async fn restore_from_file(
    store: &dyn Store,
    path: &Path,
    domains: &[String],
) -> anyhow::Result<Summary> {
    let open = || -> anyhow::Result<_> {
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(std::io::BufReader::with_capacity(1 << 16, f))
    };
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();

    let existing: std::collections::HashSet<String> =
        store.list_accounts(None).await?.into_iter().collect();
    let mut progress = Progress::new("checking", Unit::Bytes, size);
    let r = check(open()?, domains, &existing, &mut progress);
    progress.finish(size, String::new);
    r?;

    let mut progress = Progress::new("restoring", Unit::Bytes, size);
    let r = import(store, open()?, domains, &mut progress).await;
    match &r {
        Ok(sum) => progress.finish(size, || restore_detail(sum)),
        Err(_) => progress.abandon(),
    }
    r
}

/// First pass: the file is well-formed, its hosts served and its accounts
/// new. Returns the number of accounts.
fn check<R: BufRead>(
    input: R,
    domains: &[String],
    existing: &std::collections::HashSet<String>,
    progress: &mut Progress,
) -> anyhow::Result<usize> {
    let mut r = BackupReader::open(input, domains)?;
    let mut users = 0;
    while let Some((user, _)) = r.next_user()? {
        if existing.contains(&user) {
            bail!("{user} already exists here: restore into a fresh data directory");
        }
        r.skip_subtree()?;
        users += 1;
        progress.update(r.doc.position(), || format!("{users} accounts"));
    }
    Ok(users)
}

/// Second pass: write every account as it is read.
async fn import<R: BufRead>(
    store: &dyn Store,
    input: R,
    domains: &[String],
    progress: &mut Progress,
) -> anyhow::Result<Summary> {
    let mut r = BackupReader::open(input, domains)?;
    let mut sum = Summary::default();
    while let Some((user, start)) = r.next_user()? {
        import_user(store, &mut r, user.clone(), start, &mut sum, progress)
            .await
            .with_context(|| format!("restoring {user}"))?;
        progress.update(r.doc.position(), || restore_detail(&sum));
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let us = 1_700_000_000_123_456;
        assert_eq!(stamp_to_micros(&micros_to_stamp(us)), Some(us));
        assert!(stamp_to_micros("1469-07-21T00:32:29Z").is_some_and(|t| t < 0));
    }

    #[test]
    fn pep_options_from_fields_and_from_older_backups() {
        let form = |fields: &str| {
            parse_xml(&format!(
                "<configure xmlns='{NS_PUBSUB_OWNER}' node='n'><x xmlns='{NS_DATA}' type='submit'>\
                 {fields}</x></configure>"
            ))
            .unwrap()
        };
        let f = |var: &str, v: &str| format!("<field var='{var}'><value>{v}</value></field>");
        // As natter writes them now.
        let now = form(
            &[
                f("pubsub#access_model", "open"),
                f("pubsub#publish_model", "publishers"),
                f("pubsub#max_items", "max"),
                f("pubsub#persist_items", "0"),
                f("pubsub#send_last_published_item", "never"),
                f("pubsub#notify_retract", "0"),
                f("pubsub#notify_delete", "1"),
            ]
            .concat(),
        );
        let want = PepNodeConfig {
            access_model: "open".into(),
            max_items: u32::MAX,
            publish_model: "publishers".into(),
            persist_items: false,
            send_last_published_item: "never".into(),
            notify_retract: false,
            notify_delete: true,
            item_expire_secs: 0,
        };
        assert_eq!(pep_config(&now), want);
        // Older natter packed the options into publish_model.
        let old = form(
            &[
                f("pubsub#access_model", "open"),
                f(
                    "pubsub#publish_model",
                    "publishers;persist_items=0;send_last_published_item=never;notify_retract=0",
                ),
                f("pubsub#max_items", "max"),
            ]
            .concat(),
        );
        assert_eq!(pep_config(&old), want);
        // Nothing given: the defaults.
        assert_eq!(pep_config(&form("")), PepNodeConfig::default());
    }

    #[test]
    fn archive_entry_without_natter_extras_is_derived() {
        let res = parse_xml(
            "<result xmlns='urn:xmpp:mam:2' id='x1'><forwarded xmlns='urn:xmpp:forward:0'>\
             <delay xmlns='urn:xmpp:delay' stamp='2024-01-02T03:04:05Z'/>\
             <message xmlns='jabber:client' from='a@h/r' to='b@h' type='chat'><body>hi</body></message>\
             </forwarded></result>",
        )
        .unwrap();
        let m = archived_from("a@h", &res).unwrap();
        assert!(m.outgoing);
        assert_eq!(m.with, "b@h");
        assert_eq!(m.id, "x1");
        let m = archived_from("b@h", &res).unwrap();
        assert!(!m.outgoing);
        assert_eq!(m.with, "a@h");
    }
}
