//! Who is calling: a JWT from the identity provider, HS256 with
//! `AUTH_JWT_SECRET` and/or RS256/ES256 with the public keys of a JWKS file.
//! `iss`, `aud`, `exp` and `nbf` are checked with a small leeway; each key is
//! pinned to one algorithm, so `alg: none` and HS/RS confusion are refused.
//! The claims name the tenant, app, agent and roles of the caller.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use shared::CodedError;
use shared::ErrorCode;
use shared::ids::TenantId;

/// The role that may read and replace its tenant's policy and verify audit.
pub const ADMIN_ROLE: &str = "admin";

/// The operator's role: the global audit chain (`GET /v1/audit/verify`
/// across tenants, anchors). Tenant admins get a tenant-scoped answer.
pub const PLATFORM_ADMIN_ROLE: &str = "platform-admin";

/// Header naming the tenant under `AUTHZ_BYPASS` (no token).
pub const BYPASS_TENANT_HEADER: &str = "x-tenant-id";

/// Claims of a caller's JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// Validated ([`shared::ids::check_tenant`]): never `-`, `..` or a path.
    pub tenant: TenantId,
    pub subject: String,
    pub app: Option<String>,
    pub agent: Option<String>,
    pub roles: Vec<String>,
    /// Authentication was bypassed (development only).
    pub bypass: bool,
}

impl Identity {
    /// True when the caller holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// `subject`, or `subject (app/agent)` for logs and audit.
    pub fn actor(&self) -> String {
        match (&self.app, &self.agent) {
            (None, None) => self.subject.clone(),
            (app, agent) => format!(
                "{} ({}/{})",
                self.subject,
                app.as_deref().unwrap_or("-"),
                agent.as_deref().unwrap_or("-")
            ),
        }
    }
}

/// A verification key pinned to its algorithm.
struct PinnedKey {
    key: DecodingKey,
    validation: Validation,
}

/// Verifies callers' JWTs.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Keys>,
}

struct Keys {
    hmac: Option<PinnedKey>,
    /// JWKS keys by `kid`.
    by_kid: HashMap<String, PinnedKey>,
    /// JWKS keys without a `kid`, tried by algorithm when the token has none.
    anonymous: Vec<PinnedKey>,
    bypass: bool,
}

fn validation(alg: Algorithm, issuer: &str, audience: &str, leeway: u64) -> Validation {
    let mut v = Validation::new(alg);
    v.set_issuer(&[issuer]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    v.leeway = leeway;
    v
}

/// Settings of a [`Verifier`].
pub struct VerifierConfig<'a> {
    pub secret: Option<&'a str>,
    pub jwks_path: Option<&'a Path>,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub leeway_seconds: u64,
    pub bypass: bool,
}

impl Verifier {
    /// Loads the keys; a JWKS that cannot be read or holds an unusable key
    /// stops start-up with a message.
    pub fn new(c: &VerifierConfig<'_>) -> Result<Verifier, String> {
        let hmac = c.secret.map(|s| PinnedKey {
            key: DecodingKey::from_secret(s.as_bytes()),
            validation: validation(Algorithm::HS256, c.issuer, c.audience, c.leeway_seconds),
        });
        let mut by_kid = HashMap::new();
        let mut anonymous = Vec::new();
        if let Some(path) = c.jwks_path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("AUTH_JWKS_PATH {}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("AUTH_JWKS_PATH {}: not a JWKS: {e}", path.display()))?;
            for jwk in &set.keys {
                let alg = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    _ => {
                        return Err(format!(
                            "AUTH_JWKS_PATH {}: only RSA (RS256) and P-256 (ES256) keys are accepted",
                            path.display()
                        ));
                    }
                };
                if let Some(declared) = jwk.common.key_algorithm {
                    let declared = format!("{declared:?}");
                    if declared != format!("{alg:?}") {
                        return Err(format!(
                            "AUTH_JWKS_PATH {}: a key declares alg {declared}; only RS256 for RSA and ES256 for P-256",
                            path.display()
                        ));
                    }
                }
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("AUTH_JWKS_PATH {}: {e}", path.display()))?;
                let pinned = PinnedKey {
                    key,
                    validation: validation(alg, c.issuer, c.audience, c.leeway_seconds),
                };
                match &jwk.common.key_id {
                    Some(kid) => {
                        by_kid.insert(kid.clone(), pinned);
                    }
                    None => anonymous.push(pinned),
                }
            }
        }
        Ok(Verifier {
            inner: Arc::new(Keys {
                hmac,
                by_kid,
                anonymous,
                bypass: c.bypass,
            }),
        })
    }

    /// True under `AUTHZ_BYPASS`.
    pub fn bypassed(&self) -> bool {
        self.inner.bypass
    }

    /// Checks a bearer token and returns the caller it names.
    pub fn verify(&self, token: &str) -> Result<Identity, CodedError> {
        let unauthorized = |m: String| CodedError::new(ErrorCode::Unauthorized, m);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthorized(format!("malformed token: {e}")))?;
        let keys = &self.inner;
        let candidates: Vec<&PinnedKey> = match header.alg {
            Algorithm::HS256 => keys.hmac.iter().collect(),
            Algorithm::RS256 | Algorithm::ES256 => match &header.kid {
                Some(kid) => keys.by_kid.get(kid).into_iter().collect(),
                None => keys.anonymous.iter().collect(),
            },
            other => return Err(unauthorized(format!("algorithm {other:?} is not accepted"))),
        };
        // A key only verifies the algorithm it is pinned to.
        let candidates: Vec<&PinnedKey> = candidates
            .into_iter()
            .filter(|k| k.validation.algorithms == [header.alg])
            .collect();
        if candidates.is_empty() {
            return Err(unauthorized(format!(
                "no key for algorithm {:?}{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" and kid {k:?}"))
                    .unwrap_or_default()
            )));
        }
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation) {
                Ok(data) => return identity_from(data.claims),
                Err(e) => last = Some(e),
            }
        }
        Err(unauthorized(format!(
            "invalid token: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }
}

fn identity_from(c: Claims) -> Result<Identity, CodedError> {
    let tenant = TenantId::parse(c.tenant).map_err(|m| {
        CodedError::new(
            ErrorCode::Unauthorized,
            format!("the token's tenant is malformed: {m}"),
        )
    })?;
    Ok(Identity {
        tenant,
        subject: c.sub,
        app: c.app,
        agent: c.agent,
        roles: c.roles,
        bypass: false,
    })
}

/// The identity used for every request under `AUTHZ_BYPASS`.
pub fn bypass_identity(tenant: Option<&str>) -> Result<Identity, CodedError> {
    let tenant = tenant.unwrap_or("dev");
    let tenant = TenantId::parse(tenant).map_err(|m| {
        CodedError::new(
            ErrorCode::InvalidArgument,
            format!("{BYPASS_TENANT_HEADER}: {m}"),
        )
    })?;
    Ok(Identity {
        tenant,
        subject: "authz-bypass".into(),
        app: None,
        agent: None,
        roles: vec![ADMIN_ROLE.into()],
        bypass: true,
    })
}

/// `control-plane token`: a development token signed with AUTH_JWT_SECRET.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "control-plane token",
    about = "Mint a development token for the REST API (refused when ENV=production)"
)]
pub struct TokenArgs {
    #[arg(long)]
    pub tenant: String,
    /// Comma-separated roles, e.g. `admin` or `agent`.
    #[arg(long, default_value = "")]
    pub roles: String,
    #[arg(long, default_value = "dev-user")]
    pub subject: String,
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long)]
    pub agent: Option<String>,
    /// The control plane's `AUTH_JWT_SECRET`; unset outside production, the
    /// development key in `.local/` that a control plane started alone uses.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    #[arg(long, env = "AUTH_ISSUER", default_value = "sandbox-dev-idp")]
    pub issuer: String,
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "control-plane")]
    pub audience: String,
    /// Lifetime, seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    #[arg(long = "env", env = "ENV", default_value = "dev")]
    pub environment: String,
}

/// Signs a development token (never in production).
pub fn mint_dev_token(args: &TokenArgs) -> Result<String, String> {
    if shared::env::is_production(&args.environment) {
        return Err(
            "control-plane token mints development tokens only; refusing with ENV=production"
                .into(),
        );
    }
    TenantId::parse(args.tenant.as_str()).map_err(|e| e.to_string())?;
    let mut secret = args.secret.clone();
    shared::env::dev_key_fallback(
        &mut secret,
        &args.environment,
        "AUTH_JWT_SECRET",
        std::path::Path::new(shared::env::DEV_KEY_DIR),
        shared::env::dev_keys::USER,
    )?;
    let secret = secret.ok_or("AUTH_JWT_SECRET is required")?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        iss: args.issuer.clone(),
        aud: args.audience.clone(),
        sub: args.subject.clone(),
        exp: now + args.ttl,
        nbf: None,
        iat: Some(now),
        tenant: args.tenant.clone(),
        app: args.app.clone(),
        agent: args.agent.clone(),
        roles: args
            .roles
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(String::from)
            .collect(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use clap::Parser;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const ISS: &str = "sandbox-dev-idp";
    const AUD: &str = "control-plane";

    fn verifier() -> Verifier {
        Verifier::new(&VerifierConfig {
            secret: Some(SECRET),
            jwks_path: None,
            issuer: ISS,
            audience: AUD,
            leeway_seconds: 5,
            bypass: false,
        })
        .unwrap()
    }

    fn claims(exp_offset: i64) -> Claims {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        Claims {
            iss: ISS.into(),
            aud: AUD.into(),
            sub: "alice".into(),
            exp: (now + exp_offset) as u64,
            nbf: None,
            iat: None,
            tenant: "acme".into(),
            app: Some("app1".into()),
            agent: Some("bot".into()),
            roles: vec!["admin".into()],
        }
    }

    fn sign(c: &Claims, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            c,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn good_token_names_the_caller() {
        let id = verifier().verify(&sign(&claims(60), SECRET)).unwrap();
        assert_eq!(id.tenant, "acme");
        assert_eq!(id.app.as_deref(), Some("app1"));
        assert!(id.has_role("admin"));
        assert!(!id.bypass);
    }

    #[test]
    fn bad_tokens_are_refused() {
        let v = verifier();
        let good = sign(&claims(60), SECRET);
        let expired = sign(&claims(-120), SECRET);
        let wrong_secret = sign(&claims(60), "another-secret-another-secret-xx");
        let mut wrong_aud = claims(60);
        wrong_aud.aud = "someone-else".into();
        let mut wrong_iss = claims(60);
        wrong_iss.iss = "evil".into();
        let mut future = claims(600);
        future.nbf = Some(jsonwebtoken::get_current_timestamp() + 300);
        let mut bad_tenant = claims(60);
        bad_tenant.tenant = "../etc".into();
        // Flip one character of the signature.
        let mut tampered = good.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        // Same payload, claims edited without re-signing.
        let parts: Vec<&str> = good.split('.').collect();
        let mut edited = claims(60);
        edited.tenant = "other".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&edited).unwrap());
        let forged = format!("{}.{}.{}", parts[0], payload, parts[2]);
        // alg none, unsigned.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let none = format!("{none_header}.{}.", parts[1]);
        // HS512 with the right secret: not an accepted algorithm.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(60),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        for (name, token) in [
            ("expired", expired),
            ("wrong secret", wrong_secret),
            ("wrong audience", sign(&wrong_aud, SECRET)),
            ("wrong issuer", sign(&wrong_iss, SECRET)),
            ("not yet valid", sign(&future, SECRET)),
            ("malformed tenant", sign(&bad_tenant, SECRET)),
            ("tampered signature", tampered),
            ("forged claims", forged),
            ("alg none", none),
            ("hs512", hs512),
            ("garbage", "not-a-jwt".into()),
        ] {
            let e = v.verify(&token).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized, "{name}");
        }
    }

    /// An RS256 token whose "public key" is fed to HMAC: the classic
    /// confusion. Without an HS key configured, HS256 has no key at all; with
    /// both, the RSA public key is never used as an HMAC secret.
    #[test]
    fn rsa_public_key_is_never_an_hmac_secret() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, test_keys::JWKS).unwrap();
        let v = Verifier::new(&VerifierConfig {
            secret: None,
            jwks_path: Some(&jwks),
            issuer: ISS,
            audience: AUD,
            leeway_seconds: 5,
            bypass: false,
        })
        .unwrap();
        // Signed with the JWKS file's text as an HMAC secret.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        let confused = jsonwebtoken::encode(
            &h,
            &claims(60),
            &EncodingKey::from_secret(test_keys::JWKS.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            v.verify(&confused).unwrap_err().code,
            ErrorCode::Unauthorized
        );
    }

    #[test]
    fn rs256_and_es256_from_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, test_keys::JWKS).unwrap();
        let v = Verifier::new(&VerifierConfig {
            secret: Some(SECRET),
            jwks_path: Some(&jwks),
            issuer: ISS,
            audience: AUD,
            leeway_seconds: 5,
            bypass: false,
        })
        .unwrap();
        let rsa = EncodingKey::from_rsa_pem(test_keys::RSA_PRIVATE_PEM.as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(test_keys::EC_PRIVATE_PEM.as_bytes()).unwrap();
        let sign_as = |alg: Algorithm, kid: &str, key: &EncodingKey| {
            let mut h = Header::new(alg);
            h.kid = Some(kid.into());
            jsonwebtoken::encode(&h, &claims(60), key).unwrap()
        };
        let rs = sign_as(Algorithm::RS256, "rsa-1", &rsa);
        assert_eq!(v.verify(&rs).unwrap().tenant, "acme");
        let es = sign_as(Algorithm::ES256, "ec-1", &ec);
        assert_eq!(v.verify(&es).unwrap().tenant, "acme");
        // The RSA key's kid with ES256: the key is pinned to RS256.
        let swapped = sign_as(Algorithm::ES256, "rsa-1", &ec);
        assert_eq!(
            v.verify(&swapped).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        // Unknown kid.
        let unknown = sign_as(Algorithm::RS256, "nope", &rsa);
        assert_eq!(
            v.verify(&unknown).unwrap_err().code,
            ErrorCode::Unauthorized
        );
    }

    #[test]
    fn token_command_refuses_production() {
        let args = TokenArgs::parse_from([
            "token",
            "--tenant",
            "acme",
            "--roles",
            "admin,agent",
            "--secret",
            SECRET,
        ]);
        let id = verifier().verify(&mint_dev_token(&args).unwrap()).unwrap();
        assert_eq!(id.roles, vec!["admin", "agent"]);
        let prod = TokenArgs::parse_from([
            "token",
            "--tenant",
            "acme",
            "--secret",
            SECRET,
            "--env",
            "production",
        ]);
        assert!(mint_dev_token(&prod).unwrap_err().contains("production"));
    }

    /// Key pairs made for these tests only (`openssl genrsa 2048`,
    /// `openssl ecparam -name prime256v1 -genkey`).
    mod test_keys {
        include!("../tests/keys/test_keys.rs");
    }
}
