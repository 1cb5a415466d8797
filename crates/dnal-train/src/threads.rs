//! How busy each thread of this process was over an interval, from Linux's per-thread
//! scheduler statistics (`/proc/self/task/TID/schedstat`, nanoseconds on a CPU). `dnal-train
//! bench` uses it to show which of burn's threads (the caller, the fusion stream's server, the
//! CubeCL device server) a GPU step keeps busy. Elsewhere, or where the kernel does not expose
//! the file, nothing is measured.

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use serde::Serialize;

/// One thread's share of an interval.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadBusy {
    /// The thread's name (`comm`; burn's device servers are `DSU-...` for the fusion stream and
    /// `DSD-...` for CubeCL's device, the caller is the binary's name).
    pub name: String,
    /// The thread's id (several threads may share a name: a device server's helpers, the
    /// caller's worker pool).
    pub tid: u32,
    /// Time on a CPU over the interval's wall time (1.0: never off a CPU; spinning counts).
    pub busy: f64,
}

/// Per-thread CPU time at one instant.
pub struct Snapshot {
    at: Instant,
    cpu_ns: BTreeMap<u32, (String, u64)>,
}

impl Snapshot {
    /// Every thread's CPU time now (none where `/proc` does not tell).
    pub fn take() -> Snapshot {
        let mut cpu_ns = BTreeMap::new();
        if let Ok(tasks) = fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let path = task.path();
                let ns = fs::read_to_string(path.join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok());
                let name = fs::read_to_string(path.join("comm")).unwrap_or_default();
                if let Some(ns) = ns {
                    cpu_ns.insert(tid, (name.trim().to_string(), ns));
                }
            }
        }
        Snapshot {
            at: Instant::now(),
            cpu_ns,
        }
    }

    /// The threads alive at both snapshots that were on a CPU at least 1 % of the time between
    /// them, busiest first.
    pub fn busy_since(&self, before: &Snapshot) -> Vec<ThreadBusy> {
        let wall = self.at.duration_since(before.at).as_nanos() as f64;
        if wall <= 0.0 {
            return Vec::new();
        }
        let mut out: Vec<ThreadBusy> = self
            .cpu_ns
            .iter()
            .filter_map(|(tid, (name, ns))| {
                let (_, was) = before.cpu_ns.get(tid)?;
                let busy = ns.saturating_sub(*was) as f64 / wall;
                (busy >= 0.01).then(|| ThreadBusy {
                    name: name.clone(),
                    tid: *tid,
                    busy,
                })
            })
            .collect();
        out.sort_by(|a, b| b.busy.total_cmp(&a.busy));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_is_busy_and_a_sleeping_one_is_not() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Barrier};
        use std::time::Duration;
        if Snapshot::take().cpu_ns.is_empty() {
            return; // Not Linux, or no schedstat: nothing to measure.
        }
        // Both threads exist before the first snapshot and after the second.
        let started = Arc::new(Barrier::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        // A thread named `name` that runs `tick` until stopped.
        let worker = |name: &str, tick: fn()| {
            let (started, stop) = (started.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    started.wait();
                    while !stop.load(Ordering::Relaxed) {
                        tick();
                    }
                })
                .unwrap()
        };
        let spin = worker("spinner", || {
            std::hint::black_box((0..64u64).fold(7u64, |x, i| x.wrapping_mul(31) ^ i));
        });
        let sleep = worker("sleeper", || std::thread::sleep(Duration::from_millis(5)));
        started.wait();
        let before = Snapshot::take();
        std::thread::sleep(Duration::from_millis(300));
        let after = Snapshot::take();
        stop.store(true, Ordering::Relaxed);
        spin.join().unwrap();
        sleep.join().unwrap();
        let busy = after.busy_since(&before);
        // Two cores may be shared with other tests' threads: "busy" is well above idle.
        assert!(
            busy.iter().any(|t| t.name == "spinner" && t.busy > 0.1),
            "the spinning thread is not busy: {busy:?}"
        );
        assert!(
            busy.iter().all(|t| t.name != "sleeper" || t.busy < 0.05),
            "the sleeping thread shows as busy: {busy:?}"
        );
    }
}
