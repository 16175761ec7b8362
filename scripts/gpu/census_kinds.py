#!/usr/bin/env python3
"""Rolls the kernel census (kernel_census.c's SDR_CENSUS_OUT rows: label, window, ms, calls, name) up by kind
of work, per label: what share of each side's GPU time goes to matrix products, convolutions, attention,
normalisation, copies and elementwise passes, in ms per timed call.

  census_kinds.py CENSUS.tsv [--calls 3]
prints `census-kind: LABEL kind=ms_per_call(share) ...` and each label's three largest unclassified kernels.
"""
import argparse
import collections
import re

# First match wins: cuDNN's convolution kernels are implicit GEMMs, so convolutions come before products.
KINDS = [
    ("attention", r"flash|fmha|sdpa|attention|softmax"),
    ("conv", r"conv|fprop|implicit|nchwtonhwc|nhwctonchw|winograd|im2col|cudnn"),
    ("gemm", r"gemm|nvjet|cublas|cutlass|xmma|sm90_|sm80_"),
    ("norm", r"norm|moments|welford|gn_stats|gn_apply|fusedparams"),
    ("copy", r"copy|memcpy|memset|cat|transpose|permute"),
    ("elementwise", r"tail_|geglu|gelu|silu|elementwise|badd|bmul|bsub|bdiv|affine|unary|binary|add|mul|where|"
                    r"fill|cast|upsample|index|reduce|exp"),
]
RULES = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KINDS]


def kind_of(name):
    for kind, rule in RULES:
        if rule.search(name):
            return kind
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tsv")
    ap.add_argument("--calls", type=float, default=3.0, help="timed calls per window (SDR_CENSUS_CALLS)")
    a = ap.parse_args()
    totals = collections.defaultdict(lambda: collections.Counter())
    others = collections.defaultdict(lambda: collections.Counter())
    for line in open(a.tsv, encoding="utf-8", errors="replace"):
        parts = line.rstrip("\n").split("\t", 4)
        if len(parts) != 5:
            continue
        label, window, ms, _calls, name = parts
        key = f"{label} window={window}"
        kind = kind_of(name)
        totals[key][kind] += float(ms)
        if kind == "other":
            others[key][name[:120]] += float(ms)
    for key, kinds in totals.items():
        whole = sum(kinds.values()) or 1.0
        cells = " ".join(f"{k}={v / a.calls:.2f}ms({100 * v / whole:.0f}%)"
                         for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        print(f"census-kind: {key} per_call_ms={whole / a.calls:.2f} {cells}")
        for name, ms in others[key].most_common(3):
            print(f"census-kind: {key} other {ms / a.calls:.2f}ms {name}")


if __name__ == "__main__":
    main()
