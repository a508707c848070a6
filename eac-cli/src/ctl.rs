//! The pool commands: talk to a controller's API (unix socket on the host, or authenticated
//! TCP from elsewhere) and print the answer for people, or as JSON with `--json`.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use eac_api::controller::events::Event;
use eac_api::controller::view::{ChangeResult, HostList, HostView, PoolStatus, VmList};
use eac_api::controller::{ApiError, Client, Op, codes};
use futures::StreamExt;
use serde_json::Value;

/// Where the controller is.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp { addr: SocketAddr, secret_file: PathBuf },
}

/// A failed command: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub hint: Option<String>,
    pub code: i32,
}

impl Failure {
    fn usage(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: Some(hint.into()),
            code: eac_common::EXIT_USAGE,
        }
    }
}

/// API error codes that mean "this request will not work as asked" (exit 64: fix the command
/// or the pool); everything else is transient (exit 1: retry may help).
const REFUSED_CODES: &[&str] = &[
    codes::BAD_REQUEST,
    codes::UNSUPPORTED_VERSION,
    codes::UNKNOWN_OP,
    codes::TOO_LARGE,
    codes::FORBIDDEN,
    codes::UNAUTHENTICATED,
    "refused",
    "not_found",
    "plan_broken",
    "level_unavailable",
];

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let code = if REFUSED_CODES.contains(&e.code.as_str()) {
            eac_common::EXIT_USAGE
        } else {
            eac_common::EXIT_TRANSIENT
        };
        let mut message = e.message.clone();
        if let Some(src) = std::error::Error::source(&e) {
            let _ = write!(message, ": {}", eac_common::error_chain(src));
        }
        Self {
            message,
            hint: e.hint.clone(),
            code,
        }
    }
}

/// The commands that go to a controller.
#[derive(Debug, Clone)]
pub enum Command {
    PoolStatus,
    PoolPolicy { host_failures_to_tolerate: u32 },
    HostList,
    VmList,
    VmProtect { name: String, level: u8 },
    VmUnprotect { name: String },
    Plan,
    Events { follow: bool, limit: Option<usize> },
}

async fn connect(target: &Target) -> Result<Client, Failure> {
    match target {
        Target::Unix(path) => Ok(Client::connect_unix(path).await?),
        Target::Tcp { addr, secret_file } => {
            let secret = std::fs::read(secret_file).map_err(|e| {
                Failure::usage(
                    format!("cannot read the pool secret {}: {e}", secret_file.display()),
                    "pass the pool's secret file (the controllers' pool_secret_file) with --secret-file",
                )
            })?;
            let secret = trim_ascii(&secret);
            Ok(Client::connect_tcp(*addr, secret).await?)
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Runs one command; prints its output; returns the exit code or a failure.
pub async fn run(target: &Target, cmd: Command, json: bool) -> Result<(), Failure> {
    let mut client = connect(target).await?;
    let op = match &cmd {
        Command::PoolStatus => Op::PoolStatus,
        Command::PoolPolicy {
            host_failures_to_tolerate,
        } => Op::Ext {
            name: "pool.policy".into(),
            args: serde_json::json!({ "host_failures_to_tolerate": host_failures_to_tolerate }),
        },
        Command::HostList => Op::HostList,
        Command::VmList => Op::VmList,
        Command::VmProtect { name, level } => Op::VmProtect {
            name: name.clone(),
            level: *level,
        },
        Command::VmUnprotect { name } => Op::VmUnprotect { name: name.clone() },
        Command::Plan => Op::Plan,
        Command::Events { follow: true, limit } => {
            if let Some(n) = limit {
                let recent = client.call(Op::EventsRecent { limit: Some(*n) }).await?;
                print_events_value(&recent, json)?;
                client = connect(target).await?;
            }
            let mut stream = Box::pin(client.follow_events().await?);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => print_event(&ev, json),
                    Err(e) if e.code == codes::LAGGED => eprintln!("eac: {}", e.message),
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(());
        }
        Command::Events { follow: false, limit } => Op::EventsRecent { limit: *limit },
    };
    let value = client.call(op).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        return Ok(());
    }
    let text = match cmd {
        Command::PoolStatus => render_pool_status(&decode(value)?),
        Command::HostList => render_hosts(&decode::<HostList>(value)?.hosts),
        Command::VmList => render_vm_list(&decode(value)?),
        Command::VmProtect { .. } | Command::VmUnprotect { .. } | Command::PoolPolicy { .. } => {
            render_change(&decode(value)?)
        }
        Command::Plan => render_plan(&value),
        Command::Events { .. } => {
            print_events_value(&value, false)?;
            String::new()
        }
    };
    print!("{text}");
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_json::from_value(v).map_err(|e| Failure {
        message: format!("the controller answered in a shape this eac does not understand: {e}"),
        hint: Some("use eac of the same version as the controller, or --json".into()),
        code: eac_common::EXIT_TRANSIENT,
    })
}

fn print_events_value(v: &Value, json: bool) -> Result<(), Failure> {
    let events: Vec<Event> = decode(v.get("events").cloned().unwrap_or_else(|| v.clone()))?;
    for e in &events {
        print_event(e, json);
    }
    Ok(())
}

fn print_event(e: &Event, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let mut line = format!("{} {:<2} {:<20}", clock(e.ts_ms), e.host, e.kind.as_str());
    if let Some(g) = &e.guest {
        let _ = write!(line, " guest={g}");
    }
    if let Some(p) = &e.peer {
        let _ = write!(line, " peer={p}");
    }
    let _ = write!(line, " {}", e.detail);
    println!("{line}");
}

/// `HH:MM:SS.mmm` (UTC) of a unix-ms timestamp.
pub fn clock(ts_ms: u64) -> String {
    let s = ts_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ts_ms % 1000
    )
}

fn channels(h: &HostView) -> String {
    if h.channels.is_empty() {
        return "-".into();
    }
    h.channels
        .iter()
        .map(|c| format!("{} {}", c.name, if c.up { "up" } else { "DOWN" }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `eac pool status` for people.
pub fn render_pool_status(s: &PoolStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "pool: {} hosts, {} protected guest{}, host-failures-to-tolerate {}",
        s.hosts.len(),
        s.protected_guests,
        if s.protected_guests == 1 { "" } else { "s" },
        s.host_failures_to_tolerate
    );
    let _ = writeln!(o, "configuration: epoch {} ({})", s.config_epoch, s.config_fingerprint);
    let _ = writeln!(
        o,
        "plan: {} — {}",
        if s.plan_ok { "ok" } else { "BROKEN" },
        s.plan_summary
    );
    let _ = writeln!(
        o,
        "answered by: {}{}{}",
        s.answered_by,
        if s.isolated { " (ISOLATED)" } else { "" },
        if s.fencing == "normal" {
            String::new()
        } else {
            format!(" fencing: {}", s.fencing)
        }
    );
    if s.realtime == Some(false) {
        let _ = writeln!(
            o,
            "scheduling: normal — on a busy host heartbeats and judgements may come late; set realtime_priority (docs/operations.md)"
        );
    }
    if s.redundancy_ok {
        let _ = writeln!(o, "redundancy: ok (every channel to every peer works)");
    } else {
        let _ = writeln!(o, "redundancy: LOST — {}", s.redundancy_lost.join("; "));
    }
    o.push('\n');
    o.push_str(&render_hosts(&s.hosts));
    o
}

/// `eac host list` for people.
pub fn render_hosts(hosts: &[HostView]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<12} {:<8} {:>16} {:>8}  channels",
        "HOST", "STATE", "MEMORY (MiB)", "VCPUS"
    );
    for h in hosts {
        let _ = writeln!(
            o,
            "{:<12} {:<8} {:>16} {:>8}  {}",
            h.name,
            h.state,
            format!("{}/{}", h.mem_used_mib, h.mem_mib),
            format!("{}/{}", h.vcpus_used, h.vcpus),
            channels(h)
        );
    }
    o
}

/// `eac vm list` for people: a tree host → guests.
pub fn render_vm_list(l: &VmList) -> String {
    let mut o = String::new();
    for h in &l.hosts {
        let _ = writeln!(
            o,
            "{} ({}{})",
            h.host,
            h.state,
            if h.reachable {
                ""
            } else {
                ", not reachable: from the pool configuration"
            }
        );
        if h.guests.is_empty() {
            let _ = writeln!(o, "  (no guests)");
        }
        let n = h.guests.len();
        for (i, g) in h.guests.iter().enumerate() {
            let branch = if i + 1 == n { "└─" } else { "├─" };
            let level = g.level.map_or_else(|| "-".to_owned(), |l| format!("level {l}"));
            let _ = writeln!(o, "  {branch} {:<20} {:<8} {:<12} {}", g.name, level, g.state, g.health);
        }
    }
    o
}

fn render_change(c: &ChangeResult) -> String {
    let mut o = format!(
        "{}: done (configuration epoch {}, applied on {})\n",
        c.change,
        c.epoch,
        c.applied_on.join(", ")
    );
    if !c.pending_on.is_empty() {
        let _ = writeln!(
            o,
            "not reachable now, will catch up when back: {}",
            c.pending_on.join(", ")
        );
    }
    o
}

/// `eac plan` for people, from the plan report (`plan::PlanReport` as JSON).
pub fn render_plan(v: &Value) -> String {
    let mut o = String::new();
    let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
    let n = v.get("failures_to_tolerate").and_then(Value::as_u64).unwrap_or(0);
    let summary = v.get("summary").and_then(Value::as_str).unwrap_or("");
    let _ = writeln!(
        o,
        "failover plan for host-failures-to-tolerate = {n}: {}",
        if ok { "ok" } else { "BROKEN" }
    );
    if !summary.is_empty() {
        let _ = writeln!(o, "{summary}");
    }
    let down: Vec<&str> = v
        .get("down")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !down.is_empty() {
        let _ = writeln!(o, "hosts down now: {}", down.join(", "));
    }
    for sc in v.get("scenarios").and_then(Value::as_array).into_iter().flatten() {
        let failed: Vec<&str> = sc
            .get("failed")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "\nif {} fail{}:",
            failed.join(" + "),
            if failed.len() == 1 { "s" } else { "" }
        );
        let placements = sc.get("placements").and_then(Value::as_array);
        let shortfalls = sc.get("shortfalls").and_then(Value::as_array);
        if placements.is_none_or(|p| p.is_empty()) && shortfalls.is_none_or(|s| s.is_empty()) {
            let _ = writeln!(o, "  nothing to restart");
        }
        for p in placements.into_iter().flatten() {
            let _ = writeln!(
                o,
                "  {} ({} → {})",
                p.get("guest").and_then(Value::as_str).unwrap_or("?"),
                p.get("from").and_then(Value::as_str).unwrap_or("?"),
                p.get("to").and_then(Value::as_str).unwrap_or("?")
            );
        }
        for s in shortfalls.into_iter().flatten() {
            let _ = writeln!(
                o,
                "  NO PLACE: {}",
                s.get("explanation").and_then(Value::as_str).unwrap_or("?")
            );
        }
    }
    for w in v.get("warnings").and_then(Value::as_array).into_iter().flatten() {
        let _ = writeln!(o, "warning: {}", w.as_str().unwrap_or(""));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use eac_api::controller::view::{ChannelView, HostGuests, VmView};

    fn host(name: &str, state: &str, up: bool) -> HostView {
        HostView {
            name: name.into(),
            state: state.into(),
            channels: if state == "self" {
                vec![]
            } else {
                vec![
                    ChannelView {
                        name: "mgmt".into(),
                        up,
                        last_seen_ms_ago: Some(100),
                    },
                    ChannelView {
                        name: "statefile".into(),
                        up: true,
                        last_seen_ms_ago: Some(300),
                    },
                ]
            },
            mem_mib: 1024,
            vcpus: 4,
            mem_used_mib: 160,
            vcpus_used: 1,
            fencing: None,
        }
    }

    #[test]
    fn pool_status_says_what_is_lost() {
        let s = PoolStatus {
            answered_by: "a".into(),
            config_epoch: 3,
            config_fingerprint: "abcd".into(),
            host_failures_to_tolerate: 1,
            hosts: vec![host("a", "self", true), host("b", "alive", false)],
            protected_guests: 1,
            isolated: false,
            realtime: Some(false),
            fencing: "normal".into(),
            redundancy_ok: false,
            redundancy_lost: vec!["b: mgmt down".into()],
            plan_ok: true,
            plan_summary: "every protected guest has a place".into(),
        };
        let t = render_pool_status(&s);
        assert!(
            t.contains("pool: 2 hosts, 1 protected guest, host-failures-to-tolerate 1"),
            "{t}"
        );
        assert!(t.contains("redundancy: LOST — b: mgmt down"), "{t}");
        assert!(t.contains("mgmt DOWN, statefile up"), "{t}");
        assert!(t.contains("160/1024"), "{t}");
        assert!(t.contains("scheduling: normal"), "{t}");
        let rt = PoolStatus {
            realtime: Some(true),
            ..s
        };
        assert!(!render_pool_status(&rt).contains("scheduling:"));
    }

    #[test]
    fn vm_list_is_a_tree() {
        let l = VmList {
            answered_by: "a".into(),
            hosts: vec![
                HostGuests {
                    host: "a".into(),
                    state: "self".into(),
                    reachable: true,
                    guests: vec![
                        VmView {
                            name: "g1".into(),
                            level: Some(1),
                            state: "running".into(),
                            health: "ok".into(),
                            mem_mib: 160,
                            vcpus: 1,
                        },
                        VmView {
                            name: "scratch".into(),
                            level: None,
                            state: "shut off".into(),
                            health: "unprotected".into(),
                            mem_mib: 160,
                            vcpus: 1,
                        },
                    ],
                },
                HostGuests {
                    host: "b".into(),
                    state: "dead".into(),
                    reachable: false,
                    guests: vec![],
                },
            ],
        };
        let t = render_vm_list(&l);
        assert!(t.contains("a (self)\n  ├─ g1"), "{t}");
        assert!(t.contains("└─ scratch"), "{t}");
        assert!(t.contains("level 1  running"), "{t}");
        assert!(t.contains("b (dead, not reachable"), "{t}");
        assert!(t.contains("(no guests)"), "{t}");
    }

    #[test]
    fn plan_rendering_names_shortfalls() {
        let v = serde_json::json!({
            "failures_to_tolerate": 1, "ok": false, "down": [], "summary": "1 shortfall",
            "scenarios": [
                {"failed": ["a"], "placements": [{"guest": "g1", "from": "a", "to": "b"}], "shortfalls": []},
                {"failed": ["b"], "placements": [], "shortfalls": [{"explanation": "g9 needs 900 MiB, a has 400"}]}
            ],
            "warnings": []
        });
        let t = render_plan(&v);
        assert!(t.contains("BROKEN"), "{t}");
        assert!(t.contains("if a fails:\n  g1 (a → b)"), "{t}");
        assert!(t.contains("NO PLACE: g9 needs 900 MiB"), "{t}");
    }

    #[test]
    fn refusals_exit_64_and_transient_errors_1() {
        let f: Failure = ApiError::new("refused", "no").with_hint("do x").into();
        assert_eq!(f.code, 64);
        assert_eq!(f.hint.as_deref(), Some("do x"));
        let f: Failure = ApiError::new(codes::UNREACHABLE, "gone").into();
        assert_eq!(f.code, 1);
        // A saturated controller, here or at the peer a pool change goes through, is transient.
        for code in [codes::BUSY, codes::INTERNAL, "peer_unreachable", "isolated"] {
            let f: Failure = ApiError::new(code, "not now").with_hint("retry shortly").into();
            assert_eq!(f.code, 1, "{code}");
        }
    }

    #[test]
    fn clock_format() {
        assert_eq!(clock(3_723_004), "01:02:03.004");
    }
}
