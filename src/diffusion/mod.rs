//! Stable Diffusion in Candle, faithful to diffusers: model components built from their config files
//! (`clip`, `unet_2d`, `vae` and their building blocks), the noise schedulers, PyTorch-compatible seeded
//! noise, and the pipeline that ties them together. No I/O here beyond reading weights and configs.

pub mod adapt;
pub mod attention;
pub mod blas;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod cpu_attention;
pub mod cpu_data;
pub mod cpu_geglu;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
#[cfg(feature = "cudnn")]
pub mod cudnn_conv;
pub mod embeddings;
pub mod group_norm;
pub mod image;
pub mod layer_norm;
pub mod layer_tail;
pub mod linear;
pub mod lora;
pub mod numerics;
pub mod pipeline;
pub mod profile;
pub mod random_weights;
pub mod resnet;
pub mod rng;
pub mod schedulers;
mod simd;
pub mod token_projection;
pub mod tokenizer;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;
pub mod weights;
pub mod winograd;

pub use lora::LoraWeight;
pub use pipeline::{
    BatchKey, BatchMember, CancelFlag, GenerateError, GeneratedImage, GenerationOutput, GenerationRequest, InitImage,
    LoadOptions, ModelFamily, ResumeState, StableDiffusion, StepCallback, StepInfo, Timings,
};
pub use schedulers::{SchedulerKind, TimestepSpacing};
