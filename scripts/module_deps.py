#!/usr/bin/env python3
"""The crate's module graph, from the `crate::` paths each file names (its `use` lines and inline paths).

Prints each top-level module's dependencies, then any cycle between top-level modules, and (with
--within MODULE) the same for the submodules of one module. Exits 1 when there is a cycle. Used to check
issue 10's "no import cycle between modules": `python3 scripts/module_deps.py --within queen`; `--root
crates/contract/src` checks the contract crate the same way.
"""
import argparse
import os
import re
import sys

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
ROOT = os.path.join(os.path.dirname(__file__), "..")
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)(?:::([a-z_][a-z0-9_]*))?")
SUPER = re.compile(r"\bsuper::([a-z_][a-z0-9_]*)")


def modules_of(rel):
    """('queen', 'http') for src/queen/http/jobs.rs; ('bus', None) for src/bus/client.rs."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    top = parts[0] if parts else "lib"
    sub = parts[1] if len(parts) > 1 else None
    return top, sub


def strip_tests(text):
    # Test modules may reach anywhere; the boundaries are about the code that ships.
    cut = text.find("#[cfg(test)]\nmod tests")
    return text if cut < 0 else text[:cut]


def graph(within=None):
    edges = {}
    for root, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith(".rs") or name == "tests.rs":
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, SRC)
            top, sub = modules_of(rel)
            text = strip_tests(open(path, encoding="utf-8").read())
            text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
            if within is None:
                node = top
                targets = {m.group(1) for m in PATH.finditer(text)}
            else:
                if top != within:
                    continue
                node = sub or "(mod)"
                targets = {m.group(2) for m in PATH.finditer(text) if m.group(1) == within and m.group(2)}
                if sub is not None and not rel.endswith(os.sep + "mod.rs") and rel.count(os.sep) == 1:
                    targets |= {m.group(1) for m in SUPER.finditer(text)}
                elif sub is not None and rel.count(os.sep) >= 2:
                    # src/queen/http/x.rs: super:: is queen::http itself, super::super:: is queen.
                    targets |= {m.group(1) for m in re.finditer(r"\bsuper::super::([a-z_][a-z0-9_]*)", text)}
            edges.setdefault(node, set()).update(t for t in targets if t and t != node)
    known = set(edges)
    return {n: sorted(t for t in ts if t in known) for n, ts in edges.items()}


def cycles(edges):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in edges.get(n, []):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--within", help="a top-level module whose submodules to check")
    parser.add_argument("--root", help="the crate's source folder, relative to the repository (default src)")
    args = parser.parse_args()
    global SRC
    if args.root:
        SRC = os.path.join(ROOT, args.root)
        if not os.path.isdir(SRC):
            sys.exit(f"no folder {SRC}")
    bad = False
    for within in [None] + ([args.within] if args.within else []):
        edges = graph(within)
        print(f"== {'crate' if within is None else within}")
        for n in sorted(edges):
            print(f"{n:12} -> {', '.join(edges[n]) or '-'}")
        for c in cycles(edges):
            bad = True
            print("cycle: " + " -> ".join(c))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
