//! Rebuilds the crate when the web UI's bundle changes: `rust-embed` includes ui/dist's files, and cargo
//! notices neither a new file there nor one gone (Vite names each build's files by their hash).
fn main() {
    println!("cargo:rerun-if-changed=ui/dist");
}
