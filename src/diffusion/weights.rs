//! Where a component's safetensors weights are in a pipeline folder (one file or a sharded index, the
//! `.fp16.` variant preferred when running in half precision; shared with the Hub download so both agree on
//! what a component's weights are), and how they are read: memory-mapped, each tensor copied out once and
//! its pages handed back to the kernel right away, so loading a model never holds the file and the loaded
//! copy in memory together.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::Value;

use super::checkpoint::names::Source;

/// Memory-mapped safetensors that release each tensor's file pages once it has been read.
pub struct ReleasingSafetensors(MmapedSafetensors);

impl ReleasingSafetensors {
    /// Tells the kernel this tensor's mapped pages are no longer needed (they are clean file pages: a later
    /// read simply maps them again). On other systems this does nothing.
    fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Ok(view) = self.0.get(name) {
            let data = view.data();
            if data.is_empty() {
                return;
            }
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
            let start = data.as_ptr() as usize & !(page - 1);
            let end = data.as_ptr() as usize + data.len();
            // SAFETY: [start, end) lies within the read-only private file mapping that `self.0` owns (page
            // aligned outward, still inside the mapping); MADV_DONTNEED on it only drops clean pages that the
            // kernel re-reads from the file if they are touched again.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

impl SimpleBackend for ReleasingSafetensors {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = SimpleBackend::get(&self.0, s, name, h, dtype, dev)?;
        self.release(name);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = SimpleBackend::get_unchecked(&self.0, name, dtype, dev)?;
        self.release(name);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

impl ReleasingSafetensors {
    /// Maps `path` (read-only).
    pub fn open(path: &Path) -> Result<Self> {
        // SAFETY: the file is mapped read-only and sd-rbee never writes to it while it is mapped.
        let mapped = unsafe { MmapedSafetensors::new(path) }
            .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
        Ok(Self(mapped))
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.0.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect()
    }

    /// The names and shapes of the floating-point tensors (what a model's weights are).
    pub fn float_tensors(&self) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
        use safetensors::Dtype;
        self.0
            .tensors()
            .into_iter()
            .filter(|(_, v)| matches!(v.dtype(), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64))
            .map(|(n, v)| (n, v.shape().to_vec()))
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.0.load(name, dev)?;
        self.release(name);
        Ok(t)
    }
}

/// Finds a model's tensor names in a checkpoint laid out otherwise (`None`: it has no counterpart).
pub type NameMap = Box<dyn Fn(&str) -> Option<Source> + Send + Sync>;

/// A checkpoint read through a [`NameMap`]: each tensor the model asks for by its diffusers name is read
/// under its name in the file, cut out of a stacked tensor, or transposed, as the map says.
struct Renamed {
    file: Arc<ReleasingSafetensors>,
    map: NameMap,
    /// The last stacked tensor read for [`Source::Rows`]: q, k and v come from one read of `in_proj`.
    stacked: std::sync::Mutex<Option<(String, Tensor)>>,
}

impl Renamed {
    fn fetch(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let source = (self.map)(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor of the checkpoint corresponds to `{name}`")))?;
        // A tensor the file lacks is named; any other failure (the device's) is passed on as it is.
        let load = |n: &str| match self.file.0.get(n) {
            Err(_) => Err(candle_core::Error::Msg(format!("the checkpoint has no tensor `{n}` (for `{name}`)"))),
            Ok(_) => self.file.load(n, dev),
        };
        match source {
            Source::Tensor(n) => load(&n),
            Source::Rows { name: n, start, len } => {
                let mut stacked = self.stacked.lock().unwrap_or_else(|e| e.into_inner());
                let whole = match stacked.as_ref() {
                    Some((cached, t)) if *cached == n && t.device().same_device(dev) => t.clone(),
                    _ => {
                        let t = load(&n)?;
                        *stacked = Some((n, t.clone()));
                        t
                    }
                };
                whole.narrow(0, start, len)?.contiguous()
            }
            Source::Transposed(n) => load(&n)?.t()?.contiguous(),
        }
    }
}

impl SimpleBackend for Renamed {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.fetch(name, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match (self.map)(name) {
            Some(Source::Tensor(n) | Source::Rows { name: n, .. } | Source::Transposed(n)) => {
                self.file.0.get(&n).is_ok()
            }
            None => false,
        }
    }
}

/// A `VarBuilder` over a checkpoint whose tensors are found through `map`, converting to `dtype` on `device`.
pub fn renamed_var_builder(
    file: Arc<ReleasingSafetensors>,
    map: NameMap,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Renamed { file, map, stacked: Default::default() }), dtype, device.clone())
}

/// A `VarBuilder` over safetensors `files`, converting to `dtype` on `device`.
pub fn var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for f in files {
        if !f.is_file() {
            bail!("weights file {} is missing", f.display());
        }
    }
    // SAFETY: the files are mapped read-only and sd-rbee never writes to them while they are mapped.
    let mapped = unsafe { MmapedSafetensors::multi(files) }
        .with_context(|| format!("cannot read weights {}", files[0].display()))?;
    Ok(VarBuilder::from_backend(Box::new(ReleasingSafetensors(mapped)), dtype, device.clone()))
}

/// The ways a component's weights can be stored, best first: for each variant (`.fp16.` first
/// when preferred), the single file, then the shard indexes naming it (diffusers writes
/// `stem.safetensors.index.fp16.json` for the fp16 variant; `stem.fp16.safetensors.index.json`
/// is accepted too).
pub fn weight_layouts(stem: &str, prefer_fp16: bool) -> Vec<WeightLayout> {
    let plain = [
        WeightLayout::Single(format!("{stem}.safetensors")),
        WeightLayout::Sharded(format!("{stem}.safetensors.index.json")),
    ];
    let fp16 = [
        WeightLayout::Single(format!("{stem}.fp16.safetensors")),
        WeightLayout::Sharded(format!("{stem}.safetensors.index.fp16.json")),
        WeightLayout::Sharded(format!("{stem}.fp16.safetensors.index.json")),
    ];
    if prefer_fp16 {
        fp16.into_iter().chain(plain).collect()
    } else {
        plain.into_iter().chain(fp16).collect()
    }
}

/// One way of storing weights: a file, or an index whose `weight_map` names the shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightLayout {
    Single(String),
    Sharded(String),
}

/// The shard file names a safetensors index lists, in order, without repeats.
pub fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
    let index: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{} has no weight_map", index_path.display()))?;
    let mut names: Vec<String> = Vec::new();
    for value in map.values() {
        let name = value
            .as_str()
            .filter(|n| !n.is_empty() && !n.contains('/') && !n.contains('\\') && *n != "..")
            .ok_or_else(|| anyhow!("{}: bad shard name {value}", index_path.display()))?;
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The weight files of the component in `dir` (`stem` is `diffusion_pytorch_model` or `model`).
pub fn find_weights(dir: &Path, stem: &str, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    for layout in weight_layouts(stem, prefer_fp16) {
        match layout {
            WeightLayout::Single(name) if dir.join(&name).is_file() => return Ok(vec![dir.join(name)]),
            WeightLayout::Sharded(index) if dir.join(&index).is_file() => {
                return Ok(shard_names(&dir.join(index))?.into_iter().map(|n| dir.join(n)).collect());
            }
            _ => {}
        }
    }
    if dir.join(format!("{stem}.bin")).is_file() {
        bail!(
            "{} has only PyTorch .bin weights; sd-rbee loads safetensors (convert them, or use a repo that ships .safetensors)",
            dir.display()
        );
    }
    bail!("no weights in {} (expected {stem}.safetensors or {stem}.fp16.safetensors)", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_variant_asked_for_and_reads_shard_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("model.safetensors"), b"").unwrap();
        std::fs::write(d.join("model.fp16.safetensors"), b"").unwrap();
        assert_eq!(find_weights(d, "model", false).unwrap(), vec![d.join("model.safetensors")]);
        assert_eq!(find_weights(d, "model", true).unwrap(), vec![d.join("model.fp16.safetensors")]);

        let index =
            r#"{"weight_map": {"a": "unet-2.safetensors", "b": "unet-1.safetensors", "c": "unet-1.safetensors"}}"#;
        std::fs::write(d.join("unet.safetensors.index.fp16.json"), index).unwrap();
        assert_eq!(
            find_weights(d, "unet", true).unwrap(),
            vec![d.join("unet-1.safetensors"), d.join("unet-2.safetensors")]
        );
    }

    #[test]
    fn bin_only_and_empty_folders_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_weights(dir.path(), "model", false).unwrap_err().to_string();
        assert!(err.contains("no weights in"), "{err}");
        std::fs::write(dir.path().join("model.bin"), b"").unwrap();
        let err = find_weights(dir.path(), "model", false).unwrap_err().to_string();
        assert!(err.contains(".bin"), "{err}");
    }
}
