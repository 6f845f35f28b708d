//! The zero-loss promotion rule under quorum commit, as a pure function.
//!
//! With `synchronous_standby_names = 'ANY N (S)'` a commit is acknowledged once N members of S
//! confirmed it. Any |S| - N + 1 members of S therefore include at least one member that holds
//! every acknowledged commit, so the most advanced among them does. A standby may promote only
//! if it is in S, has heard from at least |S| - N + 1 members of S (itself included), and is the
//! most advanced of those (ties broken by name). Two candidates that heard different subsets can
//! both qualify; that is safe because both hold every acknowledged commit, and the Lease write,
//! preconditioned on the observed resourceVersion, lets only one of them promote.

use std::collections::BTreeMap;

use super::decide::Sync;

/// Why a candidate may not promote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// N is zero or larger than the set: the published quorum is inconsistent.
    BadQuorum {
        number: usize,
        set: usize,
    },
    NotInSet,
    /// Heard from too few members of S to be sure the view covers every quorum.
    TooFewHeard {
        heard: usize,
        needed: usize,
    },
    /// Another member of S that was heard from is further ahead (or equal and sorts first).
    NotMostAdvanced {
        ahead: String,
    },
}

/// Decides whether `me` may promote. `heard` maps members of S (and possibly others) that
/// answered, `me` included, to the WAL position they have received.
pub fn may_promote<P: Ord>(
    me: &str,
    set: &[String],
    number: usize,
    heard: &BTreeMap<String, P>,
) -> Result<(), Refusal> {
    if number == 0 || number > set.len() {
        return Err(Refusal::BadQuorum {
            number,
            set: set.len(),
        });
    }
    if !set.iter().any(|s| s == me) {
        return Err(Refusal::NotInSet);
    }
    let members: Vec<(&String, &P)> = heard
        .iter()
        .filter(|(name, _)| set.contains(name))
        .collect();
    let needed = set.len() - number + 1;
    if members.len() < needed {
        return Err(Refusal::TooFewHeard {
            heard: members.len(),
            needed,
        });
    }
    let best = most_advanced(members.iter().map(|(name, p)| (name.as_str(), *p)));
    match best {
        Some(best) if best == me => Ok(()),
        Some(best) => Err(Refusal::NotMostAdvanced {
            ahead: best.to_string(),
        }),
        None => Err(Refusal::TooFewHeard { heard: 0, needed }),
    }
}

/// The name with the most advanced position; on equal positions the smaller name wins (so
/// that every instance picks the same one from the same reports).
pub fn most_advanced<'a, P: Ord>(
    positions: impl IntoIterator<Item = (&'a str, P)>,
) -> Option<&'a str> {
    positions
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(name, _)| name)
}

/// The primary's side: which synchronous set to ask for. With at least `number` standbys
/// streaming, exactly those; with fewer, commits wait: the set keeps what it had (plus every
/// known standby) so that Postgres never silently stops waiting, unless `allow_degraded`,
/// which turns synchronous commit off (reported as degraded). `number == 0` means off.
pub fn target(
    number: usize,
    allow_degraded: bool,
    streaming: &[String],
    previous: &Sync,
    standbys: &[String],
) -> (Sync, bool) {
    if number == 0 {
        return (Sync::Off, false);
    }
    if streaming.len() >= number {
        return (quorum(number, streaming.iter()), false);
    }
    if allow_degraded {
        return (Sync::Off, true);
    }
    let kept = match previous {
        Sync::Quorum { set, .. } => set.as_slice(),
        Sync::Off => &[],
    };
    let mut set: Vec<&String> = kept.iter().chain(streaming).collect();
    if set.len() < number {
        set.extend(standbys);
    }
    if set.is_empty() {
        // No other instance known yet (a cluster being bootstrapped): nobody to wait for,
        // and `ANY N ()` is no valid setting.
        return (Sync::Off, false);
    }
    (quorum(number, set.into_iter()), false)
}

fn quorum<'a>(number: usize, names: impl Iterator<Item = &'a String>) -> Sync {
    let set: std::collections::BTreeSet<String> = names.cloned().collect();
    Sync::Quorum {
        number,
        set: set.into_iter().collect(),
    }
}

/// What Postgres may be using as its synchronous set. A new setting is in force once a new
/// session shows it; until then Postgres may still use any set it had or was sent (a SIGHUP
/// not yet acted on is acted on later, reading whatever the files then hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InForce {
    /// A set covering every set Postgres may be using.
    bound: Sync,
    /// What the files hold, while no session has shown it yet.
    unseen: Option<Sync>,
}

/// Before any setting: Postgres waits for nobody.
impl Default for InForce {
    fn default() -> Self {
        Self::seen(Sync::Off)
    }
}

impl InForce {
    /// Postgres is seen using `sync` (or starts with it).
    pub fn seen(sync: Sync) -> Self {
        Self {
            bound: sync,
            unseen: None,
        }
    }

    /// A set covering every set Postgres may be using.
    pub fn bound(&self) -> &Sync {
        &self.bound
    }

    /// `sync` was written and the configuration reloaded; `shown` says whether a new session
    /// shows it.
    pub fn sent(&mut self, sync: Sync, shown: bool) {
        if shown {
            *self = Self::seen(sync);
        } else {
            self.bound = cover(&self.bound, &sync);
            self.unseen = Some(sync);
        }
    }
}

/// A set that every commit acknowledged under either `a` or `b` was acknowledged by, with the
/// promotion rule's meaning: the union, with the smaller number. Off acknowledges without any
/// standby, so it adds nothing.
pub fn cover(a: &Sync, b: &Sync) -> Sync {
    match (a, b) {
        (Sync::Off, other) | (other, Sync::Off) => other.clone(),
        (Sync::Quorum { number: a, set: p }, Sync::Quorum { number: b, set: t }) => {
            quorum((*a).min(*b), p.iter().chain(t))
        }
    }
}

/// One step from what Postgres may use (`in_force`) and what the Lease says (`published`)
/// towards `target`, keeping the promotion rule sound at every moment: the published set
/// always covers every set Postgres may be waiting for. So a change first publishes the
/// cover of both, then changes Postgres, and once a session shows the change publishes the
/// target itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Publish(Sync),
    Apply(Sync),
    Done,
}

pub fn next_step(published: &Sync, in_force: &InForce, target: &Sync) -> Step {
    let bound = in_force.bound();
    if bound == target {
        // The files may still hold an earlier target that Postgres is about to use.
        if in_force.unseen.as_ref().is_some_and(|s| s != target) {
            return Step::Apply(target.clone());
        }
        return if published == target {
            Step::Done
        } else {
            Step::Publish(target.clone())
        };
    }
    let cover = match target {
        // Turning synchronous commit off: Postgres first (the published quorum stays the
        // stricter rule meanwhile).
        Sync::Off => return Step::Apply(Sync::Off),
        t => cover(bound, t),
    };
    if *published == cover {
        Step::Apply(target.clone())
    } else {
        Step::Publish(cover)
    }
}

/// The value of `synchronous_standby_names` for a set.
pub fn standby_names(sync: &Sync) -> Option<String> {
    match sync {
        Sync::Off => None,
        Sync::Quorum { number, set } => Some(format!(
            "ANY {number} ({})",
            set.iter()
                .map(|n| format!("\"{}\"", n.replace('"', "")))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::lsn::Lsn;

    fn set(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn heard(entries: &[(&str, u64)]) -> BTreeMap<String, Lsn> {
        entries
            .iter()
            .map(|(n, l)| (n.to_string(), Lsn(*l)))
            .collect()
    }

    #[test]
    fn table() {
        let s = set(&["a", "b", "c"]);
        type Case<'a> = (&'a str, usize, Vec<(&'a str, u64)>, Result<(), Refusal>);
        let cases: Vec<Case> = vec![
            // ANY 1 of 3: must hear from 3 (every member) to be sure.
            ("a", 1, vec![("a", 10), ("b", 5), ("c", 7)], Ok(())),
            (
                "a",
                1,
                vec![("a", 10), ("b", 5)],
                Err(Refusal::TooFewHeard {
                    heard: 2,
                    needed: 3,
                }),
            ),
            (
                "b",
                1,
                vec![("a", 10), ("b", 5), ("c", 7)],
                Err(Refusal::NotMostAdvanced { ahead: "a".into() }),
            ),
            // ANY 2 of 3: hearing from 2 suffices.
            ("a", 2, vec![("a", 10), ("b", 5)], Ok(())),
            ("b", 2, vec![("b", 10), ("c", 10)], Ok(())),
            (
                "c",
                2,
                vec![("b", 10), ("c", 10)],
                Err(Refusal::NotMostAdvanced { ahead: "b".into() }),
            ),
            // Not a member of S: never.
            (
                "d",
                2,
                vec![("a", 1), ("b", 1), ("d", 99)],
                Err(Refusal::NotInSet),
            ),
            // Answers from outside S do not count.
            (
                "a",
                2,
                vec![("a", 10), ("x", 1)],
                Err(Refusal::TooFewHeard {
                    heard: 1,
                    needed: 2,
                }),
            ),
            // Inconsistent quorums are refused.
            (
                "a",
                0,
                vec![("a", 10)],
                Err(Refusal::BadQuorum { number: 0, set: 3 }),
            ),
            (
                "a",
                4,
                vec![("a", 10)],
                Err(Refusal::BadQuorum { number: 4, set: 3 }),
            ),
        ];
        for (me, n, h, want) in cases {
            assert_eq!(
                may_promote(me, &s, n, &heard(&h)),
                want,
                "{me} N={n} heard={h:?}"
            );
        }
    }

    fn q(number: usize, names: &[&str]) -> Sync {
        Sync::Quorum {
            number,
            set: set(names),
        }
    }

    #[test]
    fn the_primary_asks_for_streaming_standbys_and_never_silently_degrades() {
        // No other instance known yet (bootstrap): nothing to wait for, no invalid `ANY 1 ()`.
        assert_eq!(target(1, false, &[], &Sync::Off, &[]), (Sync::Off, false));
        let all = set(&["b", "c"]);
        let cases = vec![
            ("off", 0, false, vec!["b"], Sync::Off, (Sync::Off, false)),
            (
                "both stream",
                1,
                false,
                vec!["c", "b"],
                Sync::Off,
                (q(1, &["b", "c"]), false),
            ),
            (
                "one streams",
                1,
                false,
                vec!["b"],
                q(1, &["b", "c"]),
                (q(1, &["b"]), false),
            ),
            (
                "none stream: keep waiting on the old set",
                1,
                false,
                vec![],
                q(1, &["b"]),
                (q(1, &["b"]), false),
            ),
            (
                "none stream, nothing before: wait on every standby",
                1,
                false,
                vec![],
                Sync::Off,
                (q(1, &["b", "c"]), false),
            ),
            (
                "too few, degrading allowed",
                2,
                true,
                vec!["b"],
                q(2, &["b", "c"]),
                (Sync::Off, true),
            ),
        ];
        for (name, n, degrade, streaming, previous, want) in cases {
            assert_eq!(
                target(n, degrade, &set(&streaming), &previous, &all),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn set_changes_publish_the_union_first() {
        use Step::*;
        // Growing: publish b+c, apply b+c, done.
        assert_eq!(
            next_step(
                &q(1, &["b"]),
                &InForce::seen(q(1, &["b"])),
                &q(1, &["b", "c"])
            ),
            Publish(q(1, &["b", "c"]))
        );
        assert_eq!(
            next_step(
                &q(1, &["b", "c"]),
                &InForce::seen(q(1, &["b"])),
                &q(1, &["b", "c"])
            ),
            Apply(q(1, &["b", "c"]))
        );
        assert_eq!(
            next_step(
                &q(1, &["b", "c"]),
                &InForce::seen(q(1, &["b", "c"])),
                &q(1, &["b", "c"])
            ),
            Done
        );
        // Shrinking: the union is already published; apply, then publish the smaller set.
        assert_eq!(
            next_step(
                &q(1, &["b", "c"]),
                &InForce::seen(q(1, &["b", "c"])),
                &q(1, &["b"])
            ),
            Apply(q(1, &["b"]))
        );
        assert_eq!(
            next_step(
                &q(1, &["b", "c"]),
                &InForce::seen(q(1, &["b"])),
                &q(1, &["b"])
            ),
            Publish(q(1, &["b"]))
        );
        // Swapping members with a different number: union with the smaller number.
        assert_eq!(
            next_step(
                &q(2, &["b", "c"]),
                &InForce::seen(q(2, &["b", "c"])),
                &q(1, &["c", "d"])
            ),
            Publish(q(1, &["b", "c", "d"]))
        );
        // Off -> quorum: publish first. Quorum -> off: Postgres first.
        assert_eq!(
            next_step(&Sync::Off, &InForce::seen(Sync::Off), &q(1, &["b"])),
            Publish(q(1, &["b"]))
        );
        assert_eq!(
            next_step(&q(1, &["b"]), &InForce::seen(Sync::Off), &q(1, &["b"])),
            Apply(q(1, &["b"]))
        );
        assert_eq!(
            next_step(&q(1, &["b"]), &InForce::seen(q(1, &["b"])), &Sync::Off),
            Apply(Sync::Off)
        );
        assert_eq!(
            next_step(&q(1, &["b"]), &InForce::seen(Sync::Off), &Sync::Off),
            Publish(Sync::Off)
        );
        assert_eq!(
            standby_names(&q(1, &["pg-1", "pg-2"])).as_deref(),
            Some("ANY 1 (\"pg-1\", \"pg-2\")")
        );
    }

    /// A setting sent but not yet shown by a session (a postmaster slow to act on its SIGHUP)
    /// counts as possibly in force, next to the one before it.
    #[test]
    fn a_set_not_yet_shown_is_covered_until_it_is() {
        use Step::*;
        // Growing interrupted: b+c written, not shown. The published b+c covers both; when c
        // leaves, b alone is not published while Postgres may still count on c.
        let mut in_force = InForce::seen(q(1, &["b"]));
        in_force.sent(q(1, &["b", "c"]), false);
        assert_eq!(in_force.bound(), &q(1, &["b", "c"]));
        assert_eq!(
            next_step(&q(1, &["b", "c"]), &in_force, &q(1, &["b"])),
            Apply(q(1, &["b"]))
        );
        in_force.sent(q(1, &["b"]), false);
        assert_eq!(in_force.bound(), &q(1, &["b", "c"]));
        assert_eq!(
            next_step(&q(1, &["b", "c"]), &in_force, &q(1, &["b"])),
            Apply(q(1, &["b"]))
        );
        in_force.sent(q(1, &["b"]), true);
        assert_eq!(
            next_step(&q(1, &["b", "c"]), &in_force, &q(1, &["b"])),
            Publish(q(1, &["b"]))
        );
        // Swapping interrupted: b+c in force, c+d written; the target becomes the cover itself
        // (b is back): the files must be brought to it rather than left at c+d.
        let mut in_force = InForce::seen(q(1, &["b", "c"]));
        in_force.sent(q(1, &["c", "d"]), false);
        assert_eq!(in_force.bound(), &q(1, &["b", "c", "d"]));
        assert_eq!(
            next_step(&q(1, &["b", "c", "d"]), &in_force, &q(1, &["b", "c", "d"])),
            Apply(q(1, &["b", "c", "d"]))
        );
        // Turning off, not yet shown: the quorum stays the bound and is applied again.
        let mut in_force = InForce::seen(q(1, &["b"]));
        in_force.sent(Sync::Off, false);
        assert_eq!(in_force.bound(), &q(1, &["b"]));
        assert_eq!(
            next_step(&q(1, &["b"]), &in_force, &Sync::Off),
            Apply(Sync::Off)
        );
    }

    /// Exhaustively: whenever a candidate is allowed, it holds every acknowledged commit.
    #[test]
    fn an_allowed_candidate_never_misses_an_acknowledged_commit() {
        let s = set(&["a", "b", "c", "d"]);
        let names = ["a", "b", "c", "d"];
        for number in 1..=4usize {
            // Positions 0..3 for each member; a commit at position p is acknowledged when at
            // least `number` members reached p.
            for code in 0..(4u32.pow(4)) {
                let pos: Vec<u64> = (0..4)
                    .map(|i| u64::from((code / 4u32.pow(i)) % 4))
                    .collect();
                let mut sorted = pos.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                let acknowledged = sorted[number - 1];
                for heard_mask in 1..16u32 {
                    let h: BTreeMap<String, Lsn> = (0..4)
                        .filter(|i| heard_mask & (1 << i) != 0)
                        .map(|i| (names[i].to_string(), Lsn(pos[i])))
                        .collect();
                    for (i, me) in names.iter().enumerate() {
                        if !h.contains_key(*me) {
                            continue;
                        }
                        if may_promote(me, &s, number, &h).is_ok() {
                            assert!(pos[i] >= acknowledged, "{me} at {} < acknowledged {acknowledged} (N={number}, pos={pos:?}, heard={h:?})", pos[i]);
                        }
                    }
                }
            }
        }
    }
}
