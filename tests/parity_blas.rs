//! The parity suite (`parity.rs`) again, with the CPU's matrix multiplies (convolutions, linear layers) on a
//! vendor BLAS loaded at run time (`SD_RBEE_BLAS`; here Debian's OpenBLAS): the same tolerances against
//! diffusers hold.

mod common;

/// Read by the suite's `load`, before any model is built.
const VENDOR_BLAS: bool = true;

#[path = "parity.rs"]
mod suite;
