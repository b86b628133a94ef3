//! Where uploaded bytes live: a key-value blob store with two backends,
//! the local disk under `data_dir/blobs` (default) and S3-compatible
//! object storage through the `object_store` crate (`upload.storage =
//! "s3"`, for clusters: every node sees the same bucket).
//!
//! Keys are logical: a blob is its SHA-256 in hex, and the other
//! namespaces are `tmp/<name>` (uploads in flight) and
//! `thumbs/<sha256>-<size>.jpg` (previews). Both backends lay blobs out
//! as `ab/cd/<sha256>` so no directory or listing page grows huge.
//!
//! Writers stream: the disk writes a temporary file, S3 a multipart
//! upload of bounded parts (`PART` × `PARTS_IN_FLIGHT` bytes in memory
//! per upload), so a 2 GB document costs the same memory as a photo.
//! `commit` moves the written object to its key, replacing an existing
//! copy of the same bytes; the replacement is fresh, which restarts the
//! sweep's grace period for it.

use crate::config::{Config, S3Config};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// S3 multipart part size (S3's minimum is 5 MiB).
const PART: usize = 8 * 1024 * 1024;
/// Parts one upload may have in flight to S3.
const PARTS_IN_FLIGHT: usize = 2;
/// Bytes a disk download reads at once, and hands to hyper at once.
const READ_CHUNK: usize = 64 * 1024;
const SEND_SLICE: usize = 4 * 1024;

pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// One stored object, as listed for the sweep.
pub struct Listed {
    pub key: String,
    pub modified: SystemTime,
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Start writing an object that `commit` will move to its key.
    async fn writer(&self, tmp_name: &str) -> io::Result<Box<dyn BlobWriter>>;
    /// The bytes of `key` in `range` (inclusive start, exclusive end);
    /// `None` when there is no such object.
    async fn read(&self, key: &str, range: std::ops::Range<u64>) -> io::Result<Option<ByteStream>>;
    /// Delete `key`; deleting what is not there is no error.
    async fn delete(&self, key: &str) -> io::Result<()>;
    /// Every object, for the sweep.
    async fn list(&self) -> io::Result<Vec<Listed>>;
    /// Store a small object whole (thumbnails).
    async fn put_small(&self, key: &str, bytes: Bytes) -> io::Result<()>;
    /// A URL a client may GET `key` from directly, when downloads are
    /// redirected to the storage (S3 with `downloads = "redirect"`).
    async fn direct_url(&self, key: &str, content_type: &str, disposition: &str) -> Option<String>;
}

#[async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()>;
    /// Finish (durably) and move the object to `key`.
    async fn commit(self: Box<Self>, key: &str) -> io::Result<()>;
    /// Give up: delete what was written.
    async fn abort(self: Box<Self>);
}

/// The backend `config.upload.storage` names.
pub fn open(config: &Config) -> anyhow::Result<Box<dyn BlobStore>> {
    Ok(match config.upload.storage.as_str() {
        "s3" => Box::new(S3::open(&config.upload.s3)?),
        _ => Box::new(Disk {
            root: config.data_dir.join("blobs"),
        }),
    })
}

/// `chunks` handed on in slices of at most SEND_SLICE bytes (no copy):
/// hyper's write queue holds a number of frames per connection, so small
/// frames keep what 100 downloads in flight hold small (~18 MiB, not ~70;
/// BENCHMARKS.md), whatever size the reads or the storage's chunks have.
fn sliced(chunks: impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static) -> ByteStream {
    chunks
        .map_ok(|big| {
            let slices: Vec<io::Result<Bytes>> = (0..big.len())
                .step_by(SEND_SLICE)
                .map(|at| Ok(big.slice(at..(at + SEND_SLICE).min(big.len()))))
                .collect();
            futures::stream::iter(slices)
        })
        .try_flatten()
        .boxed()
}

/// A key's place in the store: blobs spread as ab/cd/<hash>.
fn layout(key: &str) -> String {
    if is_blob_key(key) {
        format!("{}/{}/{key}", &key[0..2], &key[2..4])
    } else {
        key.to_string()
    }
}

/// The key stored at `path` (a layout() result).
fn unlayout(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((_, name)) if is_blob_key(name) => name.to_string(),
        _ => path.to_string(),
    }
}

pub fn is_blob_key(key: &str) -> bool {
    key.len() == 64
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------
// Local disk
// ---------------------------------------------------------------------------

struct Disk {
    root: PathBuf,
}

impl Disk {
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(layout(key))
    }
}

struct DiskWriter {
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    root: PathBuf,
}

#[async_trait]
impl BlobStore for Disk {
    async fn writer(&self, tmp_name: &str) -> io::Result<Box<dyn BlobWriter>> {
        let tmp = self.path(&format!("tmp/{tmp_name}"));
        natter_store::files::create_dir(tmp.parent().expect("tmp keys have a parent"))?;
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(Box::new(DiskWriter {
            file: Some(file),
            tmp,
            root: self.root.clone(),
        }))
    }

    async fn read(&self, key: &str, range: std::ops::Range<u64>) -> io::Result<Option<ByteStream>> {
        let mut file = match tokio::fs::File::open(self.path(key)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if range.start > 0 {
            file.seek(io::SeekFrom::Start(range.start)).await?;
        }
        let reader = file.take(range.end.saturating_sub(range.start));
        // Large reads: each one is a trip to tokio's blocking pool.
        let chunks = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK);
        Ok(Some(sliced(chunks)))
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn list(&self) -> io::Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            while let Some(entry) = entries.next_entry().await? {
                let meta = entry.metadata().await?;
                if meta.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                let Ok(rel) = entry
                    .path()
                    .strip_prefix(&self.root)
                    .map(|p| p.to_path_buf())
                else {
                    continue;
                };
                out.push(Listed {
                    key: unlayout(&rel.to_string_lossy()),
                    modified: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                });
            }
        }
        Ok(out)
    }

    async fn put_small(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let mut w = self
            .writer(&format!("{}.small", crate::modules::new_id()))
            .await?;
        w.write(bytes).await?;
        w.commit(key).await
    }

    async fn direct_url(&self, _: &str, _: &str, _: &str) -> Option<String> {
        None
    }
}

#[async_trait]
impl BlobWriter for DiskWriter {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("written before commit")
            .write_all(&chunk)
            .await
    }

    async fn commit(mut self: Box<Self>, key: &str) -> io::Result<()> {
        let file = self.file.take().expect("committed once");
        let done = async {
            file.sync_all().await?;
            drop(file);
            let dest = self.root.join(layout(key));
            natter_store::files::create_dir(dest.parent().expect("keys have a parent"))?;
            // Atomic replace: an existing copy of these bytes is swapped for
            // this fresh one.
            tokio::fs::rename(&self.tmp, &dest).await
        }
        .await;
        if done.is_err() {
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        done
    }

    async fn abort(mut self: Box<Self>) {
        drop(self.file.take());
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }
}

// ---------------------------------------------------------------------------
// S3
// ---------------------------------------------------------------------------

struct S3 {
    store: AmazonS3,
    prefix: String,
    redirect: bool,
    url_ttl: Duration,
}

impl S3 {
    /// The client `s3` describes; fails naming the key that is wrong.
    pub fn open(s3: &S3Config) -> anyhow::Result<Self> {
        if s3.bucket.is_empty() {
            anyhow::bail!("upload.s3.bucket must be set when upload.storage = \"s3\"");
        }
        // reqwest is built without a crypto provider of its own: it uses
        // the process default, ring, as natter's own TLS does. A second
        // install is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_allow_http(s3.allow_http);
        if !s3.endpoint.is_empty() {
            b = b.with_endpoint(&s3.endpoint);
        }
        if !s3.access_key_id.is_empty() {
            b = b
                .with_access_key_id(&s3.access_key_id)
                .with_secret_access_key(&s3.secret_access_key);
        }
        let store = b
            .build()
            .map_err(|e| anyhow::anyhow!("upload.s3: cannot set up the S3 client: {e}"))?;
        Ok(S3 {
            store,
            prefix: s3.prefix.trim_matches('/').to_string(),
            redirect: s3.downloads == "redirect",
            url_ttl: Duration::from_secs(s3.url_ttl_secs),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        object_path(&self.prefix, key)
    }
}

fn object_path(prefix: &str, key: &str) -> ObjectPath {
    if prefix.is_empty() {
        ObjectPath::from(layout(key))
    } else {
        ObjectPath::from(format!("{prefix}/{}", layout(key)))
    }
}

struct S3Writer {
    upload: Option<WriteMultipart>,
    tmp: ObjectPath,
    store: AmazonS3,
    prefix: String,
}

#[async_trait]
impl BlobStore for S3 {
    async fn writer(&self, tmp_name: &str) -> io::Result<Box<dyn BlobWriter>> {
        let tmp = self.path(&format!("tmp/{tmp_name}"));
        let upload = self.store.put_multipart(&tmp).await?;
        Ok(Box::new(S3Writer {
            upload: Some(WriteMultipart::new_with_chunk_size(upload, PART)),
            tmp,
            store: self.store.clone(),
            prefix: self.prefix.clone(),
        }))
    }

    async fn read(&self, key: &str, range: std::ops::Range<u64>) -> io::Result<Option<ByteStream>> {
        if range.is_empty() {
            return Ok(Some(futures::stream::empty().boxed()));
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        match self.store.get_opts(&self.path(key), opts).await {
            Ok(got) => Ok(Some(sliced(got.into_stream().map_err(io::Error::from)))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> io::Result<Vec<Listed>> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = Vec::new();
        let mut objects = self.store.list(prefix.as_ref());
        while let Some(meta) = objects.next().await {
            let meta = meta?;
            let path = meta.location.to_string();
            out.push(Listed {
                key: unlayout(path.strip_prefix(&strip).unwrap_or(&path)),
                modified: meta.last_modified.into(),
            });
        }
        Ok(out)
    }

    async fn put_small(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        self.store.put(&self.path(key), bytes.into()).await?;
        Ok(())
    }

    async fn direct_url(&self, key: &str, content_type: &str, disposition: &str) -> Option<String> {
        if !self.redirect {
            return None;
        }
        // S3 serves the object with the upload's type and disposition when
        // the signed URL asks for them (objects are shared by hash, so the
        // stored metadata cannot carry one upload's).
        let opts = SignedUrlOptions::new().with_query([
            ("response-content-type", content_type),
            ("response-content-disposition", disposition),
        ]);
        match self
            .store
            .signed_url_opts(
                object_store::signer::Method::GET,
                &self.path(key),
                self.url_ttl,
                &opts,
            )
            .await
        {
            Ok(url) => Some(url.to_string()),
            Err(e) => {
                // Proxying still works: log and serve the bytes ourselves.
                tracing::warn!(error = %e, "cannot presign an S3 download URL");
                None
            }
        }
    }
}

#[async_trait]
impl BlobWriter for S3Writer {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        let upload = self.upload.as_mut().expect("written before commit");
        upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        upload.put(chunk);
        Ok(())
    }

    async fn commit(mut self: Box<Self>, key: &str) -> io::Result<()> {
        let upload = self.upload.take().expect("committed once");
        if let Err(e) = upload.finish().await {
            return Err(e.into());
        }
        let dest = object_path(&self.prefix, key);
        // Copy, then delete the temporary object (S3 has no rename); the
        // copy replaces an existing object of the same bytes with a fresh
        // one.
        let copied = self.store.copy(&self.tmp, &dest).await;
        let _ = self.store.delete(&self.tmp).await;
        copied.map_err(io::Error::from)
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(upload) = self.upload.take() {
            let _ = upload.abort().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_places_and_back() {
        let h = "ab".repeat(32);
        assert_eq!(layout(&h), format!("ab/ab/{h}"));
        assert_eq!(unlayout(&layout(&h)), h);
        assert_eq!(layout("tmp/x.part"), "tmp/x.part");
        assert_eq!(unlayout("tmp/x.part"), "tmp/x.part");
        assert_eq!(
            unlayout(&format!("thumbs/{h}-256.jpg")),
            format!("thumbs/{h}-256.jpg")
        );
        assert!(!is_blob_key(&"AB".repeat(32)));
    }
}
