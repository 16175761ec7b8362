//! A run's state between two denoising steps, enough to continue it elsewhere with the same result: the
//! latents, the scheduler's multistep history, each image's noise generator (as words drawn since seeding)
//! and the seeds. Written as safetensors bytes (tensors, and the rest as JSON in the header's metadata), so
//! a checkpoint is one object in the store.

use std::collections::HashMap;

use anyhow::{ensure, Context};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::GenerateError;
use crate::diffusion::schedulers::{SchedulerKind, SchedulerState};

/// The state after `step` denoising steps (counted from the run's first step, as progress counts them).
#[derive(Clone, Debug)]
pub struct ResumeState {
    pub step: usize,
    /// `[N, C, h, w]`, the latents after that step.
    pub latents: Tensor,
    pub scheduler: SchedulerKind,
    pub scheduler_state: SchedulerState,
    /// Each image's seed, and the words its generator had drawn.
    pub seeds: Vec<u64>,
    pub noise_draws: Vec<u64>,
    /// Whatever the caller needs to tell whether the checkpoint belongs to its job (a fingerprint).
    pub label: String,
}

/// The header's metadata: everything that is not a tensor.
#[derive(Serialize, Deserialize)]
struct Header {
    step: usize,
    scheduler: String,
    counters: Vec<(String, u64)>,
    seeds: Vec<u64>,
    noise_draws: Vec<u64>,
    label: String,
}

const METADATA_KEY: &str = "sd-rbee-checkpoint";
const LATENTS: &str = "latents";
const SCHEDULER_PREFIX: &str = "scheduler.";

impl ResumeState {
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let header = Header {
            step: self.step,
            scheduler: self.scheduler.name().to_string(),
            counters: self.scheduler_state.counters.clone(),
            seeds: self.seeds.clone(),
            noise_draws: self.noise_draws.clone(),
            label: self.label.clone(),
        };
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let mut tensors = vec![(LATENTS.to_string(), cpu(&self.latents)?)];
        for (name, t) in &self.scheduler_state.tensors {
            tensors.push((format!("{SCHEDULER_PREFIX}{name}"), cpu(t)?));
        }
        let metadata = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&header)?)]);
        Ok(safetensors::serialize(tensors, Some(metadata))?)
    }

    /// Reads a checkpoint, its tensors on `device`.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> anyhow::Result<Self> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).context("not a safetensors file")?;
        let header = meta.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)).context("no checkpoint header")?;
        let header: Header = serde_json::from_str(header).context("an unreadable checkpoint header")?;
        let mut tensors = candle_core::safetensors::load_buffer(bytes, device)?;
        let latents = tensors.remove(LATENTS).context("no latents")?;
        let scheduler = header.scheduler.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let mut state = SchedulerState { tensors: Vec::new(), counters: header.counters };
        for (name, t) in tensors {
            let short = name.strip_prefix(SCHEDULER_PREFIX).with_context(|| format!("an unknown tensor {name}"))?;
            state.tensors.push((short.to_string(), t));
        }
        state.tensors.sort_by(|a, b| a.0.cmp(&b.0));
        ensure!(
            header.seeds.len() == header.noise_draws.len(),
            "{} seeds but {} generators",
            header.seeds.len(),
            header.noise_draws.len()
        );
        ensure!(
            latents.dim(0)? == header.seeds.len(),
            "latents for {} images, {} seeds",
            latents.dim(0)?,
            header.seeds.len()
        );
        Ok(Self {
            step: header.step,
            latents,
            scheduler,
            scheduler_state: state,
            seeds: header.seeds,
            noise_draws: header.noise_draws,
            label: header.label,
        })
    }
}

impl ResumeState {
    /// Its noise counts and values: no count past what a run with latents of `dims` and `schedule_len`
    /// timesteps draws (replaying a corrupt or forged one would spin for ever), and only finite values.
    pub(super) fn check_values(&self, dims: &[usize], schedule_len: usize) -> Result<(), GenerateError> {
        let bad = |message: String| Err(super::invalid("resume", message));
        // Per image: its initial noise and one draw a step (ancestral schedulers), each at most two words a
        // value (`randn_vec`), with room to spare.
        let per_image = dims.iter().skip(1).product::<usize>() as u64;
        let most = per_image.saturating_mul(4).saturating_mul(schedule_len as u64 + 2).saturating_add(1024);
        if let Some(&draws) = self.noise_draws.iter().find(|&&d| d > most) {
            return bad(format!("the checkpoint's noise is {draws} draws in, past the {most} a run makes"));
        }
        let tensors = std::iter::once(&self.latents).chain(self.scheduler_state.tensors.iter().map(|(_, t)| t));
        for t in tensors {
            if !super::all_finite(t)? {
                return bad("the checkpoint holds values that are not finite".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let dev = Device::Cpu;
        let latents = Tensor::arange(0f32, 2.0 * 4.0 * 3.0 * 5.0, &dev).unwrap().reshape((2, 4, 3, 5)).unwrap();
        let history = (latents.clone() * 0.5).unwrap();
        let ckpt = ResumeState {
            step: 7,
            latents: latents.clone(),
            scheduler: SchedulerKind::UniPc,
            scheduler_state: SchedulerState {
                tensors: vec![("model_outputs.1".into(), history.clone())],
                counters: vec![("next_step".into(), 7), ("this_order".into(), 2)],
            },
            seeds: vec![3, 4],
            noise_draws: vec![120, 120],
            label: "job".into(),
        };
        let back = ResumeState::from_bytes(&ckpt.to_bytes().unwrap(), &dev).unwrap();
        assert_eq!(
            (back.step, back.scheduler, &back.seeds, &back.noise_draws, &back.label[..]),
            (7, SchedulerKind::UniPc, &ckpt.seeds, &ckpt.noise_draws, "job")
        );
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&back.latents), flat(&latents));
        assert_eq!(flat(back.scheduler_state.tensor("model_outputs.1").unwrap()), flat(&history));
        assert_eq!(back.scheduler_state.counter("this_order").unwrap(), 2);
        assert!(ResumeState::from_bytes(b"not a checkpoint", &dev).is_err());
    }
}
