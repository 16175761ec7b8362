#!/usr/bin/env python3
"""Runs sd-rbee's and diffusers' (PyTorch CPU) benchmarks on the same model folder, one after the other in
the same session, and prints both medians and the ratio (sd-rbee / PyTorch; below 1.0 means sd-rbee is faster).

  benches/compare_with_pytorch.py pipeline tests/fixtures/tiny-sd15 [--steps 20] [--width 96 --height 64]
  benches/compare_with_pytorch.py sd15-unet /tmp/sd15-unet [--latent 64]

The PyTorch side is ../shared/bench/torch_baseline.py (needs `pip install torch diffusers transformers`).
`sd15-unet` makes that script write a full-size SD 1.5 UNet with seeded random weights to the folder the first
time; sd-rbee then loads the very same weights. Both sides use the same number of threads (--threads, default:
all cores, i.e. RAYON_NUM_THREADS for sd-rbee and torch.set_num_threads for PyTorch).
"""
import argparse, os, re, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCH = os.path.join(ROOT, "..", "shared", "bench", "torch_baseline.py")


def run(cmd, env=None):
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}):\n{out.stderr}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("bench") or l.startswith("baseline")]
    if not lines:
        sys.exit(f"no result line in output:\n{out.stdout}\n{out.stderr}")
    print(lines[-1], flush=True)
    return lines[-1]


def field(line, name):
    m = re.search(name + r"=([0-9.]+)", line)
    if not m:
        sys.exit(f"{name} not found in: {line}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pipeline", "sd15-unet"])
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sd-rbee", default=None, help="path to the sd-rbee binary (default: cargo run --release)")
    a = ap.parse_args()

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    binary = [a.sd_rbee] if a.sd_rbee else ["cargo", "run", "--release", "--quiet", "--"]
    threads = ["--threads", str(a.threads)]
    if a.mode == "pipeline":
        size = ["--width", str(a.width), "--height", str(a.height)]
        torch = run([sys.executable, TORCH, "pipeline", a.path, "--steps", str(a.steps)] + size + threads)
        ours = run(binary + ["bench", "pipeline", "--model", a.path, "--steps", str(a.steps)] + size, env)
        t, o = field(torch, "median_step_ms"), field(ours, "median_step_ms")
        print(f"ratio: sd-rbee/pytorch median ms per step = {o:.2f}/{t:.2f} = {o / t:.3f}")
    else:
        torch = run([sys.executable, TORCH, "sd15-unet", a.path, "--latent", str(a.latent)] + threads)
        ours = run(binary + ["bench", "unet", a.path, "--latent", str(a.latent)], env)
        t = field(torch, "median_s") if "median_s=" in torch else None
        o = field(ours, "median_s")
        if t:
            print(f"ratio: sd-rbee/pytorch seconds per CFG step = {o:.2f}/{t:.2f} = {o / t:.3f}")


if __name__ == "__main__":
    main()
