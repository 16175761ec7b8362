#!/usr/bin/env python3
"""Checks the container setup without a container engine: compose.yaml, docker/Dockerfile*, .dockerignore and
.env.example.

    target/test-tools/bin/python scripts/check_containers.py [--binary target/debug/sd-rbee] [--root DIR]

Exits 1 naming every problem found (0 and a one-line summary when there is none). What it checks:

 1. compose.yaml, interpolated as compose does (`${VAR:?msg}` and `${VAR?msg}` get a dummy value,
    `${VAR:-default}` its default, `$$` is a `$`), validates against the Compose Specification's JSON schema,
    vendored as docker/compose-spec.json (compose-spec/compose-spec, schema/compose-spec.json at commit
    170098ba07d9f53c383a41bfd4c5166b0a4529a6, whose last change to that file is a08f8d51631b, 2025-10-28).
    Every variable is required (`:?`) or has a default, and every required one is in .env.example.
 2. Secrets: no `minioadmin` anywhere; no default (`:-`, `-`) for a variable named *PASSWORD*, *SECRET*,
    *TOKEN*; every environment entry so named, every password inside a URL and every `--pass`/`--password`/
    `--token` argument comes from a required variable; .env.example holds only CHANGE-ME placeholders for them.
 3. Ports: every published port binds 127.0.0.1 (or ::1); no host networking.
 4. Services: depends_on targets exist (and have a healthcheck when waited on as healthy); every
    build.dockerfile exists; the queen and every worker have a healthcheck; workers have no container_name and
    publish no port (so `--scale worker=N` works); a worker's stop_grace_period exceeds its --grace (30s by
    default).
 5. Dockerfiles: the `# syntax=docker/dockerfile:1` header; every COPY/ADD source exists and is not excluded by
    .dockerignore (nor is any git-tracked file under it); every `--from=` (COPY, RUN --mount) names an earlier
    stage; what `cargo build --locked` reads is copied (Cargo.toml, Cargo.lock, build.rs, workspace members,
    [[bin]]/[[bench]]/[[test]]/[[example]] targets, include_bytes!/include_str! files, rust-embed folders); the
    final stage has a non-root USER, a HEALTHCHECK and OCI labels.
 6. The sd-rbee command lines (the `command:` of services built from our Dockerfiles, and healthchecks that run
    `sd-rbee ...`): with --binary PATH, `PATH <subcommand> --help` must list every --flag used and every
    SD_RBEE_* environment variable the service sets (clap prints `[env: NAME=]`); without it, a weaker check
    against the sources in src/ (every SD_RBEE_* name and every flag must appear there).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

try:
    import yaml  # PyYAML
    import jsonschema
except ImportError as e:  # pragma: no cover
    sys.exit(
        f"check_containers: cannot import {e.name!r} ({e}); run it with a Python that has PyYAML and jsonschema, "
        "e.g. target/test-tools/bin/python (scripts/test.sh installs it), or `pip install pyyaml jsonschema`"
    )

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)
PLACEHOLDER = "CHANGE-ME"
REQUIRED_PREFIX = "REQUIRED_"  # the dummy value of a required variable: "REQUIRED_<NAME>"
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}
DEFAULT_GRACE_S = 30.0


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.checked: dict[str, int] = {}

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n


# ---------------------------------------------------------------------------------------------- interpolation


class Use:
    def __init__(self, name: str, op: str, arg: str | None, path: str) -> None:
        self.name, self.op, self.arg, self.path = name, op, arg, path


def interpolate(text: str, path: str, uses: list[Use], problems: Problems) -> str:
    """Compose's interpolation of one scalar; records every variable use. Unset variables: required ones get
    REQUIRED_<NAME>, defaults apply, `${VAR:+x}` is empty."""
    out = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        if i + 1 < n and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if i + 1 < n and text[i + 1] == "{":
            depth, j = 1, i + 2
            while j < n and depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                problems.add(path, f"unterminated ${{ in {text!r}")
                out.append(text[i:])
                break
            body = text[i + 2 : j - 1]
            m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?\Z", body, re.S)
            if not m:
                problems.add(path, f"bad interpolation ${{{body}}}")
                i = j
                continue
            name, op, arg = m.group(1), m.group(2) or "", m.group(3)
            uses.append(Use(name, op, arg, path))
            if op in (":?", "?"):
                out.append(REQUIRED_PREFIX + name)
            elif op in (":-", "-"):
                out.append(interpolate(arg or "", path, uses, problems))
            elif op in (":+", "+"):
                pass  # unset: empty
            else:
                out.append("")  # unset, no default: compose warns and uses ""
            i = j
            continue
        m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])
        if m:
            uses.append(Use(m.group(1), "", None, path))
            i += len(m.group(0))
            continue
        out.append("$")
        i += 1
    return "".join(out)


def interpolate_tree(node, path: str, uses: list[Use], problems: Problems):
    if isinstance(node, dict):
        return {k: interpolate_tree(v, f"{path}.{k}", uses, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, f"{path}[{i}]", uses, problems) for i, v in enumerate(node)]
    if isinstance(node, str):
        return interpolate(node, path, uses, problems)
    return node


# ----------------------------------------------------------------------------------------------- .dockerignore


class DockerIgnore:
    """Docker's .dockerignore rules: patterns (Go filepath.Match plus `**`) on slash-separated paths relative to
    the context, `!` re-includes, the last matching pattern wins, and a path is excluded when it or a parent
    directory matches."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = os.path.normpath(line).replace(os.sep, "/").lstrip("/")
            if line == ".":
                continue
            self.rules.append((negate, re.compile(self._regex(line))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
                continue
            if c == "*":
                out += "[^/]*"
            elif c == "?":
                out += "[^/]"
            elif c == "[":
                j = pattern.find("]", i)
                if j < 0:
                    out += re.escape(c)
                else:
                    cls = pattern[i + 1 : j].replace("\\", "\\\\")
                    if cls.startswith("^") or cls.startswith("!"):
                        cls = "^" + cls[1:]
                    out += f"[{cls}]"
                    i = j
            else:
                out += re.escape(c)
            i += 1
        return out + "$"

    def _matches(self, path: str) -> bool:
        excluded = False
        for negate, rx in self.rules:
            if rx.match(path):
                excluded = not negate
        return excluded

    def excluded(self, path: str) -> bool:
        path = os.path.normpath(path).replace(os.sep, "/").lstrip("/")
        parts = path.split("/")
        for k in range(1, len(parts) + 1):
            if self._matches("/".join(parts[:k])):
                # A parent excluded: a `!` rule for something below it can still bring the path back.
                if k == len(parts) or not any(neg and rx.match(path) for neg, rx in self.rules):
                    return True
        return False


# -------------------------------------------------------------------------------------------------- Dockerfiles


class Instr:
    def __init__(self, line: int, keyword: str, args: str) -> None:
        self.line, self.keyword, self.args = line, keyword.upper(), args


def parse_dockerfile(text: str) -> tuple[list[str], list[Instr]]:
    """(the leading comment lines, the instructions with continuation lines joined and comments dropped)."""
    lines = text.splitlines()
    header: list[str] = []
    for raw in lines:
        if raw.startswith("#"):
            header.append(raw)
        else:
            break
    instrs: list[Instr] = []
    buf, start = "", 0
    for no, raw in enumerate(lines, 1):
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue  # comment lines inside a continuation are dropped
        if not buf:
            start = no
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        kw, _, rest = buf.partition(" ")
        instrs.append(Instr(start, kw, rest.strip()))
        buf = ""
    if buf:
        kw, _, rest = buf.partition(" ")
        instrs.append(Instr(start, kw, rest.strip()))
    return header, instrs


def split_flags(args: str) -> tuple[dict[str, list[str]], list[str]]:
    """`--flag=value ... rest` of COPY/ADD/RUN: the flags, and the rest (JSON array or words)."""
    flags: dict[str, list[str]] = {}
    rest = args.strip()
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        k, _, v = word[2:].partition("=")
        flags.setdefault(k, []).append(v)
        rest = rest.strip()
    if rest.startswith("["):
        try:
            return flags, [str(x) for x in json.loads(rest)]
        except json.JSONDecodeError:
            pass
    return flags, shlex.split(rest) if rest else []


def cargo_required_paths(root: Path, problems: Problems) -> list[str]:
    """What `cargo build --locked --bin ...` in /src needs from the repository, relative to it."""
    if tomllib is None:
        problems.add("Cargo.toml", "Python 3.11+ (tomllib) is needed to read the manifests")
        return []
    needed = ["Cargo.toml", "Cargo.lock"]

    def package(dir_rel: str) -> None:
        d = root / dir_rel
        manifest = d / "Cargo.toml"
        if not manifest.exists():
            problems.add(str(manifest.relative_to(root)), "workspace member without a manifest")
            return
        data = tomllib.loads(manifest.read_text())
        rel = lambda p: os.path.normpath(os.path.join(dir_rel, p)).replace(os.sep, "/")  # noqa: E731
        needed.append(rel("Cargo.toml"))
        pkg = data.get("package", {})
        build = pkg.get("build", "build.rs" if (d / "build.rs").exists() else None)
        if build:
            needed.append(rel(build))
        lib = data.get("lib", {})
        if lib.get("path") or (d / "src/lib.rs").exists():
            needed.append(rel(lib.get("path", "src/lib.rs")))
        defaults = {"bin": "src/bin", "bench": "benches", "test": "tests", "example": "examples"}
        for kind, folder in defaults.items():
            for target in data.get(kind, []):
                if "path" in target:
                    needed.append(rel(target["path"]))
                elif kind == "bin" and target.get("name") == pkg.get("name"):
                    needed.append(rel("src/main.rs"))
                else:
                    name = target.get("name", "")
                    single, nested = f"{folder}/{name}.rs", f"{folder}/{name}/main.rs"
                    needed.append(rel(nested if (d / nested).exists() else single))
        if (d / "src/main.rs").exists():
            needed.append(rel("src/main.rs"))
        # Files the sources embed at compile time.
        for src in sorted((d / "src").rglob("*.rs")) if (d / "src").is_dir() else []:
            text = src.read_text(errors="replace")
            for m in re.finditer(r'include_(?:bytes|str)!\(\s*"([^"]+)"\s*\)', text):
                target = (src.parent / m.group(1)).resolve()
                try:
                    needed.append(str(target.relative_to(root.resolve())).replace(os.sep, "/"))
                except ValueError:
                    problems.add(str(src.relative_to(root)), f"embeds {m.group(1)} from outside the repository")
            for m in re.finditer(r'#\[folder\s*=\s*"([^"]+)"\]', text):
                needed.append(rel(m.group(1)))

    top = tomllib.loads((root / "Cargo.toml").read_text())
    members = top.get("workspace", {}).get("members", ["."])
    for member in members:
        package(os.path.normpath(member).replace(os.sep, "/"))
    return sorted(set(p[2:] if p.startswith("./") else p for p in needed))


def check_dockerfile(root: Path, context: Path, dockerfile: Path, ignore: DockerIgnore, tracked: list[str],
                     cargo_paths: list[str], problems: Problems) -> None:
    where = str(dockerfile.relative_to(root))
    header, instrs = parse_dockerfile(dockerfile.read_text())
    problems.count("Dockerfiles")
    if not header or not re.match(r"#\s*syntax\s*=\s*docker/dockerfile:1", header[0]):
        problems.add(where, "the first line must be `# syntax=docker/dockerfile:1` (BuildKit's cache mounts)")
    stages: list[str | None] = []
    final: dict = {}
    copied: list[str] = []
    for ins in instrs:
        at = f"{where}:{ins.line}"
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(name)
            final = {"user": None, "healthcheck": None, "labels": "", "line": ins.line}
            continue
        if not stages:
            if ins.keyword != "ARG":
                problems.add(at, f"{ins.keyword} before the first FROM")
            continue
        if ins.keyword == "USER":
            final["user"] = ins.args.strip()
        elif ins.keyword == "HEALTHCHECK":
            final["healthcheck"] = ins.args.strip()
        elif ins.keyword == "LABEL":
            final["labels"] += " " + ins.args
        if ins.keyword in ("COPY", "ADD", "RUN"):
            flags, rest = split_flags(ins.args)
            refs = list(flags.get("from", []))
            for mount in flags.get("mount", []):
                for part in mount.split(","):
                    k, _, v = part.partition("=")
                    if k == "from":
                        refs.append(v)
            earlier = [s for s in stages[:-1] if s]
            for ref in refs:
                problems.count("--from references")
                if ref.isdigit():
                    if int(ref) >= len(stages) - 1:
                        problems.add(at, f"--from={ref}: no earlier stage has that index")
                elif ref.lower() not in earlier:
                    later = ref.lower() in [s for s in stages if s]
                    problems.add(at, f"--from={ref}: " + ("names this stage, not an earlier one" if later
                                 else f"no earlier stage is named so (stages: {', '.join(earlier) or 'none'})"))
            if ins.keyword in ("COPY", "ADD") and not refs:
                sources = rest[:-1]
                if not sources:
                    problems.add(at, f"{ins.keyword} without a source")
                for src in sources:
                    problems.count("COPY sources")
                    if re.match(r"^[a-z]+://", src):
                        continue
                    rel = os.path.normpath(src).replace(os.sep, "/").lstrip("/")
                    ctx_rel = os.path.relpath(context / rel, root).replace(os.sep, "/")
                    matches = [p for p in context.glob(rel)] if any(ch in rel for ch in "*?[") else (
                        [context / rel] if (context / rel).exists() else [])
                    if not matches:
                        problems.add(at, f"COPY source {src} does not exist in the build context ({ctx_rel})")
                        continue
                    for m in matches:
                        mrel = os.path.relpath(m, context).replace(os.sep, "/")
                        copied.append(os.path.relpath(m, root).replace(os.sep, "/"))
                        if mrel != "." and ignore.excluded(mrel):
                            problems.add(at, f"COPY source {src} is excluded by .dockerignore")
                            continue
                        prefix = "" if mrel == "." else mrel + "/"
                        in_context = (os.path.relpath(root / t, context).replace(os.sep, "/") for t in tracked)
                        lost = [t for t in in_context if t.startswith(prefix) and ignore.excluded(t)]
                        if lost:
                            problems.add(at, f"COPY {src}: .dockerignore excludes tracked files under it, e.g. "
                                         f"{', '.join(lost[:3])}")
    if not stages:
        problems.add(where, "no FROM")
        return
    fl = f"{where}:{final.get('line')} (final stage)"
    user = final.get("user")
    if not user:
        problems.add(fl, "no USER: the image would run as root")
    elif user.split(":")[0] in ("root", "0"):
        problems.add(fl, f"USER {user} is root")
    hc = final.get("healthcheck")
    if not hc or hc.upper().startswith("NONE"):
        problems.add(fl, "no HEALTHCHECK")
    elif "sd-rbee" in hc and "healthcheck" not in hc:
        problems.add(fl, "the HEALTHCHECK should run `sd-rbee healthcheck URL`")
    for label in ("org.opencontainers.image.title", "org.opencontainers.image.description",
                  "org.opencontainers.image.version", "org.opencontainers.image.licenses"):
        if label not in final.get("labels", ""):
            problems.add(fl, f"no LABEL {label}")
    # Everything cargo reads is copied (a missing [[bench]] file fails `cargo build` at manifest parsing).
    for need in cargo_paths:
        problems.count("cargo inputs")
        if not any(need == c or need.startswith(c.rstrip("/") + "/") or c == "." for c in copied):
            problems.add(where, f"{need} is not copied into the build stage (cargo needs it)")


# ------------------------------------------------------------------------------------------------- the binary


def duration_s(text) -> float | None:
    if isinstance(text, (int, float)):
        return float(text)
    total, found = 0.0, False
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|us|h|m|s|d)?", str(text)):
        found = True
        total += float(num) * {"ms": 1e-3, "us": 1e-6, "h": 3600, "m": 60, "s": 1, "d": 86400, "": 1}[unit or ""]
    return total if found else None


class Help:
    def __init__(self, binary: str | None, root: Path) -> None:
        self.binary, self.root = binary, root
        self.cache: dict[str, str | None] = {}
        self._sources: str | None = None

    def text(self, sub: str, problems: Problems) -> str | None:
        if sub not in self.cache:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SD_RBEE_")}
            env["COLUMNS"] = "10000"
            try:
                r = subprocess.run([self.binary, sub, "--help"], capture_output=True, text=True, timeout=30,
                                   env=env)
            except (OSError, subprocess.TimeoutExpired) as e:
                problems.add(f"--binary {self.binary}", f"cannot run `{sub} --help`: {e}")
                self.cache[sub] = None
            else:
                if r.returncode != 0:
                    first = (r.stderr or r.stdout).strip().splitlines()[:1]
                    problems.add(f"--binary {self.binary}",
                                 f"`sd-rbee {sub} --help` failed (rc {r.returncode}): {' '.join(first)}")
                    self.cache[sub] = None
                else:
                    self.cache[sub] = re.sub(r"\s+", " ", r.stdout)
        return self.cache[sub]

    def sources(self) -> str:
        if self._sources is None:
            self._sources = "\n".join(p.read_text(errors="replace") for p in sorted((self.root / "src").rglob("*.rs")))
        return self._sources


def check_command(where: str, argv: list[str], env_names: list[str], help_: Help, problems: Problems) -> None:
    """argv[0] is the subcommand; its --flags and the SD_RBEE_* environment names must be the binary's."""
    if not argv:
        return
    sub = argv[0]
    flags = []
    for a in argv[1:]:
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2:
            flags.append(a.split("=", 1)[0])
        elif re.fullmatch(r"-[A-Za-z]", a):
            flags.append(a)
    problems.count("sd-rbee flags", len(flags))
    problems.count("SD_RBEE_* variables", len(env_names))
    if help_.binary:
        text = help_.text(sub, problems)
        if text is None:
            return
        for f in flags:
            rx = (rf"(?<![\w-]){re.escape(f)}(?![\w-])" if f.startswith("--") else rf"(?<![\w-]){re.escape(f)},")
            if not re.search(rx, text):
                problems.add(where, f"`sd-rbee {sub}` has no flag {f} (not in `{sub} --help`)")
        for name in env_names:
            if not re.search(rf"\b{re.escape(name)}\b", text):
                problems.add(where, f"`sd-rbee {sub}` does not read {name} (not in `{sub} --help`)")
    else:
        src = help_.sources()
        if not re.search(rf'\b{re.escape(sub.replace("-", ""))}\b|"{re.escape(sub)}"|{sub.capitalize()}\(',
                         src, re.I):
            problems.add(where, f"no subcommand {sub} in src/ (source check)")
        for f in flags:
            if f.startswith("--"):
                long = f[2:]
                field = long.replace("-", "_")
                if not re.search(rf'long\s*=\s*"{re.escape(long)}"|\bpub\s+{re.escape(field)}\s*:', src):
                    problems.add(where, f"no flag {f} in src/ (source check; pass --binary for the real one)")
        for name in env_names:
            if f'"{name}"' not in src:
                problems.add(where, f"{name} is never read in src/ (source check)")


# ------------------------------------------------------------------------------------------------------ compose


def published_ports(svc: dict) -> list[tuple[str | None, str | None, str]]:
    """(host_ip, host_port, container) of each published port."""
    out = []
    for p in svc.get("ports", []) or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published")) if p.get("published") is not None else None,
                        str(p.get("target"))))
            continue
        s = str(p)
        m = re.match(r"^(?:(\[[^\]]+\]|[^:\[\]]+(?:\.[^:]+)*|\d+\.\d+\.\d+\.\d+):)?(?:([\d-]*):)?([\d-]+(?:/\w+)?)$", s)
        if not m:
            out.append((None, None, s))
            continue
        ip, host, cont = m.groups()
        if ip is not None and host is None and re.fullmatch(r"[\d-]+", ip):
            ip, host = None, ip  # "8080:8080"
        out.append((ip, host, cont))
    return out


def env_dict(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        d = {}
        for item in env:
            k, _, v = str(item).partition("=")
            d[k] = v
        return d
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="the repository root")
    ap.add_argument("--compose", default="compose.yaml", help="the compose file, relative to --root")
    ap.add_argument("--binary", help="an sd-rbee binary whose --help the command lines are checked against")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    problems = Problems()

    compose_path = root / args.compose
    schema_path = root / "docker/compose-spec.json"
    for p in (compose_path, schema_path):
        if not p.exists():
            print(f"check_containers: {p} is missing", file=sys.stderr)
            return 1
    raw_text = compose_path.read_text()
    try:
        raw = yaml.safe_load(raw_text)
    except yaml.YAMLError as e:
        print(f"check_containers: {args.compose} is not valid YAML: {e}", file=sys.stderr)
        return 1
    uses: list[Use] = []
    doc = interpolate_tree(raw, args.compose, uses, problems)

    # 1. The schema.
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        loc = ".".join(str(x) for x in err.absolute_path) or "(top)"
        problems.add(f"{args.compose} schema", f"{loc}: {err.message}")
    problems.count("schema validations")

    # Variables: required or defaulted; secrets never defaulted; all required ones in .env.example.
    env_example_path = root / ".env.example"
    example: dict[str, str] = {}
    if env_example_path.exists():
        for line in env_example_path.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
            if m:
                example[m.group(1)] = m.group(2).strip()
    else:
        problems.add(".env.example", "missing (the compose secrets' template)")
    required = set()
    for u in uses:
        problems.count("variables")
        if u.op in (":?", "?"):
            required.add(u.name)
        elif u.op in (":-", "-"):
            if SECRET_NAME.search(u.name):
                problems.add(u.path, f"${{{u.name}{u.op}...}}: a secret must not have a default; use "
                             f"${{{u.name}:?set {u.name} in .env (see .env.example)}}")
        elif u.op == "":
            problems.add(u.path, f"${{{u.name}}} has neither a default nor `:?` (unset, compose would use \"\")")
    for name in sorted(required):
        if name not in example:
            problems.add(".env.example", f"{name} is required by {args.compose} but not listed")
        elif SECRET_NAME.search(name) and example[name] != PLACEHOLDER:
            problems.add(".env.example", f"{name} must be the placeholder {PLACEHOLDER}, not a value")

    # 2. Secrets.
    for m in re.finditer(r"minioadmin", raw_text, re.I):
        line = raw_text.count("\n", 0, m.start()) + 1
        problems.add(f"{args.compose}:{line}", "the default MinIO credentials (minioadmin)")

    services: dict = (doc or {}).get("services") or {}
    raw_services: dict = (raw or {}).get("services") or {}
    help_ = Help(args.binary, root)
    ours = {}  # service -> dockerfile path, for services built from this repository's Dockerfiles
    ignore_path = root / ".dockerignore"
    ignore = DockerIgnore(ignore_path.read_text() if ignore_path.exists() else "")
    try:
        tracked = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True,
                                 check=True).stdout.split("\n")
        tracked = [t for t in tracked if t]
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    cargo_paths = cargo_required_paths(root, problems)
    checked_dockerfiles: set[Path] = set()

    for name, svc in services.items():
        where = f"{args.compose} services.{name}"
        if not isinstance(svc, dict):
            continue
        problems.count("services")
        rsvc = raw_services.get(name) or {}
        env = env_dict(svc)
        raw_env = env_dict(rsvc)
        for k, v in env.items():
            if SECRET_NAME.search(k) and not (v.startswith(REQUIRED_PREFIX) and
                                              re.search(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?", raw_env.get(k, ""))):
                problems.add(where, f"environment {k} must come from a required variable "
                             f"(${{NAME:?set NAME in .env (see .env.example)}}), not {raw_env.get(k)!r}")
        # Credentials in URLs and on command lines.
        strings = list(env.items())
        for key in ("command", "entrypoint"):
            val = svc.get(key)
            if isinstance(val, list):
                strings += [(f"{key}[{i}]", str(x)) for i, x in enumerate(val)]
                for i, x in enumerate(val[:-1]):
                    if str(x) in ("--pass", "--password", "--token", "--auth_token") and \
                            not str(val[i + 1]).startswith(REQUIRED_PREFIX):
                        problems.add(where, f"{key}: the value after {x} must come from a required variable")
        for k, v in strings:
            for m in re.finditer(r"[a-z][a-z0-9+.-]*://([^/@\s:]*):([^/@\s]*)@", v):
                if not m.group(2).startswith(REQUIRED_PREFIX):
                    problems.add(where, f"{k}: the password in the URL must come from a required variable")

        # 3. Ports.
        if svc.get("network_mode") == "host":
            problems.add(where, "network_mode: host publishes every port on every interface")
        for ip, host, cont in published_ports(svc):
            problems.count("published ports")
            if ip not in LOOPBACK:
                problems.add(where, f"port {cont} is published on {ip or 'all interfaces'}; bind it to 127.0.0.1 "
                             f"(\"127.0.0.1:{host or cont}:{cont}\")")

        # 4. depends_on.
        deps = svc.get("depends_on") or {}
        dep_items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, cond in dep_items:
            problems.count("depends_on")
            if dep not in services:
                problems.add(where, f"depends_on {dep}: no such service")
                continue
            if (cond or {}).get("condition") == "service_healthy":
                target = services[dep]
                hc = target.get("healthcheck") or {}
                if (not hc or hc.get("disable")) and "build" not in target:
                    problems.add(where, f"waits for {dep} to be healthy, but {dep} has no healthcheck")

        # Built from our Dockerfiles?
        build = svc.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = (root / build.get("context", ".")).resolve()
            dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
            if not dockerfile.exists():
                problems.add(where, f"build.dockerfile {os.path.relpath(dockerfile, root)} does not exist")
            else:
                ours[name] = dockerfile
                if dockerfile not in checked_dockerfiles:
                    checked_dockerfiles.add(dockerfile)
                    if context != root:
                        problems.add(where, "the build context should be the repository root (.)")
                    check_dockerfile(root, context, dockerfile, ignore, tracked, cargo_paths, problems)

        if name not in ours:
            continue
        command = svc.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        command = [str(c) for c in (command or [])]
        sub = command[0] if command else None
        role = sub if sub in ("queen", "worker") else None
        sd_env = sorted(k for k in env if k.startswith("SD_RBEE_"))
        if sub:
            check_command(f"{where}.command", command, sd_env, help_, problems)
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        if isinstance(test, list) and len(test) > 1 and test[0] in ("CMD", "CMD-SHELL"):
            argv = test[1:] if test[0] == "CMD" else shlex.split(test[1])
            if argv and Path(argv[0]).name == "sd-rbee":
                check_command(f"{where}.healthcheck", argv[1:], [], help_, problems)
        if role:
            problems.count(f"{role} services")
            if not test or hc.get("disable") or test == ["NONE"]:
                problems.add(where, f"the {role} has no healthcheck")
        if role == "queen":
            if not test or not any("/ready" in str(t) or "/health" in str(t) for t in test):
                problems.add(where, "the queen's healthcheck should ask /ready (or /health)")
        if role == "worker":
            if "container_name" in svc:
                problems.add(where, "a worker with container_name cannot be scaled (--scale worker=N)")
            if svc.get("ports"):
                problems.add(where, "a worker publishes ports: a second replica could not bind them")
            grace = DEFAULT_GRACE_S
            for i, a in enumerate(command):
                if a == "--grace" and i + 1 < len(command):
                    grace = duration_s(command[i + 1]) or grace
                elif a.startswith("--grace="):
                    grace = duration_s(a.split("=", 1)[1]) or grace
            stop = duration_s(svc.get("stop_grace_period", "10s"))
            if stop is None or stop <= grace:
                problems.add(where, f"stop_grace_period ({svc.get('stop_grace_period', '10s (default)')}) must "
                             f"exceed the worker's --grace ({grace:g}s), or running jobs are killed")
            if test and not any("ready" in str(t) for t in test):
                problems.add(where, "the worker's healthcheck should ask its readiness probe (/ready)")

    for role in ("queen", "worker"):
        if not problems.checked.get(f"{role} services"):
            problems.add(args.compose, f"no {role} service built from this repository's Dockerfiles")
    # Every Dockerfile under docker/ is checked, used by compose or not.
    for df in sorted((root / "docker").glob("Dockerfile*")):
        if df.resolve() not in checked_dockerfiles:
            checked_dockerfiles.add(df.resolve())
            check_dockerfile(root, root, df, ignore, tracked, cargo_paths, problems)

    if problems.items:
        print(f"check_containers: {len(problems.items)} problem(s):", file=sys.stderr)
        for item in problems.items:
            print(f"  - {item}", file=sys.stderr)
        return 1
    c = problems.checked
    print(
        f"check_containers: OK: {args.compose} valid against the Compose Specification schema; "
        f"{c.get('services', 0)} services, {c.get('published ports', 0)} published ports on loopback, "
        f"{c.get('variables', 0)} variable uses ({len(required)} required, all in .env.example), no default secret, "
        f"{c.get('depends_on', 0)} depends_on, {len(checked_dockerfiles)} Dockerfiles ({c.get('COPY sources', 0)} "
        f"COPY sources, {c.get('--from references', 0)} --from, non-root USER, HEALTHCHECK), "
        f"{c.get('sd-rbee flags', 0)} sd-rbee flags and {c.get('SD_RBEE_* variables', 0)} SD_RBEE_* variables "
        + (f"against `{args.binary} <subcommand> --help`" if args.binary else "against src/ (no --binary)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
