//! Bearer tokens of the Docker token-authentication scheme: JWTs whose `access` claim lists the
//! repositories and actions granted, for audience `service`.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Action, ConfigError};

/// The `[auth.token]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// `iss` of the tokens Berth issues.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The audience (`aud`, the `service` parameter) tokens must be for.
    pub service: String,
    /// PEM PKCS#8 EC P-256 private key: Berth issues tokens itself at `/auth/token`.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// PEM public keys (EC or RSA) of external token issuers whose tokens are accepted.
    #[serde(default)]
    pub verify_keys: Vec<PathBuf>,
    /// Lifetime of issued tokens, in seconds.
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// The token endpoint URL given in challenges; by default `<scheme>://<Host>/auth/token`.
    #[serde(default)]
    pub realm: Option<String>,
}

fn default_issuer() -> String {
    "berth".into()
}
fn default_ttl() -> u64 {
    300
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The token's subject (`sub`).
    pub subject: String,
    access: Vec<(String, Vec<Action>)>,
}

impl TokenGrant {
    /// Whether the token grants `action` on `repo`.
    pub fn allows(&self, repo: &str, action: Action) -> bool {
        self.access.iter().any(|(name, actions)| {
            name == repo && actions.iter().any(|a| *a == action || *a == Action::Admin)
        })
    }

    /// Whether the token grants `action` on any repository.
    pub(super) fn grants_anywhere(&self, action: Action) -> bool {
        self.access.iter().any(|(_, actions)| actions.contains(&action))
    }
}

/// A token issued by [`super::Auth::issue_token`].
#[derive(Debug, Clone, Serialize)]
pub struct IssuedToken {
    /// The JWT.
    pub token: String,
    /// Its lifetime, in seconds.
    pub expires_in: u64,
    /// When it was issued (Unix seconds).
    pub issued_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    #[serde(default)]
    access: Vec<AccessEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AccessEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// Loaded token keys.
pub(super) struct Tokens {
    pub(super) service: String,
    pub(super) realm: Option<String>,
    issuer: String,
    ttl: u64,
    signing: Option<EncodingKey>,
    verifying: Vec<(Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("service", &self.service).field("keys", &self.verifying.len()).finish()
    }
}

impl Tokens {
    pub(super) fn load(config: &TokenConfig) -> Result<Self, ConfigError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| ConfigError(format!("cannot read key {}: {e}", p.display())))
        };
        let mut verifying = Vec::new();
        let mut signing = None;
        if let Some(path) = &config.signing_key {
            let pem = read(path)?;
            let bad = |e: String| {
                ConfigError(format!("{}: not a PEM PKCS#8 EC P-256 private key: {e}", path.display()))
            };
            signing = Some(EncodingKey::from_ec_pem(&pem).map_err(|e| bad(e.to_string()))?);
            verifying.push((Algorithm::ES256, public_key_of(&pem).map_err(bad)?));
        }
        for path in &config.verify_keys {
            let pem = read(path)?;
            let key = if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, k)
            } else if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, k)
            } else {
                return Err(ConfigError(format!("{}: not a PEM EC or RSA public key", path.display())));
            };
            verifying.push(key);
        }
        if verifying.is_empty() {
            return Err(ConfigError("[auth.token] needs signing_key or verify_keys".into()));
        }
        Ok(Tokens {
            service: config.service.clone(),
            realm: config.realm.clone(),
            issuer: config.issuer.clone(),
            ttl: config.ttl_secs,
            signing,
            verifying,
        })
    }

    pub(super) fn can_sign(&self) -> bool {
        self.signing.is_some()
    }

    pub(super) fn sign(
        &self,
        subject: &str,
        access: Vec<(String, Vec<Action>)>,
        now: u64,
    ) -> Result<IssuedToken, String> {
        let key = self.signing.as_ref().ok_or("no signing key")?;
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_string(),
            aud: self.service.clone(),
            exp: now + self.ttl,
            nbf: now.saturating_sub(1),
            iat: now,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            access: access
                .into_iter()
                .map(|(name, actions)| AccessEntry {
                    kind: "repository".into(),
                    name,
                    actions: actions.iter().map(|a| a.as_str().to_string()).collect(),
                })
                .collect(),
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, key).map_err(|e| e.to_string())?;
        Ok(IssuedToken { token, expires_in: self.ttl, issued_at: now })
    }

    /// Verifies signature, audience and validity window (against the application clock).
    pub(super) fn verify(&self, token: &str, now: u64) -> Result<TokenGrant, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("invalid token: {e}"))?;
        let mut last_error = "no key for the token's algorithm".to_string();
        for (alg, key) in self.verifying.iter().filter(|(alg, _)| *alg == header.alg) {
            let mut validation = Validation::new(*alg);
            validation.set_audience(&[&self.service]);
            // Times are checked below against the application clock.
            validation.validate_exp = false;
            validation.required_spec_claims.clear();
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let c = data.claims;
                    if now >= c.exp || now + 60 < c.nbf {
                        return Err("token expired or not yet valid".into());
                    }
                    let access = c
                        .access
                        .into_iter()
                        .filter(|e| e.kind == "repository")
                        .map(|e| (e.name, e.actions.iter().filter_map(|a| Action::parse(a)).collect()))
                        .collect();
                    return Ok(TokenGrant { subject: c.sub, access });
                }
                Err(e) => last_error = format!("invalid token: {e}"),
            }
        }
        Err(last_error)
    }
}

/// The public half of a PEM PKCS#8 EC P-256 private key, as a verification key.
fn public_key_of(pem: &[u8]) -> Result<DecodingKey, String> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    use base64::Engine as _;
    let text = std::str::from_utf8(pem).map_err(|e| e.to_string())?;
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body.trim()).map_err(|e| e.to_string())?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).map_err(|e| e.to_string())?;
    // An uncompressed point: 0x04, then x and y.
    let point = pair.public_key().as_ref();
    if point.len() != 65 {
        return Err("unexpected public key size".into());
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    DecodingKey::from_ec_components(&b64.encode(&point[1..33]), &b64.encode(&point[33..]))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
pub(super) mod tests {
    /// A throwaway key for tests only.
    pub(crate) const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgN2FN0Cgj4eUBUhJm
1QkBgP6fQMk9kzkAjpGhZQHfR6ahRANCAAQAYH2TNL+ILHfAtUguKAnYJbGIjXKK
9LdzGRGyFqdW5kxIR9SPry/ENvycedrQ5+q4PF+tmVhLC6aqaRbglcP9
-----END PRIVATE KEY-----
";
}
