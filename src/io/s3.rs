//! All S3 access goes through [`S3`]: listing and reading input objects,
//! and (for outputs) writing them. Credentials come from the standard AWS
//! chain (environment, profile, instance role); an `endpoint` switches to an
//! S3-compatible store (MinIO, s3s-fs) with path-style addressing.

use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;
use tokio::io::AsyncWriteExt;

/// An `s3://bucket/key` URL, a prefix (`s3://bucket/dir/`) or a glob
/// (`s3://bucket/dir/*.csv.gz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url, S3Error> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| S3Error::Url(url.to_string()))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(S3Error::Url(url.to_string()));
        }
        Ok(S3Url { bucket: bucket.to_string(), key: key.to_string() })
    }

    /// The listing prefix: the key up to its first glob character.
    fn prefix(&self) -> &str {
        let end = self.key.find(['*', '?', '[']).unwrap_or(self.key.len());
        &self.key[..end]
    }

    fn is_glob(&self) -> bool {
        self.key.contains(['*', '?', '['])
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{0:?} is not an s3://bucket/key URL")]
    Url(String),
    #[error("{url}: {message}")]
    Call { url: String, message: String },
    /// No object has the key, or none matches the prefix or glob.
    #[error("{url}: no objects match")]
    Empty { url: String },
    #[error("{url}: writing the local copy failed: {source}")]
    Local { url: String, source: std::io::Error },
}

/// An S3 client for one endpoint.
#[derive(Clone, Debug)]
pub struct S3 {
    client: Client,
}

impl S3 {
    /// `endpoint` (or `AWS_ENDPOINT_URL`) selects an S3-compatible store;
    /// `region` falls back to the AWS chain, then `us-east-1`.
    pub async fn connect(endpoint: Option<&str>, region: Option<&str>) -> S3 {
        S3::connect_with(endpoint, region, aws_config::retry::RetryConfig::standard()).await
    }

    /// For writing a job's output, whose calls are already paid for: a
    /// store that goes away is waited for, retrying each request for about
    /// two minutes (10 attempts, exponential backoff with jitter up to 30 s)
    /// before the write fails. Requests are idempotent (PUT, COPY, DELETE of
    /// the commit's own keys), so a retry never doubles anything. Checks and
    /// sources keep the SDK's default three attempts, so a wrong endpoint
    /// fails fast.
    pub async fn connect_patient(endpoint: Option<&str>, region: Option<&str>) -> S3 {
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(10)
            .with_initial_backoff(std::time::Duration::from_secs(2))
            .with_max_backoff(std::time::Duration::from_secs(30));
        S3::connect_with(endpoint, region, retry).await
    }

    async fn connect_with(endpoint: Option<&str>, region: Option<&str>, retry: aws_config::retry::RetryConfig) -> S3 {
        let mut loader = aws_config::from_env().retry_config(retry);
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_string()));
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            conf = conf.region(Region::new("us-east-1"));
        }
        let endpoint = endpoint.map(str::to_string).or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(e) = endpoint {
            conf = conf.endpoint_url(e).force_path_style(true);
        }
        S3 { client: Client::from_conf(conf.build()) }
    }

    /// Wraps a client built elsewhere (tests pass explicit credentials).
    pub fn from_client(client: Client) -> S3 {
        S3 { client }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The objects a URL names, in key order: itself, everything under a
    /// prefix ending in `/`, or the keys matching a glob.
    pub async fn list(&self, url: &S3Url) -> Result<Vec<S3Url>, S3Error> {
        let shown = url.to_string();
        let call = |e: String| S3Error::Call { url: shown.clone(), message: e };
        if !url.is_glob() && !url.key.ends_with('/') && !url.key.is_empty() {
            self.client.head_object().bucket(&url.bucket).key(&url.key).send().await.map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_not_found()) {
                    S3Error::Empty { url: shown.clone() }
                } else {
                    call(aws_sdk_s3::error::DisplayErrorContext(&e).to_string())
                }
            })?;
            return Ok(vec![url.clone()]);
        }
        let pattern = if url.is_glob() {
            Some(glob::Pattern::new(&url.key).map_err(|e| call(format!("bad glob: {e}")))?)
        } else {
            None
        };
        let mut keys = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&url.bucket).prefix(url.prefix()).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| call(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                let wanted = match &pattern {
                    Some(p) => p.matches_with(
                        key,
                        glob::MatchOptions { require_literal_separator: true, ..Default::default() },
                    ),
                    None => !key.ends_with('/'),
                };
                if wanted {
                    keys.push(S3Url { bucket: url.bucket.clone(), key: key.to_string() });
                }
            }
        }
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        if keys.is_empty() {
            return Err(S3Error::Empty { url: shown });
        }
        Ok(keys)
    }

    /// Streams an object to a local file (memory stays flat whatever its size).
    pub async fn download(&self, url: &S3Url, to: &Path) -> Result<u64, S3Error> {
        let shown = url.to_string();
        let obj = self.client.get_object().bucket(&url.bucket).key(&url.key).send().await.map_err(|e| {
            S3Error::Call { url: shown.clone(), message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string() }
        })?;
        let local = |source| S3Error::Local { url: shown.clone(), source };
        let mut file = tokio::fs::File::create(to).await.map_err(local)?;
        let mut body = obj.body;
        let mut n = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| S3Error::Call { url: shown.clone(), message: format!("download cut short: {e}") })?
        {
            n += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.flush().await.map_err(local)?;
        Ok(n)
    }
}

/// Parts of a multipart upload: S3's minimum is 5 MiB; 16 MiB keeps a
/// 1 GB file to about 64 parts and memory to one part.
const PART_SIZE: usize = 16 * 1024 * 1024;

impl S3 {
    fn call_err<E>(url: &S3Url) -> impl Fn(E) -> S3Error + '_
    where
        E: std::error::Error + 'static,
    {
        move |e| S3Error::Call { url: url.to_string(), message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string() }
    }

    /// Every key under a prefix, in key order (empty if none).
    pub async fn keys_under(&self, prefix: &S3Url) -> Result<Vec<String>, S3Error> {
        let mut keys = Vec::new();
        let mut pages =
            self.client.list_objects_v2().bucket(&prefix.bucket).prefix(&prefix.key).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(Self::call_err(prefix))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
        }
        keys.sort();
        Ok(keys)
    }

    /// A small object's bytes, or `None` if there is no such object.
    pub async fn get_bytes(&self, url: &S3Url) -> Result<Option<Vec<u8>>, S3Error> {
        let got = self.client.get_object().bucket(&url.bucket).key(&url.key).send().await;
        let object = match got {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(Self::call_err(url)(e)),
        };
        let body =
            object.body.collect().await.map_err(|e| S3Error::Call { url: url.to_string(), message: e.to_string() })?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// Uploads a small object in one PUT.
    pub async fn put_bytes(&self, url: &S3Url, body: Vec<u8>) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .body(body.into())
            .send()
            .await
            .map_err(Self::call_err(url))?;
        Ok(())
    }

    /// Uploads a local file. Large files go up in parts, so the object
    /// appears whole when the upload completes (or not at all: a failed
    /// upload is aborted), with one part in memory at a time.
    pub async fn upload_file(&self, from: &Path, url: &S3Url) -> Result<u64, S3Error> {
        use tokio::io::AsyncReadExt;
        let local = |source| S3Error::Local { url: url.to_string(), source };
        let size = tokio::fs::metadata(from).await.map_err(local)?.len();
        if size <= PART_SIZE as u64 {
            self.put_bytes(url, tokio::fs::read(from).await.map_err(local)?).await?;
            return Ok(size);
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
            .map_err(Self::call_err(url))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        let parts = async {
            let mut file = tokio::fs::File::open(from).await.map_err(local)?;
            let mut parts = Vec::new();
            for number in 1.. {
                let mut buf = Vec::with_capacity(PART_SIZE);
                (&mut file).take(PART_SIZE as u64).read_to_end(&mut buf).await.map_err(local)?;
                if buf.is_empty() {
                    break;
                }
                let part = self
                    .client
                    .upload_part()
                    .bucket(&url.bucket)
                    .key(&url.key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(buf.into())
                    .send()
                    .await
                    .map_err(Self::call_err(url))?;
                parts.push(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .build(),
                );
            }
            Ok::<_, S3Error>(parts)
        }
        .await;
        let completed = match parts {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&url.bucket)
                .key(&url.key)
                .upload_id(&upload_id)
                .multipart_upload(aws_sdk_s3::types::CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map_err(Self::call_err(url)),
            Err(e) => Err(e),
        };
        if let Err(e) = completed {
            // Leave no invisible parts behind to be billed for.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&url.bucket)
                .key(&url.key)
                .upload_id(&upload_id)
                .send()
                .await;
            return Err(e);
        }
        Ok(size)
    }

    /// Server-side copy within a bucket (objects up to 5 GB).
    pub async fn copy(&self, from: &S3Url, to: &S3Url) -> Result<(), S3Error> {
        self.client
            .copy_object()
            .bucket(&to.bucket)
            .key(&to.key)
            .copy_source(copy_source(from))
            .send()
            .await
            .map_err(Self::call_err(from))?;
        Ok(())
    }

    /// Deletes objects; a key that is already gone is not an error.
    pub async fn delete(&self, url: &S3Url) -> Result<(), S3Error> {
        self.client.delete_object().bucket(&url.bucket).key(&url.key).send().await.map_err(Self::call_err(url))?;
        Ok(())
    }
}

/// `bucket/key` for CopyObject, percent-encoded as S3 requires (`dt=...`
/// partitions hold `=`).
fn copy_source(from: &S3Url) -> String {
    let mut out = format!("{}/", from.bucket);
    for b in from.key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_key_and_listing_prefix() {
        let u = S3Url::parse("s3://fleet/exports/2026-*/part-*.csv.gz").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix()), ("fleet", "exports/2026-"));
        assert!(u.is_glob());
        let u = S3Url::parse("s3://fleet/exports/").unwrap();
        assert_eq!(u.prefix(), "exports/");
        assert!(S3Url::parse("https://x/y").is_err());
        assert!(S3Url::parse("s3:///y").is_err());
    }
}
