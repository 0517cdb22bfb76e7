//! The blob store: media, audio, transcripts and summaries live here, and
//! records carry their URI, size and sha256 (the claim-check pattern: large
//! payloads never travel through Kafka).
//!
//! Two backends behind one type, so that stages stay business logic:
//!
//! - a local directory (the default): `file://<root>/<video>/g<gen>/<name>`.
//!   Files are written under a scratch directory on the same filesystem
//!   and renamed into place, so a reader never sees half a file and a
//!   crash leaves only scratch to clean.
//! - S3-compatible object storage (`storage = "s3://bucket/prefix"`, the
//!   `object_store` crate): `s3://bucket/<prefix>/<video>/g<gen>/<name>`.
//!   Files are streamed from the instance's scratch directory in multipart
//!   uploads (at most three parts in memory) while hashed; an object
//!   appears only when its upload completes, and an upload that fails or
//!   is cancelled is aborted. Tools that need a local file
//!   (ffmpeg, the ASR upload) get a streamed copy in scratch, removed when
//!   they are done with it.
//!
//! Either way, names are the video id, generation and a fixed name chosen
//! by the stage (`media.mp4`, `transcript.srt`), never anything from the
//! input such as a title, so a hostile title cannot pick a path. URIs in
//! records are input too: one that is not this store's is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, ClientOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions,
    PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, S3Config};
use crate::records::Blob;
use crate::template::StageError;

/// Parts of one multipart upload in flight at once: with the part being
/// filled, an upload holds at most `UPLOAD_PARTS_IN_FLIGHT + 1` parts.
const UPLOAD_PARTS_IN_FLIGHT: usize = 2;

/// The most [`BlobStore::read`] takes into memory: it is for transcripts
/// and summaries, which are far smaller; media goes through files.
pub const READ_LIMIT: u64 = 64 << 20;

/// Chunk local copies download at once for [`BlobStore::local_all`].
const DOWNLOADS_IN_FLIGHT: usize = 4;

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The filesystem refused (disk full, permissions): may pass.
    #[error("blob store I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A URI that is not one of this store's files.
    #[error("not a blob of this store: {0}")]
    Foreign(String),
    /// The object store failed or refused (network, server, permissions).
    #[error("blob store request for {uri} failed: {source}")]
    Store {
        /// The blob.
        uri: String,
        /// The cause (never holds credentials).
        source: object_store::Error,
    },
    /// The blob does not exist.
    #[error("blob {0} does not exist")]
    Missing(String),
    /// Larger than an in-memory read allows.
    #[error("blob {uri} has {size} bytes, more than the {limit} read into memory")]
    TooLarge {
        /// The blob.
        uri: String,
        /// Its size.
        size: u64,
        /// [`READ_LIMIT`].
        limit: u64,
    },
    /// A store without local files (S3) was asked for a blob's local path;
    /// [`BlobStore::local`] makes a local copy instead.
    #[error("{0} has no local path (use a local copy)")]
    NotLocal(String),
    /// The storage settings cannot build a store.
    #[error("blob store settings: {0}")]
    Config(String),
}

impl From<BlobError> for StageError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Io { .. } | BlobError::Store { .. } => {
                StageError::retryable("blob_io", e.to_string())
            }
            BlobError::Foreign(_) => StageError::permanent("blob_uri", e.to_string()),
            BlobError::Missing(_) => StageError::permanent("blob_missing", e.to_string()),
            BlobError::TooLarge { .. } => StageError::permanent("blob_too_large", e.to_string()),
            BlobError::NotLocal(_) | BlobError::Config(_) => {
                StageError::permanent("blob_config", e.to_string())
            }
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn store_err(uri: &str) -> impl FnOnce(object_store::Error) -> BlobError + '_ {
    move |source| match source {
        object_store::Error::NotFound { .. } => BlobError::Missing(uri.to_string()),
        source => BlobError::Store {
            uri: uri.to_string(),
            source,
        },
    }
}

/// Media, audio, transcripts and summaries: a local directory or an
/// S3-compatible bucket. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Local { root: PathBuf },
    S3(Arc<S3>),
}

/// An S3-compatible bucket under a key prefix.
struct S3 {
    client: AmazonS3,
    bucket: String,
    /// Without slashes at either end; empty for the whole bucket.
    prefix: String,
    /// Where local copies and files about to be uploaded live.
    scratch: PathBuf,
    part_size: usize,
}

impl S3 {
    fn uri(&self, key: &Key) -> String {
        format!("s3://{}/{}", self.bucket, key.as_ref())
    }
}

// By hand: the S3 client's own Debug would show the access key id, and
// nothing here needs more than where the store is.
impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BlobStore").field(&self.to_string()).finish()
    }
}

impl std::fmt::Display for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Local { root } => write!(f, "file://{}", root.display()),
            Backend::S3(s3) if s3.prefix.is_empty() => write!(f, "s3://{}", s3.bucket),
            Backend::S3(s3) => write!(f, "s3://{}/{}", s3.bucket, s3.prefix),
        }
    }
}

/// A file name safe on every filesystem for a video id: ids are ours
/// (`yt:…`, `url:…`), but a replayed or legacy id is still input, so any
/// character outside a small set is hex-escaped.
pub fn safe_name(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02x}")),
        }
    }
    if out.is_empty() {
        out.push_str("%empty");
    }
    out
}

/// Whether a `storage` setting names an S3-compatible store.
pub fn is_s3(storage: &str) -> bool {
    storage.starts_with("s3://")
}

/// The bucket and key prefix of an `s3://bucket/prefix` setting, or why it
/// is not one (S3's bucket naming rules; no empty, `.` or `..` segments).
pub fn parse_s3_storage(storage: &str) -> Result<(String, String), String> {
    let rest = storage
        .strip_prefix("s3://")
        .ok_or("must start with s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(format!(
            "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() {
        let key = Key::parse(prefix).map_err(|e| format!("bad key prefix: {e}"))?;
        if key.as_ref() != prefix {
            return Err(format!("bad key prefix {prefix:?}"));
        }
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// A blob as a local file, for tools that read files (ffmpeg, an ASR
/// upload). A copy from S3 lives in scratch and is removed on drop; a blob
/// of a local store is its own file.
#[derive(Debug)]
pub struct LocalBlob {
    path: PathBuf,
    _scratch: Option<tempfile::TempDir>,
}

impl LocalBlob {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for LocalBlob {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl BlobStore {
    /// A local store rooted at `root` (created if missing; made absolute so
    /// that URIs stay valid from any working directory).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, BlobError> {
        let root = root.as_ref();
        std::fs::create_dir_all(root.join(".scratch")).map_err(io(root))?;
        let root = std::fs::canonicalize(root).map_err(io(root))?;
        Ok(Self {
            backend: Backend::Local { root },
        })
    }

    /// The store that `storage` (and, for `s3://`, the `s3` table) names.
    /// No request is made: see [`BlobStore::connect`].
    pub fn from_config(config: &Config) -> Result<Self, BlobError> {
        if !is_s3(&config.storage) {
            return Self::open(&config.storage);
        }
        let (bucket, prefix) = parse_s3_storage(&config.storage).map_err(BlobError::Config)?;
        Self::s3(bucket, prefix, &config.s3)
    }

    /// [`BlobStore::from_config`], and for S3 one small write to
    /// `<prefix>/.vidpipe-probe`, so that a wrong endpoint, bucket or
    /// credential stops a process at start instead of failing every video.
    /// (A write, not a listing: the store needs no list permission.)
    pub async fn connect(config: &Config) -> Result<Self, BlobError> {
        let store = Self::from_config(config)?;
        if let Backend::S3(s3) = &store.backend {
            let key = s3.key(&[".vidpipe-probe"])?;
            let uri = s3.uri(&key);
            s3.client
                .put(&key, PutPayload::from_static(b"vidpipe\n"))
                .await
                .map_err(|source| {
                    BlobError::Config(format!(
                        "cannot write {uri} (check storage and the s3 settings): {source}"
                    ))
                })?;
        }
        Ok(store)
    }

    fn s3(bucket: String, prefix: String, c: &S3Config) -> Result<Self, BlobError> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&c.region)
            .with_allow_http(c.allow_http)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(c.allow_http)
                    .with_connect_timeout(Duration::from_secs(5))
                    // Bounds one request (a part, or a stretch of a
                    // download, which resumes where it broke off);
                    // a stalled connection is noticed sooner.
                    .with_timeout(Duration::from_secs(300))
                    .with_read_timeout(Duration::from_secs(60)),
            )
            .with_retry(RetryConfig {
                max_retries: 5,
                retry_timeout: Duration::from_secs(60),
                ..RetryConfig::default()
            });
        if !c.endpoint.is_empty() {
            builder = builder.with_endpoint(&c.endpoint);
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (&c.access_key_id, &c.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id.expose_secret())
                    .with_secret_access_key(secret.expose_secret());
                if let Some(token) = &c.session_token {
                    builder = builder.with_token(token.expose_secret());
                }
            }
            _ => {
                // The AWS SDKs' order: the environment's keys, then web
                // identity, container and instance credentials. Only the
                // credential variables are read, so no other AWS_* variable
                // changes where blobs go.
                for (key, var) in [
                    (AmazonS3ConfigKey::AccessKeyId, "AWS_ACCESS_KEY_ID"),
                    (AmazonS3ConfigKey::SecretAccessKey, "AWS_SECRET_ACCESS_KEY"),
                    (AmazonS3ConfigKey::Token, "AWS_SESSION_TOKEN"),
                    (
                        AmazonS3ConfigKey::WebIdentityTokenFile,
                        "AWS_WEB_IDENTITY_TOKEN_FILE",
                    ),
                    (AmazonS3ConfigKey::RoleArn, "AWS_ROLE_ARN"),
                    (AmazonS3ConfigKey::RoleSessionName, "AWS_ROLE_SESSION_NAME"),
                    (
                        AmazonS3ConfigKey::ContainerCredentialsRelativeUri,
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    ),
                    (
                        AmazonS3ConfigKey::ContainerCredentialsFullUri,
                        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    ),
                    (
                        AmazonS3ConfigKey::ContainerAuthorizationTokenFile,
                        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                    ),
                ] {
                    if let Some(value) = env(var) {
                        builder = builder.with_config(key, value);
                    }
                }
            }
        }
        // The builder's error may quote its settings; none of them is a
        // secret except the keys, which it never prints.
        let client = builder
            .build()
            .map_err(|e| BlobError::Config(e.to_string()))?;
        let scratch = if c.scratch_dir.is_empty() {
            std::env::temp_dir().join("vidpipe-scratch")
        } else {
            PathBuf::from(&c.scratch_dir)
        };
        std::fs::create_dir_all(&scratch).map_err(io(&scratch))?;
        Ok(Self {
            backend: Backend::S3(Arc::new(S3 {
                client,
                bucket,
                prefix,
                scratch,
                part_size: usize::try_from(c.part_size).unwrap_or(usize::MAX),
            })),
        })
    }

    /// A fresh scratch directory, removed when dropped: a stage downloads
    /// or converts into it, then `put`s results. For a local store it is
    /// on the store's filesystem (so `put` is a rename); for S3 it is in
    /// `s3.scratch_dir`.
    pub fn scratch(&self) -> Result<tempfile::TempDir, BlobError> {
        let dir = match &self.backend {
            Backend::Local { root } => root.join(".scratch"),
            Backend::S3(s3) => s3.scratch.clone(),
        };
        tempfile::Builder::new()
            .prefix("work-")
            .tempdir_in(&dir)
            .map_err(io(&dir))
    }

    /// Moves `src` (a file in scratch) into the store as `name` of the
    /// video's generation and describes it: a rename into a local store, a
    /// streamed (multipart) upload to S3, after which `src` is removed.
    /// `sha256` is computed (while streaming) unless the caller already has
    /// it.
    pub async fn put(
        &self,
        video_id: &str,
        generation: i64,
        name: &str,
        src: &Path,
        sha256: Option<String>,
        content_type: Option<&str>,
    ) -> Result<Blob, BlobError> {
        let (uri, size, sha256) = match &self.backend {
            Backend::Local { root } => {
                let dir = root
                    .join(safe_name(video_id))
                    .join(format!("g{generation}"));
                tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
                let dest = dir.join(name);
                let sha256 = match sha256 {
                    Some(s) => s,
                    None => sha256_file(src).await?,
                };
                tokio::fs::rename(src, &dest).await.map_err(io(&dest))?;
                let size = tokio::fs::metadata(&dest).await.map_err(io(&dest))?.len();
                (format!("file://{}", dest.display()), size, sha256)
            }
            Backend::S3(s3) => {
                let key = s3.blob_key(video_id, generation, name)?;
                let (size, sha256) = s3.upload(&key, src, sha256, content_type).await?;
                // Moved, as a rename would: scratch space is freed at once.
                let _ = tokio::fs::remove_file(src).await;
                (s3.uri(&key), size, sha256)
            }
        };
        Ok(Blob {
            uri,
            size: size as i64,
            sha256,
            content_type: content_type.map(str::to_string),
        })
    }

    /// Writes `bytes` as `name` of the video's generation (small results:
    /// transcripts, summaries).
    pub async fn put_bytes(
        &self,
        video_id: &str,
        generation: i64,
        name: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<Blob, BlobError> {
        let sha = hex::encode(Sha256::digest(bytes));
        match &self.backend {
            Backend::Local { .. } => {
                let scratch = self.scratch()?;
                let tmp = scratch.path().join(name);
                tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
                self.put(
                    video_id,
                    generation,
                    name,
                    &tmp,
                    Some(sha),
                    Some(content_type),
                )
                .await
            }
            Backend::S3(s3) => {
                let key = s3.blob_key(video_id, generation, name)?;
                let uri = s3.uri(&key);
                s3.client
                    .put_opts(
                        &key,
                        PutPayload::from(bytes.to_vec()),
                        PutOptions {
                            attributes: attributes(Some(content_type)),
                            ..PutOptions::default()
                        },
                    )
                    .await
                    .map_err(store_err(&uri))?;
                Ok(Blob {
                    uri,
                    size: bytes.len() as i64,
                    sha256: sha,
                    content_type: Some(content_type.to_string()),
                })
            }
        }
    }

    /// The local path of a blob of a local store. URIs from records are
    /// input: anything outside the root is refused. An S3 store has no
    /// local paths ([`BlobStore::local`] makes a local copy).
    pub fn path(&self, uri: &str) -> Result<PathBuf, BlobError> {
        let root = match &self.backend {
            Backend::Local { root } => root,
            Backend::S3(s3) => {
                s3.key_of(uri)?;
                return Err(BlobError::NotLocal(uri.to_string()));
            }
        };
        let path = uri
            .strip_prefix("file://")
            .map(PathBuf::from)
            .ok_or_else(|| BlobError::Foreign(uri.to_string()))?;
        let clean = path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::RootDir
            )
        });
        if !clean || !path.starts_with(root) {
            return Err(BlobError::Foreign(uri.to_string()));
        }
        Ok(path)
    }

    /// The local path of a sibling of a local blob (the `transcript.srt`
    /// next to `transcript.json`); see [`BlobStore::sibling_uri`].
    pub fn sibling(&self, uri: &str, name: &str) -> Result<PathBuf, BlobError> {
        let path = self.path(uri)?;
        Ok(path.with_file_name(name))
    }

    /// The URI of a sibling of a blob (the `transcript.srt` next to
    /// `transcript.json`), in either backend.
    pub fn sibling_uri(&self, uri: &str, name: &str) -> Result<String, BlobError> {
        plain_name(name).ok_or_else(|| BlobError::Foreign(name.to_string()))?;
        match &self.backend {
            Backend::Local { .. } => Ok(format!("file://{}", self.sibling(uri, name)?.display())),
            Backend::S3(s3) => {
                let key = s3.key_of(uri)?;
                let parent = key.as_ref().rsplit_once('/').map_or("", |(p, _)| p);
                let sibling = if parent.is_empty() {
                    name.to_string()
                } else {
                    format!("{parent}/{name}")
                };
                let sibling = Key::parse(&sibling).map_err(|_| BlobError::Foreign(sibling))?;
                Ok(s3.uri(&sibling))
            }
        }
    }

    /// A blob as a local file for a tool: the file itself in a local store,
    /// a copy streamed into scratch (removed when the result is dropped)
    /// from S3.
    pub async fn local(&self, uri: &str) -> Result<LocalBlob, BlobError> {
        let s3 = match &self.backend {
            Backend::Local { .. } => {
                return Ok(LocalBlob {
                    path: self.path(uri)?,
                    _scratch: None,
                });
            }
            Backend::S3(s3) => s3,
        };
        let key = s3.key_of(uri)?;
        let scratch = self.scratch()?;
        // Our own name from the key (the stage chose it), kept for the
        // extension; a stranger one is not trusted as a file name.
        let name = key
            .filename()
            .and_then(plain_name)
            .unwrap_or("blob")
            .to_string();
        let dest = scratch.path().join(name);
        let got = s3.client.get(&key).await.map_err(store_err(uri))?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(&dest).await.map_err(io(&dest))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store_err(uri))?;
            file.write_all(&chunk).await.map_err(io(&dest))?;
        }
        file.flush().await.map_err(io(&dest))?;
        Ok(LocalBlob {
            path: dest,
            _scratch: Some(scratch),
        })
    }

    /// [`BlobStore::local`] for several blobs (audio chunks), a few
    /// downloads at a time, in order.
    pub async fn local_all(&self, uris: Vec<String>) -> Result<Vec<LocalBlob>, BlobError> {
        // Owned URIs and store: a borrowing closure here makes the stage's
        // future not `Send` (rust-lang/rust#102211).
        futures::stream::iter(uris)
            .map(|uri| {
                let store = self.clone();
                async move { store.local(&uri).await }
            })
            .buffered(DOWNLOADS_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Reads a small blob whole (at most [`READ_LIMIT`] bytes).
    pub async fn read(&self, uri: &str) -> Result<Vec<u8>, BlobError> {
        let too_large = |size| BlobError::TooLarge {
            uri: uri.to_string(),
            size,
            limit: READ_LIMIT,
        };
        match &self.backend {
            Backend::Local { .. } => {
                let path = self.path(uri)?;
                let size = tokio::fs::metadata(&path).await.map_err(io(&path))?.len();
                if size > READ_LIMIT {
                    return Err(too_large(size));
                }
                tokio::fs::read(&path).await.map_err(io(&path))
            }
            Backend::S3(s3) => {
                let key = s3.key_of(uri)?;
                let got = s3.client.get(&key).await.map_err(store_err(uri))?;
                if got.meta.size > READ_LIMIT {
                    return Err(too_large(got.meta.size));
                }
                let bytes = got.bytes().await.map_err(store_err(uri))?;
                Ok(bytes.to_vec())
            }
        }
    }
}

impl S3 {
    /// `<prefix>/<parts...>`, each part a plain name.
    fn key(&self, parts: &[&str]) -> Result<Key, BlobError> {
        let mut key = self.prefix.clone();
        for part in parts {
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(part);
        }
        Key::parse(&key).map_err(|_| BlobError::Foreign(key))
    }

    fn blob_key(&self, video_id: &str, generation: i64, name: &str) -> Result<Key, BlobError> {
        plain_name(name).ok_or_else(|| BlobError::Foreign(name.to_string()))?;
        self.key(&[&safe_name(video_id), &format!("g{generation}"), name])
    }

    /// The key of one of this store's blobs: this bucket, under the prefix,
    /// with no empty, `.` or `..` segments. Anything else is foreign.
    fn key_of(&self, uri: &str) -> Result<Key, BlobError> {
        let foreign = || BlobError::Foreign(uri.to_string());
        let (bucket, key) = uri
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(foreign)?;
        if bucket != self.bucket {
            return Err(foreign());
        }
        let parsed = Key::parse(key).map_err(|_| foreign())?;
        let under_prefix = self.prefix.is_empty()
            || key
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if parsed.as_ref() != key || !under_prefix {
            return Err(foreign());
        }
        Ok(parsed)
    }

    /// Streams `src` to `key`: one request up to a part's size, a multipart
    /// upload above it (aborted on failure), hashing on the way unless the
    /// caller knows the sha256. Returns size and sha256.
    async fn upload(
        &self,
        key: &Key,
        src: &Path,
        sha256: Option<String>,
        content_type: Option<&str>,
    ) -> Result<(u64, String), BlobError> {
        let uri = self.uri(key);
        let size = tokio::fs::metadata(src).await.map_err(io(src))?.len();
        if size <= self.part_size as u64 {
            let bytes = tokio::fs::read(src).await.map_err(io(src))?;
            let sha256 = sha256.unwrap_or_else(|| hex::encode(Sha256::digest(&bytes)));
            let size = bytes.len() as u64;
            self.client
                .put_opts(
                    key,
                    PutPayload::from(bytes),
                    PutOptions {
                        attributes: attributes(content_type),
                        ..PutOptions::default()
                    },
                )
                .await
                .map_err(store_err(&uri))?;
            return Ok((size, sha256));
        }
        let upload = self
            .client
            .put_multipart_opts(
                key,
                PutMultipartOptions {
                    attributes: attributes(content_type),
                    ..PutMultipartOptions::default()
                },
            )
            .await
            .map_err(store_err(&uri))?;
        let mut pending = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(
            upload,
            self.part_size,
        )));
        let mut hasher = sha256.is_none().then(Sha256::new);
        let mut file = tokio::fs::File::open(src).await.map_err(io(src))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Some(writer) = pending.0.as_mut() {
            let n = file.read(&mut buf).await.map_err(io(src))?;
            if n == 0 {
                break;
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            // Back pressure: no new part starts while enough are in
            // flight, so memory stays at a few parts whatever the size.
            writer
                .wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT)
                .await
                .map_err(store_err(&uri))?;
            writer.write(&buf[..n]);
            total += n as u64;
        }
        if let Some(writer) = pending.0.take() {
            // (Aborts the upload itself if completing it fails.)
            writer.finish().await.map_err(store_err(&uri))?;
        }
        let sha256 = sha256
            .or_else(|| hasher.map(|h| hex::encode(h.finalize())))
            .unwrap_or_default();
        Ok((total, sha256))
    }
}

/// A multipart upload that has not completed: aborted when dropped (an
/// error, or the stage's future dropped at shutdown), since uploaded parts
/// cost storage until then and are invisible in listings.
struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let (Some(writer), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                if let Err(e) = writer.abort().await {
                    tracing::warn!(error = %e, "could not abort a multipart upload");
                }
            });
        }
    }
}

fn attributes(content_type: Option<&str>) -> Attributes {
    let mut attributes = Attributes::new();
    if let Some(kind) = content_type {
        attributes.insert(Attribute::ContentType, kind.to_string().into());
    }
    attributes
}

/// `name` if it is a plain file name of ours: letters, digits, `.`, `-`,
/// `_`, not starting with a dot.
fn plain_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    ok.then_some(name)
}

/// sha256 of a file, streamed.
pub async fn sha256_file(path: &Path) -> Result<String, BlobError> {
    let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe() {
        assert_eq!(safe_name("yt:dQw4w9WgXcQ"), "yt%3adQw4w9WgXcQ");
        assert_eq!(safe_name("../../etc"), "%2e%2e%2f%2e%2e%2fetc");
        assert_eq!(safe_name("a\0b"), "a%00b");
        assert_eq!(safe_name(""), "%empty");
    }

    #[tokio::test]
    async fn put_read_and_refuse_foreign_uris() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let blob = store
            .put_bytes("url:abc", 2, "transcript.txt", b"hello", "text/plain")
            .await
            .unwrap();
        assert_eq!(blob.size, 5);
        assert_eq!(
            blob.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(blob.uri.ends_with("/url%3aabc/g2/transcript.txt"));
        assert_eq!(store.read(&blob.uri).await.unwrap(), b"hello");
        let srt = store.sibling_uri(&blob.uri, "transcript.srt").unwrap();
        assert!(srt.ends_with("/url%3aabc/g2/transcript.srt"), "{srt}");
        assert_eq!(
            store.local(&blob.uri).await.unwrap().path(),
            store.path(&blob.uri).unwrap()
        );
        assert!(store.path("file:///etc/passwd").is_err());
        let root = store.to_string();
        let sneaky = format!("{root}/../../etc/passwd");
        assert!(store.path(&sneaky).is_err());
        assert!(store.path("s3://bucket/x").is_err());
        assert!(store.sibling_uri(&blob.uri, "../x").is_err());
    }

    #[test]
    fn s3_storage_urls_parse_strictly() {
        assert_eq!(
            parse_s3_storage("s3://media/vidpipe/prod/").unwrap(),
            ("media".into(), "vidpipe/prod".into())
        );
        assert_eq!(
            parse_s3_storage("s3://media").unwrap(),
            ("media".into(), String::new())
        );
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Media/x",
            "s3://-media/x",
            "s3://media//x",
            "s3://media/a/../b",
            "s3://media/./b",
            "file:///tmp",
        ] {
            assert!(parse_s3_storage(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn s3_keys_stay_in_the_bucket_and_prefix() {
        let mut config = Config {
            storage: "s3://media/vp".into(),
            ..Config::default()
        };
        config.s3.endpoint = "http://127.0.0.1:1".into();
        config.s3.allow_http = true;
        config.s3.access_key_id = Some("id".into());
        config.s3.secret_access_key = Some("secret-canary".into());
        let scratch = tempfile::tempdir().unwrap();
        config.s3.scratch_dir = scratch.path().display().to_string();
        let store = BlobStore::from_config(&config).unwrap();
        let Backend::S3(s3) = &store.backend else {
            panic!("an s3 store")
        };
        let key = s3.blob_key("yt:abc", 3, "media.mp4").unwrap();
        assert_eq!(key.as_ref(), "vp/yt%3aabc/g3/media.mp4");
        assert_eq!(s3.uri(&key), "s3://media/vp/yt%3aabc/g3/media.mp4");
        assert_eq!(s3.key_of(&s3.uri(&key)).unwrap(), key);
        assert_eq!(
            store
                .sibling_uri(
                    "s3://media/vp/yt%3aabc/g3/transcript.json",
                    "transcript.srt"
                )
                .unwrap(),
            "s3://media/vp/yt%3aabc/g3/transcript.srt"
        );
        for foreign in [
            "s3://other/vp/x/g1/a.txt",
            "s3://media/vpx/x/g1/a.txt",
            "s3://media/x/g1/a.txt",
            "s3://media/vp/../x/a.txt",
            "s3://media/vp//x/a.txt",
            "s3://media",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(s3.key_of(foreign), Err(BlobError::Foreign(_))),
                "{foreign}"
            );
        }
        assert!(matches!(
            store.path("s3://media/vp/x/g1/a.txt"),
            Err(BlobError::NotLocal(_))
        ));
        assert!(s3.blob_key("yt:abc", 1, "../../x").is_err());
        assert!(!format!("{store:?}").contains("secret-canary"));
        assert_eq!(store.to_string(), "s3://media/vp");
    }
}
