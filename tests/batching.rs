//! Requests from different callers sharing UNet passes (`StableDiffusion::generate_batch`): every member's
//! images equal its run on its own, whatever it shares the batch with; a cancelled member leaves and the
//! others go on; requests that cannot share run one group after the other.

use crate::common;

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use sd_rbee::diffusion::{
    BatchMember, CancelFlag, GenerateError, GenerationOutput, GenerationRequest, InitImage, LoadOptions, SchedulerKind,
    StableDiffusion, StepCallback, StepInfo,
};

/// The largest difference a batch may make to a member's float image (the bound).
const TOLERANCE: f32 = 1e-5;

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixture(name), &LoadOptions::default()).unwrap()
}

fn sd15() -> &'static StableDiffusion {
    static MODEL: OnceLock<StableDiffusion> = OnceLock::new();
    MODEL.get_or_init(|| load("tiny-sd15"))
}

fn request(prompt: &str, seed: u64, scheduler: SchedulerKind) -> GenerationRequest {
    let mut req = GenerationRequest::new(prompt);
    req.width = 64;
    req.height = 48;
    req.steps = 5;
    req.seed = Some(seed);
    req.scheduler = Some(scheduler);
    req
}

fn alone(sd: &StableDiffusion, req: &GenerationRequest) -> GenerationOutput {
    sd.generate(req, &mut |_| {}, None).unwrap()
}

/// Runs `requests` as one batch, counting each member's progress calls.
fn batch(
    sd: &StableDiffusion,
    requests: &[GenerationRequest],
) -> (Vec<Result<GenerationOutput, GenerateError>>, Vec<usize>) {
    let mut counts = vec![0usize; requests.len()];
    let results = {
        let mut callbacks: Vec<StepCallback> = Vec::new();
        for c in counts.iter_mut() {
            callbacks.push(Box::new(move |_: &StepInfo| *c += 1));
        }
        let mut members: Vec<BatchMember> = requests
            .iter()
            .zip(callbacks.iter_mut())
            .map(|(request, on_step)| BatchMember { request, on_step: on_step.as_mut(), cancel: None, on_decode: None })
            .collect();
        sd.generate_batch(&mut members)
    };
    (results, counts)
}

/// The largest difference between a batch member's images and its run alone.
fn worst_difference(batched: &GenerationOutput, solo: &GenerationOutput) -> f32 {
    assert_eq!(batched.images.len(), solo.images.len());
    batched
        .images
        .iter()
        .zip(&solo.images)
        .map(|(b, s)| {
            assert_eq!(b.seed, s.seed);
            common::diff(&b.pixels, &s.pixels).0
        })
        .fold(0.0, f32::max)
}

#[test]
fn members_of_a_batch_get_the_images_they_get_alone() {
    let sd = sd15();
    let a = request("a lighthouse at dusk", 3, SchedulerKind::EulerAncestral);
    let mut b = request("a red bicycle", 11, SchedulerKind::EulerAncestral);
    b.negative_prompt = Some("blurry".into());
    b.guidance_scale = 4.0;
    // Guidance off: this member adds one row per image, not two.
    let mut c = request("a bowl of fruit", 7, SchedulerKind::EulerAncestral);
    c.guidance_scale = 1.0;
    c.num_images = 2;
    let mut requests = [a, b, c];
    // The end-to-end batching check's shape: 64×64, 20 steps.
    for r in &mut requests {
        r.height = 64;
        r.steps = 20;
    }
    let keys: Vec<_> = requests.iter().map(|r| sd.batch_key(r).unwrap()).collect();
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "these requests can share UNet passes");

    let (results, counts) = batch(sd, &requests);
    assert_eq!(counts, vec![20, 20, 20], "every member hears every step");
    let mut worst = 0.0f32;
    for (req, result) in requests.iter().zip(results) {
        let out = result.unwrap();
        worst = worst.max(worst_difference(&out, &alone(sd, req)));
    }
    println!("largest difference batch vs alone (tiny-sd15, 64×64, 20 steps of euler_a, 3 members): {worst:e}");
    assert!(worst <= TOLERANCE, "a batch changed a member's image by {worst}");
    // The members really are different images (no cross-talk that makes them equal).
    let (r, _) = batch(sd, &requests[..2]);
    let (x, y) = (r[0].as_ref().unwrap(), r[1].as_ref().unwrap());
    assert!(common::diff(&x.images[0].pixels, &y.images[0].pixels).0 > 1e-2);
}

#[test]
fn multistep_schedulers_keep_each_members_history() {
    // DPM++ 2M and UniPC keep earlier model outputs: each member's must stay its own.
    let sd = sd15();
    for scheduler in [SchedulerKind::DpmPp2m, SchedulerKind::UniPc] {
        let requests = [request("a castle", 1, scheduler), request("a forest", 2, scheduler)];
        let (results, _) = batch(sd, &requests);
        for (req, result) in requests.iter().zip(results) {
            let d = worst_difference(&result.unwrap(), &alone(sd, req));
            assert!(d <= TOLERANCE, "{scheduler}: batch vs alone differs by {d}");
        }
    }
}

#[test]
fn a_cancelled_member_leaves_and_the_others_go_on() {
    let sd = sd15();
    let requests = [
        request("one", 1, SchedulerKind::Euler),
        request("two", 2, SchedulerKind::Euler),
        request("three", 3, SchedulerKind::Euler),
    ];
    let cancel = CancelFlag::new();
    let mut steps = [0usize; 3];
    let results = {
        let [s0, s1, s2] = &mut steps;
        let mut first = |_: &StepInfo| *s0 += 1;
        let flag = cancel.clone();
        let mut second = |i: &StepInfo| {
            *s1 += 1;
            if i.step == 2 {
                flag.cancel();
            }
        };
        let mut third = |_: &StepInfo| *s2 += 1;
        let mut members = [
            BatchMember { request: &requests[0], on_step: &mut first, cancel: None, on_decode: None },
            BatchMember { request: &requests[1], on_step: &mut second, cancel: Some(&cancel), on_decode: None },
            BatchMember { request: &requests[2], on_step: &mut third, cancel: None, on_decode: None },
        ];
        sd.generate_batch(&mut members)
    };
    assert_eq!(steps, [5, 2, 5], "the cancelled member hears no step after it left");
    let mut results = results.into_iter();
    let first = results.next().unwrap().unwrap();
    match results.next().unwrap() {
        Err(GenerateError::Cancelled { completed: 2, total: 5 }) => {}
        other => panic!("expected the second member cancelled after 2 of 5 steps, got {other:?}"),
    }
    let third = results.next().unwrap().unwrap();
    assert!(worst_difference(&first, &alone(sd, &requests[0])) <= TOLERANCE);
    assert!(worst_difference(&third, &alone(sd, &requests[2])) <= TOLERANCE);
}

/// The decode has no steps: each VAE call, and each tile of a tiled one, is a sign of life (the worker's
/// stall watchdog hears them), and a member cancelled while its image decodes in tiles stops at the next tile.
#[test]
fn a_decode_signals_each_tile_and_a_cancel_stops_it_between_tiles() {
    let sd = sd15();
    let mut tiled = request("tiles", 7, SchedulerKind::Euler);
    // 16 × 12 latents in tiles of 8 every 6: 3 × 2 tiles
    (tiled.width, tiled.height, tiled.vae_tiling) = (128, 96, Some(true));
    let whole = request("whole", 8, SchedulerKind::Euler);
    let signals = &[Cell::new(0usize), Cell::new(0usize)];
    let count = |i: usize| move || signals[i].set(signals[i].get() + 1);
    let (first, second) = (count(0), count(1));
    let results = {
        let (mut a, mut b) = (|_: &StepInfo| {}, |_: &StepInfo| {});
        let mut members = [
            BatchMember { request: &tiled, on_step: &mut a, cancel: None, on_decode: Some(&first) },
            BatchMember { request: &whole, on_step: &mut b, cancel: None, on_decode: Some(&second) },
        ];
        sd.generate_batch(&mut members)
    };
    assert_eq!(signals.each_ref().map(Cell::get), [7, 1], "six tiles and the call's end; one call");
    let decoded = results.into_iter().next().unwrap().unwrap();
    assert!(worst_difference(&decoded, &alone(sd, &tiled)) <= TOLERANCE);

    let cancel = CancelFlag::new();
    let tiles = Cell::new(0usize);
    let cancel_at_second = || {
        tiles.set(tiles.get() + 1);
        if tiles.get() == 2 {
            cancel.cancel();
        }
    };
    let mut on_step = |_: &StepInfo| {};
    let mut members = [BatchMember {
        request: &tiled,
        on_step: &mut on_step,
        cancel: Some(&cancel),
        on_decode: Some(&cancel_at_second),
    }];
    match sd.generate_batch(&mut members).pop().unwrap() {
        Err(GenerateError::Cancelled { completed: 5, total: 5 }) => {}
        other => panic!("expected the member cancelled during its decode, got {other:?}"),
    }
    assert_eq!(tiles.get(), 2, "the decode stopped after the tile during which it was cancelled");
}

#[test]
fn requests_that_cannot_share_run_in_groups_and_bad_ones_fail_alone() {
    let sd = sd15();
    let a = request("a", 1, SchedulerKind::Ddim);
    let mut longer = request("b", 2, SchedulerKind::Ddim);
    longer.steps = 6;
    let mut wider = request("c", 3, SchedulerKind::Ddim);
    wider.width = 80;
    let mut broken = request("d", 4, SchedulerKind::Ddim);
    broken.width = 100;
    assert_ne!(sd.batch_key(&a).unwrap(), sd.batch_key(&longer).unwrap());
    assert_ne!(sd.batch_key(&a).unwrap(), sd.batch_key(&wider).unwrap());
    let requests = [a, longer, broken, wider];
    let (results, counts) = batch(sd, &requests);
    assert_eq!(counts, vec![5, 6, 0, 5]);
    for (i, (req, result)) in requests.iter().zip(results).enumerate() {
        if i == 2 {
            assert!(matches!(result, Err(GenerateError::InvalidRequest { field: "width", .. })), "{result:?}");
            continue;
        }
        let d = worst_difference(&result.unwrap(), &alone(sd, req));
        assert!(d <= TOLERANCE, "member {i} differs by {d}");
    }
}

#[test]
fn sdxl_members_keep_their_own_pooled_embeddings_and_time_ids() {
    let sd = load("tiny-sdxl");
    let mut a = request("a mountain lake", 5, SchedulerKind::Euler);
    a.negative_prompt = None; // zero negative embeddings
    let mut b = request("a city at night", 6, SchedulerKind::Euler);
    b.negative_prompt = Some("fog".into());
    let requests = [a, b];
    let (results, _) = batch(&sd, &requests);
    for (req, result) in requests.iter().zip(results) {
        let d = worst_difference(&result.unwrap(), &alone(&sd, req));
        assert!(d <= TOLERANCE, "SDXL batch vs alone differs by {d}");
    }
}

/// A deterministic picture `[1, 3, h, w]` in [0, 1] and a mask of its left half.
fn picture_and_mask(h: usize, w: usize, phase: f64) -> (Tensor, Tensor) {
    let pixels: Vec<f32> = (0..3 * h * w).map(|i| (0.5 + 0.5 * ((i as f64) * 0.37 + phase).sin()) as f32).collect();
    let pixels = Tensor::from_vec(pixels, (1, 3, h, w), &Device::Cpu).unwrap();
    let mask: Vec<f32> = (0..h * w).map(|i| if i % w < w / 2 { 1.0 } else { 0.0 }).collect();
    (pixels, Tensor::from_vec(mask, (1, 1, h, w), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap())
}

#[test]
fn img2img_and_inpainting_members_keep_their_own_pictures() {
    // A regular model: img2img and re-blended inpainting share a batch at the same strength.
    let sd = sd15();
    let (p1, m1) = picture_and_mask(48, 64, 0.0);
    let (p2, _) = picture_and_mask(48, 64, 1.3);
    let mut a = request("a statue", 8, SchedulerKind::EulerAncestral);
    a.steps = 10;
    a.init = Some(InitImage { pixels: p1.clone(), strength: 0.6, mask: Some(m1.clone()), noise: None });
    let mut b = request("a garden", 9, SchedulerKind::EulerAncestral);
    b.steps = 10;
    b.init = Some(InitImage { pixels: p2, strength: 0.6, mask: None, noise: None });
    let requests = [a, b];
    assert_eq!(sd.batch_key(&requests[0]).unwrap(), sd.batch_key(&requests[1]).unwrap());
    let (results, counts) = batch(sd, &requests);
    assert_eq!(counts, vec![6, 6], "strength 0.6 of 10 steps runs 6");
    for (req, result) in requests.iter().zip(results) {
        let d = worst_difference(&result.unwrap(), &alone(sd, req));
        assert!(d <= TOLERANCE, "img2img batch vs alone differs by {d}");
    }

    // An inpainting UNet: the mask and masked-image channels are each member's.
    let inpaint = load("tiny-sd15-inpaint");
    let (p3, m3) = picture_and_mask(48, 64, 2.1);
    let requests: Vec<GenerationRequest> = [(p1, m1, 12), (p3, m3, 13)]
        .into_iter()
        .map(|(pixels, mask, seed)| {
            let mut r = request("a window", seed, SchedulerKind::Ddim);
            r.init = Some(InitImage { pixels, strength: 1.0, mask: Some(mask), noise: None });
            r
        })
        .collect();
    let (results, _) = batch(&inpaint, &requests);
    for (req, result) in requests.iter().zip(results) {
        let d = worst_difference(&result.unwrap(), &alone(&inpaint, req));
        assert!(d <= TOLERANCE, "inpainting batch vs alone differs by {d}");
    }
}
