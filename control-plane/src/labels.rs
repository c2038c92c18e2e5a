//! Agent labels (`env`, `cluster`, `role` and free keys) and the selectors that use them.
//!
//! A selector is a list of entries, any of which may match: `NAME-PATTERN` (`*` stands for any
//! characters) matches the agent's name, `KEY=VALUE-PATTERN` matches its label `KEY`. So
//! `["env=prod"]`, `["db-*"]` and `["cluster=main", "db-7"]` all work wherever a set of agents
//! is chosen: backup policies, rule overrides, silences and maintenance windows.

use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

pub use proto::labels::{LABELS_MAX, key_ok, validate};

/// An agent's stored labels (none when unset or unreadable).
pub fn of(stored: Option<&str>) -> Labels {
    stored
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// Why a selector entry is malformed (a label entry with a bad key).
pub fn entry_ok(entry: &str) -> Result<(), String> {
    match entry.split_once('=') {
        Some((k, _)) if !key_ok(k) => Err(format!(
            "{entry:?}: a label key is a-z, 0-9, _ . - starting with a letter"
        )),
        _ => Ok(()),
    }
}

/// Entries a selector holds at most.
pub const SELECTOR_ENTRIES_MAX: usize = 1000;
const ENTRY_BYTES_MAX: usize = 128;

/// Why a selector (the `agents` field wherever agents are chosen) cannot be taken.
pub fn selector_ok(selector: &[String]) -> Result<(), String> {
    if selector.is_empty() || selector.len() > SELECTOR_ENTRIES_MAX {
        return Err(format!(
            "agents must list 1 to {SELECTOR_ENTRIES_MAX} names or patterns"
        ));
    }
    if selector
        .iter()
        .any(|a| a.is_empty() || a.len() > ENTRY_BYTES_MAX)
    {
        return Err(format!(
            "agents: each name or pattern is 1 to {ENTRY_BYTES_MAX} bytes"
        ));
    }
    for entry in selector {
        entry_ok(entry).map_err(|e| format!("agents: {e}"))?;
    }
    Ok(())
}

/// Whether selector entry `entry` matches the agent `name` with `labels`.
pub fn matches(entry: &str, name: &str, labels: &Labels) -> bool {
    match entry.split_once('=') {
        Some((k, pattern)) => labels.get(k).is_some_and(|v| glob(pattern, v)),
        None => glob(entry, name),
    }
}

/// Whether any entry of `selector` matches.
pub fn selects(selector: &[String], name: &str, labels: &Labels) -> bool {
    selector.iter().any(|e| matches(e, name, labels))
}

/// `KEY=VALUE` strings as labels (the CLI's `--label`), or the first bad one.
pub fn parse_pairs(pairs: &[String]) -> Result<Labels, String> {
    let mut out = Labels::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("label {p:?}: write KEY=VALUE"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    validate(&out)?;
    Ok(out)
}

/// `pattern` (where `*` is any run of characters) against `name`.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    first.len() + last.len() <= name.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_names_or_labels() {
        let l = labels(&[("env", "prod"), ("cluster", "main-eu")]);
        let sel =
            |entries: &[&str]| -> Vec<String> { entries.iter().map(|e| e.to_string()).collect() };
        assert!(selects(&sel(&["env=prod"]), "db1", &l));
        assert!(selects(&sel(&["cluster=main-*"]), "db1", &l));
        assert!(!selects(&sel(&["env=dev"]), "db1", &l));
        assert!(
            !selects(&sel(&["role=primary"]), "db1", &l),
            "a missing label matches nothing"
        );
        assert!(selects(&sel(&["env=dev", "db*"]), "db1", &l));
        assert!(!selects(&sel(&["web*"]), "db1", &l));
    }

    #[test]
    fn bad_labels_are_refused_with_the_label_named() {
        assert!(
            parse_pairs(&["env".into()])
                .expect_err("no =")
                .contains("KEY=VALUE")
        );
        assert!(
            parse_pairs(&["Env=prod".into()])
                .expect_err("upper")
                .contains("\"Env\"")
        );
        assert!(entry_ok("9x=1").is_err());
        assert!(entry_ok("db-*").is_ok());
        let ok = parse_pairs(&["env=prod".into(), "cluster = main".into()]).expect("valid");
        assert_eq!(ok, labels(&[("env", "prod"), ("cluster", "main")]));
    }
}
