//! The CPU's large f32 matrix multiplies (convolutions, linear layers): a vendor BLAS loaded at run time when
//! the user names one, else the `gemm` crate Candle uses.
//!
//! `SD_RBEE_BLAS` names a shared library that exports `cblas_sgemm`: Intel's oneMKL (`libmkl_rt.so`, from
//! PyPI's `mkl` or Debian's `libmkl-rt`), OpenBLAS (Debian's `libopenblas0`) or BLIS. It is loaded, not
//! linked, so one binary runs with or without it and building needs no BLAS (Candle's own `mkl` feature
//! downloads MKL at build time, which these machines cannot). A library that cannot be loaded, or lacks the
//! symbol, is an error at start-up naming the variable, never a silent fallback.
//!
//! The library runs single-threaded and the threads are ours: rayon splits the output into blocks, one
//! library call each. A library's own thread pool (OpenMP's spin-waiting threads, say) would otherwise compete
//! for the cores with the rayon threads every other kernel of a step runs on.

use std::ffi::c_int;
use std::sync::OnceLock;

use gemm::Parallelism;

/// The environment variable naming the library.
pub const BLAS_VAR: &str = "SD_RBEE_BLAS";

/// Multiplies smaller than this many multiply-adds run on one thread.
const PARALLEL_WORK: usize = 1 << 20;

type CblasSgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

// CBLAS's enumerations (cblas.h).
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// A loaded BLAS.
pub struct Blas {
    sgemm: CblasSgemm,
    /// Where it was loaded from, for logs and benchmark reports.
    pub path: String,
    /// Kept open for the life of the process: `sgemm` points into it.
    _library: libloading::Library,
}

static VENDOR: OnceLock<Option<Blas>> = OnceLock::new();

/// Loads the library `SD_RBEE_BLAS` names, if any; call once at start-up so a bad path is an error there.
/// Later calls return the first answer.
pub fn init() -> Result<Option<&'static Blas>, String> {
    if let Some(loaded) = VENDOR.get() {
        return Ok(loaded.as_ref());
    }
    match std::env::var_os(BLAS_VAR) {
        Some(path) if !path.is_empty() => {
            let path = path.to_str().ok_or_else(|| format!("{BLAS_VAR}: the path is not valid UTF-8"))?;
            use_library(path.trim()).map(Some).map_err(|e| format!("{BLAS_VAR}: {e}"))
        }
        _ => Ok(VENDOR.get_or_init(|| None).as_ref()),
    }
}

/// Loads `path` (a file, or a name the dynamic loader finds, as `libopenblas.so.0`) as the BLAS for the rest
/// of the process. An error if it cannot be loaded, or if the process already settled on another.
pub fn use_library(path: &str) -> Result<&'static Blas, String> {
    if VENDOR.get().is_none() {
        // A caller racing this one may set it first; the match below reports what won.
        let _ = VENDOR.set(Some(Blas::open(path)?));
    }
    match VENDOR.get().and_then(Option::as_ref) {
        Some(blas) if blas.path == path => Ok(blas),
        Some(blas) => Err(format!("this process already uses {}", blas.path)),
        None => Err("this process already runs without a vendor BLAS".into()),
    }
}

/// The vendor BLAS in use, if [`init`] loaded one.
pub fn vendor() -> Option<&'static Blas> {
    VENDOR.get().and_then(Option::as_ref)
}

impl Blas {
    fn open(path: &str) -> Result<Self, String> {
        // SAFETY: loading a library runs its initialisers; the user named it as a BLAS to run.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot load '{path}': {e}"))?;
        // SAFETY: probing for a symbol runs nothing.
        if unsafe { library.get::<CblasSgemm>(b"cblas_sgemm\0") }.is_err() {
            return Err(format!("'{path}' has no cblas_sgemm: it is not a CBLAS library"));
        }
        prepare(&library).map_err(|e| format!("'{path}': {e}"))?;
        // SAFETY: `prepare` checked that the library takes 32-bit integers, so this is its signature.
        let sgemm = unsafe { library.get::<CblasSgemm>(b"cblas_sgemm\0") }.map(|f| *f).expect("probed above");
        Ok(Self { sgemm, path: path.to_string(), _library: library })
    }
}

/// Checks that the library takes 32-bit integers (the `c_int`s of [`CblasSgemm`]) and asks it to run each
/// call on the calling thread alone, with whichever controls it has; refuses what it cannot make so.
fn prepare(library: &libloading::Library) -> Result<(), String> {
    // SAFETY: each symbol, where present, has the C signature given: MKL's mkl_service.h (interface layer
    // 0 = LP64 and threading layer 1 = sequential, both set before the first computation), OpenBLAS's
    // cblas.h, BLIS's blis.h (dim_t is 64-bit).
    unsafe {
        if let Ok(f) = library.get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Interface_Layer\0") {
            if f(0) != 0 {
                return Err("oneMKL is set to 64-bit integers (MKL_INTERFACE_LAYER=ILP64); unset it".into());
            }
        }
        if let Ok(f) = library.get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"openblas_get_config\0") {
            let config = std::ffi::CStr::from_ptr(f()).to_string_lossy();
            if config.contains("USE64BITINT") {
                return Err("a 64-bit-integer build of OpenBLAS; use the 32-bit one (libopenblas.so.0)".into());
            }
        }
        // OpenMP builds take the thread count per calling thread: every rayon thread would start a team of
        // its own unless OpenMP itself is held to one thread.
        if let Ok(f) = library.get::<unsafe extern "C" fn() -> c_int>(b"openblas_get_parallel\0") {
            if f() == 2 && std::env::var("OMP_NUM_THREADS").as_deref() != Ok("1") {
                return Err("an OpenMP build of OpenBLAS: set OMP_NUM_THREADS=1, or use the pthreads build \
                            (Debian's libopenblas0-pthread)"
                    .into());
            }
        }
        if let Ok(f) = library.get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Threading_Layer\0") {
            f(1);
        }
        for name in [&b"MKL_Set_Num_Threads\0"[..], b"openblas_set_num_threads\0"] {
            if let Ok(f) = library.get::<unsafe extern "C" fn(c_int)>(name) {
                f(1);
            }
        }
        if let Ok(f) = library.get::<unsafe extern "C" fn(i64)>(b"bli_thread_set_num_threads\0") {
            f(1);
        }
    }
    Ok(())
}

/// A matrix operand: `data[row * stride + col]`, or with `transposed` the matrix is stored as its
/// transpose (`data[col * stride + row]`, a linear layer's `[out, in]` weight as the right-hand side).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    pub fn rows(data: &'a [f32], stride: usize) -> Self {
        Self { data, stride, transposed: false }
    }

    pub fn transposed(data: &'a [f32], stride: usize) -> Self {
        Self { data, stride, transposed: true }
    }

    /// Where element (`row`, `col`) is in `data`.
    fn at(&self, row: usize, col: usize) -> usize {
        if self.transposed {
            col * self.stride + row
        } else {
            row * self.stride + col
        }
    }

    /// (row stride, column stride) as the `gemm` crate takes them.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.stride as isize)
        } else {
            (self.stride as isize, 1)
        }
    }
}

/// The sizes of a product `a[m, k] · b[k, n]`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Where a product goes: `data[row * stride + col]`.
pub struct Output<'a> {
    pub data: &'a mut [f32],
    pub stride: usize,
}

impl<'a> Output<'a> {
    pub fn rows(data: &'a mut [f32], stride: usize) -> Self {
        Self { data, stride }
    }
}

/// How the product reaches `c`: `c = alpha · a · b`, or with `accumulate` `c += alpha · a · b`.
#[derive(Clone, Copy, Debug)]
pub struct Update {
    pub alpha: f32,
    pub accumulate: bool,
}

impl Update {
    /// `c = a · b`.
    pub const SET: Self = Self { alpha: 1.0, accumulate: false };
    /// `c += a · b`.
    pub const ADD: Self = Self { alpha: 1.0, accumulate: true };

    /// `c = alpha · a · b`.
    pub fn scaled(alpha: f32) -> Self {
        Self { alpha, accumulate: false }
    }
}

/// `c[m, n]` receives `a[m, k] · b[k, n]` as `update` says. Runs on the vendor BLAS when one is loaded, else on
/// `gemm`, on up to `threads` threads.
pub fn matmul(dims: Dims, a: Operand, b: Operand, c: Output, update: Update, threads: usize) {
    let Dims { m, n, k } = dims;
    if m == 0 || n == 0 {
        return;
    }
    // Rows must not overlap (threads write disjoint rows or columns of `c`; a BLAS refuses a short stride),
    // and every element the strides reach must lie inside its slice.
    let covers = |o: &Operand, rows: usize, cols: usize| {
        let (outer, inner) = if o.transposed { (cols, rows) } else { (rows, cols) };
        o.stride >= inner
            && (outer - 1).checked_mul(o.stride).and_then(|x| x.checked_add(inner)).is_some_and(|e| e <= o.data.len())
    };
    let c_fits = (m - 1).checked_mul(c.stride).and_then(|x| x.checked_add(n)).is_some_and(|e| e <= c.data.len());
    assert!(
        k > 0 && covers(&a, m, k) && covers(&b, k, n) && c.stride >= n && c_fits,
        "matmul: operands and strides do not describe {m}×{k} · {k}×{n}"
    );
    let threads = if m * n * k >= PARALLEL_WORK { threads.max(1) } else { 1 };
    match vendor() {
        Some(blas) => blas.matmul_split(dims, a, b, c, update, threads),
        None => {
            let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
            let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides(), b.strides());
            // SAFETY: the assertion above checks that every element the strides reach is inside its slice.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.data.as_mut_ptr(),
                    1,
                    c.stride as isize,
                    update.accumulate,
                    a.data.as_ptr(),
                    a_cs,
                    a_rs,
                    b.data.as_ptr(),
                    b_cs,
                    b_rs,
                    1.0,
                    update.alpha,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
    }
}

/// `c`'s base address, shareable across the rayon threads that each write a disjoint block of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the blocks handed to the threads never overlap (see `matmul_split`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` must lie inside `c`.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

impl Blas {
    /// Splits the output along its longer side into one block per thread (whole multiples of 16, the width
    /// the libraries' kernels work in) and multiplies each block with one library call.
    fn matmul_split(&self, dims: Dims, a: Operand, b: Operand, c: Output, update: Update, threads: usize) {
        let Dims { m, n, k } = dims;
        let Output { data: c, stride: ldc } = c;
        let split_rows = m > n;
        let long = if split_rows { m } else { n };
        let chunk = long.div_ceil(threads).div_ceil(16) * 16;
        let out = OutPtr(c.as_mut_ptr());
        let block = |start: usize| {
            let len = chunk.min(long - start);
            let (rows, cols, row, col) = if split_rows { (len, n, start, 0) } else { (m, len, 0, start) };
            let a = Operand { data: &a.data[a.at(row, 0)..], ..a };
            let b = Operand { data: &b.data[b.at(0, col)..], ..b };
            // SAFETY: `matmul` checked the whole operands' extents and this block lies inside them; blocks
            // of `c` for different `start`s are disjoint rows or columns.
            unsafe {
                self.call(Dims { m: rows, n: cols, k }, a, b, out.at(row * ldc + col), ldc, update);
            }
        };
        if threads == 1 || long <= chunk {
            block(0);
        } else {
            use rayon::prelude::*;
            (0..long).step_by(chunk).collect::<Vec<_>>().into_par_iter().for_each(block);
        }
    }

    /// # Safety
    /// `a.data`, `b.data` and `c` (rows `ldc` apart) must hold the matrices the sizes and strides describe.
    unsafe fn call(&self, dims: Dims, a: Operand, b: Operand, c: *mut f32, ldc: usize, update: Update) {
        let Dims { m, n, k } = dims;
        let trans = |o: &Operand| if o.transposed { TRANS } else { NO_TRANS };
        let dim = |x: usize| c_int::try_from(x).expect("matrix dimension fits a C int");
        // SAFETY: forwarded from the caller.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                trans(&a),
                trans(&b),
                dim(m),
                dim(n),
                dim(k),
                update.alpha,
                a.data.as_ptr(),
                dim(a.stride),
                b.data.as_ptr(),
                dim(b.stride),
                if update.accumulate { 1.0 } else { 0.0 },
                c,
                dim(ldc),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's OpenBLAS (`libopenblas0`, which scripts/test.sh installs), found by the dynamic loader.
    const OPENBLAS: &str = "libopenblas.so.0";

    fn filled(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    /// Element (r, c) of an operand.
    fn at(o: &Operand, r: usize, c: usize) -> f32 {
        o.data[o.at(r, c)]
    }

    /// Every case multiplied by `run` agrees with the schoolbook product: odd sizes, operands wider than the
    /// product (row strides past the used columns), a transposed right-hand side, accumulation, row and
    /// column splits.
    fn check(run: impl Fn(Dims, Operand, Operand, Output, Update, usize)) {
        let cases = [(1, 1, 1), (3, 5, 7), (37, 300, 19), (300, 37, 64), (64, 4224, 96), (513, 17, 130)];
        for (m, n, k) in cases {
            for (transposed, update, threads) in
                [(false, Update::SET, 1), (true, Update::ADD, 2), (false, Update { alpha: -0.5, accumulate: true }, 3)]
            {
                let (lda, ldb, ldc) = (k + 3, if transposed { k + 1 } else { n + 5 }, n + 2);
                let a_data = filled(m * lda, 1);
                let b_data = filled(if transposed { n * ldb } else { k * ldb }, 2);
                let a = Operand::rows(&a_data, lda);
                let b = Operand { data: &b_data, stride: ldb, transposed };
                let start = filled(m * ldc, 3);
                let mut c = start.clone();
                run(Dims { m, n, k }, a, b, Output::rows(&mut c, ldc), update, threads);
                for r in 0..m {
                    for col in 0..ldc {
                        let got = c[r * ldc + col];
                        if col >= n {
                            assert_eq!(got, start[r * ldc + col], "wrote past column {n}");
                            continue;
                        }
                        let dot: f32 = (0..k).map(|i| at(&a, r, i) * at(&b, i, col)).sum();
                        let want = update.alpha * dot + if update.accumulate { start[r * ldc + col] } else { 0.0 };
                        let tol = 1e-5 * (k as f32).sqrt() * (1.0 + want.abs());
                        assert!((got - want).abs() <= tol, "{m}x{n}x{k} t={transposed} ({r},{col}): {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_built_in_gemm_multiplies_strided_and_transposed_operands() {
        assert!(vendor().is_none(), "no unit test loads a process-wide BLAS");
        check(matmul);
    }

    #[test]
    #[should_panic(expected = "do not describe")]
    fn overlapping_output_rows_are_refused() {
        let (a, b, mut c) = (vec![1f32; 4], vec![1f32; 4], vec![0f32; 4]);
        // 2×2 output with rows 1 apart: row 1 would overwrite row 0's second column.
        let dims = Dims { m: 2, n: 2, k: 2 };
        matmul(dims, Operand::rows(&a, 2), Operand::rows(&b, 2), Output::rows(&mut c, 1), Update::SET, 1);
    }

    #[test]
    fn a_vendor_blas_split_across_threads_multiplies_the_same() {
        let blas = Blas::open(OPENBLAS)
            .unwrap_or_else(|e| panic!("{e}: install Debian's libopenblas0 (scripts/test.sh does), then rerun"));
        check(|dims, a, b, c, update, threads| blas.matmul_split(dims, a, b, c, update, threads));
    }

    #[test]
    fn a_library_that_is_not_a_blas_is_refused_by_name() {
        let missing = Blas::open("/nonexistent/libblas.so").err().expect("no such file");
        assert!(missing.contains("cannot load '/nonexistent/libblas.so'"), "{missing}");
        let not_blas = Blas::open("libc.so.6").err().expect("libc has no cblas_sgemm");
        assert!(not_blas.contains("'libc.so.6' has no cblas_sgemm"), "{not_blas}");
    }
}
