//! The control socket: a unix stream socket speaking JSON lines, one request per line, one
//! answer per line, any number per connection. The controller and `ublk-mirror status |
//! promote | demote | resolve | verify | attach-disk` use it.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"promote","force":false}`, `{"cmd":"demote"}`,
//! `{"cmd":"resolve","discard_local":true}` (false = `--keep`), `{"cmd":"verify"}`,
//! `{"cmd":"attach-disk","path":"/dev/sdb"}` (path optional). A bare word (`status`) is
//! accepted as `{"cmd":"status"}`. Answers always carry `"ok"`; failures an `"error"` string.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::{Daemon, DaemonError};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The status document.
    Status,
    /// Become primary.
    Promote {
        /// Also when the local copy is inconsistent.
        #[serde(default)]
        force: bool,
    },
    /// Become secondary.
    Demote,
    /// Resolve a split brain.
    Resolve {
        /// true: this copy's changes are discarded; false: this copy survives.
        discard_local: bool,
    },
    /// Start an online verify.
    Verify,
    /// Attach a local disk to a diskless primary.
    AttachDisk {
        /// Default: the configured backing.
        #[serde(default)]
        path: Option<PathBuf>,
    },
}

/// Control client failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Could not talk to the daemon.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something that is not JSON.
    #[error("bad answer from the daemon: {0}")]
    BadAnswer(String),
    /// The daemon refused or failed the request (retrying will not help).
    #[error("{0}")]
    Failed(String),
    /// The daemon cannot do it yet (`"transient": true`): retry later.
    #[error("{0}")]
    Transient(String),
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let t = line.trim();
    if t.starts_with('{') {
        serde_json::from_str(t).map_err(|e| format!("bad request: {e}"))
    } else {
        serde_json::from_value(json!({ "cmd": t })).map_err(|e| format!("bad request {t:?}: {e}"))
    }
}

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
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let d = daemon.clone();
                tokio::spawn(async move { connection(s, d).await });
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(s: UnixStream, d: Daemon) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        let n = {
            use tokio::io::AsyncReadExt;
            let mut limited = (&mut r).take(MAX_LINE);
            match limited.read_line(&mut line).await {
                Ok(n) => n,
                Err(_) => return,
            }
        };
        if n == 0 {
            return;
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            let _ = w
                .write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n")
                .await;
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = match parse_request(&line) {
            Err(e) => json!({"ok": false, "error": e}),
            Ok(req) => handle(&d, req).await,
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
        Request::AttachDisk { path } => d.attach_disk(path).await,
    };
    r.unwrap_or_else(|e| {
        let transient = matches!(e, crate::daemon::DaemonError::Busy(_));
        json!({"ok": false, "error": eac_common::error_chain(&e), "transient": transient})
    })
}

/// Sends one request to the daemon at `socket` and returns its answer; an answer with
/// `"ok": false` becomes [`ControlError::Failed`].
pub async fn request(socket: &Path, req: &Request) -> Result<Value, ControlError> {
    let io = |what, source| ControlError::Io {
        what,
        path: socket.to_owned(),
        source,
    };
    let s = UnixStream::connect(socket)
        .await
        .map_err(|e| io("cannot connect to", e))?;
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| io("cannot write to", e))?;
    let mut answer = String::new();
    BufReader::new(r)
        .read_line(&mut answer)
        .await
        .map_err(|e| io("cannot read from", e))?;
    let v: Value = serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(format!("{e}: {answer:?}")))?;
    if v["ok"] == true {
        return Ok(v);
    }
    let msg = v["error"]
        .as_str()
        .unwrap_or("the daemon refused without a reason")
        .to_owned();
    if v["transient"] == true {
        Err(ControlError::Transient(msg))
    } else {
        Err(ControlError::Failed(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_request("status\n"), Ok(Request::Status));
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
}
