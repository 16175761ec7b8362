#!/usr/bin/env python3
"""Runs sd-rbee's and diffusers' (PyTorch CPU) benchmarks on the same model folder, one after the other in
the same session, and prints both medians and the ratio (sd-rbee / PyTorch; below 1.0 means sd-rbee is faster).

  benches/compare_with_pytorch.py pipeline tests/fixtures/tiny-sd15 [--steps 20] [--width 96 --height 64] [--batch 1,4]
  benches/compare_with_pytorch.py sd15-unet /tmp/sd15-unet [--latent 64] [--batch 1,2,4,8] [--runs 3]
  benches/compare_with_pytorch.py unet --arch sdxl [--latent 128] [--batch 1,2] [--profile]

The PyTorch side is benches/torch_baseline.py (needs `pip install torch diffusers transformers`).
`sd15-unet` makes that script write a full-size SD 1.5 UNet with seeded random weights to the folder the first
time; sd-rbee then loads the very same weights. `unet --arch` builds the real UNet in memory on both sides,
each with its own seeded random weights (`sd-rbee bench unet --arch`): no download, no file. Both sides use the
same number of threads (--threads, default: all cores, i.e. RAYON_NUM_THREADS for sd-rbee and
torch.set_num_threads for PyTorch). Each batch size is a line per side and a ratio; with --profile (UNet modes)
also a table of where one call's time goes on each side, component by component.
"""
import argparse, os, re, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCH = os.path.join(HERE, "torch_baseline.py")


PROFILES = {}  # (side, images) -> {component: (calls, own_ms)}, from `profile: ...` lines


def run(cmd, env=None):
    """Runs one side; returns its result lines by batch size (images), and keeps its profile lines."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}):\n{out.stderr}")
    for line in out.stdout.splitlines():
        m = re.match(r"profile: (\S+) unet images ([0-9]+) component=(\S+) calls=([0-9]+) own_ms=([0-9.]+)", line)
        if m:
            side = PROFILES.setdefault((m.group(1), int(m.group(2))), {})
            side[m.group(3)] = (int(m.group(4)), float(m.group(5)))
        m = re.match(r"profile: (\S+) unet images ([0-9]+) component=total wall_ms=([0-9.]+)", line)
        if m:
            PROFILES.setdefault((m.group(1), int(m.group(2))), {})["(whole call)"] = (1, float(m.group(3)))
    lines = [l for l in out.stdout.splitlines() if l.startswith("bench") or l.startswith("baseline")]
    if not lines:
        sys.exit(f"no result line in output:\n{out.stdout}\n{out.stderr}")
    by_images = {}
    for line in lines:
        print(line, flush=True)
        m = re.search(r"images[= ]([0-9]+)", line)
        by_images[int(m.group(1)) if m else 1] = line
    return by_images


def field(line, name):
    m = re.search(name + r"=([0-9.]+)", line)
    if not m:
        sys.exit(f"{name} not found in: {line}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pipeline", "sd15-unet", "unet"])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--latent", type=int, default=None)
    ap.add_argument("--batch", default="1", help="batch sizes (images), comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sd-rbee", default=None, help="path to the sd-rbee binary (default: cargo run --release)")
    ap.add_argument("--profile", action="store_true",
                    help="UNet modes: also time one call component by component on both sides, side by side")
    a = ap.parse_args()

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    binary = [a.sd_rbee] if a.sd_rbee else ["cargo", "run", "--release", "--quiet", "--"]
    common = ["--batch", a.batch, "--runs", str(a.runs)] + (["--profile"] if a.profile and a.mode != "pipeline" else [])
    threads = ["--threads", str(a.threads)]
    latent = ["--latent", str(a.latent)] if a.latent else []
    if a.mode == "pipeline":
        size = ["--width", str(a.width), "--height", str(a.height), "--steps", str(a.steps)]
        torch = run([sys.executable, TORCH, "pipeline", a.path] + size + common + threads)
        ours = run(binary + ["bench", "pipeline", "--model", a.path] + size + common, env)
        per, what = "median_step_ms", "ms per step"
    elif a.mode == "sd15-unet":
        torch = run([sys.executable, TORCH, "sd15-unet", a.path] + latent + common + threads)
        ours = run(binary + ["bench", "unet", a.path] + latent + common, env)
        per, what = "median_s", "seconds per CFG step"
    else:
        torch = run([sys.executable, TORCH, "unet", "--arch", a.arch] + latent + common + threads)
        ours = run(binary + ["bench", "unet", "--arch", a.arch] + latent + common, env)
        per, what = "median_s", "seconds per CFG step"
    for images in sorted(ours):
        if images not in torch:
            continue
        t, o = field(torch[images], per), field(ours[images], per)
        mem = ""
        if "peak_rss_gb=" in torch[images] and "peak_rss_gb=" in ours[images]:
            mem = f"; peak RSS {field(ours[images], 'peak_rss_gb'):.2f} / {field(torch[images], 'peak_rss_gb'):.2f} GB"
        print(f"ratio: sd-rbee/pytorch {what} at {images} image(s) = {o:.3f}/{t:.3f} = {o / t:.3f}{mem}")
        print_profile(images)


def print_profile(images):
    """The two profiles of one batch size side by side: own ms per component (calls), and the ratio."""
    ours, theirs = PROFILES.get(("sd-rbee", images)), PROFILES.get(("diffusers", images))
    if not ours or not theirs:
        return
    print(f"profile at {images} image(s), own ms per component (calls): sd-rbee | diffusers | ratio")
    names = sorted(set(ours) | set(theirs), key=lambda n: -max(ours.get(n, (0, 0))[1], theirs.get(n, (0, 0))[1]))
    for n in names:
        (oc, o), (tc, t) = ours.get(n, (0, 0.0)), theirs.get(n, (0, 0.0))
        ratio = f"{o / t:.2f}" if o and t else "-"
        print(f"  {n:18s} {o:10.2f} ({oc:4d}) | {t:10.2f} ({tc:4d}) | {ratio}")
    print("  (sd-rbee runs each SiLU after a norm inside group_norm; diffusers times it as silu)")


if __name__ == "__main__":
    main()
