//! sd-rbee: Stable Diffusion as a service. The generation core lives in [`diffusion`]; [`hub`] finds model
//! folders (local, Hugging Face Hub, or built-in short names); [`device`] picks where models run; [`cli`]
//! is the `sd-rbee` command line.

pub mod api;
pub mod bus;
pub mod cli;
pub mod device;
pub mod diffusion;
pub mod generation;
pub mod hub;
pub mod image_input;
pub mod loras;
pub mod protocol;
pub mod queen;
pub mod shutdown;
pub mod storage;
pub mod vocab;
pub mod worker;
