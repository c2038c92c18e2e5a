//! Proof of origin for the Redis stream entries replicas write: relayed requests (terminal
//! opens, task commands), their answers, terminal input and terminal output. Each carries `m`,
//! an HMAC-SHA256 over the stream it is in (for output, with the entry's id) and its other
//! fields in order, with a key only the replicas hold (kept in the control plane's storage,
//! `cluster_secrets`). Write access to Redis alone can then neither open a terminal, nor type
//! into one, nor create a task, nor forge an answer or what a browser is shown: an entry
//! without a valid `m` is dropped where it is read. The session meta hash is not signed
//! (SECURITY.md says why).

use std::sync::RwLock;

use hmac::{Hmac, Mac};
use redis::Value;
use sha2::Sha256;

/// The name of the field holding the MAC.
pub const MAC_FIELD: &str = "m";

pub struct Signer {
    key: RwLock<[u8; 32]>,
}

impl Signer {
    pub fn new(key: [u8; 32]) -> Signer {
        Signer {
            key: RwLock::new(key),
        }
    }

    /// Use `key` from now on (the one every replica reads from storage at start-up).
    pub fn set_key(&self, key: [u8; 32]) {
        *self
            .key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = key;
    }

    fn start(&self, stream: &str) -> Hmac<Sha256> {
        let key = *self
            .key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
        feed(&mut mac, stream.as_bytes());
        mac
    }

    fn mac_of(&self, stream: &str, fields: &[(&str, &[u8])]) -> Hmac<Sha256> {
        let mut mac = self.start(stream);
        for (name, value) in fields {
            feed(&mut mac, name.as_bytes());
            feed(&mut mac, value);
        }
        mac
    }

    /// The MAC of an entry of `stream` with `fields` (name, value) in this order.
    pub fn sign(&self, stream: &str, fields: &[(&str, &[u8])]) -> Vec<u8> {
        self.mac_of(stream, fields).finalize().into_bytes().to_vec()
    }

    /// Whether `claimed_hex` is the hex of [`Signer::sign`]'s MAC over the same input,
    /// compared in constant time.
    pub fn verify_hex(&self, stream: &str, fields: &[(&str, &[u8])], claimed_hex: &[u8]) -> bool {
        hex::decode(claimed_hex)
            .is_ok_and(|claimed| self.mac_of(stream, fields).verify_slice(&claimed).is_ok())
    }

    /// Whether an entry of `stream` as read (name, value, name, value, …) carries a valid MAC
    /// over its other fields.
    pub fn verify(&self, stream: &str, fields: &[Value]) -> bool {
        let mut mac = self.start(stream);
        let mut claimed = None;
        for pair in fields.chunks(2) {
            let [Value::BulkString(name), Value::BulkString(value)] = pair else {
                return false;
            };
            if name.as_slice() == MAC_FIELD.as_bytes() {
                claimed = Some(value.as_slice());
            } else {
                feed(&mut mac, name);
                feed(&mut mac, value);
            }
        }
        claimed.is_some_and(|claimed| mac.verify_slice(claimed).is_ok())
    }
}

/// Length-prefixed, so no two field lists feed the same bytes.
fn feed(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::{Signer, Value};

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
