"""Mutation testing of the science-critical modules with mutmut 3 (``make mutate``).

Why a driver: mutmut names every mutant after its file's path (a leading ``src/`` stripped) and
matches it at run time against the function's ``__module__``, so the package must sit at
``src/cifarlab`` (ours is at ``code/cifarlab``; see README "Layout"). Each module therefore runs
in its own folder ``build/mutate/<module>/`` holding a copy of the package as ``src/cifarlab``,
a copy of ``tests/``, a ``setup.cfg`` with the options, and mutmut's own ``mutants/`` (kept
between runs: mutmut re-tests only functions whose code changed). Copies, not links: nothing
mutmut does there (``mutmut apply`` included) can touch the real tree.

Configuration, in pyproject.toml: ``[tool.mutmut]`` holds the options every module shares;
``[tool.cifarlab.mutate]`` maps each module (under code/cifarlab) to ``tests`` (the test files
that pin it) and ``skip`` (functions or classes not mutated: benches, plotting) or ``only`` (the
functions and methods to mutate, every other one skipped: for a large module of which only a part
is the science, e.g. the trainer's best-checkpoint selection and resume).

    python scripts/mutate.py                      # every configured module
    python scripts/mutate.py dropout/layers.py    # one (or several); run again after adding tests: the
                                                  # survivors are re-tested when its tests changed
    python scripts/mutate.py --list
    python scripts/mutate.py --retest-survivors optim/slbi.py   # re-test the survivors in any case

mutmut forks one worker per mutant (``--max-children``, default 1: one core); pin the whole run
with ``taskset -c N`` on a shared machine. Writes build/mutate/summary.md (score and time per
module) and build/mutate/<module>/survivors.txt (the diff of every surviving mutant).
"""
from __future__ import annotations

import argparse
import ast
import configparser
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import tokenize
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutate"
# mutmut exit codes (mutmut.stats.status_by_exit_code), grouped for the score
KILLED = {1, 3, 24, -24, 152, 255, 36, 37}  # failed test, pytest error, timeout, type check
SURVIVED = {0}
NO_TESTS = {5, 33}


def load_config() -> tuple[dict, dict[str, dict]]:
    """([tool.mutmut], {module: {"tests": [...], "skip": [...]}})."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shared = dict(data.get("tool", {}).get("mutmut", {}))
    modules = data.get("tool", {}).get("cifarlab", {}).get("mutate", {})
    if not modules:
        sys.exit("error: no [tool.cifarlab.mutate] table in pyproject.toml")
    out = {}
    for m, v in modules.items():
        skip = list(v.get("skip", []))
        if v.get("only"):
            skip += [n for n in definitions(ROOT / "code" / "cifarlab" / m) if n not in set(v["only"])]
            unknown = set(v["only"]) - set(definitions(ROOT / "code" / "cifarlab" / m))
            if unknown:
                sys.exit(f"error: only names not defined in {m}: {', '.join(sorted(unknown))}")
        out[m] = {"tests": list(v["tests"]), "skip": skip}
    return shared, out


def definitions(path: Path) -> list[str]:
    """The functions mutmut mutates one by one: module-level functions and methods of module-level
    classes, in file order."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef):
            names += [n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", "-")


def _copy_tree(src: Path, dst: Path) -> None:
    """Mirror src into dst (copy2 keeps mtimes, so unchanged files look unchanged to mutmut)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def stage(module: str, tests: list[str], skip: list[str], shared: dict) -> Path:
    """build/mutate/<slug>/: src/cifarlab, tests/, setup.cfg; stale non-mutated copies in mutants/ dropped."""
    work = WORK / slug(module)
    work.mkdir(parents=True, exist_ok=True)
    _copy_tree(ROOT / "code" / "cifarlab", work / "src" / "cifarlab")
    _copy_tree(ROOT / "tests", work / "tests")
    target = f"src/cifarlab/{module}"
    copied = work / "mutants" / "src" / "cifarlab"
    if copied.is_dir():  # mutmut copies the package once and never refreshes it: drop all but the mutated file
        for f in copied.rglob("*"):
            rel = f.relative_to(work / "mutants").as_posix()
            if f.is_file() and rel not in (target, target + ".meta"):
                f.unlink()
    options = dict(shared)
    options.update(source_paths=["src/cifarlab"], only_mutate=[target],
                   pytest_add_cli_args_test_selection=tests)
    if skip:
        mark_skipped(work / target, skip)
    cfg = configparser.ConfigParser()
    cfg["mutmut"] = {k: ("\n" + "\n".join(map(str, v)) if isinstance(v, list) else str(v).lower()
                         if isinstance(v, bool) else str(v)) for k, v in options.items()}
    with open(work / "setup.cfg", "w") as f:
        f.write(f"# written by scripts/mutate.py for {module}; edit pyproject.toml instead\n")
        cfg.write(f)
    return work


def mark_skipped(path: Path, names: list[str]) -> None:
    """In the staged copy only: end the header line of each def/class named in ``names`` with
    mutmut's ``# pragma: no mutate block`` (the whole definition is left alone). The file keeps
    its mtime, so mutmut still sees it as unchanged when the real source is."""
    text = path.read_text()
    stat = path.stat()
    lines = text.splitlines(keepends=True)
    wanted = set(names)
    headers = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in wanted:
            headers[node.name] = _header_line(text, node.lineno)
    missing = wanted - set(headers)
    if missing:
        sys.exit(f"error: skip names not defined in {path.name}: {', '.join(sorted(missing))}")
    for line in headers.values():
        code, hash_, comment = lines[line - 1].rstrip("\n").partition("#")
        extra = f", {comment.strip()}" if hash_ else ""  # mutmut reads the pragma up to the first comma
        lines[line - 1] = f"{code.rstrip()}  # pragma: no mutate block{extra}\n"
    path.write_text("".join(lines))
    os.utime(path, (stat.st_atime, stat.st_mtime))


def _header_line(text: str, def_line: int) -> int:
    """Line of the colon that ends the def/class header starting at ``def_line``."""
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.start[0] < def_line or tok.type != tokenize.OP:
            continue
        if tok.string in "([{":
            depth += 1
        elif tok.string in ")]}":
            depth -= 1
        elif tok.string == ":" and depth == 0:
            return tok.start[0]
    raise ValueError(f"no header end after line {def_line}")


def mutmut(work: Path, args: list[str], log) -> int:
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1")}
    return subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def results(work: Path, module: str) -> dict[str, int]:
    meta = work / "mutants" / "src" / "cifarlab" / (module + ".meta")
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def show(work: Path, name: str) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(exe) if exe.exists() else "mutmut", "show", name], cwd=work,
                         capture_output=True, text=True)
    return out.stdout.strip()


def forget_survivors(work: Path, module: str) -> int:
    """Clear the recorded result of every surviving mutant, so that the next ``mutmut run`` tests
    them again (mutmut re-tests a function only when its code changed, not when the tests did:
    after adding tests for survivors, this is how they get their second chance)."""
    meta = work / "mutants" / "src" / "cifarlab" / (module + ".meta")
    if not meta.is_file():
        return 0
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    survivors = [k for k, v in codes.items() if v in SURVIVED]
    for k in survivors:
        codes[k] = None
    tmp = meta.with_suffix(".meta.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(meta)
    return len(survivors)


def tests_digest(tests: list[str]) -> str:
    """sha256 over the module's test files and conftest.py: what its survivors were tested against."""
    h = hashlib.sha256()
    for t in sorted({*tests, "tests/conftest.py"}):
        f = ROOT / t
        h.update(t.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"") + b"\0")
    return h.hexdigest()


def run_module(module: str, tests: list[str], skip: list[str], shared: dict, max_children: int,
               retest_survivors: bool = False) -> dict:
    work = stage(module, tests, skip, shared)
    # mutmut re-tests a function only when its code changed: when the module's tests changed since
    # the last run, its survivors get their second chance here without --retest-survivors
    digest_file = work / "tests.sha256"
    digest = tests_digest(tests)
    tests_changed = digest_file.is_file() and digest_file.read_text().strip() != digest
    if retest_survivors or tests_changed:
        why = "tests changed since the last run" if tests_changed and not retest_survivors else "--retest-survivors"
        print(f"{module}: {forget_survivors(work, module)} survivors to test again ({why})")
    t0 = time.time()
    with open(work / "mutmut.log", "w") as log:  # mutmut re-tests what changed since its last run
        rc = mutmut(work, ["run", "--max-children", str(max_children)], log)
    seconds = time.time() - t0
    digest_file.write_text(digest + "\n")
    codes = results(work, module)
    killed = sum(v in KILLED for v in codes.values())
    survived = sorted(k for k, v in codes.items() if v in SURVIVED)
    no_tests = sum(v in NO_TESTS for v in codes.values())
    other = len(codes) - killed - len(survived) - no_tests
    tested = killed + len(survived)
    score = 100.0 * killed / tested if tested else float("nan")
    with open(work / "survivors.txt", "w") as f:
        for name in survived:
            f.write(show(work, name) + "\n\n")
    row = dict(module=module, tests=tests, skip=skip, mutants=len(codes), killed=killed, survived=len(survived),
               no_tests=no_tests, other=other, score=score, seconds=seconds, mutmut_rc=rc, survivors=survived)
    print(f"{module}: {killed}/{tested} killed ({score:.1f}%), {len(survived)} survived, {no_tests} without "
          f"tests, {other} other; {seconds / 60:.1f} min; mutmut exit {rc}; log {work / 'mutmut.log'}")
    for name in survived:
        print(f"    survived: {name}")
    return row


def write_summary(rows: list[dict]) -> Path:
    """Merge these rows into build/mutate/summary.json and render summary.md."""
    store = WORK / "summary.json"
    known = json.loads(store.read_text()) if store.is_file() else {}
    for r in rows:
        known[r["module"]] = {**r, "date": time.strftime("%Y-%m-%d %H:%M")}
    store.write_text(json.dumps(known, indent=2))
    lines = ["| module | tests | mutants | killed | survived | no tests | score | time | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(known):
        r = known[m]
        lines.append(f"| {m} | {', '.join(Path(t).name for t in r['tests'])} | {r['mutants']} | {r['killed']} | "
                     f"{r['survived']} | {r['no_tests']} | {r['score']:.1f}% | {r['seconds'] / 60:.1f} min | {r['date']} |")
    out = WORK / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    shared, modules = load_config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help="modules under code/cifarlab (default: all configured)")
    p.add_argument("--max-children", type=int, default=1)
    p.add_argument("--list", action="store_true", help="print the configured modules and their tests")
    p.add_argument("--retest-survivors", action="store_true",
                   help="test the surviving mutants of the last run again (after adding tests)")
    args = p.parse_args(argv)
    if args.list:
        for m, v in modules.items():
            print(f"{m}: {' '.join(v['tests'])}" + (f" (skip {', '.join(v['skip'])})" if v["skip"] else ""))
        return 0
    chosen = args.modules or list(modules)
    unknown = [m for m in chosen if m not in modules]
    if unknown:
        print(f"error: not configured in [tool.cifarlab.mutate]: {', '.join(unknown)}; "
              f"choose from: {', '.join(modules)}", file=sys.stderr)
        return 2
    for m in chosen:  # the summary after each module: a long run stopped half-way keeps what it measured
        row = run_module(m, modules[m]["tests"], modules[m]["skip"], shared, args.max_children, args.retest_survivors)
        print(f"summary: {write_summary([row])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
