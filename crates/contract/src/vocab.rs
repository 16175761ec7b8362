//! The shared vocabulary: the names and defaults that the command line, the HTTP API, the bus protocol and
//! the generation core all speak (scheduler and timestep-spacing names, image formats, resize modes, the
//! defaults a job gets for what it leaves out). A leaf module: it neither imports the CLI nor Candle, nor any
//! other module of this crate, so each of them can use it without pulling in the others.

use serde::{Deserialize, Serialize};

/// Scheduler names, as on the CLI (`--scheduler`).
pub const SCHEDULERS: [&str; 6] = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"];

/// Timestep-spacing names, as on the CLI (`--timestep-spacing`).
pub const TIMESTEP_SPACINGS: [&str; 3] = ["leading", "linspace", "trailing"];

/// The number of images of a job that gives none.
pub const DEFAULT_NUM_IMAGES: u32 = 1;

/// The default strength of an img2img job without one (diffusers' default).
pub const DEFAULT_IMG2IMG_STRENGTH: f64 = 0.8;

/// The default strength of an inpaint job without one (diffusers' default).
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

/// The default mask blur radius in pixels.
pub const DEFAULT_MASK_BLUR: u32 = 4;

/// How soon a job is taken: workers serve `high` before `normal` before `low`, except that a share of their
/// picks starts from the bottom so that low priorities never starve (`sd-rbee worker --priority-share`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
    strum::VariantNames,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// How an input image is brought to the requested size.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
    strum::VariantNames,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ResizeMode {
    /// Scale to cover the target, then centre-crop (nothing is distorted).
    #[default]
    Fit,
    /// Scale each side independently.
    Stretch,
    /// Scale to fit inside the target and pad the rest with `fill`.
    Pad,
}

/// An encoded image format.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, strum::VariantNames,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// From a file name's extension; PNG when it names none of these.
    pub fn from_path(path: &std::path::Path) -> Self {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("jpg" | "jpeg") => ImageFormat::Jpeg,
            Some("webp") => ImageFormat::Webp,
            _ => ImageFormat::Png,
        }
    }

    /// The file extension of results: `png`, `jpg`, `webp`.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }
}
