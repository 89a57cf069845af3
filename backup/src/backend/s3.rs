//! The S3 backend, through the `object_store` crate. Async inside, blocking
//! outside: a private current-thread tokio runtime drives every call, so the
//! rest of the crate never sees a future.
//!
//! A PUT is atomic on S3 (an object appears whole or not at all) and durable
//! once acknowledged, which is the [`Backend::put`] contract. S3 has no locks
//! and no way to refresh an object's time but to rewrite it, so
//! [`Backend::touch`] rewrites and [`Backend::lock`] excludes nothing; the
//! window that leaves between GC's listing and its delete is described in
//! docs/BACKUP.md. Last-modified times have one-second resolution, hence
//! [`S3Backend::CLOCK_SLACK`].

use std::time::{Duration, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutPayload};
use tokio::runtime::Runtime;

use super::{check_key, Backend, BackendError, LockMode, ObjectInfo, RepoLock};

/// Where an S3 repository lives and how to reach it. Fields left `None` are
/// taken from the `AWS_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside the bucket (no leading or trailing `/`); may be
    /// empty.
    pub prefix: String,
    /// A custom endpoint (an S3-compatible server), e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// The region.
    pub region: Option<String>,
    /// The access key id.
    pub access_key_id: Option<String>,
    /// The secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain HTTP (a local test server).
    pub allow_http: bool,
}

impl S3Config {
    /// Parses `BUCKET/PREFIX` (the part after `s3://`); everything else comes
    /// from the environment.
    pub fn from_url_and_env(rest: &str) -> Result<S3Config, BackendError> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BackendError::InvalidLocation {
                location: format!("s3://{rest}"),
                reason: "no bucket".into(),
            });
        }
        // object_store reads AWS_ALLOW_HTTP too, but the builder's
        // with_allow_http would override it: a local S3-compatible server
        // named by AWS_ENDPOINT=http://… needs it from here.
        let allow_http = std::env::var("AWS_ALLOW_HTTP")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Ok(S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            allow_http,
            ..S3Config::default()
        })
    }
}

/// A repository in an S3 bucket.
#[derive(Debug)]
pub struct S3Backend {
    store: AmazonS3,
    prefix: String,
    runtime: Runtime,
}

fn store_err(op: &'static str, key: &str, e: object_store::Error) -> BackendError {
    BackendError::Store {
        op,
        key: key.to_owned(),
        message: e.to_string(),
    }
}

/// PUTs one batch keeps in flight. Each waits a round trip for the store's
/// answer, so a batch of small chunks stored one after another is bound by
/// latency, not bandwidth (16,384 requests per GiB at 64 KiB chunks). 16
/// is what common S3 clients default to (the AWS CLI's
/// `max_concurrent_requests` is 10, rclone's `--transfers` 4 × 4 parts).
const PUT_CONCURRENCY: usize = 16;

impl S3Backend {
    /// How much later than its true time an S3 object's last-modified may
    /// read: S3 reports whole seconds. GC adds this to its margin.
    pub const CLOCK_SLACK: Duration = Duration::from_secs(2);

    /// Connects to the bucket `config` names.
    pub fn new(config: S3Config) -> Result<S3Backend, BackendError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(id) = &config.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let location = format!("s3://{}/{}", config.bucket, config.prefix);
        let invalid = |reason: String| BackendError::InvalidLocation {
            location: location.clone(),
            reason,
        };
        let store = builder.build().map_err(|e| invalid(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("tokio runtime: {e}")))?;
        Ok(S3Backend {
            store,
            prefix: config.prefix,
            runtime,
        })
    }

    fn path(&self, key: &str) -> Result<Path, BackendError> {
        check_key(key)?;
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        Path::parse(&full).map_err(|_| BackendError::InvalidKey(key.to_owned()))
    }

    /// One PUT of `data` under `key` (the object appears only whole).
    async fn put_object(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let path = self.path(key)?;
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        self.store
            .put(&path, payload)
            .await
            .map(drop)
            .map_err(|e| store_err("put", key, e))
    }

    fn info(&self, meta: ObjectMeta) -> ObjectInfo {
        let full = meta.location.to_string();
        let key = match self.prefix.is_empty() {
            true => full,
            false => full
                .strip_prefix(&self.prefix)
                .map(|k| k.trim_start_matches('/').to_owned())
                .unwrap_or(full),
        };
        let millis = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
        ObjectInfo {
            key,
            size: meta.size,
            modified: SystemTime::UNIX_EPOCH + Duration::from_millis(millis),
        }
    }
}

impl Backend for S3Backend {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        self.runtime.block_on(self.put_object(key, data))
    }

    /// Stores every object with up to `PUT_CONCURRENCY` (16) PUTs in flight.
    /// An S3 object appears only once its PUT completed whole, so the
    /// batch is durable when this returns Ok; on an error some objects may
    /// be stored, none half, and no index names them yet.
    fn put_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<(), BackendError> {
        let puts = objects.iter().map(|(key, data)| self.put_object(key, data));
        self.runtime.block_on(
            futures::stream::iter(puts)
                .buffer_unordered(PUT_CONCURRENCY)
                .try_collect::<()>(),
        )
    }

    /// Refreshes every object that exists (HEAD, then a PUT of the same
    /// bytes) with up to `PUT_CONCURRENCY` (16) objects in flight; the answers
    /// come back in the order of `objects`.
    fn touch_batch(&self, objects: &[(String, Vec<u8>)]) -> Result<Vec<bool>, BackendError> {
        let touches = objects.iter().map(|(key, data)| async move {
            let path = self.path(key)?;
            match self.store.head(&path).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(store_err("head", key, e)),
            }
            self.put_object(key, data).await.map(|()| true)
        });
        self.runtime.block_on(
            futures::stream::iter(touches)
                .buffered(PUT_CONCURRENCY)
                .try_collect(),
        )
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let path = self.path(key)?;
        let result = self.runtime.block_on(async {
            let got = self.store.get(&path).await?;
            got.bytes().await
        });
        match result {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("get", key, e)),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>, BackendError> {
        let path = self.path(key)?;
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(meta) => Ok(Some(self.info(meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("head", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let path = self.path(prefix.trim_end_matches('/'))?;
        let metas: Vec<ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&path)).try_collect())
            .map_err(|e| store_err("list", prefix, e))?;
        Ok(metas.into_iter().map(|m| self.info(m)).collect())
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key)?;
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err("delete", key, e)),
        }
    }

    fn touch(&self, key: &str, data: &[u8]) -> Result<bool, BackendError> {
        if self.head(key)?.is_none() {
            return Ok(false);
        }
        self.put(key, data)?;
        Ok(true)
    }

    fn lock(&self, _mode: LockMode) -> Result<RepoLock, BackendError> {
        Ok(RepoLock::none())
    }

    fn clock_slack(&self) -> Duration {
        S3Backend::CLOCK_SLACK
    }
}
