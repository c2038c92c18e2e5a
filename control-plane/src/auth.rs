//! Users, roles and secrets. Passwords are stored as argon2id hashes; random secrets (API
//! tokens, agent credentials, enrollment tokens) carry 256 bits of entropy and are stored as
//! SHA-256 digests, so the database never holds anything a reader could present.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};
use world::World;

/// Roles are ordered: each one can do everything the ones before it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn allows(self, required: Role) -> bool {
        self >= required
    }
}

/// Kinds of random secret, each with its own recognizable prefix.
#[derive(Clone, Copy, Debug)]
pub enum SecretKind {
    ApiToken,
    AgentCredential,
    EnrollToken,
}

impl SecretKind {
    fn prefix(self) -> &'static str {
        match self {
            SecretKind::ApiToken => "opt_",
            SecretKind::AgentCredential => "opa_",
            SecretKind::EnrollToken => "ope_",
        }
    }
}

pub fn new_secret(world: &World, kind: SecretKind) -> String {
    format!(
        "{}{}",
        kind.prefix(),
        hex::encode(world.random_bytes::<32>())
    )
}

/// A short random id with a prefix, e.g. `agt_3f2a…`.
pub fn new_id(world: &World, prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(world.random_bytes::<8>()))
}

pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[derive(Debug, thiserror::Error)]
#[error("hash password: {0}")]
pub struct HashError(String);

/// Argon2id with the library's recommended parameters. CPU-heavy: call through
/// `World::blocking`. The salt comes from the world's randomness.
pub fn hash_password(salt_bytes: [u8; 16], password: &str) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| HashError(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Compared against when a login names an unknown user, so that answer takes as long as a
/// wrong password does (user names are not revealed by timing).
pub const DUMMY_PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$b3V0cG9zdC1kdW1teQ$0Zp8Tn7mQlmVtLSr1Bqv6o1mJz3h3VnAbo9k8kqG3yE";

/// Passwords shorter than this are refused at user creation.
pub const PASSWORD_CHARS_MIN: usize = 12;
/// Longer passwords are refused everywhere (argon2 cost is linear in input).
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// A random 20-character password from an alphabet without look-alikes (0/O, 1/l/I).
pub fn generate_password(world: &World) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    (0..20)
        .map(|_| {
            let i = usize::try_from(world.random_below(ALPHABET.len() as u64)).unwrap_or(0);
            char::from(ALPHABET[i])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Role, hash_password, secret_hash, verify_password};

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn password_round_trip() {
        let hash = hash_password([7; 16], "correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse battery"));
        assert!(!verify_password(&hash, "correct horse battery!"));
        assert!(!verify_password("not a hash", "x"));
    }

    #[test]
    fn dummy_hash_parses_and_matches_nothing_common() {
        assert!(argon2::password_hash::PasswordHash::new(super::DUMMY_PASSWORD_HASH).is_ok());
        assert!(!verify_password(super::DUMMY_PASSWORD_HASH, ""));
    }

    #[test]
    fn secret_hash_is_sha256_hex() {
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
