//! Tokens: 256 random bits shown once, stored only as a SHA-256 hash. The hash is the
//! lookup key, so a token is never compared byte by byte and never kept in memory.

use std::path::Path;

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

/// A new token for an account of entity shard `shard` (sharded cluster mode,
/// `docs/sharding.md` §4): `tok_<shard>.<256 random bits>`. Any node reads the shard from
/// the token to route the request to the shard's owner, which alone holds the token's hash
/// in its registry; the shard is part of what is hashed, so it cannot be changed.
pub fn new_token_in(shard: u64) -> (String, [u8; 32]) {
    let bytes: [u8; 32] = rand::random();
    let token = format!("tok_{shard}.{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&token);
    (token, hash)
}

/// The entity shard an own token names (`tok_<shard>.…`, [`new_token_in`]); `None` for a
/// token without one (minted by a node not in sharded mode) or one that names no entity
/// shard.
pub fn token_shard(token: &str) -> Option<u64> {
    let (shard, _) = token.strip_prefix("tok_")?.split_once('.')?;
    if shard.is_empty() || shard.len() > 3 || !shard.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let shard: u64 = shard.parse().ok()?;
    (1..=dispatch_engine::shard::ENTITY_SHARDS)
        .contains(&shard)
        .then_some(shard)
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether two token hashes are equal, in time that does not depend on where they differ.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// The file the generated admin token is kept in, inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The admin token's hash: from `--admin-token` if set; else read from
/// `<data-dir>/admin.token`, which the first start creates with mode 0600. The token
/// itself is never logged: only the file's path is.
pub fn admin_token_hash(given: Option<&str>, data_dir: &Path) -> anyhow::Result<[u8; 32]> {
    if let Some(t) = given {
        return Ok(hash(t));
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    anyhow::bail!(
                        "{} is readable by others (mode {:o}); make it private (chmod 600) or pass --admin-token",
                        path.display(),
                        mode & 0o777
                    );
                }
            }
            let token = text.trim();
            if token.len() < 16 {
                anyhow::bail!(
                    "{} holds no usable admin token (at least 16 characters); delete it to have a new one made, or pass --admin-token",
                    path.display()
                );
            }
            tracing::info!(file = %path.display(), "admin token read from file");
            Ok(hash(token))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let token = format!("adm_{}", URL_SAFE_NO_PAD.encode(bytes));
            // With --store postgres nothing else creates the data directory.
            std::fs::create_dir_all(data_dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts
                .open(&path)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
            use std::io::Write;
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()?;
            tracing::info!(file = %path.display(), "admin token generated; read it from the file");
            Ok(hash(&token))
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
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
    fn the_admin_token_file_is_made_private_once_and_read_back() {
        let dir = std::env::temp_dir().join(format!("dispatch-admin-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = admin_token_hash(None, &dir).unwrap();
        let path = dir.join(ADMIN_TOKEN_FILE);
        let token = std::fs::read_to_string(&path).unwrap();
        assert_eq!(hash(token.trim()), first);
        assert_eq!(admin_token_hash(None, &dir).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = admin_token_hash(None, &dir).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{e}");
        }
        // A token given on the command line wins and the file is not consulted.
        assert_eq!(
            admin_token_hash(Some("x".repeat(20).as_str()), &dir).unwrap(),
            hash(&"x".repeat(20))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sharded_token_names_its_shard_and_others_name_none() {
        let (t, h) = new_token_in(17);
        assert!(t.starts_with("tok_17."), "{t}");
        assert_eq!(hash(&t), h);
        assert_eq!(token_shard(&t), Some(17));
        assert_eq!(token_shard(&new_token_in(256).0), Some(256));
        for bad in [
            new_token().0.as_str(),
            "tok_0.x",
            "tok_257.x",
            "tok_.x",
            "tok_-1.x",
            "tok_1234.x",
            "tok_12x.y",
            "xyz_5.a",
            "",
        ] {
            assert_eq!(token_shard(bad), None, "{bad}");
        }
    }

    #[test]
    fn hashes_compare_equal_only_when_equal() {
        assert!(same_hash(&hash("a"), &hash("a")));
        assert!(!same_hash(&hash("a"), &hash("b")));
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
