//! Proof of origin for the Redis stream entries replicas write: relayed requests (terminal
//! opens, task commands), their answers, terminal input and terminal output. Each carries `m`:
//! the id of the key that signed it (4 bytes, big-endian) and an HMAC-SHA256 over the stream it
//! is in (for output, with the entry's id) and its other fields in order, with a key only the
//! replicas hold (kept in the control plane's storage, `signing_keys`). Write access to Redis
//! alone can then neither open a terminal, nor type into one, nor create a task, nor forge an
//! answer or what a browser is shown: an entry without a valid `m` is dropped where it is read.
//!
//! Keys rotate (`outpost admin rotate-signing-key`): every replica signs with the current key
//! and accepts every key that has not been retired, so entries signed before a rotation verify
//! until their key is retired.

use std::sync::RwLock;

use hmac::{Hmac, Mac};
use redis::Value;
use sha2::Sha256;

/// The name of the field holding the MAC.
pub const MAC_FIELD: &str = "m";

/// Bytes of the key id in front of each MAC.
const KEY_ID_BYTES: usize = 4;

/// One signing key and the id entries name it by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SigningKey {
    pub id: u32,
    pub key: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.id)
    }
}

struct Ring {
    current: SigningKey,
    /// Every key an entry may be signed with, the current one included.
    accepted: Vec<SigningKey>,
}

pub struct Signer {
    ring: RwLock<Ring>,
}

impl Signer {
    /// A signer with one key (id 0) that only it knows: until [`Signer::set_keys`] gives it
    /// the shared ones, what it signs is accepted by itself alone.
    pub fn new(key: [u8; 32]) -> Signer {
        let only = SigningKey { id: 0, key };
        Signer {
            ring: RwLock::new(Ring {
                current: only,
                accepted: vec![only],
            }),
        }
    }

    /// Sign with `current` from now on and accept `accepted` (which need not name `current`).
    pub fn set_keys(&self, current: SigningKey, accepted: &[SigningKey]) {
        let mut accepted = accepted.to_vec();
        if !accepted.contains(&current) {
            accepted.push(current);
        }
        *self
            .ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Ring { current, accepted };
    }

    /// The id of the key entries are signed with now.
    pub fn current_id(&self) -> u32 {
        self.ring().current.id
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The accepted key with id `id`.
    fn key(&self, id: u32) -> Option<[u8; 32]> {
        self.ring()
            .accepted
            .iter()
            .find(|k| k.id == id)
            .map(|k| k.key)
    }

    fn start(key: &[u8; 32], stream: &str) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        feed(&mut mac, stream.as_bytes());
        mac
    }

    fn mac_of(key: &[u8; 32], stream: &str, fields: &[(&str, &[u8])]) -> Hmac<Sha256> {
        let mut mac = Signer::start(key, stream);
        for (name, value) in fields {
            feed(&mut mac, name.as_bytes());
            feed(&mut mac, value);
        }
        mac
    }

    /// The key id and MAC of an entry of `stream` with `fields` (name, value) in this order,
    /// signed with the current key.
    pub fn sign(&self, stream: &str, fields: &[(&str, &[u8])]) -> Vec<u8> {
        let current = self.ring().current;
        let mut out = current.id.to_be_bytes().to_vec();
        out.extend_from_slice(
            &Signer::mac_of(&current.key, stream, fields)
                .finalize()
                .into_bytes(),
        );
        out
    }

    /// The accepted key `claimed` names, and the MAC after its id.
    fn split<'a>(&self, claimed: &'a [u8]) -> Option<([u8; 32], &'a [u8])> {
        let (id, mac) = claimed.split_first_chunk::<KEY_ID_BYTES>()?;
        Some((self.key(u32::from_be_bytes(*id))?, mac))
    }

    /// Whether `claimed_hex` is the hex of [`Signer::sign`]'s output over the same input with
    /// an accepted key, compared in constant time.
    pub fn verify_hex(&self, stream: &str, fields: &[(&str, &[u8])], claimed_hex: &[u8]) -> bool {
        let Ok(claimed) = hex::decode(claimed_hex) else {
            return false;
        };
        self.split(&claimed).is_some_and(|(key, mac)| {
            Signer::mac_of(&key, stream, fields)
                .verify_slice(mac)
                .is_ok()
        })
    }

    /// Whether an entry of `stream` as read (name, value, name, value, …) carries a valid MAC
    /// over its other fields, by an accepted key.
    pub fn verify(&self, stream: &str, fields: &[Value]) -> bool {
        // Two passes over the fields (the MAC, which names the key, may come last) rather
        // than a copy of them: this runs for every entry read.
        let mut claimed = None;
        for pair in fields.chunks(2) {
            let [Value::BulkString(name), Value::BulkString(value)] = pair else {
                return false;
            };
            if name.as_slice() == MAC_FIELD.as_bytes() {
                claimed = Some(value.as_slice());
            }
        }
        let Some((key, mac)) = claimed.and_then(|c| self.split(c)) else {
            return false;
        };
        let mut check = Signer::start(&key, stream);
        for pair in fields.chunks(2) {
            if let [Value::BulkString(name), Value::BulkString(value)] = pair
                && name.as_slice() != MAC_FIELD.as_bytes()
            {
                feed(&mut check, name);
                feed(&mut check, value);
            }
        }
        check.verify_slice(mac).is_ok()
    }
}

/// Length-prefixed, so no two field lists feed the same bytes.
fn feed(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::{Signer, SigningKey, Value};

    fn as_read(fields: &[(&str, &[u8])], mac: &[u8]) -> Vec<Value> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(Value::BulkString(name.as_bytes().to_vec()));
            out.push(Value::BulkString(value.to_vec()));
        }
        out.push(Value::BulkString(b"m".to_vec()));
        out.push(Value::BulkString(mac.to_vec()));
        out
    }

    #[test]
    fn a_signed_entry_verifies_and_any_change_does_not() {
        let signer = Signer::new([7; 32]);
        let fields: [(&str, &[u8]); 2] = [("s", b"ses_1"), ("a", b"agt_1")];
        let mac = signer.sign("requests", &fields);
        assert!(signer.verify("requests", &as_read(&fields, &mac)));

        assert!(!signer.verify("other-stream", &as_read(&fields, &mac)));
        let changed: [(&str, &[u8]); 2] = [("s", b"ses_1"), ("a", b"agt_2")];
        assert!(!signer.verify("requests", &as_read(&changed, &mac)));
        let shifted: [(&str, &[u8]); 2] = [("s", b"ses_1a"), ("a", b"gt_1")];
        assert!(!signer.verify("requests", &as_read(&shifted, &mac)));
        let unsigned: Vec<Value> = as_read(&fields, &mac)[..4].to_vec();
        assert!(!signer.verify("requests", &unsigned), "no MAC, no entry");
        assert!(
            !Signer::new([8; 32]).verify("requests", &as_read(&fields, &mac)),
            "another key"
        );
    }

    #[test]
    fn entries_signed_before_a_rotation_verify_until_their_key_is_retired() {
        let signer = Signer::new([7; 32]);
        let first = SigningKey {
            id: 1,
            key: [1; 32],
        };
        let second = SigningKey {
            id: 2,
            key: [2; 32],
        };
        signer.set_keys(first, &[first, second]);
        let fields: [(&str, &[u8]); 1] = [("s", b"ses_1")];
        let old = signer.sign("requests", &fields);
        assert_eq!(old[..4], 1u32.to_be_bytes());

        signer.set_keys(second, &[first, second]);
        let new = signer.sign("requests", &fields);
        assert_eq!(new[..4], 2u32.to_be_bytes());
        assert!(signer.verify("requests", &as_read(&fields, &old)));
        assert!(signer.verify("requests", &as_read(&fields, &new)));

        signer.set_keys(second, &[second]);
        assert!(
            !signer.verify("requests", &as_read(&fields, &old)),
            "retired"
        );
        assert!(signer.verify("requests", &as_read(&fields, &new)));

        let mut renamed = old.clone();
        renamed[..4].copy_from_slice(&2u32.to_be_bytes());
        assert!(
            !signer.verify("requests", &as_read(&fields, &renamed)),
            "a MAC names its own key"
        );
    }

    #[test]
    fn a_hex_mac_verifies_only_for_its_own_input() {
        let signer = Signer::new([7; 32]);
        let fields: [(&str, &[u8]); 1] = [("agent_id", b"agt_1")];
        let mac = hex::encode(signer.sign("meta", &fields));
        assert!(signer.verify_hex("meta", &fields, mac.as_bytes()));
        assert!(!signer.verify_hex("meta", &[("agent_id", b"agt_2")], mac.as_bytes()));
        assert!(!signer.verify_hex("other", &fields, mac.as_bytes()));
        assert!(!signer.verify_hex("meta", &fields, b"not hex"));
        assert!(!signer.verify_hex("meta", &fields, &mac.as_bytes()[..10]));
    }
}
