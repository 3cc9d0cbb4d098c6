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

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use shared::dataplane::ArtifactInfo;
use tokio::io::AsyncReadExt;

use super::blobs::Blobs;
use super::crypto::{CHUNK, CryptoError, MAGIC, Opener, Sealer, SecretKey, TAG};

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
}

/// Encrypted artifacts over a [`Blobs`] backend.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    blobs: Blobs,
    kek: SecretKey,
    max_bytes: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn object_key(tenant: &str, id: &str) -> String {
    format!("objects/{tenant}/{id}")
}

fn meta_key(tenant: &str, id: &str) -> String {
    format!("meta/{tenant}/{id}.json")
}

fn dek_key(tenant: &str, id: &str) -> String {
    format!("keys/{tenant}/{id}.dek")
}

impl ArtifactStore {
    /// A store on the local filesystem under `root`.
    pub fn new(root: PathBuf, kek: SecretKey, max_bytes: u64) -> io::Result<Self> {
        for d in ["objects", "meta", "keys"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(ArtifactStore {
            blobs: Blobs::Fs { root },
            kek,
            max_bytes,
        })
    }

    /// A store on any backend.
    pub fn with_blobs(blobs: Blobs, kek: SecretKey, max_bytes: u64) -> Self {
        ArtifactStore {
            blobs,
            kek,
            max_bytes,
        }
    }

    /// The tenant's key, created on first use (exclusively, so concurrent
    /// first uploads agree on one key).
    async fn tenant_key(&self, tenant: &str) -> Result<SecretKey, ArtifactError> {
        let key = format!("keys/{tenant}/tenant.key");
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

    async fn data_key(&self, tenant: &str, id: &str) -> Result<SecretKey, ArtifactError> {
        let wrapped = self
            .blobs
            .read(&dek_key(tenant, id))
            .await?
            .ok_or(CryptoError::KeyDestroyed)?;
        let tk = self.tenant_key(tenant).await?;
        Ok(tk.unwrap_key(&wrapped, &format!("artifact:{tenant}/{id}"))?)
    }

    /// Stores a stream as a new artifact. On any failure nothing remains.
    pub async fn put<S, E>(
        &self,
        tenant: &str,
        name: &str,
        session_id: Option<&str>,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let id = format!("art-{}", hex::encode(rand::random::<[u8; 12]>()));
        let result = self.put_inner(&id, tenant, name, session_id, body).await;
        if result.is_err() {
            self.remove_all(tenant, &id).await;
        }
        result
    }

    async fn put_inner<S, E>(
        &self,
        id: &str,
        tenant: &str,
        name: &str,
        session_id: Option<&str>,
        mut body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tk = self.tenant_key(tenant).await?;
        let dek = SecretKey::generate();
        self.blobs
            .create_new(
                &dek_key(tenant, id),
                &tk.wrap(&dek, &format!("artifact:{tenant}/{id}")),
            )
            .await?;
        let mut out = self.blobs.writer(&object_key(tenant, id)).await?;
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
            artifact_id: id.to_owned(),
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            session_id: session_id.map(str::to_owned),
            size,
            sha256,
            created_at_ms: now_ms(),
        };
        let meta = serde_json::to_vec(&info).map_err(io::Error::other)?;
        self.blobs.create_new(&meta_key(tenant, id), &meta).await?;
        Ok(info)
    }

    /// An artifact's metadata (another tenant's is simply not found).
    pub async fn info(&self, tenant: &str, id: &str) -> Result<ArtifactInfo, ArtifactError> {
        let bytes = self
            .blobs
            .read(&meta_key(tenant, id))
            .await?
            .ok_or(ArtifactError::NotFound)?;
        serde_json::from_slice(&bytes).map_err(|e| ArtifactError::Io(io::Error::other(e)))
    }

    /// Opens an artifact for streaming. The first chunk is checked before
    /// this returns, so a tampered small artifact is a coded error, not a
    /// broken stream; later chunks are checked before they are sent.
    pub async fn get(
        &self,
        tenant: &str,
        id: &str,
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
            .reader(&object_key(tenant, id))
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

    /// Destroys the artifact's data key (on `fs` overwritten, then removed) and its object.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ArtifactError> {
        self.info(tenant, id).await?;
        self.remove_all(tenant, id).await;
        Ok(())
    }

    /// Deletes every artifact of a session (session teardown).
    pub async fn delete_session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<usize, ArtifactError> {
        let mut n = 0;
        for name in self.blobs.list(&format!("meta/{tenant}")).await? {
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if let Ok(info) = self.info(tenant, id).await
                && info.session_id.as_deref() == Some(session_id)
            {
                self.remove_all(tenant, id).await;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn remove_all(&self, tenant: &str, id: &str) {
        // The key first: once it is gone, what remains is noise.
        self.blobs.delete(&dek_key(tenant, id), true).await;
        self.blobs.delete(&object_key(tenant, id), false).await;
        self.blobs.delete(&meta_key(tenant, id), false).await;
    }

    /// Decrypts a copy of an object's bytes with the keys the store has now
    /// (what an attacker holding old ciphertext could do with them).
    pub async fn decrypt_copy(
        &self,
        tenant: &str,
        id: &str,
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
    pub async fn raw_object(&self, tenant: &str, id: &str) -> Result<Vec<u8>, ArtifactError> {
        self.blobs
            .read(&object_key(tenant, id))
            .await?
            .ok_or(ArtifactError::NotFound)
    }

    /// Path of an artifact's object on the `fs` backend (tests alter it).
    pub fn object_path(&self, tenant: &str, id: &str) -> PathBuf {
        match &self.blobs {
            Blobs::Fs { root } => root.join(object_key(tenant, id)),
            Blobs::S3 { .. } => PathBuf::new(),
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

    async fn read_all(s: &ArtifactStore, tenant: &str, id: &str) -> Result<Vec<u8>, String> {
        let (_, stream) = s.get(tenant, id).await.map_err(|e| e.to_string())?;
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
                .put("acme", "f.bin", None, body(&data, 10_000))
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
            let raw = std::fs::read(s.object_path("acme", &info.artifact_id)).unwrap();
            if len > 64 {
                assert!(!raw.windows(64).any(|w| w == &data[..64]));
            }
        }
    }

    #[tokio::test]
    async fn tampering_is_an_integrity_error_never_wrong_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let data = vec![42u8; 2 * CHUNK + 5];
        for offset in [10, 8 + CHUNK + TAG + 3, 8 + 2 * (CHUNK + TAG) + 1] {
            let info = s.put("acme", "f", None, body(&data, CHUNK)).await.unwrap();
            let path = s.object_path("acme", &info.artifact_id);
            let mut raw = std::fs::read(&path).unwrap();
            raw[offset] ^= 0x80;
            std::fs::write(&path, &raw).unwrap();
            let got = read_all(&s, "acme", &info.artifact_id).await;
            assert!(got.unwrap_err().contains("integrity"), "offset {offset}");
        }
        // Truncation (drop the last chunk).
        let info = s.put("acme", "f", None, body(&data, CHUNK)).await.unwrap();
        let path = s.object_path("acme", &info.artifact_id);
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
            .put("acme", "r", Some("ses-1"), body(&data, 4096))
            .await
            .unwrap();
        let copy = std::fs::read(s.object_path("acme", &info.artifact_id)).unwrap();
        assert_eq!(
            s.decrypt_copy("acme", &info.artifact_id, &copy)
                .await
                .unwrap(),
            data
        );
        s.delete("acme", &info.artifact_id).await.unwrap();
        let err = s
            .decrypt_copy("acme", &info.artifact_id, &copy)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::Crypto(CryptoError::KeyDestroyed)),
            "{err}"
        );
        assert!(matches!(
            s.get("acme", &info.artifact_id).await,
            Err(ArtifactError::NotFound)
        ));
        // Session teardown takes the session's artifacts with it.
        let a = s
            .put("acme", "a", Some("ses-2"), body(b"x", 1))
            .await
            .unwrap();
        let b = s
            .put("acme", "b", Some("ses-3"), body(b"y", 1))
            .await
            .unwrap();
        assert_eq!(s.delete_session("acme", "ses-2").await.unwrap(), 1);
        assert!(matches!(
            s.info("acme", &a.artifact_id).await,
            Err(ArtifactError::NotFound)
        ));
        assert!(s.info("acme", &b.artifact_id).await.is_ok());
    }

    #[tokio::test]
    async fn tenants_are_apart_and_limits_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ArtifactStore::new(tmp.path().to_path_buf(), SecretKey::generate(), 1000).unwrap();
        let info = s.put("acme", "a", None, body(b"hello", 2)).await.unwrap();
        assert!(matches!(
            s.get("globex", &info.artifact_id).await,
            Err(ArtifactError::NotFound)
        ));
        // Files copied into another tenant's place do not open there.
        s.put("globex", "own", None, body(b"g", 1)).await.unwrap();
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
        let err = s.get("globex", &info.artifact_id).await.err().unwrap();
        assert!(
            matches!(err, ArtifactError::Crypto(CryptoError::Integrity)),
            "{err}"
        );
        let err = s
            .put("acme", "big", None, body(&[0u8; 2000], 100))
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
}
