//! The failover plan and admission control.
//!
//! - [`check`]: can every protected guest be restarted after **any** `n` host failures? Every
//!   combination of `n` failed hosts among the live ones is tried; the failed hosts' protected
//!   guests (and those of hosts already down) are placed on the survivors by first-fit
//!   decreasing. Shortfalls are explained in words an administrator can act on.
//! - [`admit`]: would a change (protect, start, level change) break the plan? Refused with an
//!   explanation if it adds a shortfall.
//! - [`place_failed`]: where to restart a dead host's guests. Deterministic — the same inputs,
//!   in any order, give the same answer on every survivor — so each survivor starts only the
//!   guests placed on itself and no guest is started twice.
//!
//! # Algorithm
//! Free capacity of a host = its offered capacity (`mem_mib`, `vcpus`) − the per-host
//! [`Reserve`] − the guests running on it (protected or not). Guests to place are sorted by
//! memory, then vCPUs, descending, then by name; each goes to the first survivor in name order
//! with enough free memory **and** vCPUs. First-fit decreasing is not optimal bin packing: it
//! can report a shortfall where a cleverer packing exists (never the other way round), which errs
//! on the safe side for admission control. Pools are small; the number of scenarios, C(live, n),
//! is capped at [`MAX_SCENARIOS`].
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Most failure scenarios [`check`] will enumerate (C(live hosts, n)).
pub const MAX_SCENARIOS: u64 = 100_000;

/// A host as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Memory this host offers guests (config `[capacity] mem_mib`).
    pub mem_mib: u64,
    /// vCPUs this host offers guests.
    pub vcpus: u32,
    pub alive: bool,
}

/// A guest as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// Where it runs (or is being restarted); `None` when it is not running.
    pub host: Option<String>,
    /// Restarted elsewhere when its host dies.
    pub protected: bool,
    /// Protection level (1 restart, 2 component FT). Level 2 is planned like level 1 for now.
    pub level: u8,
}

/// Capacity kept free on every host, on top of what guests use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserve {
    pub mem_mib: u64,
    pub vcpus: u32,
}

/// A guest restarted from `from` onto `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub guest: String,
    pub from: String,
    pub to: String,
}

/// A protected guest that fits on no survivor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    /// The failed hosts of the scenario (hosts already down included).
    pub failed: Vec<String>,
    pub guest: String,
    pub from: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// E.g. "if hosts a and b fail, guest web1 (2048 MiB, 2 vCPUs) fits nowhere: c has
    /// 1024 MiB and 4 vCPUs free".
    pub explanation: String,
}

/// One failure scenario of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    /// Hosts failing in this scenario (not counting hosts already down).
    pub failed: Vec<String>,
    pub placements: Vec<Placement>,
    pub shortfalls: Vec<Shortfall>,
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    pub failures_to_tolerate: usize,
    /// True when every scenario places every protected guest.
    pub ok: bool,
    /// Hosts already down (their protected guests are placed in every scenario).
    pub down: Vec<String>,
    pub scenarios: Vec<Scenario>,
    /// Hosts whose guests already use more than they offer, in words.
    pub warnings: Vec<String>,
}

impl PlanReport {
    /// Every shortfall of every scenario.
    pub fn shortfalls(&self) -> impl Iterator<Item = &Shortfall> {
        self.scenarios.iter().flat_map(|s| s.shortfalls.iter())
    }

    /// One paragraph for `eac plan`.
    pub fn summary(&self) -> String {
        let n = self.failures_to_tolerate;
        let mut s = if self.ok {
            format!(
                "the plan holds: every protected guest can be restarted after any {n} host failure{} ({} scenario{} checked)",
                plural(n),
                self.scenarios.len(),
                plural(self.scenarios.len())
            )
        } else {
            let count = self.shortfalls().count();
            format!(
                "the plan is broken for host-failures-to-tolerate = {n}: {count} shortfall{}",
                plural(count)
            )
        };
        for sh in self.shortfalls() {
            let _ = write!(s, "\n- {}", sh.explanation);
        }
        for w in &self.warnings {
            let _ = write!(s, "\n- warning: {w}");
        }
        s
    }
}

/// Inputs [`check`] and [`place_failed`] cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("host '{0}' is listed twice")]
    DuplicateHost(String),
    #[error("guest '{0}' is listed twice")]
    DuplicateGuest(String),
    #[error("guest '{guest}' runs on host '{host}', which is not in the pool")]
    UnknownHost { guest: String, host: String },
    #[error(
        "a pool with {alive} live host{} cannot tolerate {n} host failure{}: at most {}",
        plural(*alive), plural(*n), alive.saturating_sub(1)
    )]
    TooManyFailures { n: usize, alive: usize },
    #[error(
        "checking {n} failures among {alive} hosts means {count} scenarios, more than the limit of {max}; \
         lower host-failures-to-tolerate",
        max = MAX_SCENARIOS
    )]
    TooManyScenarios { n: usize, alive: usize, count: u64 },
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn vcpus(n: u32) -> String {
    format!("{n} vCPU{}", if n == 1 { "" } else { "s" })
}

#[derive(Debug, Clone, Copy)]
struct Free {
    mem: i128,
    cpu: i128,
}

/// Validated, sorted view of the inputs.
struct Pool<'a> {
    hosts: BTreeMap<&'a str, &'a Host>,
    guests: Vec<&'a Guest>,
}

fn pool<'a>(hosts: &'a [Host], guests: &'a [Guest]) -> Result<Pool<'a>, PlanError> {
    let mut hmap = BTreeMap::new();
    for h in hosts {
        if hmap.insert(h.name.as_str(), h).is_some() {
            return Err(PlanError::DuplicateHost(h.name.clone()));
        }
    }
    let mut seen = BTreeSet::new();
    let mut gs: Vec<&Guest> = Vec::with_capacity(guests.len());
    for g in guests {
        if !seen.insert(g.name.as_str()) {
            return Err(PlanError::DuplicateGuest(g.name.clone()));
        }
        if let Some(h) = &g.host
            && !hmap.contains_key(h.as_str())
        {
            return Err(PlanError::UnknownHost {
                guest: g.name.clone(),
                host: h.clone(),
            });
        }
        gs.push(g);
    }
    gs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Pool {
        hosts: hmap,
        guests: gs,
    })
}

impl Pool<'_> {
    fn free(&self, reserve: Reserve) -> BTreeMap<String, Free> {
        let mut free: BTreeMap<String, Free> = self
            .hosts
            .values()
            .map(|h| {
                (
                    h.name.clone(),
                    Free {
                        mem: i128::from(h.mem_mib) - i128::from(reserve.mem_mib),
                        cpu: i128::from(h.vcpus) - i128::from(reserve.vcpus),
                    },
                )
            })
            .collect();
        for g in &self.guests {
            if let Some(f) = g.host.as_ref().and_then(|h| free.get_mut(h)) {
                f.mem -= i128::from(g.mem_mib);
                f.cpu -= i128::from(g.vcpus);
            }
        }
        free
    }

    fn alive(&self) -> Vec<String> {
        self.hosts
            .values()
            .filter(|h| h.alive)
            .map(|h| h.name.clone())
            .collect()
    }

    fn down(&self) -> Vec<String> {
        self.hosts
            .values()
            .filter(|h| !h.alive)
            .map(|h| h.name.clone())
            .collect()
    }
}

fn describe_free(free: &BTreeMap<String, Free>, survivors: &[String]) -> String {
    let parts: Vec<String> = survivors
        .iter()
        .map(|h| {
            let f = free[h];
            format!("{h} has {} MiB and {} free", f.mem.max(0), vcpus(f.cpu.max(0) as u32))
        })
        .collect();
    if parts.is_empty() {
        "no host survives".into()
    } else {
        and_list(&parts)
    }
}

fn scenario_words(newly_failed: &[String], down: &[String]) -> String {
    let fail = match newly_failed {
        [] => None,
        [one] => Some(format!("if host {one} fails")),
        many => Some(format!("if hosts {} fail", and_list(many))),
    };
    let down = match down {
        [] => None,
        [one] => Some(format!("with host {one} down")),
        many => Some(format!("with hosts {} down", and_list(many))),
    };
    match (down, fail) {
        (Some(d), Some(f)) => format!("{d} and {}", f.trim_start_matches("if ")),
        (Some(d), None) => d,
        (None, Some(f)) => f,
        (None, None) => "with every host up".into(),
    }
}

/// First-fit decreasing of the protected guests on `failed` (already-down hosts included) onto
/// `survivors` (sorted), consuming `free`.
fn place(
    pool: &Pool<'_>,
    free: &mut BTreeMap<String, Free>,
    failed: &BTreeSet<String>,
    survivors: &[String],
    words: &str,
) -> (Vec<Placement>, Vec<Shortfall>) {
    let mut todo: Vec<&Guest> = pool
        .guests
        .iter()
        .copied()
        .filter(|g| g.protected && g.host.as_ref().is_some_and(|h| failed.contains(h)))
        .collect();
    todo.sort_by(|a, b| {
        b.mem_mib
            .cmp(&a.mem_mib)
            .then(b.vcpus.cmp(&a.vcpus))
            .then(a.name.cmp(&b.name))
    });
    let mut placements = Vec::new();
    let mut shortfalls = Vec::new();
    let failed_list: Vec<String> = failed.iter().cloned().collect();
    for g in todo {
        let from = g.host.clone().unwrap_or_default();
        let need = Free {
            mem: i128::from(g.mem_mib),
            cpu: i128::from(g.vcpus),
        };
        let target = survivors.iter().find(|h| {
            let f = free[h.as_str()];
            f.mem >= need.mem && f.cpu >= need.cpu
        });
        match target {
            Some(h) => {
                let f = free.get_mut(h.as_str()).expect("survivor has a free entry");
                f.mem -= need.mem;
                f.cpu -= need.cpu;
                placements.push(Placement {
                    guest: g.name.clone(),
                    from,
                    to: h.clone(),
                });
            }
            None => {
                let explanation = format!(
                    "{words}, guest {} ({} MiB, {}) fits nowhere: {}",
                    g.name,
                    g.mem_mib,
                    vcpus(g.vcpus),
                    describe_free(free, survivors)
                );
                shortfalls.push(Shortfall {
                    failed: failed_list.clone(),
                    guest: g.name.clone(),
                    from,
                    mem_mib: g.mem_mib,
                    vcpus: g.vcpus,
                    explanation,
                });
            }
        }
    }
    (placements, shortfalls)
}

fn binomial(n: usize, k: usize) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut r: u128 = 1;
    for i in 0..k {
        r = r * (n - i) as u128 / (i + 1) as u128;
        if r > u128::from(u64::MAX) {
            return u64::MAX;
        }
    }
    r as u64
}

/// Calls `f` with every k-subset of `0..n` (indices ascending, lexicographic order).
fn combinations(n: usize, k: usize, mut f: impl FnMut(&[usize])) {
    if k > n {
        return;
    }
    let mut idx: Vec<usize> = (0..k).collect();
    loop {
        f(&idx);
        // The rightmost index that can still move right.
        let mut i = k;
        while i > 0 && idx[i - 1] == i - 1 + n - k {
            i -= 1;
        }
        if i == 0 {
            return;
        }
        idx[i - 1] += 1;
        for j in i..k {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

/// Checks that every protected guest can be restarted after any `failures` host failures among
/// the live hosts (guests of hosts already down are placed in every scenario).
pub fn check(hosts: &[Host], guests: &[Guest], failures: usize, reserve: Reserve) -> Result<PlanReport, PlanError> {
    let pool = pool(hosts, guests)?;
    let alive = pool.alive();
    let down = pool.down();
    if alive.is_empty() || failures >= alive.len() {
        return Err(PlanError::TooManyFailures {
            n: failures,
            alive: alive.len(),
        });
    }
    let count = binomial(alive.len(), failures);
    if count > MAX_SCENARIOS {
        return Err(PlanError::TooManyScenarios {
            n: failures,
            alive: alive.len(),
            count,
        });
    }
    let base = pool.free(reserve);
    let mut warnings = Vec::new();
    for (h, f) in &base {
        if f.mem < 0 || f.cpu < 0 {
            let host = pool.hosts[h.as_str()];
            warnings.push(format!(
                "host {h} is overcommitted: its guests{} need more than the {} MiB and {} it offers",
                if reserve == Reserve::default() {
                    String::new()
                } else {
                    format!(" and the reserve ({} MiB, {})", reserve.mem_mib, vcpus(reserve.vcpus))
                },
                host.mem_mib,
                vcpus(host.vcpus)
            ));
        }
    }
    let mut scenarios = Vec::with_capacity(count as usize);
    combinations(alive.len(), failures, |idx| {
        let newly: Vec<String> = idx.iter().map(|&i| alive[i].clone()).collect();
        let failed: BTreeSet<String> = newly.iter().chain(down.iter()).cloned().collect();
        let survivors: Vec<String> = alive.iter().filter(|h| !failed.contains(*h)).cloned().collect();
        let mut free = base.clone();
        let words = scenario_words(&newly, &down);
        let (placements, shortfalls) = place(&pool, &mut free, &failed, &survivors, &words);
        scenarios.push(Scenario {
            failed: newly,
            placements,
            shortfalls,
        });
    });
    let ok = scenarios.iter().all(|s| s.shortfalls.is_empty());
    Ok(PlanReport {
        failures_to_tolerate: failures,
        ok,
        down,
        scenarios,
        warnings,
    })
}

/// The largest `n ≤ live hosts − 1` for which [`check`] holds (0 if even that fails, or the
/// scenario cap is reached first) — a hint for the administrator.
pub fn max_failures_tolerated(hosts: &[Host], guests: &[Guest], reserve: Reserve) -> usize {
    let alive = hosts.iter().filter(|h| h.alive).count();
    let mut best = 0;
    for n in 1..alive {
        match check(hosts, guests, n, reserve) {
            Ok(r) if r.ok => best = n,
            _ => break,
        }
    }
    best
}

/// A change an administrator (or the daemon) asks for, checked by [`admit`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Protect a guest at `level` (1 or 2).
    Protect { guest: String, level: u8 },
    /// Stop protecting a guest (always admitted).
    Unprotect { guest: String },
    /// Change a protected guest's level.
    SetLevel { guest: String, level: u8 },
    /// Start a stopped guest on `host`.
    Start { guest: String, host: String },
}

/// Why [`admit`] refused a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{explanation}")]
pub struct Refusal {
    /// What the administrator reads.
    pub explanation: String,
    /// The shortfalls the change would add (empty for refusals of another kind).
    pub shortfalls: Vec<Shortfall>,
}

impl Refusal {
    fn plain(explanation: impl Into<String>) -> Self {
        Self {
            explanation: explanation.into(),
            shortfalls: Vec::new(),
        }
    }
}

/// Admits `change` if it adds no shortfall to the plan for `failures` host failures; otherwise
/// refuses with an explanation. Unprotecting is always admitted. When the plan is already
/// broken, changes that do not make it worse are admitted and the refusal of others says so.
pub fn admit(
    hosts: &[Host],
    guests: &[Guest],
    failures: usize,
    reserve: Reserve,
    change: &Change,
) -> Result<(), Refusal> {
    let guest_name = match change {
        Change::Protect { guest, .. }
        | Change::Unprotect { guest }
        | Change::SetLevel { guest, .. }
        | Change::Start { guest, .. } => guest,
    };
    let Some(g) = guests.iter().find(|g| &g.name == guest_name) else {
        return Err(Refusal::plain(format!(
            "there is no guest named '{guest_name}' in the pool"
        )));
    };
    let mut after: Vec<Guest> = guests.to_vec();
    let ga = after.iter_mut().find(|x| &x.name == guest_name).expect("found above");
    let action = match change {
        Change::Unprotect { .. } => return Ok(()),
        Change::Protect { level, .. } | Change::SetLevel { level, .. } => {
            if !(1..=2).contains(level) {
                return Err(Refusal::plain(format!(
                    "level {level} does not exist: use 1 (restart on another host) or 2 (component fault tolerance)"
                )));
            }
            if matches!(change, Change::SetLevel { .. }) && !g.protected {
                return Err(Refusal::plain(format!(
                    "guest {guest_name} is not protected; protect it with a level instead"
                )));
            }
            ga.protected = true;
            ga.level = *level;
            if matches!(change, Change::Protect { .. }) {
                format!("protecting guest {guest_name} at level {level}")
            } else {
                format!("changing guest {guest_name} to level {level}")
            }
        }
        Change::Start { host, .. } => {
            if let Some(on) = &g.host {
                return Err(Refusal::plain(format!("guest {guest_name} is already running on {on}")));
            }
            let Some(h) = hosts.iter().find(|h| &h.name == host) else {
                return Err(Refusal::plain(format!("there is no host named '{host}' in the pool")));
            };
            if !h.alive {
                return Err(Refusal::plain(format!("host {host} is down")));
            }
            let p = pool(hosts, guests).map_err(|e| Refusal::plain(e.to_string()))?;
            let f = p.free(reserve)[host.as_str()];
            if f.mem < i128::from(g.mem_mib) || f.cpu < i128::from(g.vcpus) {
                return Err(Refusal::plain(format!(
                    "host {host} has {} MiB and {} free; guest {guest_name} needs {} MiB and {}",
                    f.mem.max(0),
                    vcpus(f.cpu.max(0) as u32),
                    g.mem_mib,
                    vcpus(g.vcpus)
                )));
            }
            ga.host = Some(host.clone());
            format!("starting guest {guest_name} on {host}")
        }
    };
    let after_report = check(hosts, &after, failures, reserve)
        .map_err(|e| Refusal::plain(format!("{action} cannot be checked: {e}")))?;
    if after_report.ok {
        return Ok(());
    }
    let key = |s: &Shortfall| (s.failed.clone(), s.guest.clone());
    let before_report = check(hosts, guests, failures, reserve)
        .map_err(|e| Refusal::plain(format!("{action} cannot be checked: {e}")))?;
    let before: BTreeSet<_> = before_report.shortfalls().map(key).collect();
    let added: Vec<Shortfall> = after_report
        .shortfalls()
        .filter(|s| !before.contains(&key(s)))
        .cloned()
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    let mut explanation = format!(
        "refused: {action} would break the failover plan (host-failures-to-tolerate = {failures}): {}",
        added[0].explanation
    );
    if added.len() > 1 {
        let _ = write!(explanation, " (and {} more; see `eac plan`)", added.len() - 1);
    }
    if !before_report.ok {
        let _ = write!(
            explanation,
            ". The plan is already broken before this change ({} shortfall{})",
            before.len(),
            plural(before.len())
        );
    }
    explanation.push_str(". Add capacity, stop or unprotect another guest, or lower host-failures-to-tolerate");
    Err(Refusal {
        explanation,
        shortfalls: added,
    })
}

/// Where to restart protected guests after `dead` hosts failed (hosts with `alive == false` count
/// as dead too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverPlacement {
    /// (guest, target host), sorted by guest name.
    pub placed: Vec<(String, String)>,
    /// Guests that fit on no survivor, with the explanation.
    pub unplaced: Vec<Shortfall>,
}

impl FailoverPlacement {
    /// The guests this host (`me`) must start.
    pub fn for_host<'a>(&'a self, me: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.placed
            .iter()
            .filter(move |(_, h)| h == me)
            .map(|(g, _)| g.as_str())
    }
}

/// The restart placement after a failure: the protected guests of `dead` hosts onto the
/// survivors, first-fit decreasing. The same inputs in any order give the same result.
pub fn place_failed(
    hosts: &[Host],
    guests: &[Guest],
    dead: &[String],
    reserve: Reserve,
) -> Result<FailoverPlacement, PlanError> {
    let pool = pool(hosts, guests)?;
    let dead_set: BTreeSet<String> = dead
        .iter()
        .filter(|d| pool.hosts.contains_key(d.as_str()))
        .cloned()
        .chain(pool.down())
        .collect();
    let survivors: Vec<String> = pool.alive().into_iter().filter(|h| !dead_set.contains(h)).collect();
    let mut free = pool.free(reserve);
    let dead_list: Vec<String> = dead_set.iter().cloned().collect();
    let words = match dead_list.as_slice() {
        [one] => format!("after host {one} failed"),
        many => format!("after hosts {} failed", and_list(many)),
    };
    let (placements, unplaced) = place(&pool, &mut free, &dead_set, &survivors, &words);
    let mut placed: Vec<(String, String)> = placements.into_iter().map(|p| (p.guest, p.to)).collect();
    placed.sort();
    Ok(FailoverPlacement { placed, unplaced })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, mem: u64, cpu: u32) -> Host {
        Host {
            name: name.into(),
            mem_mib: mem,
            vcpus: cpu,
            alive: true,
        }
    }

    fn guest(name: &str, mem: u64, cpu: u32, on: &str, protected: bool) -> Guest {
        Guest {
            name: name.into(),
            mem_mib: mem,
            vcpus: cpu,
            host: Some(on.into()).filter(|h: &String| !h.is_empty()),
            protected,
            level: if protected { 1 } else { 0 },
        }
    }

    const R0: Reserve = Reserve { mem_mib: 0, vcpus: 0 };

    #[test]
    fn n0_one_scenario_and_ok() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        let guests = [guest("g", 1024, 1, "a", true)];
        let r = check(&hosts, &guests, 0, R0).unwrap();
        assert!(r.ok);
        assert_eq!(r.scenarios.len(), 1);
        assert!(r.scenarios[0].failed.is_empty());
        assert!(r.scenarios[0].placements.is_empty());
        assert!(r.summary().starts_with("the plan holds"), "{}", r.summary());
    }

    #[test]
    fn n1_exact_fit_is_ok_one_mib_more_is_not() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        // b runs 2048, offers 4096 → 2048 free; a's protected guest of exactly 2048 fits.
        let mut guests = vec![guest("web1", 2048, 2, "a", true), guest("db", 2048, 2, "b", false)];
        let r = check(&hosts, &guests, 1, R0).unwrap();
        assert!(r.ok, "{}", r.summary());
        assert_eq!(r.scenarios.len(), 2);
        assert_eq!(
            r.scenarios[0].placements,
            vec![Placement {
                guest: "web1".into(),
                from: "a".into(),
                to: "b".into()
            }]
        );
        guests[0].mem_mib = 2049;
        let r = check(&hosts, &guests, 1, R0).unwrap();
        assert!(!r.ok);
        let s: Vec<_> = r.shortfalls().collect();
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].explanation,
            "if host a fails, guest web1 (2049 MiB, 2 vCPUs) fits nowhere: b has 2048 MiB and 2 vCPUs free"
        );
        // The unprotected db is not restarted when b fails.
        assert!(r.scenarios[1].placements.is_empty() && r.scenarios[1].shortfalls.is_empty());
    }

    #[test]
    fn vcpus_are_respected_too() {
        let hosts = [host("a", 8192, 8), host("b", 8192, 2)];
        let guests = [guest("wide", 512, 4, "a", true)];
        let r = check(&hosts, &guests, 1, R0).unwrap();
        assert!(!r.ok);
        assert!(
            r.shortfalls()
                .next()
                .unwrap()
                .explanation
                .ends_with("b has 8192 MiB and 2 vCPUs free"),
            "{}",
            r.summary()
        );
    }

    #[test]
    fn reserve_is_kept_free() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        let guests = [guest("g", 3584, 1, "a", true)];
        assert!(check(&hosts, &guests, 1, R0).unwrap().ok);
        let reserve = Reserve {
            mem_mib: 1024,
            vcpus: 0,
        };
        let r = check(&hosts, &guests, 1, reserve).unwrap();
        assert!(!r.ok);
        assert!(r.summary().contains("b has 3072 MiB"), "{}", r.summary());
    }

    #[test]
    fn n2_three_hosts_message_names_both_failed_hosts() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4), host("c", 4096, 4)];
        let guests = [
            guest("web1", 2048, 2, "a", true),
            guest("web2", 2048, 2, "b", true),
            guest("big", 3072, 1, "c", false),
        ];
        let r = check(&hosts, &guests, 2, R0).unwrap();
        assert_eq!(r.scenarios.len(), 3);
        let fails: Vec<_> = r.scenarios.iter().map(|s| s.failed.join("+")).collect();
        assert_eq!(fails, ["a+b", "a+c", "b+c"]);
        let s = &r.scenarios[0].shortfalls;
        // a and b fail: web1 and web2 (2048 each, ties by name) go to c, which has 1024 free.
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0].explanation,
            "if hosts a and b fail, guest web1 (2048 MiB, 2 vCPUs) fits nowhere: c has 1024 MiB and 3 vCPUs free"
        );
        // a and c fail: web1 → b (2048 free after web2). Fits.
        assert!(r.scenarios[1].shortfalls.is_empty());
        assert!(!r.ok);
        assert!(r.summary().contains("2 shortfalls"), "{}", r.summary());
    }

    #[test]
    fn ffd_places_the_largest_first_and_ties_by_name() {
        let hosts = [host("a", 8192, 8), host("b", 3072, 8), host("c", 2048, 8)];
        let guests = [
            guest("small", 1024, 1, "a", true),
            guest("large", 3072, 1, "a", true),
            guest("mid-b", 2048, 1, "a", true),
            guest("mid-a", 2048, 1, "a", true),
        ];
        let p = place_failed(&hosts, &guests, &["a".into()], R0).unwrap();
        // large → b (3072); mid-a → c; mid-b fits nowhere (b 0, c 0); small nowhere.
        assert_eq!(
            p.placed,
            vec![("large".into(), "b".into()), ("mid-a".into(), "c".into())]
        );
        let un: Vec<_> = p.unplaced.iter().map(|s| s.guest.as_str()).collect();
        assert_eq!(un, ["mid-b", "small"]);
        assert_eq!(
            p.unplaced[0].explanation,
            "after host a failed, guest mid-b (2048 MiB, 1 vCPU) fits nowhere: b has 0 MiB and 7 vCPUs free and c has 0 MiB and 7 vCPUs free"
        );
        assert_eq!(p.for_host("c").collect::<Vec<_>>(), ["mid-a"]);
    }

    #[test]
    fn place_failed_is_deterministic_under_shuffled_input() {
        let mut hosts: Vec<Host> = (0..6).map(|i| host(&format!("h{i}"), 16384, 16)).collect();
        let mut guests: Vec<Guest> = (0..40)
            .map(|i| {
                guest(
                    &format!("g{i:02}"),
                    256 * (1 + (i * 7 % 5)),
                    1 + (i % 3) as u32,
                    &format!("h{}", i % 6),
                    i % 4 != 0,
                )
            })
            .collect();
        let dead = vec!["h2".to_string(), "h4".to_string()];
        let reference = place_failed(&hosts, &guests, &dead, R0).unwrap();
        assert!(!reference.placed.is_empty());
        let reference_check = check(&hosts, &guests, 2, R0).unwrap();
        // Deterministic permutations (a simple LCG), no external randomness.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..50 {
            for v in [&mut hosts as &mut dyn Shuffle, &mut guests as &mut dyn Shuffle] {
                v.shuffle(&mut seed);
            }
            let mut dead_shuffled = dead.clone();
            dead_shuffled.reverse();
            assert_eq!(place_failed(&hosts, &guests, &dead_shuffled, R0).unwrap(), reference);
            assert_eq!(check(&hosts, &guests, 2, R0).unwrap(), reference_check);
        }
    }

    trait Shuffle {
        fn shuffle(&mut self, seed: &mut u64);
    }
    impl<T> Shuffle for Vec<T> {
        fn shuffle(&mut self, seed: &mut u64) {
            for i in (1..self.len()).rev() {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (*seed >> 33) as usize % (i + 1);
                self.swap(i, j);
            }
        }
    }

    #[test]
    fn place_failed_skips_unprotected_and_counts_not_alive_hosts_as_dead() {
        let mut hosts = vec![host("a", 4096, 4), host("b", 4096, 4), host("c", 4096, 4)];
        hosts[2].alive = false;
        let guests = [
            guest("p", 1024, 1, "a", true),
            guest("u", 1024, 1, "a", false),
            guest("q", 1024, 1, "c", true),
        ];
        let p = place_failed(&hosts, &guests, &["a".into()], R0).unwrap();
        assert_eq!(p.placed, vec![("p".into(), "b".into()), ("q".into(), "b".into())]);
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn hosts_already_down_are_placed_in_every_scenario() {
        let mut hosts = vec![host("a", 4096, 4), host("b", 4096, 4), host("c", 2048, 4)];
        hosts[0].alive = false;
        let guests = [guest("ga", 2048, 1, "a", true), guest("gb", 2048, 1, "b", true)];
        let r = check(&hosts, &guests, 1, R0).unwrap();
        assert_eq!(r.down, ["a"]);
        assert_eq!(r.scenarios.len(), 2);
        // b fails with a down: ga and gb both need c (2048): one fits, one does not.
        let s = &r.scenarios[0];
        assert_eq!(s.failed, ["b"]);
        assert_eq!(s.shortfalls.len(), 1);
        assert!(
            s.shortfalls[0]
                .explanation
                .starts_with("with host a down and host b fails, guest gb"),
            "{}",
            s.shortfalls[0].explanation
        );
        let r0 = check(&hosts, &guests, 0, R0).unwrap();
        assert!(r0.ok, "{}", r0.summary());
        assert_eq!(r0.scenarios[0].placements[0].to, "b");
    }

    #[test]
    fn too_many_failures_and_scenario_cap_are_clear_errors() {
        let hosts = [host("a", 1, 1), host("b", 1, 1)];
        let e = check(&hosts, &[], 2, R0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a pool with 2 live hosts cannot tolerate 2 host failures: at most 1"
        );
        let e = check(&[], &[], 0, R0).unwrap_err();
        assert!(matches!(e, PlanError::TooManyFailures { alive: 0, .. }));
        let many: Vec<Host> = (0..40).map(|i| host(&format!("h{i:02}"), 1, 1)).collect();
        let e = check(&many, &[], 10, R0).unwrap_err();
        assert!(
            matches!(e, PlanError::TooManyScenarios { count: 847_660_528, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("lower host-failures-to-tolerate"));
        // 40 choose 2 = 780 is fine.
        assert_eq!(check(&many, &[], 2, R0).unwrap().scenarios.len(), 780);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let hosts = [host("a", 1, 1), host("a", 1, 1)];
        assert_eq!(
            check(&hosts, &[], 0, R0).unwrap_err(),
            PlanError::DuplicateHost("a".into())
        );
        let hosts = [host("a", 1, 1), host("b", 1, 1)];
        let g = [guest("g", 1, 1, "zz", true)];
        assert!(matches!(check(&hosts, &g, 1, R0), Err(PlanError::UnknownHost { .. })));
        let g = [guest("g", 1, 1, "a", true), guest("g", 1, 1, "b", true)];
        assert!(matches!(check(&hosts, &g, 1, R0), Err(PlanError::DuplicateGuest(_))));
    }

    #[test]
    fn overcommitted_host_is_a_warning() {
        let hosts = [host("a", 1024, 4), host("b", 4096, 4)];
        let guests = [guest("fat", 2048, 1, "a", false)];
        let r = check(&hosts, &guests, 1, R0).unwrap();
        assert_eq!(
            r.warnings,
            ["host a is overcommitted: its guests need more than the 1024 MiB and 4 vCPUs it offers"]
        );
    }

    #[test]
    fn admission_refuses_a_protect_that_breaks_the_plan() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        let guests = [guest("web1", 3072, 2, "a", false), guest("db", 2048, 2, "b", true)];
        // db fits on a? a has 1024 free → the plan is already broken for db.
        let change = Change::Protect {
            guest: "web1".into(),
            level: 1,
        };
        let e = admit(&hosts, &guests, 1, R0, &change).unwrap_err();
        assert_eq!(
            e.explanation,
            "refused: protecting guest web1 at level 1 would break the failover plan (host-failures-to-tolerate = 1): \
             if host a fails, guest web1 (3072 MiB, 2 vCPUs) fits nowhere: b has 2048 MiB and 2 vCPUs free. \
             The plan is already broken before this change (1 shortfall). Add capacity, stop or unprotect \
             another guest, or lower host-failures-to-tolerate"
        );
        assert_eq!(e.shortfalls.len(), 1);
        assert_eq!(e.to_string(), e.explanation);
        // With n = 0 nothing has to be restarted: admitted.
        admit(&hosts, &guests, 0, R0, &change).unwrap();
        // Unprotect is always admitted.
        admit(&hosts, &guests, 1, R0, &Change::Unprotect { guest: "db".into() }).unwrap();
    }

    #[test]
    fn admission_of_a_protect_that_fits() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        let guests = [guest("g1", 1024, 1, "a", false), guest("g2", 1024, 1, "b", true)];
        admit(
            &hosts,
            &guests,
            1,
            R0,
            &Change::Protect {
                guest: "g1".into(),
                level: 1,
            },
        )
        .unwrap();
    }

    #[test]
    fn admission_of_start_checks_room_now_and_the_plan() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        let guests = [
            guest("p", 3072, 1, "a", true),
            guest("new", 2048, 1, "", false),
            guest("tiny", 512, 1, "", false),
        ];
        let start = |g: &str, h: &str| Change::Start {
            guest: g.into(),
            host: h.into(),
        };
        // On b: room now (4096), but b must keep 3072 for p if a fails.
        let e = admit(&hosts, &guests, 1, R0, &start("new", "b")).unwrap_err();
        assert!(
            e.explanation.starts_with(
                "refused: starting guest new on b would break the failover plan (host-failures-to-tolerate = 1): \
                 if host a fails, guest p (3072 MiB, 1 vCPU) fits nowhere: b has 2048 MiB and 3 vCPUs free"
            ),
            "{}",
            e.explanation
        );
        // On a: only 1024 free now.
        let e = admit(&hosts, &guests, 1, R0, &start("new", "a")).unwrap_err();
        assert_eq!(
            e.explanation,
            "host a has 1024 MiB and 3 vCPUs free; guest new needs 2048 MiB and 1 vCPU"
        );
        admit(&hosts, &guests, 1, R0, &start("tiny", "b")).unwrap();
        let e = admit(&hosts, &guests, 1, R0, &start("p", "b")).unwrap_err();
        assert_eq!(e.explanation, "guest p is already running on a");
        let e = admit(&hosts, &guests, 1, R0, &start("ghost", "b")).unwrap_err();
        assert_eq!(e.explanation, "there is no guest named 'ghost' in the pool");
        let mut down = hosts.to_vec();
        down[1].alive = false;
        let e = admit(&down, &guests, 0, R0, &start("tiny", "b")).unwrap_err();
        assert_eq!(e.explanation, "host b is down");
    }

    #[test]
    fn admission_of_level_changes() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4)];
        let guests = [guest("g", 1024, 1, "a", true), guest("u", 1024, 1, "a", false)];
        let set = |g: &str, level| Change::SetLevel { guest: g.into(), level };
        admit(&hosts, &guests, 1, R0, &set("g", 2)).unwrap();
        let e = admit(&hosts, &guests, 1, R0, &set("g", 3)).unwrap_err();
        assert!(e.explanation.starts_with("level 3 does not exist"), "{}", e.explanation);
        let e = admit(&hosts, &guests, 1, R0, &set("u", 1)).unwrap_err();
        assert!(e.explanation.contains("is not protected"), "{}", e.explanation);
    }

    #[test]
    fn a_change_that_does_not_worsen_a_broken_plan_is_admitted() {
        let hosts = [host("a", 4096, 4), host("b", 1024, 4)];
        let guests = [guest("big", 2048, 1, "a", true), guest("g", 512, 1, "b", true)];
        assert!(!check(&hosts, &guests, 1, R0).unwrap().ok);
        // Level change of an already protected guest adds nothing.
        admit(
            &hosts,
            &guests,
            1,
            R0,
            &Change::SetLevel {
                guest: "big".into(),
                level: 2,
            },
        )
        .unwrap();
    }

    #[test]
    fn max_failures_hint() {
        let hosts = [host("a", 4096, 4), host("b", 4096, 4), host("c", 4096, 4)];
        let guests = [guest("g1", 2048, 1, "a", true), guest("g2", 2048, 1, "b", true)];
        assert_eq!(max_failures_tolerated(&hosts, &guests, R0), 2);
        let guests = [guest("g1", 3072, 1, "a", true), guest("g2", 3072, 1, "b", true)];
        assert_eq!(max_failures_tolerated(&hosts, &guests, R0), 1);
    }

    #[test]
    fn combinations_enumerates_all_in_order() {
        let mut out = Vec::new();
        combinations(4, 2, |c| out.push(c.to_vec()));
        assert_eq!(
            out,
            vec![vec![0, 1], vec![0, 2], vec![0, 3], vec![1, 2], vec![1, 3], vec![2, 3]]
        );
        let mut n = 0;
        combinations(5, 0, |c| {
            assert!(c.is_empty());
            n += 1
        });
        assert_eq!(n, 1);
        let mut n = 0;
        combinations(6, 6, |_| n += 1);
        assert_eq!(n, 1);
        assert_eq!(binomial(32, 16), 601_080_390);
        assert_eq!(binomial(5, 0), 1);
        assert_eq!(binomial(40, 10), 847_660_528);
    }
}
