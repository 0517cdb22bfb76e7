//! The blob store: media, audio, transcripts and summaries live here, and
//! records carry their URI, size and sha256 (the claim-check pattern: large
//! payloads never travel through Kafka).
//!
//! A local directory (the default). Files are named by video id,
//! generation and a fixed name chosen by the stage (`media.mp4`,
//! `transcript.srt`), never by anything from the input such as a title, so
//! a hostile title cannot pick a path. Files are written under a scratch
//! directory on the same filesystem and renamed into place, so a reader
//! never sees half a file and a crash leaves only scratch to clean.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::records::Blob;
use crate::template::StageError;

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
}

impl From<BlobError> for StageError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Io { .. } => StageError::retryable("blob_io", e.to_string()),
            BlobError::Foreign(_) => StageError::permanent("blob_uri", e.to_string()),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A local directory of blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
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

impl BlobStore {
    /// A store rooted at `root` (created if missing; made absolute so that
    /// URIs stay valid from any working directory).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, BlobError> {
        let root = root.as_ref();
        std::fs::create_dir_all(root.join(".scratch")).map_err(io(root))?;
        let root = std::fs::canonicalize(root).map_err(io(root))?;
        Ok(Self { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a video's files of one generation live.
    pub fn video_dir(&self, video_id: &str, generation: i64) -> PathBuf {
        self.root
            .join(safe_name(video_id))
            .join(format!("g{generation}"))
    }

    /// A fresh scratch directory on the store's filesystem, removed when
    /// dropped: a stage downloads or converts into it, then `put`s results.
    pub fn scratch(&self) -> Result<tempfile::TempDir, BlobError> {
        let dir = self.root.join(".scratch");
        tempfile::Builder::new()
            .prefix("work-")
            .tempdir_in(&dir)
            .map_err(io(&dir))
    }

    /// Moves `src` (on the store's filesystem) into place as `name` of the
    /// video's generation and describes it. `sha256` is computed unless the
    /// caller already has it from streaming.
    pub async fn put(
        &self,
        video_id: &str,
        generation: i64,
        name: &str,
        src: &Path,
        sha256: Option<String>,
        content_type: Option<&str>,
    ) -> Result<Blob, BlobError> {
        let dir = self.video_dir(video_id, generation);
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let dest = dir.join(name);
        let sha256 = match sha256 {
            Some(s) => s,
            None => sha256_file(src).await?,
        };
        tokio::fs::rename(src, &dest).await.map_err(io(&dest))?;
        let size = tokio::fs::metadata(&dest).await.map_err(io(&dest))?.len();
        Ok(Blob {
            uri: format!("file://{}", dest.display()),
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
        let scratch = self.scratch()?;
        let tmp = scratch.path().join(name);
        tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
        let sha = hex::encode(Sha256::digest(bytes));
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

    /// The local path of one of this store's blobs. URIs from records are
    /// input: anything outside the root is refused.
    pub fn path(&self, uri: &str) -> Result<PathBuf, BlobError> {
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
        if !clean || !path.starts_with(&self.root) {
            return Err(BlobError::Foreign(uri.to_string()));
        }
        Ok(path)
    }

    /// A sibling of a blob (the `transcript.srt` next to `transcript.json`).
    pub fn sibling(&self, uri: &str, name: &str) -> Result<PathBuf, BlobError> {
        let path = self.path(uri)?;
        Ok(path.with_file_name(name))
    }

    /// Reads a small blob whole.
    pub async fn read(&self, uri: &str) -> Result<Vec<u8>, BlobError> {
        let path = self.path(uri)?;
        tokio::fs::read(&path).await.map_err(io(&path))
    }
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
        assert!(store.path("file:///etc/passwd").is_err());
        let sneaky = format!("file://{}/../../etc/passwd", store.root().display());
        assert!(store.path(&sneaky).is_err());
        assert!(store.path("s3://bucket/x").is_err());
    }
}
