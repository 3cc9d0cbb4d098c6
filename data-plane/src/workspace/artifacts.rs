//! The artifact store: objects encrypted at rest in chunks, with a data key
//! per artifact wrapped by a key per tenant, itself wrapped by the KEK.
//! Deleting an artifact destroys its data key (crypto-shredding) and the
//! object; the store never holds a whole object in memory.
//!
//! Layout (under the fs root or the bucket prefix): `objects/<tenant>/<id>`,
//! `meta/<tenant>/<id>.json`, `keys/<tenant>/tenant.key`,
//! `keys/<tenant>/<id>.dek`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use shared::dataplane::{
    ArtifactFilter, ArtifactInfo, ArtifactList, ArtifactMeta, MAX_ARTIFACT_PAGE,
};
use shared::ids::{ArtifactId, SessionId, TenantId, storage_key};
use tokio::io::AsyncReadExt;

use super::blobs::Blobs;
use super::crypto::{CHUNK, CryptoError, MAGIC, Opener, Sealer, SecretKey, TAG};
use super::usage::UsageBook;

/// What an artifact operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("no such artifact")]
    NotFound,
    #[error("the artifact is larger than {0} bytes")]
    TooLarge(u64),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("artifact storage failed: {0}")]
    Io(#[from] io::Error),
    #[error("the upload broke off: {0}")]
    Upload(String),
    #[error("{0}")]
    BadName(String),
    /// The asked range lies outside an artifact of this size.
    #[error("the range is outside the artifact's {0} bytes")]
    Range(u64),
    /// The tenant's stored artifact bytes would pass its quota.
    #[error(
        "the tenant's artifacts would pass their quota of {max} bytes ({used} stored or in flight)"
    )]
    QuotaExceeded { max: u64, used: u64 },
}

/// The one check of an artifact name (uploads, and files collected from a
/// sandbox's `output/`): 1-255 bytes, no `/`, `\`, NUL or other control
/// character (CR, LF, escape codes), and not `.` or `..`.
pub fn check_name(name: &str) -> Result<(), ArtifactError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\');
    if ok {
        Ok(())
    } else {
        Err(ArtifactError::BadName(
            "name must be 1-255 bytes, not '.' or '..', without '/', '\\' or control characters"
                .into(),
        ))
    }
}

/// A name from a sandbox's file path made acceptable to [`check_name`]:
/// separators and control characters become `_`, it is cut to 255 bytes.
pub fn sanitize_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_control() || c == '/' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    while name.len() > 255 {
        name.pop();
    }
    if name.is_empty() || name == "." || name == ".." {
        name = format!("_{name}");
    }
    name
}

/// Encrypted artifacts over a [`Blobs`] backend.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    blobs: Blobs,
    kek: SecretKey,
    max_bytes: u64,
    /// Stored bytes per tenant, the platform default quota
    /// (`TENANT_MAX_ARTIFACT_BYTES`).
    tenant_quota: u64,
    usage: Arc<UsageBook>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// Keys are built from validated ids only, and `storage_key` checks every
// part again (second line): a part with `/`, `..`, NUL or anything outside
// the id alphabet is "not found" and never reaches the backend.
fn key(parts: &[&str]) -> Result<String, ArtifactError> {
    storage_key(parts).map_err(|_| ArtifactError::NotFound)
}

fn object_key(tenant: &TenantId, id: &ArtifactId) -> Result<String, ArtifactError> {
    key(&["objects", tenant, id])
}

fn meta_key(tenant: &TenantId, id: &ArtifactId) -> Result<String, ArtifactError> {
    key(&["meta", tenant, &format!("{id}.json")])
}

fn dek_key(tenant: &TenantId, id: &ArtifactId) -> Result<String, ArtifactError> {
    key(&["keys", tenant, &format!("{id}.dek")])
}

impl ArtifactStore {
    /// A store on the local filesystem under `root`.
    pub fn new(root: PathBuf, kek: SecretKey, max_bytes: u64) -> io::Result<Self> {
        super::blobs::private_dir_all(&root)?;
        for d in ["objects", "meta", "keys"] {
            super::blobs::private_dir_all(&root.join(d))?;
        }
        Ok(ArtifactStore::with_blobs(
            Blobs::Fs { root },
            kek,
            max_bytes,
        ))
    }

    /// A store on any backend.
    pub fn with_blobs(blobs: Blobs, kek: SecretKey, max_bytes: u64) -> Self {
        ArtifactStore {
            blobs,
            kek,
            max_bytes,
            tenant_quota: u64::MAX,
            usage: Arc::default(),
        }
    }

    /// The same store with a default quota on each tenant's stored bytes.
    #[must_use]
    pub fn with_tenant_quota(mut self, bytes: u64) -> Self {
        self.tenant_quota = bytes;
        self
    }

    /// Stored (and in-flight) artifact bytes of a tenant as this replica
    /// counts them; counted first when the count is missing or old.
    pub async fn usage(&self, tenant: &TenantId) -> Result<u64, ArtifactError> {
        self.count_if_needed(tenant).await?;
        Ok(self.usage.used(tenant))
    }

    /// Sums the sizes in the tenant's metadata records when the count is
    /// missing, old, or stale after a deletion.
    async fn count_if_needed(&self, tenant: &TenantId) -> Result<(), ArtifactError> {
        if !self.usage.needs_count(tenant) {
            return Ok(());
        }
        let mut total: u64 = 0;
        for name in self.blobs.list(&key(&["meta", tenant])?).await? {
            let Some(Ok(id)) = name.strip_suffix(".json").map(ArtifactId::parse) else {
                continue;
            };
            match self.info(tenant, &id).await {
                Ok(info) => total = total.saturating_add(info.size),
                Err(ArtifactError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        self.usage.set_count(tenant, total);
        Ok(())
    }

    /// The tenant's key, created on first use (exclusively, so concurrent
    /// first uploads agree on one key).
    async fn tenant_key(&self, tenant: &TenantId) -> Result<SecretKey, ArtifactError> {
        let key = key(&["keys", tenant, "tenant.key"])?;
        let owner = format!("tenant:{tenant}");
        let fresh = SecretKey::generate();
        if self
            .blobs
            .create_new(&key, &self.kek.wrap(&fresh, &owner))
            .await?
        {
            return Ok(fresh);
        }
        let wrapped = self
            .blobs
            .read(&key)
            .await?
            .ok_or(CryptoError::KeyDestroyed)?;
        Ok(self.kek.unwrap_key(&wrapped, &owner)?)
    }

    async fn data_key(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<SecretKey, ArtifactError> {
        let wrapped = self
            .blobs
            .read(&dek_key(tenant, id)?)
            .await?
            .ok_or(CryptoError::KeyDestroyed)?;
        let tk = self.tenant_key(tenant).await?;
        Ok(tk.unwrap_key(&wrapped, &format!("artifact:{tenant}/{id}"))?)
    }

    /// Stores a stream as a new artifact. On any failure nothing remains.
    pub async fn put<S, E>(
        &self,
        tenant: &TenantId,
        name: &str,
        session_id: Option<&SessionId>,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let meta = ArtifactMeta {
            session_id: session_id.map(SessionId::to_string),
            ..ArtifactMeta::default()
        };
        self.put_meta(tenant, name, &meta, body).await
    }

    /// As [`Self::put`], attached to what `meta` names (its ids are the
    /// caller's to have checked), under the default tenant quota.
    pub async fn put_meta<S, E>(
        &self,
        tenant: &TenantId,
        name: &str,
        meta: &ArtifactMeta,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.put_meta_within(tenant, name, meta, None, body).await
    }

    /// As [`Self::put_meta`], under `quota` (the tenant's quota as the
    /// control plane's policy sets it) when it is below the default: policy
    /// can lower the quota, never raise it past `TENANT_MAX_ARTIFACT_BYTES`.
    /// Bytes are reserved against the quota before they are written, so an
    /// upload that would pass it stops there and nothing of it remains.
    pub async fn put_meta_within<S, E>(
        &self,
        tenant: &TenantId,
        name: &str,
        meta: &ArtifactMeta,
        quota: Option<u64>,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let quota = quota.map_or(self.tenant_quota, |q| q.min(self.tenant_quota));
        self.put_limited(tenant, name, meta, quota, body).await
    }

    /// As [`Self::put_meta`], counted but never refused by the quota: for
    /// the few KiB that tell a caller why its files were left out.
    pub async fn put_note<S, E>(
        &self,
        tenant: &TenantId,
        name: &str,
        meta: &ArtifactMeta,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.put_limited(tenant, name, meta, u64::MAX, body).await
    }

    async fn put_limited<S, E>(
        &self,
        tenant: &TenantId,
        name: &str,
        meta: &ArtifactMeta,
        quota: u64,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        check_name(name)?;
        let id = ArtifactId::parse(format!("art-{}", hex::encode(rand::random::<[u8; 12]>())))
            .map_err(|e| ArtifactError::Io(io::Error::other(e)))?;
        self.count_if_needed(tenant).await?;
        let mut reserved: u64 = 0;
        let result = self
            .put_inner(&id, tenant, name, meta, body, quota, &mut reserved)
            .await;
        self.usage.finish(tenant, reserved, result.is_ok());
        if result.is_err() {
            self.remove_all(tenant, &id).await;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_inner<S, E>(
        &self,
        id: &ArtifactId,
        tenant: &TenantId,
        name: &str,
        meta: &ArtifactMeta,
        mut body: S,
        quota: u64,
        reserved: &mut u64,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tk = self.tenant_key(tenant).await?;
        let dek = SecretKey::generate();
        self.blobs
            .create_new(
                &dek_key(tenant, id)?,
                &tk.wrap(&dek, &format!("artifact:{tenant}/{id}")),
            )
            .await?;
        let mut out = self.blobs.writer(&object_key(tenant, id)?).await?;
        let written = async {
            out.write(MAGIC).await?;
            let mut sealer = Sealer::new(&dek, id);
            let mut hasher = Sha256::new();
            let mut size: u64 = 0;
            let mut buf: Vec<u8> = Vec::with_capacity(2 * CHUNK);
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|e| ArtifactError::Upload(e.to_string()))?;
                size += piece.len() as u64;
                if size > self.max_bytes {
                    return Err(ArtifactError::TooLarge(self.max_bytes));
                }
                let n = piece.len() as u64;
                self.usage
                    .reserve(tenant, n, quota)
                    .map_err(|o| ArtifactError::QuotaExceeded {
                        max: o.max,
                        used: o.used,
                    })?;
                *reserved += n;
                hasher.update(&piece);
                buf.extend_from_slice(&piece);
                // A full chunk is sealed as "not last" only once more data exists.
                while buf.len() > CHUNK {
                    out.write(&sealer.seal(&buf[..CHUNK], false)).await?;
                    buf.drain(..CHUNK);
                }
            }
            out.write(&sealer.seal(&buf, true)).await?;
            Ok::<_, ArtifactError>((size, hex::encode(hasher.finalize())))
        }
        .await;
        let (size, sha256) = match written {
            Ok(v) => v,
            Err(e) => {
                out.abort().await;
                return Err(e);
            }
        };
        out.finish().await?;
        let info = ArtifactInfo {
            artifact_id: id.to_string(),
            tenant: tenant.to_string(),
            name: name.to_owned(),
            session_id: meta.session_id.clone(),
            size,
            sha256,
            created_at_ms: now_ms(),
            job_id: meta.job_id.clone(),
            workflow_id: meta.workflow_id.clone(),
            labels: meta.labels.clone(),
        };
        let meta = serde_json::to_vec(&info).map_err(io::Error::other)?;
        self.blobs.create_new(&meta_key(tenant, id)?, &meta).await?;
        Ok(info)
    }

    /// An artifact's metadata. The stored record must name the caller's
    /// tenant and this id: another tenant's artifact is not found, exactly
    /// like one that does not exist, whatever path led to its record.
    pub async fn info(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<ArtifactInfo, ArtifactError> {
        let bytes = self
            .blobs
            .read(&meta_key(tenant, id)?)
            .await?
            .ok_or(ArtifactError::NotFound)?;
        let info: ArtifactInfo =
            serde_json::from_slice(&bytes).map_err(|_| CryptoError::Integrity)?;
        if info.tenant != tenant.as_str() || info.artifact_id != id.as_str() {
            return Err(ArtifactError::NotFound);
        }
        Ok(info)
    }

    /// Opens an artifact for streaming. The first chunk is checked before
    /// this returns, so a tampered small artifact is a coded error, not a
    /// broken stream; later chunks are checked before they are sent.
    pub async fn get(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<
        (
            ArtifactInfo,
            impl Stream<Item = Result<Bytes, io::Error>> + use<>,
        ),
        ArtifactError,
    > {
        let info = self.info(tenant, id).await?;
        let dek = self.data_key(tenant, id).await?;
        let raw = self
            .blobs
            .reader(&object_key(tenant, id)?)
            .await?
            .ok_or(ArtifactError::NotFound)?;
        let mut file = tokio::io::BufReader::with_capacity(4 * CHUNK, raw);
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic)
            .await
            .map_err(|_| CryptoError::Integrity)?;
        if &magic != MAGIC {
            return Err(CryptoError::Integrity.into());
        }
        let mut reader = ChunkReader {
            file,
            opener: Opener::new(&dek, id),
            next: None,
            done: false,
        };
        let first = reader.next_plain().await?;
        let rest = futures::stream::unfold(reader, |mut r| async move {
            if r.done {
                return None;
            }
            match r.next_plain().await {
                Ok(Some(b)) => Some((Ok(b), r)),
                Ok(None) => None,
                Err(e) => {
                    r.done = true;
                    Some((Err(io::Error::other(e.to_string())), r))
                }
            }
        });
        let head = futures::stream::iter(first.map(Ok));
        Ok((info, head.chain(rest)))
    }

    /// Opens bytes `start..=end` of an artifact (inside its size) for
    /// streaming. Chunks are sealed independently at fixed offsets (chunk
    /// `i` at `8 + i * (CHUNK + TAG)`, nonce = index and last flag), so the
    /// read seeks to the first chunk that holds `start` and opens only the
    /// chunks up to `end`; each is authenticated before any of it is sent.
    pub async fn get_range(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
        start: u64,
        end: u64,
    ) -> Result<
        (
            ArtifactInfo,
            impl Stream<Item = Result<Bytes, io::Error>> + use<>,
        ),
        ArtifactError,
    > {
        let info = self.info(tenant, id).await?;
        if start > end || end >= info.size {
            return Err(ArtifactError::Range(info.size));
        }
        let dek = self.data_key(tenant, id).await?;
        let chunk = CHUNK as u64;
        let chunks = info.size.div_ceil(chunk).max(1);
        let first = start / chunk;
        let last_needed = end / chunk;
        let offset = MAGIC.len() as u64 + first * (chunk + TAG as u64);
        let raw = self
            .blobs
            .reader_at(&object_key(tenant, id)?, offset)
            .await?
            .ok_or(ArtifactError::NotFound)?;
        let reader = RangeReader {
            file: tokio::io::BufReader::with_capacity(2 * CHUNK, raw),
            opener: Opener::at(&dek, id, first),
            index: first,
            chunks,
            last_needed,
            skip: (start - first * chunk) as usize,
            left: end - start + 1,
        };
        let stream = futures::stream::unfold(Some(reader), |r| async move {
            let mut r = r?;
            match r.next_part().await {
                Ok(Some(b)) => Some((Ok(b), Some(r))),
                Ok(None) => None,
                Err(e) => Some((Err(io::Error::other(e.to_string())), None)),
            }
        });
        Ok((info, stream))
    }

    /// One page of the tenant's artifacts that pass `filter`, ordered by id
    /// (the cursor is the last id of the previous page). The records are the
    /// metadata files under `meta/<tenant>/`: a page reads them in id order
    /// until it is full, so a narrow filter over many artifacts reads many.
    pub async fn list(
        &self,
        tenant: &TenantId,
        filter: &ArtifactFilter,
    ) -> Result<ArtifactList, ArtifactError> {
        let limit = filter.limit.unwrap_or(100).clamp(1, MAX_ARTIFACT_PAGE);
        let mut ids: Vec<ArtifactId> = self
            .blobs
            .list(&key(&["meta", tenant])?)
            .await?
            .iter()
            .filter_map(|n| n.strip_suffix(".json"))
            .filter_map(|n| ArtifactId::parse(n).ok())
            .filter(|id| filter.cursor.as_deref().is_none_or(|c| id.as_str() > c))
            .collect();
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut artifacts = Vec::new();
        let mut next_cursor = None;
        for id in ids {
            if artifacts.len() == limit {
                next_cursor = artifacts
                    .last()
                    .map(|a: &ArtifactInfo| a.artifact_id.clone());
                break;
            }
            // Deleted meanwhile, or not this tenant's record: skipped.
            match self.info(tenant, &id).await {
                Ok(info) if filter.matches(&info) => artifacts.push(info),
                Ok(_) | Err(ArtifactError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ArtifactList {
            artifacts,
            next_cursor,
        })
    }

    /// Destroys the artifact's data key (on `fs` overwritten, then removed) and its object.
    pub async fn delete(&self, tenant: &TenantId, id: &ArtifactId) -> Result<(), ArtifactError> {
        self.info(tenant, id).await?;
        self.remove_all(tenant, id).await;
        self.usage.stale(tenant);
        Ok(())
    }

    /// Deletes every artifact of a session (session teardown, expiry).
    pub async fn delete_session(
        &self,
        tenant: &TenantId,
        session_id: &str,
    ) -> Result<usize, ArtifactError> {
        let mut n = 0;
        for name in self.blobs.list(&key(&["meta", tenant])?).await? {
            let Some(Ok(id)) = name.strip_suffix(".json").map(ArtifactId::parse) else {
                continue;
            };
            if let Ok(info) = self.info(tenant, &id).await
                && info.session_id.as_deref() == Some(session_id)
            {
                self.remove_all(tenant, &id).await;
                n += 1;
            }
        }
        if n > 0 {
            self.usage.stale(tenant);
        }
        Ok(n)
    }

    async fn remove_all(&self, tenant: &TenantId, id: &ArtifactId) {
        // The key first: once it is gone, what remains is noise.
        let (Ok(dek), Ok(object), Ok(meta)) = (
            dek_key(tenant, id),
            object_key(tenant, id),
            meta_key(tenant, id),
        ) else {
            return;
        };
        self.blobs.delete(&dek, true).await;
        self.blobs.delete(&object, false).await;
        self.blobs.delete(&meta, false).await;
    }

    /// Decrypts a copy of an object's bytes with the keys the store has now
    /// (what an attacker holding old ciphertext could do with them).
    pub async fn decrypt_copy(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
        object: &[u8],
    ) -> Result<Vec<u8>, ArtifactError> {
        let dek = self.data_key(tenant, id).await?;
        let body = object
            .strip_prefix(MAGIC.as_slice())
            .ok_or(CryptoError::Integrity)?;
        let mut opener = Opener::new(&dek, id);
        let chunks: Vec<&[u8]> = body.chunks(CHUNK + TAG).collect();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            out.extend(opener.open(c, i + 1 == chunks.len())?);
        }
        Ok(out)
    }

    /// The raw (encrypted) bytes of an object, as stored.
    pub async fn raw_object(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<Vec<u8>, ArtifactError> {
        self.blobs
            .read(&object_key(tenant, id)?)
            .await?
            .ok_or(ArtifactError::NotFound)
    }

    /// Path of an artifact's object on the `fs` backend (tests alter it).
    pub fn object_path(&self, tenant: &TenantId, id: &ArtifactId) -> PathBuf {
        match (&self.blobs, object_key(tenant, id)) {
            (Blobs::Fs { root }, Ok(key)) => root.join(key),
            _ => PathBuf::new(),
        }
    }
}

/// Reads sealed chunks with one chunk of look-ahead (to know which is last).
struct ChunkReader {
    file: tokio::io::BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    opener: Opener,
    next: Option<Vec<u8>>,
    done: bool,
}

impl ChunkReader {
    async fn read_block(&mut self) -> io::Result<Vec<u8>> {
        let mut block = vec![0u8; CHUNK + TAG];
        let mut filled = 0;
        while filled < block.len() {
            let n = self.file.read(&mut block[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        block.truncate(filled);
        Ok(block)
    }

    /// The next plaintext chunk, or `None` at the end.
    async fn next_plain(&mut self) -> Result<Option<Bytes>, ArtifactError> {
        if self.done {
            return Ok(None);
        }
        let current = match self.next.take() {
            Some(b) => b,
            None => self.read_block().await?,
        };
        if current.is_empty() {
            // No final chunk: truncated.
            self.done = true;
            return Err(CryptoError::Integrity.into());
        }
        let following = self.read_block().await?;
        let last = following.is_empty();
        let plain = self.opener.open(&current, last)?;
        if last {
            self.done = true;
        } else {
            self.next = Some(following);
        }
        Ok(Some(Bytes::from(plain)))
    }
}

/// Reads the sealed chunks a range needs, from the first one on.
struct RangeReader {
    file: tokio::io::BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
    opener: Opener,
    /// Index of the next chunk to read.
    index: u64,
    /// Chunks in the object (the last one is sealed as last).
    chunks: u64,
    /// The last chunk the range needs.
    last_needed: u64,
    /// Plaintext bytes to drop from the first chunk.
    skip: usize,
    /// Plaintext bytes still to send.
    left: u64,
}

impl RangeReader {
    async fn next_part(&mut self) -> Result<Option<Bytes>, ArtifactError> {
        if self.left == 0 || self.index > self.last_needed {
            return Ok(None);
        }
        let mut block = vec![0u8; CHUNK + TAG];
        let mut filled = 0;
        while filled < block.len() {
            let n = self.file.read(&mut block[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        block.truncate(filled);
        let last = self.index + 1 == self.chunks;
        self.index += 1;
        // A short or altered chunk, or a size record that lies about where
        // the end is, fails to open here: never wrong bytes.
        let plain = self.opener.open(&block, last)?;
        let from = std::mem::take(&mut self.skip).min(plain.len());
        let take = ((plain.len() - from) as u64).min(self.left) as usize;
        self.left -= take as u64;
        if take == 0 {
            return Err(CryptoError::Integrity.into());
        }
        Ok(Some(Bytes::copy_from_slice(&plain[from..from + take])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn store(dir: &Path) -> ArtifactStore {
        ArtifactStore::new(dir.to_path_buf(), SecretKey::generate(), 1 << 30).unwrap()
    }

    fn body(data: &[u8], piece: usize) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        let pieces: Vec<Result<Bytes, io::Error>> = data
            .chunks(piece.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(pieces)
    }

    fn t(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn aid(s: &str) -> ArtifactId {
        ArtifactId::parse(s).unwrap()
    }

    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    async fn read_all(s: &ArtifactStore, tenant: &str, id: &str) -> Result<Vec<u8>, String> {
        let (_, stream) = s
            .get(&t(tenant), &aid(id))
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = Box::pin(stream);
        let mut out = Vec::new();
        while let Some(b) = stream.next().await {
            out.extend(b.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn round_trip_sizes_and_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let info = s
                .put(&t("acme"), "f.bin", None, body(&data, 10_000))
                .await
                .unwrap();
            assert_eq!(info.size, len as u64);
            assert_eq!(info.sha256, hex::encode(Sha256::digest(&data)));
            assert_eq!(
                read_all(&s, "acme", &info.artifact_id).await.unwrap(),
                data,
                "len {len}"
            );
            // At rest it is not the plaintext.
            let raw = std::fs::read(s.object_path(&t("acme"), &aid(&info.artifact_id))).unwrap();
            if len > 64 {
                assert!(!raw.windows(64).any(|w| w == &data[..64]));
            }
        }
    }

    async fn read_range(
        s: &ArtifactStore,
        id: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, String> {
        let (_, stream) = s
            .get_range(&t("acme"), &aid(id), start, end)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = Box::pin(stream);
        let mut out = Vec::new();
        while let Some(b) = stream.next().await {
            out.extend(b.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn ranges_read_only_the_chunks_that_hold_them() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let len = 4 * CHUNK + 100;
        let data: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        let info = s
            .put(&t("acme"), "r", None, body(&data, 7_000))
            .await
            .unwrap();
        let id = info.artifact_id.clone();
        let l = len as u64;
        let c = CHUNK as u64;
        for (start, end) in [
            (0, 0),
            (0, l - 1),
            (5, c - 1),
            (c - 3, c + 3),
            (c, 2 * c - 1),
            (c + 17, 3 * c + 5),
            (4 * c, l - 1),
            (l - 1, l - 1),
        ] {
            assert_eq!(
                read_range(&s, &id, start, end).await.unwrap(),
                &data[start as usize..=end as usize],
                "{start}-{end}"
            );
        }
        assert!(matches!(
            s.get_range(&t("acme"), &aid(&id), l, l).await,
            Err(ArtifactError::Range(_))
        ));
        assert!(matches!(
            s.get_range(&t("other"), &aid(&id), 0, 0).await,
            Err(ArtifactError::NotFound)
        ));
        // Alter chunk 1: a range in chunks 2-4 never reads it and is served;
        // a range touching it is an integrity error, never wrong bytes.
        let path = s.object_path(&t("acme"), &aid(&id));
        let mut raw = std::fs::read(&path).unwrap();
        raw[MAGIC.len() + CHUNK + TAG + 9] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(
            read_range(&s, &id, 2 * c, l - 1).await.unwrap(),
            &data[2 * CHUNK..]
        );
        assert!(
            read_range(&s, &id, c + 1, c + 2)
                .await
                .unwrap_err()
                .contains("integrity")
        );
        // A record that lies about the size cannot move where the end is.
        let meta = tmp.path().join(format!("meta/acme/{id}.json"));
        let mut lying: ArtifactInfo =
            serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        lying.size = 3 * c;
        std::fs::write(&meta, serde_json::to_vec(&lying).unwrap()).unwrap();
        assert!(
            read_range(&s, &id, 2 * c, 3 * c - 1)
                .await
                .unwrap_err()
                .contains("integrity")
        );
    }

    #[tokio::test]
    async fn listing_filters_and_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let mut made = Vec::new();
        for i in 0..5 {
            let mut meta = ArtifactMeta {
                job_id: (i % 2 == 0).then(|| "job-even".to_owned()),
                workflow_id: (i == 3).then(|| "wf-3".to_owned()),
                ..ArtifactMeta::default()
            };
            meta.labels.insert("n".into(), i.to_string());
            let info = s
                .put_meta(&t("acme"), "f", &meta, body(b"x", 1))
                .await
                .unwrap();
            made.push(info.artifact_id);
        }
        s.put(&t("other"), "f", None, body(b"y", 1)).await.unwrap();
        made.sort();
        let list = |f: ArtifactFilter| {
            let s = &s;
            async move {
                s.list(&t("acme"), &f)
                    .await
                    .unwrap()
                    .artifacts
                    .into_iter()
                    .map(|a| a.artifact_id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(list(ArtifactFilter::default()).await, made);
        let even = list(ArtifactFilter {
            job_id: Some("job-even".into()),
            ..Default::default()
        })
        .await;
        assert_eq!(even.len(), 3);
        let wf = list(ArtifactFilter {
            workflow_id: Some("wf-3".into()),
            ..Default::default()
        })
        .await;
        assert_eq!(wf.len(), 1);
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("n".to_owned(), "4".to_owned());
        let four = list(ArtifactFilter {
            labels,
            ..Default::default()
        })
        .await;
        assert_eq!(four.len(), 1);
        // Pages of two: 2 + 2 + 1, the cursor set on all but the last.
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = s
                .list(
                    &t("acme"),
                    &ArtifactFilter {
                        limit: Some(2),
                        cursor: cursor.clone(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            pages += 1;
            seen.extend(page.artifacts.into_iter().map(|a| a.artifact_id));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, made);
        assert_eq!(pages, 3);
    }

    #[tokio::test]
    async fn tampering_is_an_integrity_error_never_wrong_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let data = vec![42u8; 2 * CHUNK + 5];
        for offset in [10, 8 + CHUNK + TAG + 3, 8 + 2 * (CHUNK + TAG) + 1] {
            let info = s
                .put(&t("acme"), "f", None, body(&data, CHUNK))
                .await
                .unwrap();
            let path = s.object_path(&t("acme"), &aid(&info.artifact_id));
            let mut raw = std::fs::read(&path).unwrap();
            raw[offset] ^= 0x80;
            std::fs::write(&path, &raw).unwrap();
            let got = read_all(&s, "acme", &info.artifact_id).await;
            assert!(got.unwrap_err().contains("integrity"), "offset {offset}");
        }
        // Truncation (drop the last chunk).
        let info = s
            .put(&t("acme"), "f", None, body(&data, CHUNK))
            .await
            .unwrap();
        let path = s.object_path(&t("acme"), &aid(&info.artifact_id));
        let raw = std::fs::read(&path).unwrap();
        std::fs::write(&path, &raw[..8 + 2 * (CHUNK + TAG)]).unwrap();
        assert!(
            read_all(&s, "acme", &info.artifact_id)
                .await
                .unwrap_err()
                .contains("integrity")
        );
    }

    #[tokio::test]
    async fn delete_shreds_the_key_so_old_ciphertext_stays_sealed() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let data = b"secret report".repeat(1000);
        let info = s
            .put(&t("acme"), "r", Some(&sid("ses-1")), body(&data, 4096))
            .await
            .unwrap();
        let copy = std::fs::read(s.object_path(&t("acme"), &aid(&info.artifact_id))).unwrap();
        assert_eq!(
            s.decrypt_copy(&t("acme"), &aid(&info.artifact_id), &copy)
                .await
                .unwrap(),
            data
        );
        s.delete(&t("acme"), &aid(&info.artifact_id)).await.unwrap();
        let err = s
            .decrypt_copy(&t("acme"), &aid(&info.artifact_id), &copy)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::Crypto(CryptoError::KeyDestroyed)),
            "{err}"
        );
        assert!(matches!(
            s.get(&t("acme"), &aid(&info.artifact_id)).await,
            Err(ArtifactError::NotFound)
        ));
        // Session teardown takes the session's artifacts with it.
        let a = s
            .put(&t("acme"), "a", Some(&sid("ses-2")), body(b"x", 1))
            .await
            .unwrap();
        let b = s
            .put(&t("acme"), "b", Some(&sid("ses-3")), body(b"y", 1))
            .await
            .unwrap();
        assert_eq!(s.delete_session(&t("acme"), "ses-2").await.unwrap(), 1);
        assert!(matches!(
            s.info(&t("acme"), &aid(&a.artifact_id)).await,
            Err(ArtifactError::NotFound)
        ));
        assert!(s.info(&t("acme"), &aid(&b.artifact_id)).await.is_ok());
    }

    #[tokio::test]
    async fn tenants_are_apart_and_limits_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(tmp.path().to_path_buf(), SecretKey::generate(), 1000).unwrap();
        let info = s
            .put(&t("acme"), "a", None, body(b"hello", 2))
            .await
            .unwrap();
        assert!(matches!(
            s.get(&t("globex"), &aid(&info.artifact_id)).await,
            Err(ArtifactError::NotFound)
        ));
        // Files copied into another tenant's place do not open there.
        s.put(&t("globex"), "own", None, body(b"g", 1))
            .await
            .unwrap();
        for (from, to) in [
            (
                format!("objects/acme/{0}", info.artifact_id),
                format!("objects/globex/{0}", info.artifact_id),
            ),
            (
                format!("meta/acme/{0}.json", info.artifact_id),
                format!("meta/globex/{0}.json", info.artifact_id),
            ),
            (
                format!("keys/acme/{0}.dek", info.artifact_id),
                format!("keys/globex/{0}.dek", info.artifact_id),
            ),
        ] {
            std::fs::copy(tmp.path().join(from), tmp.path().join(to)).unwrap();
        }
        // The copied record names its own tenant: not found here.
        assert!(matches!(
            s.get(&t("globex"), &aid(&info.artifact_id)).await,
            Err(ArtifactError::NotFound)
        ));
        // Even with the record rewritten to claim globex, the keys are bound
        // to acme: it does not open.
        let meta = tmp
            .path()
            .join(format!("meta/globex/{0}.json", info.artifact_id));
        let forged = std::fs::read_to_string(&meta)
            .unwrap()
            .replace("\"tenant\":\"acme\"", "\"tenant\":\"globex\"");
        std::fs::write(&meta, forged).unwrap();
        let err = s
            .get(&t("globex"), &aid(&info.artifact_id))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, ArtifactError::Crypto(CryptoError::Integrity)),
            "{err}"
        );
        let err = s
            .put(&t("acme"), "big", None, body(&[0u8; 2000], 100))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge(1000)));
        // Nothing was left of the refused upload.
        let objects = std::fs::read_dir(tmp.path().join("objects/acme"))
            .unwrap()
            .count();
        assert_eq!(objects, 1);
        let keys = std::fs::read_dir(tmp.path().join("keys/acme"))
            .unwrap()
            .count();
        assert_eq!(keys, 2, "the tenant key and one data key");
    }

    #[tokio::test]
    async fn keys_outside_the_id_alphabet_never_reach_the_backend() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        // A readable JSON file outside the store: no key may name it.
        std::fs::write(tmp.path().join("secret.json"), b"{}").unwrap();
        for bad in [
            "../secret",
            "meta/../../secret.json",
            "meta/acme/..",
            "/etc/passwd",
            "meta\\x",
            "meta/a\0b",
            "meta//x",
            "meta/%2e%2e",
        ] {
            let err = s.blobs.read(bad).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(s.blobs.writer(bad).await.is_err(), "{bad}");
            assert!(s.blobs.reader(bad).await.is_err(), "{bad}");
            assert!(s.blobs.create_new(bad, b"x").await.is_err(), "{bad}");
            assert!(s.blobs.list(bad).await.is_err(), "{bad}");
            s.blobs.delete(bad, true).await;
        }
        assert!(tmp.path().join("secret.json").exists());
        assert!(key(&["meta", "..", "x"]).is_err());
        assert!(key(&["meta", "acme", "art-1.json"]).is_ok());
    }

    #[tokio::test]
    async fn names_are_checked_once_for_every_path() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\\b",
            "a\rb",
            "a\nb",
            "\u{1b}[31mred",
            "a\0b",
            "\u{7f}",
            &"x".repeat(256),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
            let err = s
                .put(&t("acme"), bad, None, body(b"x", 1))
                .await
                .unwrap_err();
            assert!(matches!(err, ArtifactError::BadName(_)), "{bad:?}: {err}");
            let fixed = sanitize_name(bad);
            assert!(check_name(&fixed).is_ok(), "{bad:?} -> {fixed:?}");
        }
        for good in ["report.csv", "a b.txt", "données.json", "..hidden", "x..y"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        // Nothing was stored for the refused names.
        assert!(s.blobs.list("meta/acme").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn stored_files_and_folders_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let s = store(&root);
        let info = s
            .put(&t("acme"), "a", None, body(b"hello", 2))
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for f in [
            format!("objects/acme/{}", info.artifact_id),
            format!("meta/acme/{}.json", info.artifact_id),
            format!("keys/acme/{}.dek", info.artifact_id),
            "keys/acme/tenant.key".to_owned(),
        ] {
            assert_eq!(mode(&root.join(&f)), 0o600, "{f}");
        }
        for d in [
            "",
            "objects",
            "meta",
            "keys",
            "objects/acme",
            "meta/acme",
            "keys/acme",
        ] {
            assert_eq!(mode(&root.join(d)), 0o700, "{d:?}");
        }
    }

    #[tokio::test]
    async fn the_tenant_quota_holds_across_uploads_and_frees_on_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let kek = SecretKey::generate();
        let s = ArtifactStore::new(tmp.path().to_path_buf(), kek.clone(), 1 << 20)
            .unwrap()
            .with_tenant_quota(1000);
        let meta = ArtifactMeta::default();
        let first = s
            .put_meta(&t("acme"), "a", &meta, body(&[1; 600], 100))
            .await
            .unwrap();
        // 600 stored: 600 more passes 1000 partway through; nothing of it stays.
        let err = s
            .put_meta(&t("acme"), "b", &meta, body(&[2; 600], 100))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::QuotaExceeded { max: 1000, used } if used >= 600),
            "{err}"
        );
        assert_eq!(s.blobs.list("meta/acme").await.unwrap().len(), 1);
        assert_eq!(s.blobs.list("objects/acme").await.unwrap().len(), 1);
        assert_eq!(s.usage(&t("acme")).await.unwrap(), 600);
        // Another tenant has its own quota.
        s.put_meta(&t("globex"), "g", &meta, body(&[3; 1000], 100))
            .await
            .unwrap();
        // Policy may lower the quota for a request, never raise it.
        assert!(matches!(
            s.put_meta_within(&t("acme"), "c", &meta, Some(700), body(&[4; 200], 100))
                .await,
            Err(ArtifactError::QuotaExceeded { max: 700, .. })
        ));
        assert!(matches!(
            s.put_meta_within(&t("acme"), "d", &meta, Some(1 << 30), body(&[5; 600], 100))
                .await,
            Err(ArtifactError::QuotaExceeded { max: 1000, .. })
        ));
        // A note is counted but never refused.
        s.put_note(&t("acme"), "note", &meta, body(&[6; 500], 100))
            .await
            .unwrap();
        assert_eq!(s.usage(&t("acme")).await.unwrap(), 1100);
        // Deleting frees the bytes.
        s.delete(&t("acme"), &aid(&first.artifact_id))
            .await
            .unwrap();
        assert_eq!(s.usage(&t("acme")).await.unwrap(), 500);
        s.put_meta(&t("acme"), "e", &meta, body(&[7; 500], 100))
            .await
            .unwrap();
        // Another replica over the same store counts what is there.
        let other = ArtifactStore::new(tmp.path().to_path_buf(), kek, 1 << 20)
            .unwrap()
            .with_tenant_quota(1000);
        assert_eq!(other.usage(&t("acme")).await.unwrap(), 1000);
        assert!(matches!(
            other
                .put_meta(&t("acme"), "f", &meta, body(&[8; 1], 1))
                .await,
            Err(ArtifactError::QuotaExceeded { .. })
        ));
    }

    #[tokio::test]
    async fn concurrent_uploads_cannot_pass_the_quota_together() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(tmp.path().to_path_buf(), SecretKey::generate(), 1 << 20)
            .unwrap()
            .with_tenant_quota(10_000);
        let meta = ArtifactMeta::default();
        let runs = (0..8).map(|i| {
            let (s, meta) = (s.clone(), meta.clone());
            async move {
                s.put_meta(&t("acme"), &format!("p{i}"), &meta, body(&[9; 3000], 256))
                    .await
            }
        });
        let results = futures::future::join_all(runs).await;
        let kept: u64 = results.iter().flatten().map(|i| i.size).sum();
        assert!(kept <= 10_000, "{kept} bytes kept past a 10000-byte quota");
        assert!(results.iter().any(Result::is_ok), "none was kept");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(ArtifactError::QuotaExceeded { .. }))),
            "none was refused"
        );
        assert_eq!(s.usage(&t("acme")).await.unwrap(), kept);
    }
}
