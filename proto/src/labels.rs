//! The one rule for agent labels (`env`, `cluster`, `role`, free keys), which the control
//! plane applies to what it stores and the agent to its config's `[labels]`.

use std::collections::BTreeMap;

/// Labels one agent carries at most.
pub const LABELS_MAX: usize = 32;
const KEY_BYTES_MAX: usize = 63;
const VALUE_BYTES_MAX: usize = 128;

/// A label key: 1 to 63 of a-z, 0-9, `_ . -`, starting with a letter.
pub fn key_ok(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= KEY_BYTES_MAX
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

fn value_ok(value: &str) -> bool {
    value.len() <= VALUE_BYTES_MAX && !value.chars().any(char::is_control)
}

/// Why `labels` cannot be stored, naming the label.
pub fn validate(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > LABELS_MAX {
        return Err(format!("labels: at most {LABELS_MAX}"));
    }
    for (k, v) in labels {
        if !key_ok(k) {
            return Err(format!(
                "label {k:?}: a key is 1 to {KEY_BYTES_MAX} of a-z, 0-9, _ . - starting with a letter"
            ));
        }
        if !value_ok(v) {
            return Err(format!(
                "label {k}: a value is at most {VALUE_BYTES_MAX} printable bytes"
            ));
        }
    }
    Ok(())
}
