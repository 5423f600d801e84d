//! Who is calling: bearer JWTs, the `Principal` they prove, and the self-only rule.
//!
//! The accepted algorithms are pinned: HS256 only with `PRESENCE_JWT_SECRET`; RS256, ES256 and
//! EdDSA only with a JWKS key, found by the token's `kid`, whose algorithm comes from the key
//! (its `kty`/`crv`, and its `alg` when given must agree), never from the token's header alone.
//! So `alg: none`, HS256 signed with a public key, and any other algorithm are refused.
//! Tokens need `exp`, `aud` (`PRESENCE_JWT_AUDIENCE`) and `sub`, and `iss` when
//! `PRESENCE_JWT_ISSUER` is set; 30 s of clock leeway. `sub` is the userId as a decimal string;
//! a token whose `scope` holds `presence:service` is a backend's: it acts for any user.
//!
//! The JWKS is fetched at start, every 5 minutes, and when a token names an unknown `kid` (at
//! most once every `PRESENCE_JWT_JWKS_COOLDOWN`, 30 s), each fetch within 5 s; a failed fetch
//! keeps the last good keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthMode, Config};
use crate::error::Error;
use crate::metrics::{AuthRefusal, AuthScheme, JwksFetch, Metrics};
use crate::presence::{parse_user_id, UserId};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// The scope of a backend (IM server) token: it may act for any user and read everything.
pub const SERVICE_SCOPE: &str = "presence:service";
/// Longest a JWKS fetch may take.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// The JWKS is fetched this often anyway, so that rotated-out keys stop being accepted.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Largest JWKS document read.
const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Longer tokens are refused without parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The subprotocol a browser WebSocket offers with its token (`bearer.<jwt>`), and the one the
/// server answers.
pub const WS_PROTOCOL: &str = "presence.v1";
const WS_BEARER_PREFIX: &str = "bearer.";

/// Who a request acts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's user (`sub`); `None` for a service token whose `sub` is not a userId, and
    /// with `PRESENCE_AUTH=none`.
    pub user: Option<UserId>,
    /// May act for any user and read everything: a service token, or no authentication.
    pub service: bool,
    /// The token's `exp` (Unix seconds); `None` with `PRESENCE_AUTH=none`.
    pub exp: Option<u64>,
}

impl Principal {
    /// Every caller with `PRESENCE_AUTH=none`: it may do anything, as before authentication.
    pub const ANONYMOUS: Principal = Principal {
        user: None,
        service: true,
        exp: None,
    };

    /// Whether this caller may write `user`'s presence, or read their subscriptions.
    pub fn may_act_for(&self, user: UserId) -> bool {
        self.service || self.user == Some(user)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Scope {
    Text(String),
    List(Vec<String>),
}

impl Scope {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Scope::Text(s) => s.split_ascii_whitespace().any(|x| x == wanted),
            Scope::List(v) => v.iter().any(|x| x == wanted),
        }
    }
}

/// The claims this service reads (`aud`, `iss` and `nbf` are checked by the validation).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    scope: Option<Scope>,
}

/// A verification key of the JWKS and the one algorithm it verifies.
struct JwksKey {
    key: DecodingKey,
    alg: Algorithm,
}

/// The JWKS: its keys by `kid`, the last good set kept when a fetch fails.
struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, Arc<JwksKey>>>>,
    /// When a fetch last started; held during a fetch, so that fetches never overlap.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches for an unknown `kid` start at most this often.
    cooldown: Duration,
    metrics: Arc<Metrics>,
}

impl Jwks {
    fn key(&self, kid: &str) -> Option<Arc<JwksKey>> {
        self.keys.read().get(kid).cloned()
    }

    /// The key `kid`; fetches the JWKS first when it is unknown and the last fetch started more
    /// than the cooldown ago.
    async fn find(&self, kid: &str) -> Option<Arc<JwksKey>> {
        if let Some(k) = self.key(kid) {
            return Some(k);
        }
        let mut last = self.last_fetch.lock().await;
        // Fetched while this request waited?
        if let Some(k) = self.key(kid) {
            return Some(k);
        }
        if last.is_some_and(|t| t.elapsed() < self.cooldown) {
            return None;
        }
        *last = Some(Instant::now());
        self.fetch_now().await;
        self.key(kid)
    }

    /// Fetches the JWKS (the caller holds `last_fetch`); on success its usable keys replace the
    /// set in use, on failure the set in use stays.
    async fn fetch_now(&self) {
        match self.download().await {
            Ok(keys) => {
                self.metrics.auth.jwks_fetches.get(JwksFetch::Ok).inc();
                self.metrics.auth.jwks_keys.set(keys.len() as i64);
                tracing::debug!(keys = keys.len(), "JWKS fetched");
                *self.keys.write() = Arc::new(keys);
            }
            Err(e) => {
                self.metrics.auth.jwks_fetches.get(JwksFetch::Error).inc();
                tracing::warn!(url = %self.url, error = %e, "fetching the JWKS failed; keeping the last good keys");
            }
        }
    }

    async fn download(&self) -> Result<HashMap<String, Arc<JwksKey>>, String> {
        let body = tokio::time::timeout(JWKS_TIMEOUT, async {
            let resp = self
                .client
                .get(&self.url)
                .send()
                .await
                .map_err(|e| format!("request: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("answered {}", resp.status()));
            }
            if resp
                .content_length()
                .is_some_and(|n| n > JWKS_MAX_BYTES as u64)
            {
                return Err("document too large".into());
            }
            let bytes = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
            if bytes.len() > JWKS_MAX_BYTES {
                return Err("document too large".into());
            }
            Ok(bytes)
        })
        .await
        .map_err(|_| format!("no answer within {JWKS_TIMEOUT:?}"))??;
        let keys = parse_jwks(&body)?;
        if keys.is_empty() {
            return Err("no usable key (RS256, ES256 or EdDSA with a kid)".into());
        }
        Ok(keys)
    }

    /// Fetches at start and every [`JWKS_REFRESH`], until `cancel`.
    async fn refresh(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            {
                let mut last = tokio::select! {
                    _ = cancel.cancelled() => return,
                    l = self.last_fetch.lock() => l,
                };
                *last = Some(Instant::now());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.fetch_now() => {}
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(JWKS_REFRESH) => {}
            }
        }
    }
}

/// The usable keys of a JWKS document: signature keys with a `kid`, of type RSA (RS256), EC
/// P-256 (ES256) or OKP Ed25519 (EdDSA). Other keys (symmetric, encryption, other curves or
/// algorithms, malformed) are skipped.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<JwksKey>>, String> {
    #[derive(Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut out = HashMap::new();
    for raw in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if let Some((kid, key)) = usable(&jwk) {
            out.insert(kid, Arc::new(key));
        }
    }
    Ok(out)
}

/// The key and its one algorithm, if this service accepts it.
fn usable(jwk: &Jwk) -> Option<(String, JwksKey)> {
    let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty())?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let (alg, declared) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            // The verifier reads exactly 32 bytes: refuse anything else here.
            let x = base64_url_decode(&p.x)?;
            if x.len() != 32 {
                return None;
            }
            (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
        }
        // Symmetric keys never come from a JWKS (HS/RS confusion); other curves are not pinned.
        _ => return None,
    };
    if jwk.common.key_algorithm.is_some_and(|a| a != declared) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, JwksKey { key, alg }))
}

/// Unpadded (or padded) base64url.
fn base64_url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.trim_end_matches('=').bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Verifies tokens and applies the self-only rule; counts refusals.
pub struct Auth {
    mode: AuthMode,
    secret: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    audience: String,
    issuer: Option<String>,
    /// How long a socket stays open past its token's `exp`.
    pub ws_grace: Duration,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// The authentication `config` asks for; sets `presence_auth_mode`. Fetches no keys yet:
    /// see [`Auth::start`].
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Auth>> {
        let scheme = match config.auth {
            AuthMode::None => AuthScheme::None,
            AuthMode::Jwt => AuthScheme::Jwt,
        };
        for &s in AuthScheme::ALL {
            metrics.auth.mode.get(s).set((s == scheme) as i64);
        }
        let jwks = match (&config.jwt_jwks_url, config.auth) {
            (Some(url), AuthMode::Jwt) => {
                let client = reqwest::Client::builder()
                    .timeout(JWKS_TIMEOUT)
                    .connect_timeout(JWKS_TIMEOUT)
                    .build()
                    .map_err(|e| anyhow::anyhow!("PRESENCE_JWT_JWKS_URL: http client: {e}"))?;
                Some(Arc::new(Jwks {
                    url: url.clone(),
                    client,
                    keys: RwLock::new(Arc::new(HashMap::new())),
                    last_fetch: tokio::sync::Mutex::new(None),
                    cooldown: config.jwt_jwks_cooldown,
                    metrics: metrics.clone(),
                }))
            }
            _ => None,
        };
        let secret = match config.auth {
            AuthMode::Jwt => config
                .jwt_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.0.as_bytes())),
            AuthMode::None => None,
        };
        Ok(Arc::new(Auth {
            mode: config.auth,
            secret,
            jwks,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            ws_grace: config.ws_token_grace,
            metrics,
        }))
    }

    /// Starts fetching the JWKS (at once, then every [`JWKS_REFRESH`]) until `cancel`.
    pub fn start(&self, cancel: CancellationToken) {
        if let Some(jwks) = &self.jwks {
            tokio::spawn(jwks.clone().refresh(cancel));
        }
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.mode == AuthMode::Jwt
    }

    fn refuse(&self, reason: AuthRefusal) -> Error {
        self.metrics.auth.refusals.get(reason).inc();
        if reason == AuthRefusal::Forbidden {
            Error::Forbidden
        } else {
            Error::Unauthorized
        }
    }

    /// The caller of a request: from `Authorization: Bearer <jwt>`, or, for a WebSocket
    /// upgrade (`websocket`), from a `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`. Never
    /// from the query string. [`Principal::ANONYMOUS`] with `PRESENCE_AUTH=none`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        websocket: bool,
    ) -> Result<Principal, Error> {
        if !self.enabled() {
            return Ok(Principal::ANONYMOUS);
        }
        let token = match bearer(headers) {
            Some(t) => Some(t),
            None if websocket => subprotocol_token(headers),
            None => None,
        };
        match token {
            Some(t) => self.verify(&t).await,
            None => Err(self.refuse(AuthRefusal::Missing)),
        }
    }

    /// Verifies one token (a header's, or a socket's `refresh`).
    pub async fn verify(&self, token: &str) -> Result<Principal, Error> {
        if !self.enabled() {
            return Ok(Principal::ANONYMOUS);
        }
        self.check(token).await.map_err(|r| self.refuse(r))
    }

    async fn check(&self, token: &str) -> Result<Principal, AuthRefusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthRefusal::Invalid);
        }
        // `alg: none` and unknown algorithms fail to parse here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthRefusal::Invalid)?;
        let jwks_key;
        let (key, alg) = match header.alg {
            Algorithm::HS256 => (
                self.secret.as_ref().ok_or(AuthRefusal::Invalid)?,
                Algorithm::HS256,
            ),
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
                let jwks = self.jwks.as_ref().ok_or(AuthRefusal::Invalid)?;
                let kid = header.kid.as_deref().ok_or(AuthRefusal::UnknownKey)?;
                jwks_key = jwks.find(kid).await.ok_or(AuthRefusal::UnknownKey)?;
                // The key's algorithm, not the header's.
                (&jwks_key.key, jwks_key.alg)
            }
            _ => return Err(AuthRefusal::Invalid),
        };
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY.as_secs();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_audience(&[&self.audience]);
        let mut required = vec!["exp", "aud", "sub"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthRefusal::Expired,
            ErrorKind::InvalidAudience => AuthRefusal::WrongAudience,
            ErrorKind::InvalidIssuer => AuthRefusal::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthRefusal::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthRefusal::WrongIssuer,
            _ => AuthRefusal::Invalid,
        })?;
        let claims = data.claims;
        let service = claims.scope.is_some_and(|s| s.contains(SERVICE_SCOPE));
        let user = parse_user_id(&claims.sub).ok();
        if user.is_none() && !service {
            // A user token must name its user.
            return Err(AuthRefusal::Invalid);
        }
        Ok(Principal {
            user,
            service,
            exp: Some(claims.exp),
        })
    }

    /// The self-only rule: `p` may write `user`'s presence or read their subscriptions.
    pub fn authorize(&self, p: &Principal, user: UserId) -> Result<(), Error> {
        if p.may_act_for(user) {
            Ok(())
        } else {
            Err(self.refuse(AuthRefusal::Forbidden))
        }
    }

    /// A refusal decided elsewhere (a user token naming another viewer), counted.
    pub fn forbid(&self) -> Error {
        self.refuse(AuthRefusal::Forbidden)
    }

    /// Counts a refusal decided elsewhere (a socket's refresh for another user).
    pub fn count_forbidden(&self) {
        self.metrics.auth.refusals.get(AuthRefusal::Forbidden).inc();
    }
}

/// When a socket authenticated by `p` must close: its token's `exp` plus `grace`, as a tokio
/// instant; `None` when it never expires.
pub fn socket_deadline(p: &Principal, grace: Duration) -> Option<tokio::time::Instant> {
    let exp = p.exp?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // At most a year ahead: a far-future `exp` must not overflow the clock.
    let left = Duration::from_secs(exp)
        .saturating_add(grace)
        .saturating_sub(now)
        .min(Duration::from_secs(365 * 86_400));
    Some(tokio::time::Instant::now() + left)
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The token of a `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`.
fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_BEARER_PREFIX))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(vars: &[(&str, &str)]) -> Arc<Auth> {
        let mut all = vec![("PRESENCE_AUTH", "jwt"), ("PRESENCE_JWT_SECRET", SECRET)];
        all.extend_from_slice(vars);
        let c = Config::from_vars(&all).unwrap();
        Auth::new(&c, Arc::new(Metrics::new())).unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn user_and_service_tokens() {
        let a = auth(&[]);
        let exp = now() + 60;
        let p = a
            .verify(&hs(json!({"sub": "42", "aud": "presence", "exp": exp})))
            .await
            .unwrap();
        assert_eq!(
            p,
            Principal {
                user: Some(42),
                service: false,
                exp: Some(exp)
            }
        );
        assert!(p.may_act_for(42) && !p.may_act_for(43));
        assert_eq!(a.authorize(&p, 43), Err(Error::Forbidden));
        let s = a
            .verify(&hs(
                json!({"sub": "im-server", "aud": "presence", "exp": exp,
                "scope": "presence:read presence:service"}),
            ))
            .await
            .unwrap();
        assert!(s.service && s.user.is_none() && s.may_act_for(43));
        // A user token must name a userId, and every token needs exp, aud and sub.
        for claims in [
            json!({"sub": "im-server", "aud": "presence", "exp": exp}),
            json!({"sub": "-1", "aud": "presence", "exp": exp}),
            json!({"sub": "42", "aud": "presence"}),
            json!({"sub": "42", "exp": exp}),
            json!({"aud": "presence", "exp": exp}),
        ] {
            let t = hs(claims.clone());
            assert_eq!(a.verify(&t).await, Err(Error::Unauthorized), "{claims}");
        }
        let near =
            hs(json!({"sub": "42", "aud": "presence", "exp": exp, "scope": "presence:services"}));
        assert!(
            !a.verify(&near).await.unwrap().service,
            "the scope holds the exact word"
        );
        let old = hs(json!({"sub": "42", "aud": "presence", "exp": now() - 120}));
        assert_eq!(a.verify(&old).await, Err(Error::Unauthorized));
        // Within the leeway.
        let recent = hs(json!({"sub": "42", "aud": "presence", "exp": now() - 5}));
        assert!(a.verify(&recent).await.is_ok());
        let text = a.metrics.render();
        assert!(
            text.contains(r#"presence_auth_refusals_total{reason="expired"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"presence_auth_refusals_total{reason="forbidden"} 1"#));
        assert!(text.contains(r#"presence_auth_mode{mode="jwt"} 1"#));
        assert!(text.contains(r#"presence_auth_mode{mode="none"} 0"#));
    }

    #[tokio::test]
    async fn issuer_is_checked_when_set() {
        let a = auth(&[("PRESENCE_JWT_ISSUER", "https://idp")]);
        let exp = now() + 60;
        let ok = hs(json!({"sub": "1", "aud": "presence", "exp": exp, "iss": "https://idp"}));
        assert!(a.verify(&ok).await.is_ok());
        for iss in [json!("https://other"), json!(null)] {
            let t = hs(json!({"sub": "1", "aud": "presence", "exp": exp, "iss": iss}));
            assert_eq!(a.verify(&t).await, Err(Error::Unauthorized), "{iss}");
        }
    }

    #[tokio::test]
    async fn headers_and_subprotocols() {
        let a = auth(&[]);
        let t = hs(json!({"sub": "7", "aud": "presence", "exp": now() + 60}));
        let mut h = HeaderMap::new();
        assert_eq!(a.authenticate(&h, true).await, Err(Error::Unauthorized));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            format!("presence.v1, bearer.{t}").parse().unwrap(),
        );
        assert_eq!(a.authenticate(&h, true).await.unwrap().user, Some(7));
        // Only on a WebSocket upgrade.
        assert_eq!(a.authenticate(&h, false).await, Err(Error::Unauthorized));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        assert_eq!(a.authenticate(&h, false).await.unwrap().user, Some(7));
        h.insert(header::AUTHORIZATION, format!("Basic {t}").parse().unwrap());
        assert_eq!(a.authenticate(&h, false).await, Err(Error::Unauthorized));
        let none = Auth::new(&Config::from_vars(&[]).unwrap(), Arc::new(Metrics::new())).unwrap();
        assert_eq!(
            none.authenticate(&HeaderMap::new(), false).await,
            Ok(Principal::ANONYMOUS)
        );
    }

    #[test]
    fn jwks_keeps_only_pinned_signature_keys() {
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "rsa", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
            {"kty": "RSA", "kid": "rsa-enc", "use": "enc", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "rsa-384", "alg": "RS384", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "n": "sXch", "e": "AQAB"},
            {"kty": "OKP", "kid": "ed-short", "crv": "Ed25519", "x": "AAAA"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "weird", "kid": "x"}
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["ed", "rsa"]);
        assert_eq!(keys["rsa"].alg, Algorithm::RS256);
        assert_eq!(keys["ed"].alg, Algorithm::EdDSA);
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn base64url() {
        assert_eq!(base64_url_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_url_decode("aGVsbG8=").unwrap(), b"hello");
        assert!(base64_url_decode("a+b").is_none());
    }
}
