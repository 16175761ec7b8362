//! Where a model call's time goes, component by component (`sd-rbee bench unet --profile`).
//!
//! Each model component opens a [`scope`] named after what it is (`conv`, `linear`, `attention`,
//! `resnet`, ...). While [`record`] runs a call on this thread, every scope waits for the device on entry
//! and on exit, so GPU work is charged to the component that queued it, and the report gives each
//! component's own time (its time minus its sub-components') and its inclusive time. The names match the
//! diffusers module classes `benches/torch_baseline.py unet --profile` times the same way, so the two
//! breakdowns compare line by line. Outside [`record`] a scope costs one thread-local read.
//!
//! The waits serialise the GPU's queue, so a profiled call is slower than a plain one on a GPU (the
//! report's total says by how much); the shares are what it is for.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use candle_core::{Device, Result};

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

struct Frame {
    name: &'static str,
    start: Instant,
    children: Duration,
}

struct Recorder {
    device: Device,
    stack: Vec<Frame>,
    totals: BTreeMap<&'static str, Totals>,
}

/// One component's figures over a recorded call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub calls: usize,
    /// Time inside the component, its sub-components included.
    pub inclusive: Duration,
    /// Time inside the component less its sub-components' time.
    pub own: Duration,
}

/// What [`record`] measured: the call's wall time and each component's totals, largest own time first.
#[derive(Clone, Debug)]
pub struct Report {
    pub wall: Duration,
    pub components: Vec<(&'static str, Totals)>,
}

impl Report {
    pub fn get(&self, name: &str) -> Option<Totals> {
        self.components.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// The sum of every component's own time: the part of the wall time some scope accounts for.
    pub fn covered(&self) -> Duration {
        self.components.iter().map(|(_, t)| t.own).sum()
    }
}

impl fmt::Display for Report {
    /// One `component=NAME calls=N own_ms=X incl_ms=Y share=Z%` line per component (`share`: of the wall time).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wall = self.wall.as_secs_f64();
        for (name, t) in &self.components {
            writeln!(
                f,
                "component={name} calls={} own_ms={:.3} incl_ms={:.3} share={:.1}%",
                t.calls,
                t.own.as_secs_f64() * 1e3,
                t.inclusive.as_secs_f64() * 1e3,
                100.0 * t.own.as_secs_f64() / wall.max(f64::MIN_POSITIVE)
            )?;
        }
        write!(f, "component=total wall_ms={:.3} covered_ms={:.3}", wall * 1e3, self.covered().as_secs_f64() * 1e3)
    }
}

/// A component's timing, from [`scope`] until dropped.
#[must_use = "a scope times the code until it is dropped"]
pub struct Scope(());

/// Opens a timed scope named `name` when this thread is recording; `None`, for nothing, otherwise.
pub fn scope(name: &'static str) -> Option<Scope> {
    RECORDER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let recorder = slot.as_mut()?;
        // A failed wait only blurs the attribution; the call itself reports device errors.
        let _ = recorder.device.synchronize();
        recorder.stack.push(Frame { name, start: Instant::now(), children: Duration::ZERO });
        Some(Scope(()))
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        RECORDER.with(|cell| {
            let mut slot = cell.borrow_mut();
            let Some(recorder) = slot.as_mut() else { return };
            let _ = recorder.device.synchronize();
            let Some(frame) = recorder.stack.pop() else { return };
            let inclusive = frame.start.elapsed();
            if let Some(parent) = recorder.stack.last_mut() {
                parent.children += inclusive;
            }
            let totals = recorder.totals.entry(frame.name).or_default();
            totals.calls += 1;
            totals.inclusive += inclusive;
            totals.own += inclusive.saturating_sub(frame.children);
        })
    }
}

/// Runs `call` on this thread with every [`scope`] in it timed on `device`, and reports where its time went.
pub fn record<T>(device: &Device, call: impl FnOnce() -> Result<T>) -> Result<(T, Report)> {
    device.synchronize()?;
    RECORDER.with(|cell| {
        *cell.borrow_mut() = Some(Recorder { device: device.clone(), stack: Vec::new(), totals: BTreeMap::new() })
    });
    let start = Instant::now();
    let out = call();
    let waited = device.synchronize();
    let wall = start.elapsed();
    let recorder = RECORDER.with(|cell| cell.borrow_mut().take()).expect("the recorder was set above");
    let (out, ()) = (out?, waited?);
    let mut components: Vec<_> = recorder.totals.into_iter().collect();
    components.sort_by(|a, b| b.1.own.cmp(&a.1.own).then(a.0.cmp(b.0)));
    Ok((out, Report { wall, components }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(ms: u64) {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {}
    }

    #[test]
    fn own_time_excludes_nested_scopes_and_counts_calls() {
        let ((), report) = record(&Device::Cpu, || {
            let _outer = scope("outer");
            busy(20);
            for _ in 0..2 {
                let _inner = scope("inner");
                busy(15);
            }
            Ok(())
        })
        .unwrap();
        let (outer, inner) = (report.get("outer").unwrap(), report.get("inner").unwrap());
        assert_eq!((outer.calls, inner.calls), (1, 2));
        assert!(inner.own >= Duration::from_millis(30) && inner.own == inner.inclusive, "{inner:?}");
        assert!(outer.inclusive >= Duration::from_millis(50), "{outer:?}");
        assert!(outer.own >= Duration::from_millis(20) && outer.own < Duration::from_millis(30), "{outer:?}");
        assert_eq!(outer.own + inner.inclusive, outer.inclusive);
        assert!(report.covered() <= report.wall);
        assert_eq!(report.components[0].0, "inner", "sorted by own time");
        let text = report.to_string();
        assert!(text.contains("component=inner calls=2 own_ms="), "{text}");
        assert!(text.ends_with(&format!("covered_ms={:.3}", report.covered().as_secs_f64() * 1e3)), "{text}");
    }

    #[test]
    fn scopes_outside_a_recording_cost_nothing_and_record_nothing() {
        assert!(scope("conv").is_none());
        let ((), report) = record(&Device::Cpu, || Ok(())).unwrap();
        assert!(report.components.is_empty());
    }

    #[test]
    fn an_error_ends_the_recording() {
        let err = record(&Device::Cpu, || -> Result<()> {
            let _s = scope("conv");
            candle_core::bail!("boom")
        })
        .unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert!(scope("conv").is_none(), "no recorder is left behind");
    }
}
