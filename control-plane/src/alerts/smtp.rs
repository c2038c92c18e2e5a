//! Email over SMTP for the `email` channel: one connection per message over `world`'s
//! streams. `smtp://HOST[:587]` must offer STARTTLS (the connection is upgraded before any
//! password or message is sent, and a reply that arrives ahead of the upgrade is refused);
//! `smtps://HOST[:465]` speaks TLS from the start. The server's certificate is checked against
//! the system's CAs and `ca_file`. With a user the password goes as `AUTH PLAIN`.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use world::{Stream, World};

/// Where and as whom mail goes.
#[derive(Clone, Debug)]
pub struct Mailer {
    pub host: String,
    pub port: u16,
    /// TLS from the first byte (`smtps://`), else STARTTLS.
    pub implicit_tls: bool,
    pub from: String,
    pub to: Vec<String>,
    pub user: Option<String>,
}

/// One message.
pub struct Mail<'a> {
    pub subject: &'a str,
    pub body: &'a str,
    /// The idempotency key (`X-Outpost-Key`, and the `Message-ID`'s local part).
    pub key: &'a str,
    pub now_ms: i64,
}

impl Mailer {
    /// From an `smtp://` or `smtps://` URL; the error names the field.
    pub fn from_url(
        url: &str,
        from: &str,
        to: &[String],
        user: Option<&str>,
    ) -> Result<Mailer, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("url: {e}"))?;
        let (implicit_tls, default_port) = match parsed.scheme() {
            "smtp" => (false, 587),
            "smtps" => (true, 465),
            _ => return Err("url: an email channel's url is smtp://HOST[:PORT] (STARTTLS) or smtps://HOST[:PORT]".into()),
        };
        let host = parsed.host_str().ok_or("url: no host")?.to_string();
        for address in std::iter::once(from).chain(to.iter().map(String::as_str)) {
            if !address_ok(address) {
                return Err(format!(
                    "email: {address:?} is not an address (local@domain)"
                ));
            }
        }
        if to.is_empty() || to.len() > 50 {
            return Err("email.to: 1 to 50 addresses".into());
        }
        Ok(Mailer {
            host,
            port: parsed.port().unwrap_or(default_port),
            implicit_tls,
            from: from.to_string(),
            to: to.to_vec(),
            user: user.map(str::to_string),
        })
    }

    /// Send `mail` within `timeout`.
    pub async fn send(
        &self,
        world: &World,
        password: Option<&str>,
        mail: &Mail<'_>,
        timeout: Duration,
    ) -> Result<(), String> {
        tokio::time::timeout(timeout, self.exchange(world, password, mail))
            .await
            .map_err(|_| {
                format!(
                    "SMTP with {}:{} did not finish within {timeout:?}",
                    self.host, self.port
                )
            })?
    }

    async fn exchange(
        &self,
        world: &World,
        password: Option<&str>,
        mail: &Mail<'_>,
    ) -> Result<(), String> {
        let addr = format!("{}:{}", self.host, self.port);
        let mut stream = world
            .net()
            .connect(&addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        if self.implicit_tls {
            stream = self.tls(world, stream).await?;
        }
        let mut conn = BufReader::new(stream);
        expect(&mut conn, 220, "greeting").await?;
        let mut offers = ehlo(&mut conn).await?;
        if !self.implicit_tls {
            if !offers.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS")) {
                return Err(format!(
                    "{addr} does not offer STARTTLS; mail is not sent in clear text"
                ));
            }
            command(&mut conn, "STARTTLS", 220).await?;
            if !conn.buffer().is_empty() {
                return Err(format!(
                    "{addr} sent data ahead of the TLS upgrade; refused"
                ));
            }
            let tls = self.tls(world, conn.into_inner()).await?;
            conn = BufReader::new(tls);
            offers = ehlo(&mut conn).await?;
        }
        if let Some(user) = &self.user {
            if !offers.iter().any(|l| {
                l.to_ascii_uppercase().starts_with("AUTH")
                    && l.to_ascii_uppercase().contains("PLAIN")
            }) {
                return Err(format!("{addr} does not offer AUTH PLAIN"));
            }
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("\0{user}\0{}", password.unwrap_or_default()));
            command(&mut conn, &format!("AUTH PLAIN {token}"), 235).await?;
        }
        command(&mut conn, &format!("MAIL FROM:<{}>", self.from), 250).await?;
        for to in &self.to {
            command(&mut conn, &format!("RCPT TO:<{to}>"), 250).await?;
        }
        command(&mut conn, "DATA", 354).await?;
        let message = self.message(mail);
        conn.get_mut()
            .write_all(message.as_bytes())
            .await
            .map_err(|e| format!("send the message: {e}"))?;
        command(&mut conn, ".", 250).await?;
        // The message is taken; a failed goodbye changes nothing.
        let _ = command(&mut conn, "QUIT", 221).await;
        Ok(())
    }

    async fn tls(&self, world: &World, stream: Stream) -> Result<Stream, String> {
        let config = world.tls_client().map_err(|e| e.to_string())?;
        world::tls::connect(config, &self.host, stream)
            .await
            .map_err(|e| format!("TLS with {}: {e}", self.host))
    }

    /// Headers and body, CRLF line ends, dot-stuffed, ending before the final `.` line.
    fn message(&self, mail: &Mail<'_>) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_control() || !c.is_ascii() {
                        ' '
                    } else {
                        c
                    }
                })
                .collect()
        };
        let id = hex::encode(
            &sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
                mail.key.as_bytes(),
            ))[..12],
        );
        let mut out = format!(
            "From: {}\r\nTo: {}\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <{id}@outpost>\r\nX-Outpost-Key: {}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
            self.from,
            self.to.join(", "),
            clean(mail.subject),
            rfc2822(mail.now_ms),
            clean(mail.key),
        );
        for line in mail.body.lines() {
            if line.starts_with('.') {
                out.push('.');
            }
            out.push_str(line.trim_end_matches('\r'));
            out.push_str("\r\n");
        }
        out
    }
}

fn address_ok(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && a.len() <= 254
        && a.chars()
            .all(|c| c.is_ascii_graphic() && !"<>,;\"()[]\\".contains(c))
}

/// `Mon, 07 Dec 2026 14:25:00 +0000`.
fn rfc2822(ms: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let s = ms.div_euclid(1000);
    let day = s.div_euclid(86_400);
    let (y, m, d) = crate::time::civil_from_days(day);
    let t = s.rem_euclid(86_400);
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        DAYS[day.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize],
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

/// A reply: its code and lines (the text after the code).
async fn reply(conn: &mut BufReader<Stream>) -> Result<(u16, Vec<String>), String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = conn
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read the server's reply: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        if line.len() < 4 || lines.len() > 100 {
            return Err(format!("unreadable SMTP reply {line:?}"));
        }
        let code: u16 = line[..3]
            .parse()
            .map_err(|_| format!("unreadable SMTP reply {line:?}"))?;
        lines.push(line[4..].trim_end().to_string());
        if line.as_bytes()[3] != b'-' {
            return Ok((code, lines));
        }
    }
}

async fn expect(
    conn: &mut BufReader<Stream>,
    code: u16,
    what: &str,
) -> Result<Vec<String>, String> {
    let (got, lines) = reply(conn).await?;
    if got != code {
        return Err(format!(
            "{what}: the server answered {got} {}",
            lines.join(" ")
        ));
    }
    Ok(lines)
}

async fn command(
    conn: &mut BufReader<Stream>,
    line: &str,
    code: u16,
) -> Result<Vec<String>, String> {
    conn.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .map_err(|e| format!("send {}: {e}", line.split(' ').next().unwrap_or(line)))?;
    let shown = if line.starts_with("AUTH") {
        "AUTH PLAIN"
    } else {
        line
    };
    expect(conn, code, shown).await
}

async fn ehlo(conn: &mut BufReader<Stream>) -> Result<Vec<String>, String> {
    command(conn, "EHLO outpost", 250).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_addresses() {
        assert_eq!(
            rfc2822(1_796_653_500_000),
            "Mon, 07 Dec 2026 14:25:00 +0000"
        );
        assert!(address_ok("ops@example.org"));
        assert!(!address_ok("ops"));
        assert!(!address_ok("a@b>\r\nRCPT TO:<x@y"));
        let m = Mailer::from_url(
            "smtp://mail.example",
            "outpost@example.org",
            &["ops@example.org".into()],
            None,
        )
        .expect("valid");
        assert_eq!((m.port, m.implicit_tls), (587, false));
        assert!(Mailer::from_url("http://x", "a@b", &["c@d".into()], None).is_err());
    }

    #[test]
    fn a_message_is_dot_stuffed_with_clean_headers() {
        let m = Mailer::from_url("smtps://mail.example", "a@b.c", &["d@e.f".into()], None)
            .expect("valid");
        let text = m.message(&Mail {
            subject: "[FIRING] xid_age\r\nBcc: x@y",
            body: "line one\n.starts with a dot",
            key: "k1",
            now_ms: 0,
        });
        assert!(
            text.contains("Subject: [FIRING] xid_age  Bcc: x@y\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("line one\r\n..starts with a dot\r\n"),
            "{text}"
        );
        assert!(text.contains("Date: Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
    }
}
