//! What went wrong lately, per Secret: one memory that the provisioner, the refresher and the
//! admission shell all read and write, instead of one map each. Keyed by `Subject::key` (for
//! the refresher's reconciles, which cover a whole namespace, by the namespace's name).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct Failures {
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    /// Consecutive writes that left out a registry whose source failed: spaces their retries.
    incomplete: u32,
    /// Consecutive reconciles that failed: the refresher's backoff.
    reconciles: u32,
    /// Consecutive admission-time attempts that failed: the admissions' backoff.
    admissions: u32,
    /// Until then admissions do not wait on this Secret again: a token endpoint that hangs
    /// costs one admission the budget, not every admission.
    held_until: Option<Instant>,
}

impl Entry {
    fn is_empty(&self, now: Instant) -> bool {
        self.incomplete == 0
            && self.reconciles == 0
            && self.admissions == 0
            && self.held_until.is_none_or(|t| t <= now)
    }
}

impl Failures {
    fn update<T>(&self, key: &str, change: impl FnOnce(&mut Entry) -> T) -> T {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = entries.entry(key.to_string()).or_default();
        let out = change(entry);
        if entry.is_empty(Instant::now()) {
            entries.remove(key);
        }
        out
    }

    fn read<T>(&self, key: &str, look: impl FnOnce(&Entry) -> T) -> Option<T> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key).map(look)
    }

    /// A write that went out without some registry's credential; returns how many in a row.
    pub(crate) fn incomplete_write(&self, key: &str) -> u32 {
        self.update(key, |e| {
            e.incomplete = e.incomplete.saturating_add(1);
            e.incomplete
        })
    }

    /// A write with every registry's credential.
    pub(crate) fn complete_write(&self, key: &str) {
        self.update(key, |e| e.incomplete = 0)
    }

    /// Consecutive incomplete writes of the Secret.
    pub(crate) fn incomplete(&self, key: &str) -> u32 {
        self.read(key, |e| e.incomplete).unwrap_or(0)
    }

    /// A failed reconcile of the namespace; returns how many in a row.
    pub(crate) fn reconcile_failed(&self, namespace: &str) -> u32 {
        self.update(namespace, |e| {
            e.reconciles = e.reconciles.saturating_add(1);
            e.reconciles
        })
    }

    /// A reconcile that succeeded; returns whether the namespace was failing until now.
    pub(crate) fn reconcile_succeeded(&self, namespace: &str) -> bool {
        self.update(namespace, |e| std::mem::take(&mut e.reconciles) > 0)
    }

    /// The namespaces whose last reconcile failed.
    pub(crate) fn failing_namespaces(&self) -> Vec<String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .filter(|(_, e)| e.reconciles > 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Forgets what is remembered about one key.
    pub(crate) fn forget(&self, key: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Forgets every entry whose key `keep` refuses (its namespace is gone).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|k, _| keep(k));
    }

    /// How many Secrets or namespaces have something remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the namespace's last reconcile failed: the refresher retries it when its
    /// backoff ends, and nothing else needs to ask for that sooner.
    pub(crate) fn in_backoff(&self, namespace: &str) -> bool {
        self.read(namespace, |e| e.reconciles > 0).unwrap_or(false)
    }

    /// An admission-time attempt at the Secret that failed; returns how many in a row.
    pub(crate) fn admission_failed(&self, key: &str) -> u32 {
        self.update(key, |e| {
            e.admissions = e.admissions.saturating_add(1);
            e.admissions
        })
    }

    /// The Secret was written or adopted: admissions may wait on it again at once. Costs no
    /// allocation when nothing is remembered (the usual case).
    pub(crate) fn provisioned(&self, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(key) {
            e.admissions = 0;
            e.held_until = None;
            if e.is_empty(Instant::now()) {
                entries.remove(key);
            }
        }
    }

    /// Admissions stop waiting on the Secret for `hold`.
    pub(crate) fn hold(&self, key: &str, hold: Duration) {
        self.update(key, |e| e.held_until = Some(Instant::now() + hold))
    }

    /// Whether admissions should answer at once rather than wait on the Secret.
    pub(crate) fn is_held(&self, key: &str) -> bool {
        let now = Instant::now();
        self.read(key, |e| e.held_until.is_some_and(|t| t > now))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_is_counted_apart() {
        let f = Failures::default();
        assert_eq!(f.incomplete_write("a"), 1);
        assert_eq!(f.incomplete_write("a"), 2);
        assert_eq!(f.reconcile_failed("a"), 1);
        assert_eq!(f.failing_namespaces(), ["a"]);
        // A reconcile that succeeds does not reset the spacing of incomplete writes.
        assert!(f.reconcile_succeeded("a"));
        assert!(!f.reconcile_succeeded("a"));
        assert_eq!(f.incomplete("a"), 2);
        f.complete_write("a");
        assert_eq!(f.incomplete("a"), 0);
        assert!(
            f.entries.lock().unwrap().is_empty(),
            "nothing left to remember"
        );
    }

    #[test]
    fn admission_failures_count_until_the_secret_is_provisioned() {
        let f = Failures::default();
        assert_eq!(f.admission_failed("a/sa"), 1);
        assert_eq!(f.admission_failed("a/sa"), 2);
        f.hold("a/sa", Duration::from_secs(60));
        assert!(f.is_held("a/sa"));
        assert!(
            !f.in_backoff("a"),
            "admissions are not the refresher's backoff"
        );
        f.provisioned("a/sa");
        assert!(!f.is_held("a/sa"));
        assert_eq!(f.admission_failed("a/sa"), 1, "counted afresh");
        f.provisioned("a/sa");
        f.provisioned("never-failed");
        assert_eq!(f.remembered(), 0);
        f.reconcile_failed("a");
        assert!(f.in_backoff("a"));
        f.reconcile_succeeded("a");
        assert!(!f.in_backoff("a"));
    }

    #[test]
    fn a_hold_ends_by_itself() {
        let f = Failures::default();
        f.hold("a/sa", Duration::from_millis(30));
        assert!(f.is_held("a/sa") && !f.is_held("a"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!f.is_held("a/sa"));
    }
}
