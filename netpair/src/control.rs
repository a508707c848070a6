//! The control socket's requests: status, and runtime changes of the protected guests.
//!
//! Versioned JSON lines over the daemon's root-only unix socket, the controller's dialect
//! (`controller/src/api.rs`):
//!
//! ```text
//! → {"v":1,"id":7,"op":"guest.add","guest":{"name":"db","mac":"52:54:00:fb:01:0b","ip":"10.250.1.11","role":"local","port":"vg1"}}
//! ← {"v":1,"id":7,"ok":{...the guest as `status` shows it...}}
//! → {"v":1,"id":8,"op":"guest.set_role","guest":"db","role":"partner"}
//! → {"v":1,"id":9,"op":"guest.remove","guest":"db"}
//! → {"v":1,"id":10,"op":"guest.show","guest":"52:54:00:fb:01:0b"}
//! → {"v":1,"id":11,"op":"status"}
//! ← {"v":1,"id":9,"error":{"code":"unknown_guest","message":"no guest db (known: web)"}}
//! ```
//! A bare `status` line (the original request) is still answered with the bare status
//! document. A guest is named by its name or its MAC.
//!
//! Runtime changes are map updates and per-port program attachments of the one guest
//! concerned: no program is reloaded, no other guest's traffic is touched. They are not
//! written back to the configuration file: the file's guests are the boot-time set, and
//! whoever adds guests at runtime (the controller) adds them again after a restart.
//!
//! [`validate`] decides, without I/O, whether a request may be applied to the current
//! guests; the daemon then checks that a named port exists and applies it. A refused request
//! changes nothing.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    Mac, Role,
    config::{Config, Guest},
};

/// The control protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// A request, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Status,
    GuestAdd(Guest),
    GuestRemove {
        guest: String,
    },
    GuestSetRole {
        guest: String,
        role: Role,
        port: Option<String>,
    },
    GuestShow {
        guest: String,
    },
}

/// One request line: the bare `status` of old, or a versioned request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `status` on a line of its own: answered with the bare status document.
    LegacyStatus,
    Versioned {
        id: Value,
        op: Op,
    },
}

/// A refused request: a code for scripts and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What a validated request does to the guests (the guests as they are now).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Status,
    Add(Guest),
    Remove(Guest),
    /// `from` becomes `to` (same name, MAC and addresses; new role and port).
    SetRole {
        from: Guest,
        to: Guest,
    },
    Show(Guest),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddArgs {
    guest: Guest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestArg {
    guest: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleArgs {
    guest: String,
    role: Role,
    #[serde(default)]
    port: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// Parses one request line. Err carries the request id when it could be read (else null).
pub fn parse(line: &str) -> Result<Request, (Value, ApiError)> {
    let line = line.trim();
    if line == "status" {
        return Ok(Request::LegacyStatus);
    }
    let bad = |id: &Value, m: String| (id.clone(), ApiError::new("bad_request", m));
    let v: Value = serde_json::from_str(line).map_err(|e| {
        bad(
            &Value::Null,
            format!("not a request: {e} (a JSON object per line, or `status`)"),
        )
    })?;
    let Value::Object(mut obj) = v else {
        return Err(bad(&Value::Null, "a request is a JSON object".into()));
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    if id.is_null() {
        return Err(bad(&id, "the request has no \"id\"".into()));
    }
    match obj.remove("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err((
                id,
                ApiError::new(
                    "unsupported_version",
                    format!("version {v}; this daemon speaks {VERSION}"),
                ),
            ));
        }
        None => {
            return Err(bad(
                &id,
                format!("the request has no \"v\" (this daemon speaks {VERSION})"),
            ));
        }
    }
    let Some(Value::String(op)) = obj.remove("op") else {
        return Err(bad(&id, "the request has no \"op\"".into()));
    };
    let args = Value::Object(obj);
    fn args_of<T: serde::de::DeserializeOwned>(id: &Value, op: &str, args: Value) -> Result<T, (Value, ApiError)> {
        serde_json::from_value(args).map_err(|e| (id.clone(), ApiError::new("bad_request", format!("{op}: {e}"))))
    }
    let op = match op.as_str() {
        "status" => args_of::<NoArgs>(&id, &op, args).map(|_| Op::Status)?,
        "guest.add" => Op::GuestAdd(args_of::<AddArgs>(&id, &op, args)?.guest),
        "guest.remove" => Op::GuestRemove {
            guest: args_of::<GuestArg>(&id, &op, args)?.guest,
        },
        "guest.show" => Op::GuestShow {
            guest: args_of::<GuestArg>(&id, &op, args)?.guest,
        },
        "guest.set_role" => {
            let a: RoleArgs = args_of(&id, &op, args)?;
            Op::GuestSetRole {
                guest: a.guest,
                role: a.role,
                port: a.port,
            }
        }
        other => {
            return Err((
                id,
                ApiError::new(
                    "unknown_op",
                    format!("unknown op {other:?}; known: status, guest.add, guest.remove, guest.set_role, guest.show"),
                ),
            ));
        }
    };
    Ok(Request::Versioned { id, op })
}

/// The guest named `which` (its name, or its MAC).
pub fn find<'g>(guests: &'g [Guest], which: &str) -> Result<&'g Guest, ApiError> {
    let by_mac = which.parse::<Mac>().ok();
    guests
        .iter()
        .find(|g| g.name == which || Some(g.mac) == by_mac)
        .ok_or_else(|| {
            let known: Vec<&str> = guests.iter().map(|g| g.name.as_str()).collect();
            ApiError::new(
                "unknown_guest",
                format!(
                    "no guest {which} (known: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
}

/// Decides whether `op` may be applied to the guests of `cfg` (the current set) and what
/// it does. Pure: whether a port exists is checked by the daemon when it applies it.
pub fn validate(op: &Op, cfg: &Config) -> Result<Action, ApiError> {
    let invalid = |m: String| ApiError::new("invalid", m);
    match op {
        Op::Status => Ok(Action::Status),
        Op::GuestShow { guest } => Ok(Action::Show(find(&cfg.guests, guest)?.clone())),
        Op::GuestRemove { guest } => Ok(Action::Remove(find(&cfg.guests, guest)?.clone())),
        Op::GuestAdd(g) => {
            if let Some(o) = cfg.guests.iter().find(|o| o.name == g.name || o.mac == g.mac) {
                return Err(ApiError::new(
                    "duplicate",
                    format!(
                        "guest {} ({}) is already protected; remove it first or change its role",
                        o.name, o.mac
                    ),
                ));
            }
            cfg.check_guest(g, &cfg.guests).map_err(invalid)?;
            Ok(Action::Add(g.clone()))
        }
        Op::GuestSetRole { guest, role, port } => {
            let from = find(&cfg.guests, guest)?.clone();
            let to = Guest {
                role: *role,
                port: port.clone(),
                ..from.clone()
            };
            if to == from {
                return Err(ApiError::new(
                    "unchanged",
                    format!("guest {} is already {}", from.name, role_word(*role)),
                ));
            }
            let others: Vec<Guest> = cfg.guests.iter().filter(|o| o.mac != from.mac).cloned().collect();
            cfg.check_guest(&to, &others).map_err(invalid)?;
            Ok(Action::SetRole { from, to })
        }
    }
}

pub fn role_word(r: Role) -> &'static str {
    match r {
        Role::Local => "local",
        Role::Partner => "partner",
    }
}

/// The reply line to a versioned request.
pub fn reply(id: &Value, r: Result<Value, ApiError>) -> Value {
    match r {
        Ok(v) => json!({"v": VERSION, "id": id, "ok": v}),
        Err(e) => json!({"v": VERSION, "id": id, "error": {"code": e.code, "message": e.message}}),
    }
}

/// Sends one versioned request to the daemon at `socket` and returns its `ok` value; a
/// refusal is [`crate::Error::Refused`].
pub async fn call(socket: &std::path::Path, op: &str, args: Value) -> Result<Value, crate::Error> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let io = |what: &str, source| crate::Error::Io {
        what: format!("{what} {}", socket.display()),
        source,
    };
    let mut req = match args {
        Value::Object(m) => m,
        Value::Null => serde_json::Map::new(),
        other => {
            return Err(crate::Error::Config(format!(
                "request arguments must be an object, not {other}"
            )));
        }
    };
    req.insert("v".into(), json!(VERSION));
    req.insert("id".into(), json!(1));
    req.insert("op".into(), json!(op));
    let mut line = Value::Object(req).to_string();
    line.push('\n');
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| io("connect to", e))?;
    s.write_all(line.as_bytes()).await.map_err(|e| io("write to", e))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .await
        .map_err(|e| io("read from", e))?;
    let v: Value =
        serde_json::from_str(&answer).map_err(|e| crate::Error::Config(format!("bad reply {answer:?}: {e}")))?;
    if let Some(ok) = v.get("ok") {
        return Ok(ok.clone());
    }
    let e = &v["error"];
    Err(crate::Error::Refused {
        code: e["code"].as_str().unwrap_or("unknown").to_owned(),
        message: e["message"].as_str().unwrap_or("no reason given").to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const CFG: &str = r#"
host = "a"
pool_secret_file = "/etc/eac/pool.secret"
app_iface = "app0"
app_ip = "10.250.1.1"
[[availability_link]]
iface = "al1"
local = "10.250.2.1:7301"
peer = "10.250.2.2:7301"
[[guest]]
name = "web"
mac = "52:54:00:fb:01:0a"
ip = "10.250.1.10"
role = "local"
port = "vg0"
[[guest]]
name = "mail"
mac = "52:54:00:fb:01:0c"
role = "partner"
"#;

    fn cfg() -> Config {
        Config::parse(Path::new("t.toml"), CFG).unwrap()
    }

    fn req(line: &str) -> Result<Op, ApiError> {
        match parse(line) {
            Ok(Request::Versioned { op, .. }) => Ok(op),
            Ok(Request::LegacyStatus) => Ok(Op::Status),
            Err((_, e)) => Err(e),
        }
    }

    fn run(line: &str) -> Result<Action, ApiError> {
        validate(&req(line)?, &cfg())
    }

    fn add(guest: &str) -> String {
        format!(r#"{{"v":1,"id":1,"op":"guest.add","guest":{guest}}}"#)
    }

    #[test]
    fn a_good_add_remove_role_change_and_show_are_accepted() {
        let a = run(&add(
            r#"{"name":"db","mac":"52:54:00:fb:01:0b","ip":"10.250.1.11","role":"local","port":"vg1"}"#,
        ))
        .unwrap();
        let Action::Add(g) = a else { panic!("{a:?}") };
        assert_eq!(
            (g.name.as_str(), g.role, g.port.as_deref()),
            ("db", Role::Local, Some("vg1"))
        );
        assert!(run(&add(r#"{"name":"db2","mac":"52:54:00:fb:01:0d","role":"partner"}"#)).is_ok());
        assert!(matches!(
            run(r#"{"v":1,"id":2,"op":"guest.remove","guest":"web"}"#).unwrap(),
            Action::Remove(g) if g.name == "web"
        ));
        // By MAC too, in any case.
        assert!(matches!(
            run(r#"{"v":1,"id":"x","op":"guest.show","guest":"52:54:00:FB:01:0C"}"#).unwrap(),
            Action::Show(g) if g.name == "mail"
        ));
        let a = run(r#"{"v":1,"id":3,"op":"guest.set_role","guest":"web","role":"partner"}"#).unwrap();
        let Action::SetRole { from, to } = a else { panic!() };
        assert_eq!((from.role, to.role, to.port), (Role::Local, Role::Partner, None));
        assert_eq!(to.ip, from.ip, "addresses are kept");
        let a = run(r#"{"v":1,"id":3,"op":"guest.set_role","guest":"mail","role":"local","port":"vg7"}"#).unwrap();
        assert!(matches!(a, Action::SetRole { to, .. } if to.port.as_deref() == Some("vg7")));
        assert_eq!(run(r#"{"v":1,"id":4,"op":"status"}"#).unwrap(), Action::Status);
        assert_eq!(parse(" status \n").unwrap(), Request::LegacyStatus);
    }

    #[test]
    fn bad_requests_are_refused_with_a_code_and_a_reason() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                add(r#"{"name":"web","mac":"52:54:00:fb:01:0b","role":"partner"}"#),
                "duplicate",
                "web",
            ),
            (
                add(r#"{"name":"other","mac":"52:54:00:fb:01:0a","role":"partner"}"#),
                "duplicate",
                "already protected",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01","role":"partner"}"#),
                "bad_request",
                "not a MAC address",
            ),
            (
                add(r#"{"name":"db","mac":"01:00:5e:00:00:01","role":"partner"}"#),
                "invalid",
                "multicast",
            ),
            (
                add(r#"{"name":"db","mac":"00:00:00:00:00:00","role":"partner"}"#),
                "invalid",
                "not a usable MAC",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"primary"}"#),
                "bad_request",
                "unknown variant `primary`",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"local"}"#),
                "invalid",
                "needs `port`",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"partner","port":"vg1"}"#),
                "invalid",
                "only for local",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"local","port":"a/b"}"#),
                "invalid",
                "not a valid interface name",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"local","port":"this-name-is-too-long"}"#),
                "invalid",
                "1 to 15 bytes",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"local","port":"vg0"}"#),
                "invalid",
                "already guest web's",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"local","port":"al1"}"#),
                "invalid",
                "availability link",
            ),
            (
                add(r#"{"name":"d b","mac":"52:54:00:fb:01:0b","role":"partner"}"#),
                "invalid",
                "not allowed in a name",
            ),
            (
                add(r#"{"name":"db","mac":"52:54:00:fb:01:0b","role":"partner","colour":"red"}"#),
                "bad_request",
                "unknown field",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.remove","guest":"nope"}"#.into(),
                "unknown_guest",
                "no guest nope (known: web, mail)",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.show","guest":"52:54:00:00:00:99"}"#.into(),
                "unknown_guest",
                "no guest",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.set_role","guest":"web","role":"local","port":"vg0"}"#.into(),
                "unchanged",
                "already local",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.set_role","guest":"mail","role":"local"}"#.into(),
                "invalid",
                "needs `port`",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.set_role","guest":"web","role":"partner","port":"vg0"}"#.into(),
                "invalid",
                "only for local",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.set_role","guest":"web","role":"boss"}"#.into(),
                "bad_request",
                "unknown variant",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.remove"}"#.into(),
                "bad_request",
                "missing field `guest`",
            ),
            (
                r#"{"v":1,"id":1,"op":"guest.zap"}"#.into(),
                "unknown_op",
                "known: status",
            ),
            (
                r#"{"v":2,"id":1,"op":"status"}"#.into(),
                "unsupported_version",
                "speaks 1",
            ),
            (r#"{"id":1,"op":"status"}"#.into(), "bad_request", "no \"v\""),
            (r#"{"v":1,"op":"status"}"#.into(), "bad_request", "no \"id\""),
            (
                r#"{"v":1,"id":1,"op":"status","x":1}"#.into(),
                "bad_request",
                "unknown field",
            ),
            ("[1,2]".into(), "bad_request", "JSON object"),
            ("statuss".into(), "bad_request", "not a request"),
        ];
        for (line, code, want) in cases {
            let e = run(&line).unwrap_err();
            assert_eq!(e.code, code, "{line}: {e:?}");
            assert!(e.message.contains(want), "{line}: expected {want:?} in {:?}", e.message);
        }
    }

    #[test]
    fn the_request_id_comes_back_even_when_the_request_is_refused() {
        let (id, e) = parse(r#"{"v":1,"id":"abc","op":"guest.zap"}"#).unwrap_err();
        assert_eq!((id, e.code), (json!("abc"), "unknown_op"));
        let r = reply(&json!(5), Err(ApiError::new("invalid", "no")));
        assert_eq!(r, json!({"v":1,"id":5,"error":{"code":"invalid","message":"no"}}));
        assert_eq!(reply(&json!(5), Ok(json!(1)))["ok"], 1);
    }
}
