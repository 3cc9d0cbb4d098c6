//! Where artifact bytes and key files live: a local filesystem or an S3
//! bucket (`ARTIFACT_STORE=fs|s3`). Keys are `/`-separated names under the
//! root or the bucket prefix; objects are written and read as streams
//! (S3: multipart uploads of 8 MiB parts), so nothing holds a whole object.

use std::io;
use std::path::PathBuf;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::io::{AsyncRead, AsyncWriteExt};

/// S3 part size (the protocol's minimum is 5 MiB).
const PART: usize = 8 * 1024 * 1024;

/// The storage backend.
#[derive(Debug, Clone)]
pub enum Blobs {
    Fs {
        root: PathBuf,
    },
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
}

fn s3_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("s3: {e}"))
}

/// Creates `dir` and its missing parents with mode 0700 (the store's
/// directories are private to the data plane's user).
pub fn private_dir_all(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

async fn private_dir_all_async(dir: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(move || private_dir_all(&dir))
        .await
        .map_err(io::Error::other)?
}

/// Refuses a key that could leave its prefix (the second line behind the
/// typed ids): every `/`-separated part must be in the id alphabet, so no
/// `..`, empty part, leading `/`, `\`, NUL or percent sign ever reaches the
/// filesystem or the bucket.
fn checked(key: &str) -> io::Result<&str> {
    let parts: Vec<&str> = key.split('/').collect();
    match shared::ids::storage_key(&parts) {
        Ok(_) => Ok(key),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e.0)),
    }
}

impl Blobs {
    fn path(root: &std::path::Path, key: &str) -> io::Result<PathBuf> {
        Ok(root.join(checked(key)?))
    }

    fn s3_key(prefix: &str, key: &str) -> io::Result<String> {
        Ok(format!("{prefix}{}", checked(key)?))
    }

    /// An S3 object's body, `None` if the key does not exist.
    async fn get_object(
        client: &aws_sdk_s3::Client,
        bucket: &str,
        key: String,
    ) -> io::Result<Option<ByteStream>> {
        match client.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.body)),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => Ok(None),
            Err(e) => Err(s3_err(aws_sdk_s3::error::DisplayErrorContext(e))),
        }
    }

    /// The bytes of a small blob (metadata, wrapped keys), `None` if absent.
    pub async fn read(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        match self {
            Blobs::Fs { root } => match tokio::fs::read(Self::path(root, key)?).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => match Self::get_object(client, bucket, Self::s3_key(prefix, key)?).await? {
                Some(body) => Ok(Some(
                    body.collect().await.map_err(s3_err)?.into_bytes().to_vec(),
                )),
                None => Ok(None),
            },
        }
    }

    /// Writes a small blob that must not exist yet: `Ok(false)` if it does.
    pub async fn create_new(&self, key: &str, data: &[u8]) -> io::Result<bool> {
        match self {
            Blobs::Fs { root } => {
                let path = Self::path(root, key)?;
                if let Some(dir) = path.parent() {
                    private_dir_all_async(dir.to_path_buf()).await?;
                }
                let opened = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .await;
                let mut f = match opened {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                    Err(e) => return Err(e),
                };
                f.write_all(data).await?;
                f.sync_all().await?;
                Ok(true)
            }
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => {
                // A conditional write (If-None-Match: *): the first writer wins.
                let put = client
                    .put_object()
                    .bucket(bucket)
                    .key(Self::s3_key(prefix, key)?)
                    .if_none_match("*")
                    .body(ByteStream::from(data.to_vec()))
                    .send()
                    .await;
                match put {
                    Ok(_) => Ok(true),
                    Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {
                        Ok(false)
                    }
                    Err(e) => Err(s3_err(aws_sdk_s3::error::DisplayErrorContext(e))),
                }
            }
        }
    }

    /// Deletes a blob; for a key file on `fs`, overwrites it first.
    pub async fn delete(&self, key: &str, shred: bool) {
        match self {
            Blobs::Fs { root } => {
                let Ok(path) = Self::path(root, key) else {
                    return;
                };
                if shred
                    && let Ok(meta) = tokio::fs::metadata(&path).await
                    && let Ok(mut f) = tokio::fs::OpenOptions::new().write(true).open(&path).await
                {
                    let _ = f.write_all(&vec![0u8; meta.len() as usize]).await;
                    let _ = f.sync_all().await;
                }
                let _ = tokio::fs::remove_file(&path).await;
            }
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => {
                let Ok(key) = Self::s3_key(prefix, key) else {
                    return;
                };
                let _ = client.delete_object().bucket(bucket).key(key).send().await;
            }
        }
    }

    /// Names (relative to `dir`) of the blobs directly under `dir`.
    pub async fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        match self {
            Blobs::Fs { root } => {
                let mut out = Vec::new();
                let Ok(mut entries) = tokio::fs::read_dir(Self::path(root, dir)?).await else {
                    return Ok(out);
                };
                while let Some(e) = entries.next_entry().await? {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
                Ok(out)
            }
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => {
                let full = format!("{}/", Self::s3_key(prefix, dir)?);
                let mut out = Vec::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&full)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page =
                        page.map_err(|e| s3_err(aws_sdk_s3::error::DisplayErrorContext(e)))?;
                    for obj in page.contents() {
                        if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&full)) {
                            out.push(k.to_owned());
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// A streaming writer for a new object.
    pub async fn writer(&self, key: &str) -> io::Result<BlobWriter> {
        match self {
            Blobs::Fs { root } => {
                let path = Self::path(root, key)?;
                if let Some(dir) = path.parent() {
                    private_dir_all_async(dir.to_path_buf()).await?;
                }
                // Ciphertext, but still nobody else's business: 0600.
                let file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .await?;
                Ok(BlobWriter::Fs {
                    out: tokio::io::BufWriter::with_capacity(256 * 1024, file),
                    path,
                })
            }
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => Ok(BlobWriter::S3 {
                client: client.clone(),
                bucket: bucket.clone(),
                key: Self::s3_key(prefix, key)?,
                upload_id: None,
                parts: Vec::new(),
                buf: Vec::with_capacity(PART),
            }),
        }
    }

    /// A streaming reader of an object.
    pub async fn reader(&self, key: &str) -> io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        match self {
            Blobs::Fs { root } => match tokio::fs::File::open(Self::path(root, key)?).await {
                Ok(f) => Ok(Some(Box::new(f))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => Ok(Self::get_object(client, bucket, Self::s3_key(prefix, key)?)
                .await?
                .map(|body| Box::new(body.into_async_read()) as Box<dyn AsyncRead + Send + Unpin>)),
        }
    }
}

impl Blobs {
    /// A streaming reader of an object from byte `offset` on (a ranged
    /// download seeks to its first encrypted chunk): `None` if absent.
    pub async fn reader_at(
        &self,
        key: &str,
        offset: u64,
    ) -> io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        match self {
            Blobs::Fs { root } => match tokio::fs::File::open(Self::path(root, key)?).await {
                Ok(mut f) => {
                    use tokio::io::AsyncSeekExt;
                    f.seek(io::SeekFrom::Start(offset)).await?;
                    Ok(Some(Box::new(f)))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Blobs::S3 {
                client,
                bucket,
                prefix,
            } => {
                let sent = client
                    .get_object()
                    .bucket(bucket)
                    .key(Self::s3_key(prefix, key)?)
                    .range(format!("bytes={offset}-"))
                    .send()
                    .await;
                match sent {
                    Ok(out) => Ok(Some(Box::new(out.body.into_async_read()))),
                    Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => {
                        Ok(None)
                    }
                    Err(e) => Err(s3_err(aws_sdk_s3::error::DisplayErrorContext(e))),
                }
            }
        }
    }
}

/// Writes one object as a stream.
pub enum BlobWriter {
    Fs {
        out: tokio::io::BufWriter<tokio::fs::File>,
        path: PathBuf,
    },
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        key: String,
        upload_id: Option<String>,
        parts: Vec<CompletedPart>,
        buf: Vec<u8>,
    },
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            BlobWriter::Fs { out, .. } => out.write_all(data).await,
            BlobWriter::S3 { buf, .. } => {
                buf.extend_from_slice(data);
                if buf.len() >= PART {
                    self.upload_part().await?;
                }
                Ok(())
            }
        }
    }

    async fn upload_part(&mut self) -> io::Result<()> {
        let BlobWriter::S3 {
            client,
            bucket,
            key,
            upload_id,
            parts,
            buf,
        } = self
        else {
            return Ok(());
        };
        if upload_id.is_none() {
            let created = client
                .create_multipart_upload()
                .bucket(bucket.as_str())
                .key(key.as_str())
                .send()
                .await
                .map_err(|e| s3_err(aws_sdk_s3::error::DisplayErrorContext(e)))?;
            *upload_id = created.upload_id().map(str::to_owned);
        }
        let number = i32::try_from(parts.len() + 1).map_err(s3_err)?;
        let body = std::mem::replace(buf, Vec::with_capacity(PART));
        let out = client
            .upload_part()
            .bucket(bucket.as_str())
            .key(key.as_str())
            .upload_id(upload_id.clone().unwrap_or_default())
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_err(aws_sdk_s3::error::DisplayErrorContext(e)))?;
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build(),
        );
        Ok(())
    }

    /// Makes the object durable and visible.
    pub async fn finish(mut self) -> io::Result<()> {
        match &mut self {
            BlobWriter::Fs { out, .. } => {
                out.flush().await?;
                out.get_mut().sync_all().await
            }
            BlobWriter::S3 {
                upload_id: None,
                client,
                bucket,
                key,
                buf,
                ..
            } => {
                // Small enough for one request.
                client
                    .put_object()
                    .bucket(bucket.as_str())
                    .key(key.as_str())
                    .body(ByteStream::from(std::mem::take(buf)))
                    .send()
                    .await
                    .map_err(|e| s3_err(aws_sdk_s3::error::DisplayErrorContext(e)))?;
                Ok(())
            }
            BlobWriter::S3 { .. } => {
                self.upload_part().await?;
                let BlobWriter::S3 {
                    client,
                    bucket,
                    key,
                    upload_id,
                    parts,
                    ..
                } = self
                else {
                    return Ok(());
                };
                client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id.unwrap_or_default())
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| s3_err(aws_sdk_s3::error::DisplayErrorContext(e)))?;
                Ok(())
            }
        }
    }

    /// Throws the partial object away.
    pub async fn abort(self) {
        match self {
            BlobWriter::Fs { out, path } => {
                drop(out);
                let _ = tokio::fs::remove_file(path).await;
            }
            BlobWriter::S3 {
                client,
                bucket,
                key,
                upload_id: Some(id),
                ..
            } => {
                let _ = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await;
            }
            BlobWriter::S3 { .. } => {}
        }
    }
}
