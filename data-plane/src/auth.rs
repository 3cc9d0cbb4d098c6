//! The service credential: every internal call carries a JWT signed with
//! `AUTH_JWT_SECRET` (HS256 only), with `iss`/`aud` as configured, an `exp`
//! and the tenant it acts for. Anything else is refused with 401.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use shared::CodedError;
use shared::ErrorCode;
use shared::dataplane::ServiceClaims;
use shared::ids::TenantId;

/// Clock skew accepted on `exp`/`nbf`, seconds.
pub const LEEWAY_SECONDS: u64 = 5;

/// Header naming the tenant when `AUTHZ_BYPASS=true` (no credential).
pub const BYPASS_TENANT_HEADER: &str = "x-tenant-id";

/// Who is calling, attached to every authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Validated: it names directories and storage keys.
    pub tenant: TenantId,
    pub subject: String,
    /// Authorization was bypassed (development only).
    pub bypass: bool,
}

/// Verifies credentials.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    key: Option<DecodingKey>,
    validation: Validation,
}

impl Authenticator {
    /// `secret: None` means AUTHZ_BYPASS (the config refuses that in production).
    pub fn new(secret: Option<&str>, issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Authenticator {
            inner: Arc::new(Inner {
                key: secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
                validation,
            }),
        }
    }

    /// Checks a bearer token and returns the caller it names.
    pub fn verify(&self, token: &str) -> Result<Caller, CodedError> {
        let Some(key) = &self.inner.key else {
            return Err(CodedError::new(ErrorCode::Internal, "no verification key"));
        };
        let data = jsonwebtoken::decode::<ServiceClaims>(token, key, &self.inner.validation)
            .map_err(|e| {
                CodedError::new(
                    ErrorCode::Unauthorized,
                    format!("invalid service credential: {e}"),
                )
            })?;
        let claims = data.claims;
        // The tenant names directories and keys: only a plain identifier will
        // do (never `-`, `.`, `..` or anything path-like).
        let tenant = TenantId::parse(claims.tenant).map_err(|m| {
            CodedError::new(
                ErrorCode::Unauthorized,
                format!("the service credential's tenant is malformed: {m}"),
            )
        })?;
        Ok(Caller {
            tenant,
            subject: claims.sub,
            bypass: false,
        })
    }

    fn bypassed(&self) -> bool {
        self.inner.key.is_none()
    }
}

/// `data-plane token`: a development service credential.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "data-plane token",
    about = "Mint a development service credential (refused when ENV=production)"
)]
pub struct TokenArgs {
    #[arg(long)]
    pub tenant: String,
    /// The data plane's `AUTH_JWT_SECRET`; unset outside production, the
    /// development key in `.local/` that a data plane started alone uses.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    #[arg(long, env = "AUTH_ISSUER", default_value = "control-plane")]
    pub issuer: String,
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "data-plane")]
    pub audience: String,
    /// Lifetime, seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    #[arg(long = "env", env = "ENV", default_value = "dev")]
    pub environment: String,
}

/// Signs a credential for `args.tenant` (never in production).
pub fn mint_dev_token(args: &TokenArgs) -> Result<String, String> {
    if shared::env::is_production(&args.environment) {
        return Err(
            "data-plane token mints development credentials only; refusing with ENV=production"
                .into(),
        );
    }
    shared::ids::check_tenant(&args.tenant).map_err(|e| e.0)?;
    let mut secret = args.secret.clone();
    shared::env::dev_key_fallback(
        &mut secret,
        &args.environment,
        "AUTH_JWT_SECRET",
        std::path::Path::new(shared::env::DEV_KEY_DIR),
        shared::env::dev_keys::SERVICE,
    )?;
    let secret = secret.ok_or("AUTH_JWT_SECRET is required")?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = ServiceClaims {
        iss: args.issuer.clone(),
        aud: args.audience.clone(),
        sub: "dev-token".into(),
        tenant: args.tenant.clone(),
        exp: now + args.ttl,
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Middleware: authenticates the request and attaches its [`Caller`].
pub async fn require_credential(
    State(auth): State<Authenticator>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = if auth.bypassed() {
        let tenant = req
            .headers()
            .get(BYPASS_TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|t| TenantId::parse(t).ok())
            .unwrap_or_else(|| TenantId::parse("dev").expect("a valid literal tenant"));
        // Decision 9: every bypassed call leaves an audit record.
        tracing::warn!(target: "audit", bypass = true, tenant = %tenant, method = %req.method(),
            path = %req.uri().path(), "authorization bypassed (AUTHZ_BYPASS=true)");
        Caller {
            tenant,
            subject: "authz-bypass".into(),
            bypass: true,
        }
    } else {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return CodedError::new(
                ErrorCode::Unauthorized,
                "missing service credential (Authorization: Bearer)",
            )
            .into_response();
        };
        match auth.verify(token) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target: "audit", path = %req.uri().path(), reason = %e.message, "service credential refused");
                return e.into_response();
            }
        }
    };
    // The request's span (shared::server) carries the verified tenant.
    tracing::Span::current().record("tenant_id", caller.tenant.as_str());
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> ServiceClaims {
        ServiceClaims {
            iss: "control-plane".into(),
            aud: "data-plane".into(),
            sub: "cp-1".into(),
            tenant: "acme".into(),
            exp: now() + 60,
            nbf: None,
            iat: Some(now()),
        }
    }

    fn sign(c: &ServiceClaims, secret: &str, alg: Algorithm) -> String {
        encode(
            &Header::new(alg),
            c,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn auth() -> Authenticator {
        Authenticator::new(Some(SECRET), "control-plane", "data-plane")
    }

    #[test]
    fn dev_tokens_verify_and_are_refused_in_production() {
        let mut args = TokenArgs {
            tenant: "acme".into(),
            secret: Some(SECRET.into()),
            issuer: "control-plane".into(),
            audience: "data-plane".into(),
            ttl: 60,
            environment: "dev".into(),
        };
        assert_eq!(
            auth()
                .verify(&mint_dev_token(&args).unwrap())
                .unwrap()
                .tenant,
            "acme"
        );
        args.environment = "production".into();
        assert!(mint_dev_token(&args).is_err());
    }

    #[test]
    fn a_good_credential_names_its_tenant() {
        let c = auth()
            .verify(&sign(&claims(), SECRET, Algorithm::HS256))
            .unwrap();
        assert_eq!(c.tenant, "acme");
        assert!(!c.bypass);
    }

    #[test]
    fn bad_credentials_are_refused() {
        let a = auth();
        let expired = ServiceClaims {
            exp: now() - 3600,
            ..claims()
        };
        let early = ServiceClaims {
            nbf: Some(now() + 3600),
            ..claims()
        };
        let wrong_aud = ServiceClaims {
            aud: "someone-else".into(),
            ..claims()
        };
        let wrong_iss = ServiceClaims {
            iss: "mallory".into(),
            ..claims()
        };
        let no_tenant = ServiceClaims {
            tenant: String::new(),
            ..claims()
        };
        let traversal = ServiceClaims {
            tenant: "../other".into(),
            ..claims()
        };
        let dash = ServiceClaims {
            tenant: "-".into(),
            ..claims()
        };
        let upper = ServiceClaims {
            tenant: "Other".into(),
            ..claims()
        };
        for (why, token) in [
            ("expired", sign(&expired, SECRET, Algorithm::HS256)),
            ("not yet valid", sign(&early, SECRET, Algorithm::HS256)),
            ("wrong audience", sign(&wrong_aud, SECRET, Algorithm::HS256)),
            ("wrong issuer", sign(&wrong_iss, SECRET, Algorithm::HS256)),
            ("no tenant", sign(&no_tenant, SECRET, Algorithm::HS256)),
            (
                "tenant with a path",
                sign(&traversal, SECRET, Algorithm::HS256),
            ),
            ("tenant '-'", sign(&dash, SECRET, Algorithm::HS256)),
            (
                "tenant not an identifier",
                sign(&upper, SECRET, Algorithm::HS256),
            ),
            (
                "wrong secret",
                sign(
                    &claims(),
                    "another-secret-another-secret-xx",
                    Algorithm::HS256,
                ),
            ),
            (
                "other HMAC algorithm",
                sign(&claims(), SECRET, Algorithm::HS512),
            ),
            ("garbage", "not.a.jwt".into()),
        ] {
            let e = a.verify(&token).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized, "{why}");
        }
        // alg: none, with the payload of a good token.
        let good = sign(&claims(), SECRET, Algorithm::HS256);
        let payload = good.split('.').nth(1).unwrap();
        use base64::Engine;
        let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"alg":"none","typ":"JWT"}"#);
        for forged in [
            format!("{none_header}.{payload}."),
            format!("{none_header}.{payload}"),
        ] {
            assert_eq!(
                a.verify(&forged).unwrap_err().code,
                ErrorCode::Unauthorized,
                "alg none"
            );
        }
    }
}
