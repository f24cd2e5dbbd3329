//! Time per operator, from libtorch's own profiler (the Kineto profiler behind `torch.profiler`,
//! reached through trainer/csrc/profiler.cpp): start it, run a step, stop it, and read back every
//! operator event; self time (an event's duration less its children's on the same thread) is summed
//! per operator name, as `torch.profiler`'s `key_averages()` does, so the two tables compare. It
//! also writes the Chrome trace (open it in Perfetto or chrome://tracing). It does not decide what
//! to profile: the bench (`BENCH_PROFILE`) and `train.profile_step` do (`finish_step` writes the
//! latter's files).

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// One operator's times over a profiled region.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpTime {
    pub name: String,
    pub calls: u64,
    /// Time in the operator itself, children excluded (ns).
    pub self_ns: u64,
    /// Time in the operator and everything it called (ns).
    pub total_ns: u64,
}

/// What a profiled region spent, per operator, heaviest self time first.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// CPU-side operators (and the autograd nodes that call them).
    pub ops: Vec<OpTime>,
    /// CUDA kernels, when the region ran on a GPU.
    pub kernels: Vec<OpTime>,
}

/// Whether this build has the profiler shim (libtorch's headers declared its interface).
pub const AVAILABLE: bool = cfg!(ferrotune_profiler);

#[cfg(ferrotune_profiler)]
unsafe extern "C" {
    fn ferrotune_profile_start(cuda: i32) -> i32;
    fn ferrotune_profile_stop(events_path: *const std::ffi::c_char, trace_path: *const std::ffi::c_char) -> i32;
    fn ferrotune_profile_error() -> *const std::ffi::c_char;
}

#[cfg(ferrotune_profiler)]
fn shim_error(what: &str) -> Error {
    // SAFETY: the shim returns a pointer to its own NUL-terminated string, valid until its next call.
    let msg = unsafe { std::ffi::CStr::from_ptr(ferrotune_profile_error()) }.to_string_lossy().into_owned();
    Error::Invalid(format!("libtorch profiler: {what}: {msg}"))
}

/// A running profiler; `stop` it to get the profile. Only one can run in a process at a time.
pub struct Session {
    _private: (),
}

/// Starts libtorch's profiler (CPU operators, and CUDA kernels with `cuda`).
pub fn start(cuda: bool) -> Result<Session> {
    #[cfg(ferrotune_profiler)]
    {
        // SAFETY: plain call; failures come back as -1.
        if unsafe { ferrotune_profile_start(cuda as i32) } != 0 {
            return Err(shim_error("cannot start"));
        }
        Ok(Session { _private: () })
    }
    #[cfg(not(ferrotune_profiler))]
    {
        let _ = cuda;
        Err(Error::Invalid(
            "this build has no profiler: libtorch's headers lacked torch/csrc/autograd/profiler_kineto.h".into(),
        ))
    }
}

impl Session {
    /// Stops the profiler and sums its events per operator; with `trace`, also writes the Chrome trace there.
    pub fn stop(self, trace: Option<&Path>) -> Result<Profile> {
        #[cfg(ferrotune_profiler)]
        {
            use std::ffi::CString;
            let events = std::env::temp_dir().join(format!("ferrotune-profile-{}.tsv", std::process::id()));
            let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).expect("a path has no NUL");
            let (events_c, trace_c) = (c(&events), trace.map(c));
            let trace_ptr = trace_c.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
            // SAFETY: both pointers are NUL-terminated strings that outlive the call.
            if unsafe { ferrotune_profile_stop(events_c.as_ptr(), trace_ptr) } != 0 {
                return Err(shim_error("cannot stop"));
            }
            let text = std::fs::read_to_string(&events).map_err(Error::io(&events));
            let _ = std::fs::remove_file(&events);
            let text = text?;
            Ok(Profile::from_events(&parse_events(&text)))
        }
        #[cfg(not(ferrotune_profiler))]
        {
            let _ = trace;
            unreachable!("a Session exists only where start succeeded")
        }
    }
}

/// One recorded event: operator name, thread, start and duration (ns), and whether it ran on a GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub thread: u64,
    pub start: u64,
    pub dur: u64,
    pub gpu: bool,
}

/// The shim's tab-separated lines (name, thread, start ns, duration ns, c10::DeviceType number).
pub fn parse_events(text: &str) -> Vec<Event> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let [name, thread, start, dur, device] = f[..] else { return None };
            Some(Event {
                name: name.to_string(),
                thread: thread.parse().ok()?,
                start: start.parse().ok()?,
                dur: dur.parse().ok()?,
                gpu: device.parse::<i32>().ok()? == 1,
            })
        })
        .collect()
}

impl Profile {
    /// Sums events per name. A CPU event's children are the events of its thread that start inside
    /// it; its self time is its duration less theirs (nesting is strict in libtorch's records).
    pub fn from_events(events: &[Event]) -> Profile {
        let mut by_thread: HashMap<u64, Vec<&Event>> = HashMap::new();
        let mut kernels: HashMap<&str, OpTime> = HashMap::new();
        for e in events {
            if e.gpu {
                let k = kernels.entry(&e.name).or_insert_with(|| op(&e.name));
                (k.calls, k.self_ns, k.total_ns) = (k.calls + 1, k.self_ns + e.dur, k.total_ns + e.dur);
            } else {
                by_thread.entry(e.thread).or_default().push(e);
            }
        }
        let mut ops: HashMap<&str, OpTime> = HashMap::new();
        for evs in by_thread.values_mut() {
            // Parents first: earlier start, and the longer of two that start together.
            evs.sort_by_key(|e| (e.start, std::cmp::Reverse(e.dur)));
            let mut child_ns = vec![0u64; evs.len()];
            let mut stack: Vec<usize> = vec![];
            for i in 0..evs.len() {
                while stack.last().is_some_and(|&p| evs[p].start + evs[p].dur <= evs[i].start) {
                    stack.pop();
                }
                if let Some(&p) = stack.last() {
                    child_ns[p] += evs[i].dur;
                }
                stack.push(i);
            }
            for (i, e) in evs.iter().enumerate() {
                let o = ops.entry(&e.name).or_insert_with(|| op(&e.name));
                o.calls += 1;
                o.self_ns += e.dur.saturating_sub(child_ns[i]);
                o.total_ns += e.dur;
            }
        }
        let sorted = |m: HashMap<&str, OpTime>| {
            let mut v: Vec<OpTime> = m.into_values().collect();
            v.sort_by(|a, b| b.self_ns.cmp(&a.self_ns).then(a.name.cmp(&b.name)));
            v
        };
        Profile { ops: sorted(ops), kernels: sorted(kernels) }
    }

    /// Sum of every CPU operator's self time (ns): the time the profiled thread(s) spent in operators.
    pub fn self_total(&self) -> u64 {
        self.ops.iter().map(|o| o.self_ns).sum()
    }

    /// The `top` heaviest operators as a table: self ms, share of all self time, calls, total ms.
    pub fn table(&self, top: usize) -> String {
        table("operator", &self.ops, top)
    }

    /// The `top` heaviest CUDA kernels, as `table` (a kernel's self time is its duration).
    pub fn kernels_table(&self, top: usize) -> String {
        table("CUDA kernel", &self.kernels, top)
    }
}

/// `train.profile_step`: stops `session` after the step it recorded (waiting for a GPU's kernels
/// first), writes `<run_dir>/profile/step-<step>.rank-<rank>.json` (this `Profile`) and `.trace.json`
/// (the Chrome trace), and logs rank 0's heaviest operators and kernels.
pub fn finish_step(session: Session, run_dir: &Path, step: u64, rank: usize, device: tch::Device) -> Result<Profile> {
    if let tch::Device::Cuda(ordinal) = device {
        tch::Cuda::synchronize(ordinal as i64);
    }
    let dir = run_dir.join("profile");
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let stem = format!("step-{step}.rank-{rank}");
    let p = session.stop(Some(&dir.join(format!("{stem}.trace.json"))))?;
    let json = dir.join(format!("{stem}.json"));
    let bytes = serde_json::to_vec_pretty(&p).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&json, bytes).map_err(Error::io(&json))?;
    if rank == 0 {
        let kernels = if p.kernels.is_empty() { String::new() } else { p.kernels_table(25) };
        let all = p.self_total() as f64 / 1e6;
        tracing::info!(
            "step {step} profiled: {all:.1} ms of operator self time; every rank's profile and Chrome trace in {}\n{}{kernels}",
            dir.display(),
            p.table(25)
        );
    }
    Ok(p)
}

fn table(what: &str, rows: &[OpTime], top: usize) -> String {
    let all = rows.iter().map(|o| o.self_ns).sum::<u64>().max(1) as f64;
    let mut s = format!("{:<58} {:>9} {:>6} {:>7} {:>9}\n", what, "self ms", "self%", "calls", "total ms");
    for o in rows.iter().take(top) {
        s += &format!(
            "{:<58} {:>9.1} {:>5.1}% {:>7} {:>9.1}\n",
            shorten(&o.name, 58),
            o.self_ns as f64 / 1e6,
            100.0 * o.self_ns as f64 / all,
            o.calls,
            o.total_ns as f64 / 1e6
        );
    }
    s
}

fn op(name: &str) -> OpTime {
    OpTime { name: name.to_string(), calls: 0, self_ns: 0, total_ns: 0 }
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, thread: u64, start: u64, dur: u64) -> Event {
        Event { name: name.into(), thread, start, dur, gpu: false }
    }

    /// Self time is the duration less the children's, per thread; siblings and other threads are not
    /// children. The numbers are worked by hand from the intervals.
    #[test]
    fn self_time_subtracts_nested_events_of_the_same_thread() {
        let events = [
            ev("aten::linear", 1, 0, 100),
            ev("aten::t", 1, 0, 10), // starts with its parent: the shorter one is the child
            ev("aten::addmm", 1, 20, 70),
            ev("aten::linear", 1, 200, 50),
            ev("aten::addmm", 1, 210, 30),
            ev("aten::addmm", 2, 5, 40), // another thread: not linear's child
        ];
        let p = Profile::from_events(&events);
        let get = |n: &str| p.ops.iter().find(|o| o.name == n).unwrap().clone();
        let linear = get("aten::linear");
        assert_eq!((linear.calls, linear.self_ns, linear.total_ns), (2, (100 - 80) + (50 - 30), 150));
        let addmm = get("aten::addmm");
        assert_eq!((addmm.calls, addmm.self_ns), (3, 140));
        assert_eq!(p.ops[0].name, "aten::addmm");
        assert_eq!(p.self_total(), 20 + 20 + 10 + 140);
        assert!(p.table(2).lines().nth(1).unwrap().starts_with("aten::addmm"));
    }

    #[test]
    fn events_parse_from_the_shims_lines() {
        let e = parse_events("aten::mm\t7\t100\t25\t0\nvoid gemm<...>\t7\t130\t20\t1\nbad line\n");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0], ev("aten::mm", 7, 100, 25));
        assert!(e[1].gpu);
        let p = Profile::from_events(&e);
        assert_eq!((p.ops.len(), p.kernels.len()), (1, 1));
    }
}
