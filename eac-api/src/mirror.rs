//! The ublk-mirror daemon's control socket (client side and wire types; the server is in
//! `ublk-mirror`): a unix stream socket speaking JSON lines, one request per line, one answer
//! per line, any number per connection.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"promote","force":false}`, `{"cmd":"demote"}`,
//! `{"cmd":"resolve","discard_local":true}` (false = `--keep`), `{"cmd":"verify"}`,
//! `{"cmd":"attach-disk","path":"/dev/sdb"}` (path optional), `{"cmd":"resume-io"}`. A bare
//! word (`status`) is accepted as `{"cmd":"status"}`. Answers always carry `"ok"`; failures
//! an `"error"` string, and `"transient": true` when retrying later may help.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

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
    /// The owner is confirmed: release writes held by `on_peer_loss = freeze`.
    ResumeIo,
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
