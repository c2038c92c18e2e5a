//! Postgres connection strings handed to child processes (psql, pg_dump): the password
//! leaves the string and travels in `PGPASSWORD`, because a process's argv is readable by
//! every user of the host (`ps`) and its environment only by its own user and root.

/// `dsn` without its password, and the password. Both forms libpq takes: a URL
/// (`postgres://user:pw@host/db`, or `?password=` in its query) and key/value words
/// (`host=h password='p w'`). A string that is neither is returned as it is.
pub fn split_password(dsn: &str) -> (String, Option<String>) {
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        return split_url(dsn);
    }
    match words(dsn) {
        Some(pairs) if pairs.iter().any(|(k, _)| k == "password") => {
            let password = pairs
                .iter()
                .rev()
                .find(|(k, _)| k == "password")
                .map(|(_, v)| v.clone());
            let rest: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k != "password")
                .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
                .collect();
            (rest.join(" "), password)
        }
        _ => (dsn.to_string(), None),
    }
}

fn split_url(dsn: &str) -> (String, Option<String>) {
    let Ok(mut url) = url::Url::parse(dsn) else {
        return (dsn.to_string(), None);
    };
    let mut password = url.password().map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    if password.is_some() && url.set_password(None).is_err() {
        return (dsn.to_string(), None);
    }
    let query: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some((_, p)) = query.iter().rev().find(|(k, _)| k == "password") {
        password = Some(p.clone());
        let kept: Vec<&(String, String)> = query.iter().filter(|(k, _)| k != "password").collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut()
                .clear()
                .extend_pairs(kept.iter().map(|(k, v)| (k, v)));
        }
    }
    (url.to_string(), password)
}

/// libpq's key/value form: `key = value` words, values bare (backslash escapes) or in single
/// quotes (backslash escapes). `None` when `s` is not in that form.
fn words(s: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::split_password;

    #[test]
    fn a_url_loses_its_password_decoded() {
        assert_eq!(
            split_password("postgres://outpost:s%40cret@db:5432/app?sslmode=require"),
            (
                "postgres://outpost@db:5432/app?sslmode=require".to_string(),
                Some("s@cret".to_string())
            )
        );
        assert_eq!(
            split_password("postgresql://u@db/app?password=p%20w&sslmode=disable"),
            (
                "postgresql://u@db/app?sslmode=disable".to_string(),
                Some("p w".to_string())
            )
        );
        assert_eq!(
            split_password("postgres://u@db/app"),
            ("postgres://u@db/app".to_string(), None)
        );
    }

    #[test]
    fn key_value_words_lose_the_password_quoted_or_not() {
        assert_eq!(
            split_password("host=db password='it''s' user=u"),
            ("host=db password='it''s' user=u".to_string(), None),
            "'' is not an escape in libpq: the string is not key/value words and stays as it is"
        );
        assert_eq!(
            split_password(r"host=db password = 'a b\'c' dbname=app"),
            (
                "host='db' dbname='app'".to_string(),
                Some("a b'c".to_string())
            )
        );
        assert_eq!(
            split_password(r"password=bare\ word host=/run/postgresql"),
            (
                "host='/run/postgresql'".to_string(),
                Some("bare word".to_string())
            )
        );
        assert_eq!(
            split_password("host=db user=u"),
            ("host=db user=u".to_string(), None)
        );
        assert_eq!(split_password("not a dsn"), ("not a dsn".to_string(), None));
    }
}
