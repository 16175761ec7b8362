#!/usr/bin/env python3
"""Runs the fused CUDA kernels' source (src/diffusion/cuda_kernels/) on the CPU, for sessions without a GPU.

The kernels are plain CUDA C++: this compiles the very text NVRTC gets with g++ under a small shim (a block's
threads as std::threads meeting at a std::barrier for __syncthreads, __shared__ as block-wide statics, the f16
conversions through _Float16), launches them with the grids the Rust side computes (and with shrunken grids,
so every grid-stride loop wraps), and compares each output with a float64 reference: GroupNorm(+SiLU), GEGLU
with and without the bias, and both layer tails (bias, per-item shift, residual, divisor) in f32, f16 and bf16.
It checks the indexing and the arithmetic, not the device's scheduling or memory model.

    python3 scripts/gpu/kernels_on_cpu.py          # needs g++ with C++20; prints the errors, exits 1 on a miss
"""
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "src/diffusion/cuda_kernels"


def raw_string(path, name):
    text = (KERNELS / path).read_text()
    match = re.search(name + r': &str = r#"(.*?)"#;', text, re.S)
    if not match:
        sys.exit(f"{path}: no {name} raw string")
    return match.group(1)


def kernel_source():
    prelude = raw_string("mod.rs", "PRELUDE")
    # The PTX conversions become _Float16 casts; everything else is used as written.
    prelude = re.sub(r"__device__ __forceinline__ float h2f\(.*\n", "", prelude)
    prelude = re.sub(r"__device__ __forceinline__ unsigned short f2h\(.*\n", "", prelude)
    parts = [prelude] + [raw_string(f, "SOURCE") for f in ("group_norm.rs", "geglu.rs", "tails.rs")]
    return "".join(parts)


SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>
struct Dim { unsigned x = 1, y = 1, z = 1; };
thread_local Dim threadIdx, blockIdx;
Dim blockDim, gridDim;
std::barrier<> *block_barrier;
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <class A> inline A min(A a, A b) { return a < b ? a : b; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float h2f(unsigned short h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
inline unsigned short f2h(float f) { _Float16 h = (_Float16)f; unsigned short u; std::memcpy(&u, &h, 2); return u; }
"""

HARNESS = r"""
// Launches `kernel` over grid x block; with `threaded`, each block's threads run at once (for __syncthreads).
void launch(Dim grid, unsigned threads, bool threaded, const std::function<void()> &kernel) {
    gridDim = grid;
    blockDim = Dim{threads, 1, 1};
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            if (!threaded) {
                blockIdx = Dim{bx, by, 1};
                for (unsigned t = 0; t < threads; t++) { threadIdx = Dim{t, 0, 0}; kernel(); }
                continue;
            }
            std::barrier<> barrier(threads);
            block_barrier = &barrier;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; t++)
                pool.emplace_back([&, t] { blockIdx = Dim{bx, by, 1}; threadIdx = Dim{t, 0, 0}; kernel(); });
            for (auto &th : pool) th.join();
        }
}

unsigned clampu(long v, long lo, long hi) { return (unsigned)(v < lo ? lo : v > hi ? hi : v); }
// rows_launch in mod.rs, optionally with a smaller grid so that the grid-stride loops wrap.
Dim rows_grid(long rows, long width, bool shrunk) {
    Dim g{clampu((width + THREADS - 1) / THREADS, 1, 4096), clampu(rows, 1, 65535), 1};
    if (shrunk) { g.x = 1; g.y = g.y > 2 ? 2 : g.y; }
    return g;
}

std::mt19937 rng(7);
std::vector<double> randn(size_t n) {
    std::normal_distribution<double> d(0.0, 1.0);
    std::vector<double> v(n);
    for (auto &x : v) x = d(rng);
    return v;
}

template <class D> std::vector<typename D::T> pack(const std::vector<double> &v) {
    std::vector<typename D::T> out(v.size());
    for (size_t i = 0; i < v.size(); i++) D::st(out.data(), (long)i, (float)v[i]);
    return out;
}
template <class D> std::vector<double> unpack(const std::vector<typename D::T> &v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = D::ld(v.data(), (long)i);
    return out;
}
// The reference sees what the kernel sees: inputs rounded to the dtype.
template <class D> std::vector<double> rounded(const std::vector<double> &v) { return unpack<D>(pack<D>(v)); }

int failures = 0;
void check(const char *what, const std::vector<double> &got, const std::vector<double> &want, double tol) {
    double err = 0, scale = 1e-30;
    for (size_t i = 0; i < got.size(); i++) {
        err = std::fmax(err, std::fabs(got[i] - want[i]));
        scale = std::fmax(scale, std::fabs(want[i]));
    }
    bool ok = got.size() == want.size() && err <= tol * std::fmax(1.0, scale);
    if (!ok) failures++;
    std::printf("%-4s %-62s max abs %.3g (scale %.3g)\n", ok ? "ok" : "FAIL", what, err, scale);
}

template <class D>
void tails(const char *name, double tol, void (*planes_k)(typename D::T *, const typename D::T *, int, int,
           const typename D::T *, int, long, int, long, float),
           void (*rows_k)(typename D::T *, const typename D::T *, int, const typename D::T *, int, long, int)) {
    const long B = 3, C = 5, inner = 300;
    for (int shift_items : {0, 1, 3})
        for (int has_bias : {0, 1})
            for (int has_res : {0, 1})
                for (float divisor : {1.0f, 1.5f, 0.7f})
                    for (bool shrunk : {false, true}) {
                        auto y = rounded<D>(randn(B * C * inner)), res = rounded<D>(randn(B * C * inner));
                        auto terms = rounded<D>(randn(C + shift_items * C));
                        std::vector<double> want(y.size());
                        for (long p = 0; p < B * C; p++)
                            for (long j = 0; j < inner; j++) {
                                long item = p / C, c = p % C;
                                float v = (float)y[p * inner + j];
                                if (has_bias) v += (float)terms[c];
                                if (shift_items) v += (float)terms[(has_bias ? C : 0) + (item % shift_items) * C + c];
                                if (has_res) v += (float)res[p * inner + j];
                                if (divisor != 1.f) v = v * (float)(1.0 / divisor);
                                want[p * inner + j] = v;
                            }
                        auto yd = pack<D>(y), td = pack<D>(terms), rd = pack<D>(res);
                        launch(rows_grid(B * C, inner, shrunk), THREADS, false,
                               [&] { planes_k(yd.data(), td.data(), has_bias, shift_items, rd.data(), has_res, B * C,
                                              (int)C, inner, (float)(1.0 / divisor)); });
                        char what[160];
                        std::snprintf(what, sizeof what, "tail_planes_%s shift %d bias %d res %d div %.1f grid %s", name,
                                      shift_items, has_bias, has_res, divisor, shrunk ? "shrunk" : "full");
                        check(what, unpack<D>(yd), rounded<D>(want), tol);
                    }
    const long rows = 7, channels = 600;
    for (int has_bias : {0, 1})
        for (int has_res : {0, 1})
            for (bool shrunk : {false, true}) {
                auto y = rounded<D>(randn(rows * channels)), res = rounded<D>(randn(rows * channels));
                auto bias = rounded<D>(randn(channels));
                std::vector<double> want(y.size());
                for (long i = 0; i < rows * channels; i++) {
                    float v = (float)y[i];
                    if (has_bias) v += (float)bias[i % channels];
                    if (has_res) v += (float)res[i];
                    want[i] = v;
                }
                auto yd = pack<D>(y), bd = pack<D>(bias), rd = pack<D>(res);
                launch(rows_grid(rows, channels, shrunk), THREADS, false,
                       [&] { rows_k(yd.data(), bd.data(), has_bias, rd.data(), has_res, rows, (int)channels); });
                char what[160];
                std::snprintf(what, sizeof what, "tail_rows_%s bias %d res %d grid %s", name, has_bias, has_res,
                              shrunk ? "shrunk" : "full");
                check(what, unpack<D>(yd), rounded<D>(want), tol);
            }
}

template <class D>
void geglu_case(const char *name, double tol,
                void (*k)(const typename D::T *, const typename D::T *, int, typename D::T *, long, int)) {
    const long rows = 9, inner = 333;
    for (int has_bias : {0, 1})
        for (bool shrunk : {false, true}) {
            auto p = rounded<D>(randn(rows * 2 * inner)), bias = rounded<D>(randn(2 * inner));
            std::vector<double> want(rows * inner);
            for (long r = 0; r < rows; r++)
                for (long c = 0; c < inner; c++) {
                    double h = p[r * 2 * inner + c] + (has_bias ? bias[c] : 0);
                    double g = p[r * 2 * inner + inner + c] + (has_bias ? bias[inner + c] : 0);
                    want[r * inner + c] = h * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
                }
            auto pd = pack<D>(p), bd = pack<D>(bias);
            std::vector<typename D::T> out(rows * inner);
            launch(rows_grid(rows, inner, shrunk), THREADS, false,
                   [&] { k(pd.data(), bd.data(), has_bias, out.data(), rows, (int)inner); });
            char what[160];
            std::snprintf(what, sizeof what, "geglu_%s bias %d grid %s", name, has_bias, shrunk ? "shrunk" : "full");
            check(what, unpack<D>(out), want, tol);
        }
}

template <class D>
void group_norm_case(const char *name, double tol,
                     void (*stats)(const typename D::T *, float *, long, int),
                     void (*apply)(const typename D::T *, const typename D::T *, const typename D::T *, const float *,
                                   typename D::T *, long, int, long, int, int, float, int)) {
    struct Shape { long b, c, hw; int groups; };
    for (Shape s : {Shape{2, 6, 35, 3}, Shape{2, 32, 100, 4}, Shape{1, 8, 5000, 2}, Shape{2, 4, 1, 2}})
        for (int silu : {0, 1}) {
            long cpg = s.c / s.groups, group_len = cpg * s.hw, batch_groups = s.b * s.groups;
            long splits = (group_len + 4095) / 4096;  // splits_for in group_norm.rs
            splits = splits < 1 ? 1 : splits > 64 ? 64 : splits;
            float eps = 1e-5f;
            auto x = rounded<D>(randn(s.b * s.c * s.hw));
            for (auto &v : x) v = v * 3 + 5;  // an offset mean, as activations have
            x = rounded<D>(x);
            auto w = rounded<D>(randn(s.c)), bias = rounded<D>(randn(s.c));
            std::vector<double> want(x.size());
            for (long g = 0; g < batch_groups; g++) {
                double mean = 0, var = 0;
                for (long i = 0; i < group_len; i++) mean += x[g * group_len + i];
                mean /= group_len;
                for (long i = 0; i < group_len; i++) var += (x[g * group_len + i] - mean) * (x[g * group_len + i] - mean);
                var /= group_len;
                for (long i = 0; i < group_len; i++) {
                    long c = (g % s.groups) * cpg + i / s.hw;
                    double v = (x[g * group_len + i] - mean) / std::sqrt(var + eps) * w[c] + bias[c];
                    want[g * group_len + i] = silu ? v / (1 + std::exp(-v)) : v;
                }
            }
            auto xd = pack<D>(x), wd = pack<D>(w), bd = pack<D>(bias);
            std::vector<float> partial(batch_groups * splits * 3);
            std::vector<typename D::T> out(x.size());
            Dim grid{(unsigned)batch_groups, (unsigned)splits, 1};
            launch(grid, THREADS, true, [&] { stats(xd.data(), partial.data(), group_len, (int)splits); });
            launch(grid, THREADS, true, [&] {
                apply(xd.data(), wd.data(), bd.data(), partial.data(), out.data(), group_len, (int)splits, s.hw,
                      (int)cpg, s.groups, eps, silu);
            });
            char what[160];
            std::snprintf(what, sizeof what, "group_norm_%s [%ld, %ld, %ld] groups %d splits %ld silu %d", name, s.b,
                          s.c, s.hw, s.groups, splits, silu);
            check(what, unpack<D>(out), want, tol);
        }
}

int main() {
    tails<F32>("f32", 1e-6, tail_planes_f32, tail_rows_f32);
    tails<F16>("f16", 1e-3, tail_planes_f16, tail_rows_f16);
    tails<BF16>("bf16", 8e-3, tail_planes_bf16, tail_rows_bf16);
    geglu_case<F32>("f32", 1e-5, geglu_f32);
    geglu_case<F16>("f16", 2e-3, geglu_f16);
    geglu_case<BF16>("bf16", 1.6e-2, geglu_bf16);
    group_norm_case<F32>("f32", 1e-4, gn_stats_f32, gn_apply_f32);
    group_norm_case<F16>("f16", 4e-3, gn_stats_f16, gn_apply_f16);
    group_norm_case<BF16>("bf16", 3e-2, gn_stats_bf16, gn_apply_bf16);
    std::printf("%s\n", failures ? "FAILED" : "all kernels match the float64 reference");
    return failures ? 1 : 0;
}
"""


def main():
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "kernels.cpp"
        src.write_text(SHIM + kernel_source() + HARNESS)
        exe = pathlib.Path(tmp) / "kernels"
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
        sys.exit(subprocess.run([str(exe)]).returncode)


if __name__ == "__main__":
    main()
