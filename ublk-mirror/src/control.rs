//! The control socket's server: a unix stream socket speaking JSON lines, one request per
//! line, one answer per line, any number per connection. The controller and `ublk-mirror
//! status | promote | demote | resolve | verify | attach-disk | resume-io` use it through
//! `eac-api` ([`eac_api::mirror`]: the requests, the client; re-exported here), whose module
//! documentation describes the protocol.
//!
//! A bad line (not UTF-8, not a request, longer than 64 KiB) is answered with an error and
//! logged at `warn`, at most one line per client uid per 10 s with the count of the ones
//! suppressed; the connection stays usable.
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eac_common::ratelimit;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::{Daemon, DaemonError};
pub use eac_api::mirror::{ControlError, Request, parse_request, request};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Binds the control socket (root only: 0600), refusing if another daemon answers on it.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let io = |source| DaemonError::Listen {
        addr: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::Config(format!(
            "{} is in use: is another ublk-mirror running for this resource?",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

/// Serves control connections forever.
pub async fn serve(listener: UnixListener, daemon: Daemon) {
    let handle = move |req| {
        let d = daemon.clone();
        async move { handle(&d, req).await }
    };
    serve_with(listener, handle, BadRequestLog::new(ratelimit::DEFAULT_EVERY)).await
}

/// Serves control connections, answering well-formed requests with `handle`. A bad request
/// line (not UTF-8, not a request, too long) is answered with an error, logged through `bad`
/// (rate-limited), and the connection goes on with the next line.
async fn serve_with<H, Fut>(listener: UnixListener, handle: H, bad: BadRequestLog)
where
    H: Fn(Request) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Value> + Send,
{
    let bad = Arc::new(bad);
    let mut flush = tokio::time::interval(bad.every().max(Duration::from_secs(1)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = flush.tick() => {
                bad.flush();
                continue;
            }
        };
        match accepted {
            Ok((s, _)) => {
                let client = Client::of(&s);
                let (handle, bad) = (handle.clone(), bad.clone());
                tokio::spawn(async move { connection(s, client, handle, &bad).await });
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Who is on the other end of a control connection (from `SO_PEERCRED`).
#[derive(Clone, Copy, Debug)]
struct Client {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl Client {
    fn of(s: &UnixStream) -> Self {
        match s.peer_cred() {
            Ok(c) => Client {
                uid: Some(c.uid()),
                pid: c.pid(),
            },
            Err(_) => Client { uid: None, pid: None },
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.uid {
            Some(u) => write!(f, "uid {u}")?,
            None => f.write_str("an unknown client")?,
        }
        if let Some(p) = self.pid {
            write!(f, " (pid {p})")?;
        }
        Ok(())
    }
}

/// The log of bad control requests: one line per client uid per window, with the count of
/// the ones suppressed since the previous line (`eac_common::ratelimit`).
struct BadRequestLog {
    limiter: Mutex<ratelimit::LogLimiter<Option<u32>>>,
}

impl BadRequestLog {
    fn new(every: Duration) -> Self {
        BadRequestLog {
            limiter: Mutex::new(ratelimit::LogLimiter::new(every, ratelimit::DEFAULT_CAP)),
        }
    }

    fn every(&self) -> Duration {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner()).every()
    }

    fn now() -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    /// A bad request from `client`, answered with `error`.
    fn bad(&self, client: Client, error: &str) {
        let go = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(client.uid, Self::now());
        if let Some(r) = go {
            // The reason may quote the request: keep the line short.
            let mut reason: String = error.chars().take(MAX_LOGGED_REASON).collect();
            if reason.len() < error.len() {
                reason.push('…');
            }
            tracing::warn!(
                uid = client.uid,
                pid = client.pid,
                suppressed = r.suppressed,
                "bad control request from {client}: {reason}{}",
                r.note(client)
            );
        }
    }

    /// Reports the counts of clients that went quiet with bad requests not yet logged.
    fn flush(&self) {
        let due = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush(Self::now());
        for s in due {
            let secs = s.since.as_secs_f64().round() as u64;
            let who = match s.key {
                Some(Some(uid)) => format!("uid {uid}"),
                Some(None) => "an unknown client".to_owned(),
                None => "other clients".to_owned(),
            };
            tracing::warn!(
                suppressed = s.suppressed,
                "{} more bad control requests from {who} in the last {secs} s (not logged one by one)",
                s.suppressed
            );
        }
    }
}

/// The longest reason of a bad request quoted in the log, in characters.
const MAX_LOGGED_REASON: usize = 200;

/// One request line read from a connection.
enum Line {
    /// The connection was closed.
    End,
    /// A line (without the limit reached), in the buffer.
    Complete,
    /// Longer than [`MAX_LINE`]; the rest of it was skipped.
    TooLong,
}

/// Reads one line into `buf` (at most [`MAX_LINE`] bytes are kept; the rest of a longer line
/// is read and dropped, so the next line is read whole).
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let n = (&mut *r).take(MAX_LINE).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.ends_with(b"\n") || (n as u64) < MAX_LINE {
        return Ok(Line::Complete);
    }
    loop {
        let (used, done) = {
            let avail = r.fill_buf().await?;
            if avail.is_empty() {
                return Ok(Line::TooLong);
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            }
        };
        r.consume(used);
        if done {
            return Ok(Line::TooLong);
        }
    }
}

async fn connection<H, Fut>(s: UnixStream, client: Client, handle: H, bad: &BadRequestLog)
where
    H: Fn(Request) -> Fut,
    Fut: Future<Output = Value>,
{
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        let parsed = match read_line(&mut r, &mut buf).await {
            Err(_) | Ok(Line::End) => return,
            Ok(Line::TooLong) => Err(format!("bad request: line longer than {MAX_LINE} bytes")),
            Ok(Line::Complete) => match std::str::from_utf8(&buf) {
                Err(e) => Err(format!(
                    "bad request: not UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                )),
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => parse_request(line),
            },
        };
        let answer = match parsed {
            Err(e) => {
                bad.bad(client, &e);
                json!({"ok": false, "error": e})
            }
            Ok(req) => handle(req).await,
        };
        let mut out = answer.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn handle(d: &Daemon, req: Request) -> Value {
    let r = match req {
        Request::Status => Ok(d.status()),
        Request::Promote { force } => d.promote(force).await,
        Request::Demote => d.demote().await,
        Request::Resolve { discard_local } => d.resolve(discard_local).await,
        Request::Verify => d.verify().await,
        Request::ResumeIo => d.resume_io().await,
        Request::AttachDisk { path } => d.attach_disk(path).await,
    };
    r.unwrap_or_else(|e| {
        let transient = matches!(e, crate::daemon::DaemonError::Busy(_));
        json!({"ok": false, "error": eac_common::error_chain(&e), "transient": transient})
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn requests_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_request("status\n"), Ok(Request::Status));
        assert_eq!(parse_request(r#"{"cmd":"resume-io"}"#), Ok(Request::ResumeIo));
        assert_eq!(
            parse_request(r#"{"cmd":"promote"}"#),
            Ok(Request::Promote { force: false })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"promote","force":true}"#),
            Ok(Request::Promote { force: true })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"resolve","discard_local":true}"#),
            Ok(Request::Resolve { discard_local: true })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"attach-disk"}"#),
            Ok(Request::AttachDisk { path: None })
        );
        for bad in [
            "launch",
            r#"{"cmd":"resolve"}"#,
            r#"{"cmd":"promote","force":"yes"}"#,
            "{",
            "\u{0}",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        let round = serde_json::to_string(&Request::Resolve { discard_local: false }).unwrap();
        assert_eq!(round, r#"{"cmd":"resolve","discard_local":false}"#);
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A control socket in a fresh directory, served with a stand-in for the daemon that
    /// echoes the request; `every` is the log window.
    async fn echo_server(name: &str, every: Duration) -> (TempDir, PathBuf, tokio::task::JoinHandle<()>) {
        let d = std::env::temp_dir().join(format!("eac-control-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let path = d.join("ctl.sock");
        let l = bind(&path).unwrap();
        let echo = |req: Request| async move { json!({"ok": true, "request": format!("{req:?}")}) };
        let t = tokio::spawn(serve_with(l, echo, BadRequestLog::new(every)));
        (TempDir(d), path, t)
    }

    /// Sends `line` and reads one answer.
    async fn ask(
        r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        line: &[u8],
    ) -> Value {
        w.write_all(line).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    #[tokio::test]
    async fn every_bad_line_is_answered_and_logged_and_the_connection_goes_on() {
        let (logs, _guard) = crate::test_log::capture();
        // A zero window: every bad request is logged.
        let (_d, path, t) = echo_server("bad-lines", Duration::ZERO).await;
        let (r, mut w) = UnixStream::connect(&path).await.unwrap().into_split();
        let mut r = BufReader::new(r);
        let mut long = vec![b'x'; MAX_LINE as usize * 2 + 17];
        long.push(b'\n');
        let bad: [(&[u8], &str); 5] = [
            (b"\xff\xfe status\n", "not UTF-8"),
            (b"{\"cmd\":\"launch\"}\n", "unknown variant `launch`"),
            (b"launch\n", "bad request \"launch\""),
            (b"{not json\n", "bad request: key must be a string"),
            (&long, "line longer than 65536 bytes"),
        ];
        for (i, (line, why)) in bad.iter().enumerate() {
            let a = ask(&mut r, &mut w, line).await;
            assert_eq!(a["ok"], false, "{a}");
            let e = a["error"].as_str().unwrap();
            assert!(e.contains(why), "{e}");
            // The next good line on the same connection is answered normally.
            let a = ask(&mut r, &mut w, b"{\"cmd\":\"status\"}\n").await;
            assert_eq!(a, json!({"ok": true, "request": "Status"}));
            let warns = logs.lines("WARN");
            assert_eq!(warns.len(), i + 1, "{warns:#?}");
            assert!(warns[i].contains("bad control request from uid "), "{}", warns[i]);
            assert!(warns[i].contains(why), "{}", warns[i]);
        }
        t.abort();
    }

    #[tokio::test]
    async fn a_flood_of_bad_requests_logs_one_line_per_client() {
        let (logs, _guard) = crate::test_log::capture();
        let (_d, path, t) = echo_server("flood", ratelimit::DEFAULT_EVERY).await;
        for _ in 0..3 {
            let (r, mut w) = UnixStream::connect(&path).await.unwrap().into_split();
            let mut r = BufReader::new(r);
            for _ in 0..100 {
                let a = ask(&mut r, &mut w, b"\xff\n").await;
                assert_eq!(a["ok"], false);
            }
        }
        let warns = logs.lines("WARN");
        assert_eq!(warns.len(), 1, "{warns:#?}");
        t.abort();
    }
}
