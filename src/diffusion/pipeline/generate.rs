//! Generation: one request, or a batch of requests from different callers sharing every UNet pass.
//!
//! Each member of a batch keeps everything of its own — prompt, seeds and noise generators, scheduler (and
//! its multistep history), guidance scale, init image and mask, progress callback and cancel flag — and
//! only the UNet call is shared: the members' rows are concatenated, run once, and split again. The UNet
//! treats rows independently, so a member's images equal those of a run on its own (the tests measure it).
//! Requests can share a batch when they have the same [`BatchKey`]: latent size, the timesteps still to
//! run, and the LoRA set. A cancelled member leaves at the next step; the others go on.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::{
    all_finite, invalid, CancelFlag, Conditioning, EncodedPrompts, GenerateError, GeneratedImage, GenerationOutput,
    GenerationRequest, ModelFamily, ResumeState, StableDiffusion, StepInfo, Timings,
};
use crate::diffusion::rng::BatchNoise;
use crate::diffusion::schedulers::{self, Scheduler, SchedulerKind};
use crate::diffusion::unet_2d::AddedConditions;

mod decode;
use decode::Finished;

/// A progress callback that a batch member owns.
pub type StepCallback<'a> = Box<dyn FnMut(&StepInfo) + 'a>;

/// The scheduler a request runs with, and a warning when the model's own is not implemented.
type ChosenScheduler = (SchedulerKind, Box<dyn Scheduler>, Option<String>);

/// One request of a batch, with its own progress callback and cancel flag.
pub struct BatchMember<'a> {
    pub request: &'a GenerationRequest,
    /// Runs after every denoising step with this member's latents only.
    pub on_step: &'a mut dyn FnMut(&StepInfo),
    /// Checked before every step (and between the tiles of a tiled decode); a cancelled member leaves the batch.
    pub cancel: Option<&'a CancelFlag>,
    /// Runs after each VAE call that decodes this member's images, and after each tile of a tiled decode:
    /// the decode has no steps, and can take minutes for large images on a CPU, where a watchdog waiting
    /// for steps would take the device for hung.
    pub on_decode: Option<&'a dyn Fn()>,
}

/// What requests must have in common to share UNet passes: the latent size, the timesteps they still run
/// (so the steps, the scheduler's spacing and, for img2img, the strength), and the LoRAs in effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub width: usize,
    pub height: usize,
    /// The timesteps (as bits) from the first step the request runs.
    timesteps: Vec<u64>,
    /// Each LoRA's content hash and scale (as bits), in order.
    loras: Vec<([u8; 32], u64)>,
}

/// A member's state through the denoising loop.
struct Run {
    kind: SchedulerKind,
    scheduler: Box<dyn Scheduler>,
    noise: BatchNoise,
    seeds: Vec<u64>,
    guidance: Option<f64>,
    cond: Conditioning,
    latents: Tensor,
    blend: Option<Blend>,
    /// The inpainting UNet's extra channels (mask and masked-image latents), guidance rows included.
    extra_input: Option<Tensor>,
    /// The step index of the first step run (img2img skips the first ones).
    first_step: usize,
    /// Steps a checkpoint had already run (after `first_step`): this run starts at `first_step + resumed`.
    resumed: usize,
    /// All of the scheduler's timesteps (the inpainting blend re-noises to the next one).
    schedule_len: usize,
    warnings: Vec<String>,
    text_encoding_ms: f64,
    started: Instant,
}

impl Run {
    /// The step index this process starts at.
    fn start(&self) -> usize {
        self.first_step + self.resumed
    }

    /// Steps from the first step to the end, as progress counts them.
    fn total(&self) -> usize {
        self.schedule_len - self.first_step
    }

    /// The state after `done` steps (the current one).
    fn snapshot(&self, done: usize) -> anyhow::Result<ResumeState> {
        Ok(ResumeState {
            step: done,
            latents: self.latents.clone(),
            scheduler: self.kind,
            scheduler_state: self.scheduler.state(),
            seeds: self.seeds.clone(),
            noise_draws: self.noise.draws(),
            label: String::new(),
        })
    }

    /// Rows this member adds to the UNet input.
    fn rows(&self) -> usize {
        let n = self.seeds.len();
        if self.guidance.is_some() {
            2 * n
        } else {
            n
        }
    }
}

/// The inpainting blend: binary mask at latent size (1 = repaint), the clean image latents and the noise.
struct Blend {
    mask: Tensor,
    image_latents: Tensor,
    noise: Tensor,
}

impl StableDiffusion {
    /// Generates `req.num_images` images. `on_step` runs after every denoising step; `cancel` is checked
    /// before each step.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        on_step: &mut dyn FnMut(&StepInfo),
        cancel: Option<&CancelFlag>,
    ) -> Result<GenerationOutput, GenerateError> {
        let mut members = [BatchMember { request: req, on_step, cancel, on_decode: None }];
        self.generate_batch(&mut members).pop().expect("one result per member")
    }

    /// Which requests `req` can share UNet passes with; an invalid request is refused here as by
    /// [`Self::generate`].
    pub fn batch_key(&self, req: &GenerationRequest) -> Result<BatchKey, GenerateError> {
        self.validate(req)?;
        let (_, mut scheduler, _) = self.scheduler_for(req)?;
        let first_step = self.first_step(req, scheduler.as_ref());
        if let Some(state) = &req.resume {
            self.check_resume(req, state, scheduler.as_mut(), first_step)?;
        }
        let start = first_step + req.resume.as_ref().map_or(0, |c| c.step);
        Ok(BatchKey {
            width: req.width,
            height: req.height,
            timesteps: scheduler.timesteps()[start..].iter().map(|t| t.to_bits()).collect(),
            loras: req.loras.iter().map(|l| (l.lora.hash, l.scale.to_bits())).collect(),
        })
    }

    /// Whether `state` is a checkpoint of a run of `req` (the pipeline's half of the check; the caller's
    /// fingerprint says it is the same job).
    fn check_resume(
        &self,
        req: &GenerationRequest,
        state: &ResumeState,
        scheduler: &mut dyn Scheduler,
        first_step: usize,
    ) -> Result<(), GenerateError> {
        let bad = |message: String| Err(invalid("resume", message));
        let total = scheduler.timesteps().len() - first_step;
        if state.step == 0 || state.step >= total {
            return bad(format!("the checkpoint is after step {} of {total}", state.step));
        }
        let model_default =
            || schedulers::model_default(&self.scheduler_config).map_or(SchedulerKind::DpmPp2m, |d| d.0);
        let kind = req.scheduler.unwrap_or_else(model_default);
        if state.scheduler != kind {
            return bad(format!("the checkpoint ran {}, this run {kind}", state.scheduler));
        }
        let seeds: Option<Vec<u64>> = req.seed.map(|s| (0..req.num_images as u64).map(|i| s.wrapping_add(i)).collect());
        if seeds.as_ref() != Some(&state.seeds) || state.noise_draws.len() != state.seeds.len() {
            return bad(format!("the checkpoint has seeds {:?}, this run {seeds:?}", state.seeds));
        }
        let f = self.vae_scale_factor();
        let want = [req.num_images, self.vae.config().latent_channels, req.height / f, req.width / f];
        if state.latents.dims() != want {
            return bad(format!("the checkpoint has latents {:?}, this run {want:?}", state.latents.dims()));
        }
        // The history has the latents' shape; taking it up on a throwaway scheduler finds a missing counter.
        if let Some((name, t)) = state.scheduler_state.tensors.iter().find(|(_, t)| t.dims() != want) {
            return bad(format!("the checkpoint's scheduler {name} is {:?}, not {want:?}", t.dims()));
        }
        // Only here: every run's checkpoint passes here before it runs (`generate_batch` keys each member), and
        // one refused here lets the worker start the job over in the same delivery.
        state.check_values(&want, scheduler.timesteps().len())?;
        scheduler.restore(&state.scheduler_state).map_err(|e| invalid("resume", format!("{e:#}")))
    }

    /// Generates every member's images, sharing each UNet pass between the members with the same
    /// [`BatchKey`] (members with different keys run one group after the other). One result per member, in
    /// order.
    pub fn generate_batch(&self, members: &mut [BatchMember]) -> Vec<Result<GenerationOutput, GenerateError>> {
        let mut results: Vec<Option<Result<GenerationOutput, GenerateError>>> =
            std::iter::repeat_with(|| None).take(members.len()).collect();
        let mut groups: Vec<(BatchKey, Vec<usize>)> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            match self.batch_key(m.request) {
                Ok(key) => match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, group)) => group.push(i),
                    None => groups.push((key, vec![i])),
                },
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (_, group) in groups {
            let mut picked: Vec<(usize, &mut BatchMember)> =
                members.iter_mut().enumerate().filter(|(i, _)| group.contains(i)).collect();
            let outputs = self.run_group(&mut picked);
            for ((i, _), out) in picked.iter().zip(outputs) {
                results[*i] = Some(out);
            }
        }
        results.into_iter().map(|r| r.expect("every member has a result")).collect()
    }

    /// The scheduler a request runs with (and a warning when the model's own is not implemented).
    fn scheduler_for(&self, req: &GenerationRequest) -> Result<ChosenScheduler, GenerateError> {
        let (kind, warning) = match req.scheduler {
            Some(k) => (k, None),
            None => schedulers::model_default(&self.scheduler_config).map_err(|e| invalid("scheduler", e))?,
        };
        let scheduler =
            schedulers::build(kind, &self.scheduler_config, req.steps, req.timestep_spacing).map_err(|e| {
                match e.downcast_ref::<schedulers::StepCountError>() {
                    Some(_) => invalid("steps", e.to_string()),
                    None => invalid("scheduler", e.to_string()),
                }
            })?;
        Ok((kind, scheduler, warning))
    }

    fn first_step(&self, req: &GenerationRequest, scheduler: &dyn Scheduler) -> usize {
        schedulers::first_step(req.steps, req.init.as_ref().map(|i| i.strength), scheduler)
    }

    /// Runs members with one batch key together.
    fn run_group(&self, members: &mut [(usize, &mut BatchMember)]) -> Vec<Result<GenerationOutput, GenerateError>> {
        let mut results: Vec<Option<Result<GenerationOutput, GenerateError>>> =
            std::iter::repeat_with(|| None).take(members.len()).collect();
        // The group's LoRAs stay in effect (and no other set can be swapped in) until `in_effect` drops.
        let in_effect = match self.adapters.enter(&members[0].1.request.loras) {
            Ok(guard) => guard,
            Err(e) => {
                let message = e.to_string();
                let is_apply = matches!(e, crate::diffusion::lora::LoraError::Apply { .. });
                return members
                    .iter()
                    .map(|_| {
                        Err(if is_apply {
                            GenerateError::Other(anyhow::anyhow!("{message}"))
                        } else {
                            invalid("loras", message.clone())
                        })
                    })
                    .collect();
            }
        };
        let lora_ms = in_effect.apply_ms;
        let mut runs: Vec<Option<Run>> = Vec::with_capacity(members.len());
        let mut prompts = EncodedPrompts::new();
        for (k, (_, m)) in members.iter().enumerate() {
            match self.start_run(m.request, &mut prompts) {
                Ok(run) => runs.push(Some(run)),
                Err(e) => {
                    results[k] = Some(Err(e));
                    runs.push(None);
                }
            }
        }
        // Members of a group run the same timesteps from here (their batch key), whatever their start.
        let Some(remaining) = runs.iter().flatten().next().map(|r| r.schedule_len - r.start()) else {
            return results.into_iter().map(|r| r.expect("a failed start has a result")).collect();
        };

        let mut joint: Option<(Vec<usize>, Conditioning)> = None;
        let loop_start = Instant::now();
        let mut step_ms = Vec::with_capacity(remaining);
        for j in 0..remaining {
            for (k, (_, m)) in members.iter().enumerate() {
                if m.cancel.is_some_and(|c| c.is_cancelled()) {
                    if let Some(run) = runs[k].take() {
                        let (completed, total) = (run.resumed + j, run.total());
                        results[k] = Some(Err(GenerateError::Cancelled { completed, total }));
                    }
                }
            }
            if runs.iter().all(Option::is_none) {
                break;
            }
            let step_start = Instant::now();
            let live: Vec<usize> = (0..runs.len()).filter(|&k| runs[k].is_some()).collect();
            if joint.as_ref().is_none_or(|(m, _)| *m != live) {
                match Self::join_conditioning(&runs) {
                    Ok(c) => joint = Some((live, c)),
                    Err(e) => {
                        fail_all(&mut runs, &mut results, &e);
                        break;
                    }
                }
            }
            let (_, conditioning) = joint.as_ref().expect("joined above");
            if let Err(e) = self.step_all(&mut runs, conditioning, j) {
                fail_all(&mut runs, &mut results, &e);
                break;
            }
            let step_time = step_start.elapsed();
            step_ms.push(ms(step_time));
            let timestep = runs.iter().flatten().next().map_or(0.0, |r| r.scheduler.timesteps()[r.start() + j]);
            for (k, (_, m)) in members.iter_mut().enumerate() {
                if let Some(run) = &runs[k] {
                    let done = run.resumed + j + 1;
                    let checkpoint = || run.snapshot(done);
                    (m.on_step)(&StepInfo {
                        step: done,
                        total: run.total(),
                        elapsed: loop_start.elapsed(),
                        step_time,
                        timestep,
                        resumed_from: run.resumed,
                        latents: &run.latents,
                        sdxl: self.family == ModelFamily::StableDiffusionXl,
                        checkpoint: &checkpoint,
                    });
                }
            }
        }
        let denoising_ms = ms(loop_start.elapsed());

        let mut finished = Vec::new();
        let mut decoded = Vec::new();
        for (k, (_, m)) in members.iter().enumerate() {
            let Some(run) = runs[k].take() else { continue };
            let timings = Timings {
                lora_ms,
                text_encoding_ms: run.text_encoding_ms,
                denoising_ms,
                step_ms: step_ms.clone(),
                ..Timings::default()
            };
            finished.push(Finished { request: m.request, run, cancel: m.cancel, on_decode: m.on_decode, timings });
            decoded.push(k);
        }
        for (k, out) in decoded.into_iter().zip(self.finish_runs(finished)) {
            results[k] = Some(out);
        }
        drop(in_effect);
        results.into_iter().map(|r| r.expect("every member has a result")).collect()
    }

    /// A member's scheduler, conditioning and starting latents.
    fn start_run(&self, req: &GenerationRequest, prompts: &mut EncodedPrompts) -> Result<Run, GenerateError> {
        let started = Instant::now();
        let (kind, scheduler, warning) = self.scheduler_for(req)?;
        let mut warnings: Vec<String> = warning.into_iter().collect();
        let base_seed = req.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
        let seeds: Vec<u64> = (0..req.num_images as u64).map(|i| base_seed.wrapping_add(i)).collect();
        let guidance = (req.guidance_scale > 1.0).then_some(req.guidance_scale);

        let t0 = Instant::now();
        let cond = self.conditioning(req, guidance.is_some(), &mut warnings, prompts)?;
        let text_encoding_ms = ms(t0.elapsed());

        let f = self.vae_scale_factor();
        let channels = self.vae.config().latent_channels;
        let latent_shape = [1, channels, req.height / f, req.width / f];
        let mut noise = BatchNoise::new(&seeds);
        let schedule_len = scheduler.timesteps().len();
        let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = t.to_device(&self.device)?.to_dtype(self.latent_dtype())?;
            if t.dim(0)? == 1 {
                Tensor::cat(&vec![&t; req.num_images], 0)
            } else {
                Ok(t)
            }
        };
        let first_step = self.first_step(req, scheduler.as_ref());
        let mut blend: Option<Blend> = None;
        let mut extra_input: Option<Tensor> = None;
        let latents = match &req.init {
            None => {
                let initial = match &req.initial_latents {
                    Some(l) => repeat(l)?,
                    None => noise.randn(&latent_shape, &self.device)?.to_dtype(self.latent_dtype())?,
                };
                (initial * scheduler.init_noise_sigma())?
            }
            Some(init) => {
                let pixels = init.pixels.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
                let image_latents = repeat(&self.vae.encode_image(&pixels)?)?;
                let added = match (&init.noise, &req.initial_latents) {
                    (Some(given), _) | (None, Some(given)) => repeat(given)?,
                    (None, None) => noise.randn(&latent_shape, &self.device)?.to_dtype(self.latent_dtype())?,
                };
                let latents = if init.mask.is_some() && init.strength >= 1.0 {
                    // The inpainting pipelines start from pure noise at full strength.
                    (&added * scheduler.init_noise_sigma())?
                } else if first_step < schedule_len {
                    scheduler.add_noise(&image_latents, &added, first_step)?
                } else {
                    image_latents.clone()
                };
                if let Some(mask) = &init.mask {
                    let binary = mask.to_device(&self.device)?.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::F32)?;
                    let small = repeat(&latent_mask(&binary, f)?)?;
                    if self.is_inpainting() {
                        // The UNet sees the mask and the latents of the image with the masked region blanked
                        // (to 0 in [-1, 1], i.e. mid-grey: diffusers masks after normalising).
                        let keep = binary.affine(-1.0, 1.0)?.to_dtype(self.vae_dtype)?;
                        let grey = keep.affine(-0.5, 0.5)?;
                        let masked_pixels = pixels.broadcast_mul(&keep)?.broadcast_add(&grey)?;
                        let masked = repeat(&self.vae.encode_image(&masked_pixels)?)?;
                        let extra = Tensor::cat(&[&small, &masked], 1)?;
                        extra_input = Some(if guidance.is_some() { Tensor::cat(&[&extra, &extra], 0)? } else { extra });
                    } else {
                        blend = Some(Blend { mask: small, image_latents, noise: added });
                    }
                }
                latents
            }
        };
        let mut run = Run {
            kind,
            scheduler,
            noise,
            seeds,
            guidance,
            cond,
            latents,
            blend,
            extra_input,
            first_step,
            resumed: 0,
            schedule_len,
            warnings,
            text_encoding_ms,
            started,
        };
        if let Some(checkpoint) = &req.resume {
            self.resume(&mut run, checkpoint)?;
        }
        Ok(run)
    }

    /// Takes `run`, just started as the checkpoint's run was, to the checkpoint's state.
    fn resume(&self, run: &mut Run, checkpoint: &ResumeState) -> Result<(), GenerateError> {
        let bad = |message: String| invalid("resume", message);
        if checkpoint.scheduler != run.kind {
            return Err(bad(format!("the checkpoint ran {}, this run {}", checkpoint.scheduler, run.kind)));
        }
        if checkpoint.step == 0 || checkpoint.step >= run.total() {
            return Err(bad(format!("the checkpoint is after step {} of {}", checkpoint.step, run.total())));
        }
        if checkpoint.seeds != run.seeds || checkpoint.noise_draws.len() != run.seeds.len() {
            return Err(bad(format!("the checkpoint has seeds {:?}, this run {:?}", checkpoint.seeds, run.seeds)));
        }
        if checkpoint.latents.dims() != run.latents.dims() {
            return Err(bad(format!("latents {:?}, not {:?}", checkpoint.latents.dims(), run.latents.dims())));
        }
        // (Its noise counts and values were checked with its batch key: `check_resume`.)
        let dtype = run.latents.dtype();
        run.latents = checkpoint.latents.to_device(&self.device)?.to_dtype(dtype)?;
        let mut state = checkpoint.scheduler_state.clone();
        for (_, t) in &mut state.tensors {
            *t = t.to_device(&self.device)?.to_dtype(dtype)?;
        }
        run.scheduler.restore(&state).map_err(|e| bad(format!("{e:#}")))?;
        run.noise = BatchNoise::resumed(&run.seeds, &checkpoint.noise_draws);
        run.resumed = checkpoint.step;
        Ok(())
    }

    /// The live members' text conditioning, concatenated in member order (it only changes when a member
    /// leaves, so the loop builds it again only then).
    fn join_conditioning(runs: &[Option<Run>]) -> candle_core::Result<Conditioning> {
        let live: Vec<&Run> = runs.iter().flatten().collect();
        if let [only] = live[..] {
            return Ok(Conditioning { context: only.cond.context.clone(), added: only.cond.added.clone() });
        }
        let contexts: Vec<&Tensor> = live.iter().map(|r| &r.cond.context).collect();
        let added = match live.iter().map(|r| r.cond.added.as_ref()).collect::<Option<Vec<_>>>() {
            Some(all) => Some(AddedConditions {
                text_embeds: Tensor::cat(&all.iter().map(|a| &a.text_embeds).collect::<Vec<_>>(), 0)?,
                time_ids: all.iter().flat_map(|a| a.time_ids.iter().cloned()).collect(),
            }),
            None => None,
        };
        Ok(Conditioning { context: Tensor::cat(&contexts, 0)?, added })
    }

    /// Step `j` (counted from each member's first step) for every live member: one UNet call for all their
    /// rows, then each member's guidance, scheduler step and inpainting blend.
    fn step_all(&self, runs: &mut [Option<Run>], joint: &Conditioning, j: usize) -> anyhow::Result<()> {
        let live: Vec<&Run> = runs.iter().flatten().collect();
        let t = live[0].scheduler.timesteps()[live[0].start() + j];
        let mut inputs = Vec::with_capacity(live.len());
        for run in &live {
            let i = run.start() + j;
            let model_in = if run.guidance.is_some() {
                Tensor::cat(&[&run.latents, &run.latents], 0)?
            } else {
                run.latents.clone()
            };
            let model_in = run.scheduler.scale_model_input(&model_in, i)?;
            inputs.push(match &run.extra_input {
                Some(extra) => Tensor::cat(&[&model_in, extra], 1)?,
                None => model_in,
            });
        }
        let model_in = if inputs.len() == 1 { inputs.pop().expect("one input") } else { Tensor::cat(&inputs, 0)? };
        let pred = self
            .unet
            .forward(&model_in.to_dtype(self.dtype)?, t, &joint.context, joint.added.as_ref())?
            .to_dtype(self.latent_dtype())?;
        let mut row = 0;
        for run in runs.iter_mut().flatten() {
            let i = run.start() + j;
            let n = run.seeds.len();
            let rows = run.rows();
            let own = pred.narrow(0, row, rows)?;
            row += rows;
            let eps = match run.guidance {
                Some(scale) => {
                    let uncond = own.narrow(0, 0, n)?;
                    let text = own.narrow(0, n, n)?;
                    (&uncond + ((text - &uncond)? * scale)?)?
                }
                None => own,
            };
            run.latents = run.scheduler.step(&eps, i, &run.latents, &mut run.noise)?;
            if let Some(b) = &run.blend {
                // Keep the unmasked region on the original image, noised to the next step's level.
                let original = if i + 1 < run.schedule_len {
                    run.scheduler.add_noise(&b.image_latents, &b.noise, i + 1)?
                } else {
                    b.image_latents.clone()
                };
                run.latents =
                    (b.mask.broadcast_mul(&run.latents)? + b.mask.affine(-1.0, 1.0)?.broadcast_mul(&original)?)?;
            }
        }
        // GPU work is asynchronous: wait for it so per-step times and progress are real.
        self.device.synchronize()?;
        Ok(())
    }
}

/// Ends every live member with `error` (a shared UNet call failed for all of them: a [`GenerateError::Batch`]
/// when it was several members', each of which may pass alone).
fn fail_all(
    runs: &mut [Option<Run>],
    results: &mut [Option<Result<GenerationOutput, GenerateError>>],
    error: &dyn std::fmt::Display,
) {
    let message = format!("{error:#}");
    let several = runs.iter().flatten().count() > 1;
    for (run, result) in runs.iter_mut().zip(results.iter_mut()) {
        if run.take().is_some() {
            let error = anyhow::anyhow!("{message}");
            *result = Some(Err(if several { GenerateError::Batch(error) } else { GenerateError::Other(error) }));
        }
    }
}

/// A binary pixel mask brought to latent size (`[1, 1, H/f, W/f]`) as diffusers does it.
fn latent_mask(binary: &Tensor, f: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = binary.dims4()?;
    // Nearest with an integer factor picks pixel (f·y, f·x), as PyTorch's `interpolate(mode="nearest")`.
    let rows: Vec<u32> = (0..h / f).map(|y| (y * f) as u32).collect();
    let cols: Vec<u32> = (0..w / f).map(|x| (x * f) as u32).collect();
    let device = binary.device();
    binary.index_select(&Tensor::new(rows, device)?, 2)?.index_select(&Tensor::new(cols, device)?, 3)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
