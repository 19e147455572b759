//! The operator's identity provider for the tests that use JWTs (`jwt.rs`, `forward.rs`):
//! keys made with the `openssl` command (RSA 2048 and EC P-256), a JWKS served on loopback
//! by a small axum server, and JWTs signed with `jsonwebtoken`.
// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dispatch_tests::{now_ms, openssl};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://idp.example.test";
pub const AUDIENCE: &str = "dispatchd";

/// A signing key and its public JWK.
pub struct Signer {
    pub kid: String,
    pub alg: Algorithm,
    pub key: EncodingKey,
    pub jwk: Value,
    pub public_pem: Vec<u8>,
}

impl Signer {
    pub fn rsa(kid: &str) -> Signer {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "k.pem",
            ],
            dir.path(),
        );
        let modulus = String::from_utf8(openssl(
            &["rsa", "-in", "k.pem", "-noout", "-modulus"],
            dir.path(),
        ))
        .unwrap();
        let n = hex_bytes(modulus.trim().strip_prefix("Modulus=").unwrap());
        let pem = std::fs::read(dir.path().join("k.pem")).unwrap();
        let public_pem = openssl(&["pkey", "-in", "k.pem", "-pubout"], dir.path());
        Signer {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(&pem).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB"}),
            public_pem,
        }
    }

    pub fn ec(kid: &str) -> Signer {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "k.pem",
            ],
            dir.path(),
        );
        let der = openssl(
            &["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"],
            dir.path(),
        );
        // A P-256 SubjectPublicKeyInfo ends with the uncompressed point 04 || x || y.
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 4);
        let pem = std::fs::read(dir.path().join("k.pem")).unwrap();
        let public_pem = openssl(&["pkey", "-in", "k.pem", "-pubout"], dir.path());
        Signer {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(&pem).unwrap(),
            jwk: json!({"kty": "EC", "kid": kid, "use": "sig", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}),
            public_pem,
        }
    }

    /// A token with this key's kid and algorithm.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// A token signed with this key but naming `kid`.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }
}

pub fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// Valid claims for `role` `sub`, valid for ten minutes.
pub fn claims(role: &str, sub: &str) -> Value {
    let now = now_ms() / 1000;
    json!({"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, "role": role, "sub": sub})
}

pub const SERVE: usize = 0;
pub const FAIL: usize = 1;
pub const HANG: usize = 2;
pub const HUGE: usize = 3;

/// The identity provider's key set on loopback: what it serves can change, it can be made
/// to fail, and it counts its fetches.
#[derive(Clone)]
pub struct Idp {
    pub keys: Arc<Mutex<Vec<Value>>>,
    pub fetches: Arc<AtomicUsize>,
    /// What the key set endpoint does: [`SERVE`], [`FAIL`], [`HANG`] or [`HUGE`].
    pub mode: Arc<AtomicUsize>,
    pub url: String,
}

impl Idp {
    pub async fn serve(keys: &[&Signer]) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = Idp {
            keys: Arc::new(Mutex::new(Vec::new())),
            fetches: Arc::new(AtomicUsize::new(0)),
            mode: Arc::new(AtomicUsize::new(SERVE)),
            url: format!("http://{}/jwks", listener.local_addr().unwrap()),
        };
        idp.publish(keys);
        let state = idp.clone();
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let s = state.clone();
                async move {
                    s.fetches.fetch_add(1, Ordering::SeqCst);
                    let keys = s.keys.lock().unwrap().clone();
                    let set = json!({ "keys": keys }).to_string();
                    match s.mode.load(Ordering::SeqCst) {
                        FAIL => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                        HANG => std::future::pending().await,
                        // The real keys, padded past the 256 KiB bound.
                        HUGE => (
                            axum::http::StatusCode::OK,
                            format!("{set}{}", " ".repeat(300 * 1024)),
                        ),
                        _ => (axum::http::StatusCode::OK, set),
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        idp
    }

    pub fn publish(&self, keys: &[&Signer]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    pub fn flags<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut f = vec![
            "--auth-jwt-jwks-url",
            &self.url,
            "--auth-jwt-issuer",
            ISSUER,
            "--auth-jwt-audience",
            AUDIENCE,
        ];
        f.extend_from_slice(extra);
        f
    }
}
