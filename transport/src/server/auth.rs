//! Tokens: 256 random bits shown once, stored only as a SHA-256 hash. The hash is the
//! lookup key, so a token is never compared byte by byte and never kept in memory.

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// A new token and its hash.
pub fn new_token() -> (String, [u8; 32]) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("tok_{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&token);
    (token, hash)
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token of a request: the `Authorization` header, else `?token=` (browsers
/// cannot set headers on a WebSocket upgrade).
pub fn bearer<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    query_token.filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert_eq!(hash(&a), ha);
        assert!(a.len() > 40);
    }

    #[test]
    fn bearer_prefers_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h, Some("q")), Some("q"));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h, Some("q")), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h, None), None);
    }
}
