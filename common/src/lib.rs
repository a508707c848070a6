//! Helpers every binary of the project shares, so they log and fail the same way.
// One module (`sched`) wraps a libc call no well-kept crate offers for the whole process;
// everything else is safe code.
#![deny(unsafe_code)]

use std::error::Error;

pub mod bounded;
pub mod ratelimit;
pub mod sched;
pub mod sealed;

/// Process exit codes. A supervisor restarts on [`EXIT_TRANSIENT`], never on [`EXIT_USAGE`].
pub const EXIT_TRANSIENT: i32 = 1;
/// Bad command line, configuration or input (sysexits EX_USAGE): do not restart.
pub const EXIT_USAGE: i32 = 64;

/// Logs to stderr through `tracing`; `RUST_LOG` filters (default `info`), `EAC_LOG_JSON=1`
/// switches to one JSON object per line. `log` records (aya, io-uring users) are bridged.
/// Colours only when stderr is a terminal and `NO_COLOR` is unset or empty ([`use_ansi`]).
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = use_ansi(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if std::env::var_os("EAC_LOG_JSON").is_some_and(|v| v == "1") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Whether log lines get ANSI colours: only on a terminal, and not when `NO_COLOR` is set to
/// a non-empty value (<https://no-color.org>). A log file or a pipe never gets escape codes.
pub fn use_ansi(is_tty: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_tty && no_color.is_none_or(|v| v.is_empty())
}

/// "outer: cause: root cause" — the whole `source()` chain on one line, for operators.
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn chain_joins_every_cause() {
        let e = E("attach", Some(Box::new(E("netlink", Some(Box::new(E("EPERM", None)))))));
        assert_eq!(error_chain(&e), "attach: netlink: EPERM");
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_ansi(true, None));
        assert!(!use_ansi(false, None), "a file or pipe gets no escape codes");
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(!use_ansi(false, Some(OsStr::new("1"))));
        // no-color.org: an empty NO_COLOR does not disable colours.
        assert!(use_ansi(true, Some(OsStr::new(""))));
        assert!(!use_ansi(false, Some(OsStr::new(""))));
    }
}
