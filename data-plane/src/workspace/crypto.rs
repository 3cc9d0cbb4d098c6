//! Encryption at rest for artifacts.
//!
//! Keys: a key-encryption key (KEK, from `ARTIFACT_KEK`) wraps one key per
//! tenant; the tenant key wraps one data key per artifact. Wrapping is
//! AES-256-GCM with a random nonce and the key's owner as associated data, so
//! a wrapped key moved to another tenant or artifact does not open.
//!
//! Objects: a STREAM-style chunked AES-256-GCM. Each 64 KiB chunk is sealed
//! with the artifact's data key and a nonce made of the chunk index and a
//! last-chunk flag; the artifact id is associated data. Reordered, dropped,
//! truncated or appended chunks fail to open: tampering is an integrity
//! error, never wrong bytes. Nothing ever holds a whole object in memory.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// AES-GCM tag length.
pub const TAG: usize = 16;
/// Object header: magic and format version.
pub const MAGIC: &[u8; 8] = b"SAXART01";

/// Failures of the crypto layer (never the key or plaintext itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("integrity check failed: the data was altered or belongs elsewhere")]
    Integrity,
    #[error("the key material is gone (deleted: crypto-shredded)")]
    KeyDestroyed,
    #[error("malformed key: {0}")]
    BadKey(String),
}

/// A 256-bit AES key.
#[derive(Clone)]
pub struct SecretKey(Key<Aes256Gcm>);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        SecretKey(rand::random::<[u8; 32]>().into())
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CryptoError::BadKey(format!("{} bytes, expected 32", bytes.len())))?;
        Ok(SecretKey(arr.into()))
    }

    /// 64 hex characters or standard/URL-safe base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        use base64::Engine;
        let t = text.trim();
        let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(t).map_err(|e| CryptoError::BadKey(e.to_string()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
                .map_err(|_| CryptoError::BadKey("not 64 hex characters or base64".into()))?
        };
        Self::from_bytes(&bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_slice())
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0)
    }

    /// Wraps `key` for `owner` (associated data): nonce || ciphertext.
    pub fn wrap(&self, key: &SecretKey, owner: &str) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.0.as_slice(),
                    aad: owner.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Seals a short secret (a token) for `owner`: hex of nonce || ciphertext.
    pub fn seal_secret(&self, secret: &str, owner: &str) -> String {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: owner.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        hex::encode(out)
    }

    /// Seals a record at rest (a saved job result) for `owner`, the
    /// associated data (`job:{tenant}/{id}`): nonce || ciphertext.
    pub fn seal_record(&self, plain: &[u8], owner: &str) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: owner.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`SecretKey::seal_record`] sealed for the same owner; a
    /// record moved to another owner or altered is an integrity error.
    pub fn open_record(&self, sealed: &[u8], owner: &str) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < 12 + TAG {
            return Err(CryptoError::Integrity);
        }
        let (nonce, ct) = sealed.split_at(12);
        self.cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Integrity)
    }

    /// Opens what [`SecretKey::seal_secret`] sealed for the same owner.
    pub fn open_secret(&self, sealed: &str, owner: &str) -> Result<String, CryptoError> {
        let bytes = hex::decode(sealed).map_err(|_| CryptoError::Integrity)?;
        if bytes.len() < 12 + TAG {
            return Err(CryptoError::Integrity);
        }
        let (nonce, ct) = bytes.split_at(12);
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Integrity)?;
        String::from_utf8(plain).map_err(|_| CryptoError::Integrity)
    }

    /// Opens a key wrapped by [`SecretKey::wrap`] for the same owner.
    pub fn unwrap_key(&self, wrapped: &[u8], owner: &str) -> Result<SecretKey, CryptoError> {
        if wrapped.len() != 12 + 32 + TAG {
            return Err(CryptoError::Integrity);
        }
        let (nonce, sealed) = wrapped.split_at(12);
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Integrity)?;
        SecretKey::from_bytes(&plain)
    }
}

fn chunk_nonce(index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[8] = u8::from(last);
    n
}

/// Seals an object chunk by chunk.
pub struct Sealer {
    cipher: Aes256Gcm,
    aad: Vec<u8>,
    index: u64,
}

impl Sealer {
    pub fn new(key: &SecretKey, artifact_id: &str) -> Self {
        Sealer {
            cipher: key.cipher(),
            aad: artifact_id.as_bytes().to_vec(),
            index: 0,
        }
    }

    /// Seals the next chunk (`CHUNK` bytes, or fewer when `last`).
    pub fn seal(&mut self, plain: &[u8], last: bool) -> Vec<u8> {
        let nonce = chunk_nonce(self.index, last);
        self.index += 1;
        self.cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &self.aad,
                },
            )
            .unwrap_or_default()
    }
}

/// Opens an object chunk by chunk.
pub struct Opener {
    cipher: Aes256Gcm,
    aad: Vec<u8>,
    index: u64,
}

impl Opener {
    pub fn new(key: &SecretKey, artifact_id: &str) -> Self {
        Opener {
            cipher: key.cipher(),
            aad: artifact_id.as_bytes().to_vec(),
            index: 0,
        }
    }

    /// An opener positioned at chunk `index` (a ranged read starts there:
    /// the chunk's nonce is its index, so any chunk opens on its own).
    pub fn at(key: &SecretKey, artifact_id: &str, index: u64) -> Self {
        let mut o = Self::new(key, artifact_id);
        o.index = index;
        o
    }

    /// Opens the next sealed chunk; `last` says whether the stream ends here.
    pub fn open(&mut self, sealed: &[u8], last: bool) -> Result<Vec<u8>, CryptoError> {
        let nonce = chunk_nonce(self.index, last);
        self.index += 1;
        self.cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: sealed,
                    aad: &self.aad,
                },
            )
            .map_err(|_| CryptoError::Integrity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal_all(key: &SecretKey, id: &str, data: &[u8]) -> Vec<Vec<u8>> {
        let mut s = Sealer::new(key, id);
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(CHUNK).collect()
        };
        let n = chunks.len();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| s.seal(c, i + 1 == n))
            .collect()
    }

    fn open_all(key: &SecretKey, id: &str, sealed: &[Vec<u8>]) -> Result<Vec<u8>, CryptoError> {
        let mut o = Opener::new(key, id);
        let mut out = Vec::new();
        for (i, c) in sealed.iter().enumerate() {
            out.extend(o.open(c, i + 1 == sealed.len())?);
        }
        Ok(out)
    }

    #[test]
    fn round_trip_and_every_tampering_fails() {
        let key = SecretKey::generate();
        let data: Vec<u8> = (0..(3 * CHUNK + 100)).map(|i| (i % 251) as u8).collect();
        let sealed = seal_all(&key, "a1", &data);
        assert_eq!(open_all(&key, "a1", &sealed).unwrap(), data);
        // A flipped bit.
        let mut bad = sealed.clone();
        bad[1][10] ^= 1;
        assert_eq!(open_all(&key, "a1", &bad), Err(CryptoError::Integrity));
        // Reordered chunks.
        let mut bad = sealed.clone();
        bad.swap(0, 1);
        assert_eq!(open_all(&key, "a1", &bad), Err(CryptoError::Integrity));
        // Truncated: the new last chunk was not sealed as last.
        assert_eq!(
            open_all(&key, "a1", &sealed[..2]),
            Err(CryptoError::Integrity)
        );
        // Another artifact's id, another key.
        assert_eq!(open_all(&key, "a2", &sealed), Err(CryptoError::Integrity));
        assert_eq!(
            open_all(&SecretKey::generate(), "a1", &sealed),
            Err(CryptoError::Integrity)
        );
        // Empty objects work too.
        let empty = seal_all(&key, "e", &[]);
        assert_eq!(open_all(&key, "e", &empty).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn wrapped_keys_open_only_for_their_owner() {
        let kek = SecretKey::generate();
        let dek = SecretKey::generate();
        let wrapped = kek.wrap(&dek, "artifact:a1");
        assert_eq!(
            kek.unwrap_key(&wrapped, "artifact:a1").unwrap().to_hex(),
            dek.to_hex()
        );
        assert!(kek.unwrap_key(&wrapped, "artifact:a2").is_err());
        assert!(
            SecretKey::generate()
                .unwrap_key(&wrapped, "artifact:a1")
                .is_err()
        );
    }

    #[test]
    fn sealed_secrets_open_only_for_their_owner() {
        let k = SecretKey::generate();
        let sealed = k.seal_secret("tok-123", "session:s1");
        assert!(!sealed.contains("tok-123"));
        assert_eq!(k.open_secret(&sealed, "session:s1").unwrap(), "tok-123");
        assert!(k.open_secret(&sealed, "session:s2").is_err());
    }

    #[test]
    fn key_parsing() {
        let k = SecretKey::generate();
        assert_eq!(SecretKey::parse(&k.to_hex()).unwrap().to_hex(), k.to_hex());
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(SecretKey::parse(&b64).is_ok());
        assert!(SecretKey::parse("short").is_err());
    }
}
