//! The client a pull-through cache reads its upstream registry with: the distribution API's
//! manifest, blob, tag and referrers reads, with the token flow (a `401` whose
//! `WWW-Authenticate` names a Bearer realm → a token for the repository's pull scope, anonymous
//! or with the configured credentials, kept until it expires) and Basic authentication.
//! Redirects (blobs served from object storage) are followed; reqwest drops the `Authorization`
//! header when a redirect leaves the upstream's host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt as _};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::config::ProxyConfig;

/// What the caches ask for a manifest when the client named no media types.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// How an upstream request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream does not have it (404).
    #[error("the upstream does not have it")]
    NotFound,
    /// The upstream refused our credentials or the scope (401/403 after authenticating).
    #[error("the upstream refused access: {0}")]
    Refused(String),
    /// The upstream is rate limiting (429).
    #[error("the upstream is rate limiting: {0}")]
    RateLimited(String),
    /// The upstream could not be reached, failed (5xx) or answered something unusable.
    #[error("{0}")]
    Failed(String),
}

/// A manifest as the upstream answered it.
#[derive(Debug, Clone)]
pub struct UpstreamManifest {
    /// `Docker-Content-Digest`, when the upstream sent one.
    pub digest: Option<String>,
    /// `Content-Type`.
    pub media_type: String,
    /// The bytes (a `GET`); `None` for a `HEAD`.
    pub bytes: Option<Bytes>,
}

/// A blob's bytes as they arrive from the upstream.
pub struct UpstreamBlob {
    /// `Content-Length`, when sent.
    pub length: Option<u64>,
    /// The body.
    pub body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
}

/// One upstream registry.
pub struct Upstream {
    base: String,
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    /// `Authorization` values by scope, until they expire.
    tokens: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Upstream {
    /// A client for `config`'s upstream.
    ///
    /// # Errors
    /// When the CA file cannot be read or the HTTP client cannot be built.
    pub fn new(config: &ProxyConfig) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // An idle upstream body: give up on it rather than hold the clients waiting forever.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION"), " (pull-through cache)"));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("proxy `{}`: ca_file {}: {e}", config.prefix, ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("proxy `{}`: ca_file {}: {e}", config.prefix, ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Upstream {
            base: config.upstream.clone(),
            http: builder.build()?,
            credentials: config.username.clone().zip(config.password.clone()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Manifest `reference` of upstream repository `repo`, asking with `accept`.
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
        head: bool,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let method = if head { Method::HEAD } else { Method::GET };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_str(accept).unwrap_or(HeaderValue::from_static(DEFAULT_ACCEPT)),
        );
        let res = self.send(method, &url, repo, headers).await?;
        let digest = text_header(res.headers(), "docker-content-digest");
        let media_type = text_header(res.headers(), "content-type")
            .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let bytes = if head {
            None
        } else {
            Some(read_capped(res, crate::oci::manifest::MAX_MANIFEST_BYTES, "a manifest").await?)
        };
        Ok(UpstreamManifest { digest, media_type, bytes })
    }

    /// Blob `digest` of upstream repository `repo`, as a stream.
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn blob(&self, repo: &str, digest: &str) -> Result<UpstreamBlob, UpstreamError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let res = self.send(Method::GET, &url, repo, HeaderMap::new()).await?;
        let length = res.content_length();
        let body = res.bytes_stream().map_err(|e| std::io::Error::other(format!("upstream body: {e}")));
        Ok(UpstreamBlob { length, body: Box::pin(body) })
    }

    /// The size of blob `digest` upstream (a `HEAD`).
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<u64, UpstreamError> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let res = self.send(Method::HEAD, &url, repo, HeaderMap::new()).await?;
        text_header(res.headers(), "content-length")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| UpstreamError::Failed("the upstream's blob HEAD has no Content-Length".into()))
    }

    /// A read of upstream repository `repo`'s `path` (`tags/list?n=…`, `referrers/…`), answered
    /// as the upstream's content type, body and `Link` header.
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn read(
        &self,
        repo: &str,
        path: &str,
    ) -> Result<(String, Bytes, Option<String>), UpstreamError> {
        let url = format!("{}/v2/{repo}/{path}", self.base);
        let res = self.send(Method::GET, &url, repo, HeaderMap::new()).await?;
        let content_type =
            text_header(res.headers(), "content-type").unwrap_or_else(|| "application/json".into());
        let link = text_header(res.headers(), "link");
        let body = read_capped(res, MAX_LIST_BYTES, "a list").await?;
        Ok((content_type, body, link))
    }

    /// Sends a request for `repo`'s content, authenticating as the upstream asks (once).
    async fn send(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let cached = self.cached_token(&scope);
        let res = self.request(method.clone(), url, headers.clone(), cached.clone()).await?;
        let res = if res.status() == StatusCode::UNAUTHORIZED {
            let challenge = text_header(res.headers(), "www-authenticate").unwrap_or_default();
            let authorization = self.authenticate(&challenge, &scope).await?;
            self.request(method, url, headers, Some(authorization)).await?
        } else {
            res
        };
        match res.status() {
            s if s.is_success() => Ok(res),
            StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(UpstreamError::Refused(format!("{} for {url}", res.status())))
            }
            StatusCode::TOO_MANY_REQUESTS => Err(UpstreamError::RateLimited(format!("429 for {url}"))),
            s => Err(UpstreamError::Failed(format!("the upstream answered {s} for {url}"))),
        }
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        authorization: Option<HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self.http.request(method, url).headers(headers);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        req.send().await.map_err(|e| failed("reaching the upstream", &e))
    }

    fn cached_token(&self, scope: &str) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.get(scope).filter(|(_, until)| *until > Instant::now()).map(|(v, _)| v.clone())
    }

    /// Answers a `401`'s challenge: a Bearer token from the realm, or Basic credentials.
    async fn authenticate(&self, challenge: &str, scope: &str) -> Result<HeaderValue, UpstreamError> {
        let challenges = http_auth::parse_challenges(challenge)
            .map_err(|e| UpstreamError::Failed(format!("unreadable WWW-Authenticate {challenge:?}: {e}")))?;
        let param = |c: &http_auth::ChallengeRef<'_>, name: &str| {
            c.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_unescaped())
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer")) {
            let realm = param(bearer, "realm")
                .ok_or_else(|| UpstreamError::Failed("a Bearer challenge without a realm".into()))?;
            // Credentials meant for an https upstream never travel in the clear.
            if self.credentials.is_some()
                && self.base.starts_with("https://")
                && !realm.starts_with("https://")
            {
                return Err(UpstreamError::Refused(format!(
                    "the upstream's token realm {realm} is not https; credentials are not sent there"
                )));
            }
            let query = {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("scope", scope);
                if let Some(service) = param(bearer, "service") {
                    query.append_pair("service", &service);
                }
                query.finish()
            };
            let separator = if realm.contains('?') { '&' } else { '?' };
            let mut req = self.http.get(format!("{realm}{separator}{query}"));
            if let Some((user, password)) = &self.credentials {
                req = req.basic_auth(user, Some(password));
            }
            let res = req.send().await.map_err(|e| failed("reaching the token realm", &e))?;
            match res.status() {
                s if s.is_success() => {}
                s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    return Err(UpstreamError::Refused(format!("the token realm answered {s}")));
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    return Err(UpstreamError::RateLimited("the token realm answered 429".into()));
                }
                s => return Err(UpstreamError::Failed(format!("the token realm answered {s}"))),
            }
            #[derive(serde::Deserialize)]
            struct Token {
                token: Option<String>,
                access_token: Option<String>,
                expires_in: Option<u64>,
            }
            let token: Token = res
                .json()
                .await
                .map_err(|e| UpstreamError::Failed(format!("unreadable token answer: {e}")))?;
            let token = token
                .token
                .or(token.access_token)
                .map(|t| (t, token.expires_in))
                .ok_or_else(|| UpstreamError::Failed("the token answer holds no token".into()))?;
            let value = HeaderValue::from_str(&format!("Bearer {}", token.0))
                .map_err(|_| UpstreamError::Failed("the token is not a header value".into()))?;
            // Spec default: 60 s. Renewed a little early, so a request never carries one that
            // expires on its way.
            let lifetime = Duration::from_secs(token.1.unwrap_or(60).max(10)).mul_f64(0.9);
            self.remember(scope, value.clone(), lifetime);
            return Ok(value);
        }
        if challenges.iter().any(|c| c.scheme.eq_ignore_ascii_case("basic")) {
            let Some((user, password)) = &self.credentials else {
                return Err(UpstreamError::Refused(
                    "the upstream asks for credentials; none are configured".into(),
                ));
            };
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|_| UpstreamError::Failed("credentials are not a header value".into()))?;
            self.remember(scope, value.clone(), Duration::from_secs(3600));
            return Ok(value);
        }
        Err(UpstreamError::Refused(format!("unsupported authentication challenge {challenge:?}")))
    }

    fn remember(&self, scope: &str, value: HeaderValue, lifetime: Duration) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tokens.retain(|_, (_, until)| *until > now);
        tokens.insert(scope.to_string(), (value, now + lifetime));
    }
}

/// The most a tag list or referrers answer may hold.
const MAX_LIST_BYTES: usize = 16 << 20;

/// A response's body, refused beyond `limit` bytes (whatever its `Content-Length` claims).
async fn read_capped(mut res: reqwest::Response, limit: usize, what: &str) -> Result<Bytes, UpstreamError> {
    let too_large =
        || UpstreamError::Failed(format!("the upstream's answer ({what}) is larger than {limit} bytes"));
    if res.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| failed(&format!("reading {what}"), &e))? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn text_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn failed(doing: &str, e: &reqwest::Error) -> UpstreamError {
    let mut chain = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(s) = next {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        next = s.source();
    }
    UpstreamError::Failed(format!("{doing}: {chain}"))
}
