#!/usr/bin/env python
"""`make gpu-check`: the CUDA paths, checked in one prepared run on a machine with one GPU.

    PYTHONPATH=code python scripts/gpu_check.py            # on the GPU (< 8 minutes)
    PYTHONPATH=code python scripts/gpu_check.py --cpu      # the same steps on the CPU, toy size

Needs PyTorch and the package's dependencies already installed; no network. Each step runs in
its own subprocess with a timeout (capped by what is left of --budget, 450 s by default) and
writes its figures into OUT/summary.json and OUT/summary.md (logs in OUT/logs/). Steps:

  env               torch / CUDA / GPU, the dependencies that import
  cuda_tests        pytest tests/test_gpu_paths.py -k test_cuda_ (skipped without pytest)
  train_eager       resnet18 on synthetic CIFAR-shaped data, a few hundred steps: images/s
  train_compile     the same with --compile: images/s, dynamo recompiles and CUDA-graph re-recordings
                    (TORCH_LOGS=recompiles,cudagraphs); a recompile fails the step
  bench_throughput  python -m cifarlab bench throughput on the device
  host_syncs        host synchronisations per training step (SGD, SLBI eager, SLBI fused)
  slbi_fused        SLBI's fused (torch.compile) step vs the eager one: ms/step, max |difference|
  kill_resume       SIGKILL mid-run, then --resume: the run finishes with every epoch
  edropout          one EDropout run
  cam               Grad-CAM (`cam`) on the train_eager run

Exit status 0 when every step that ran passed. Runs go to a temporary folder (--work to keep).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "code"
if str(CODE) not in sys.path:  # the package from ./code when it is not installed
    sys.path.insert(0, str(CODE))


class StepFailed(Exception):
    """A step ran but its result is wrong (the message says what)."""


@dataclass
class Size:
    """How big each step is: the GPU run, or the CPU dry run's toy size."""
    model: str
    train_args: list[str]  # data and length of the training runs
    batch: int
    bench_args: list[str]
    kill_epochs: int
    edropout_args: list[str]
    fused_model: str
    fused_steps: int


GPU_SIZE = Size(
    model="resnet18",
    # synthetic: 4,500 training images (10% validation), 35 steps of 128 per epoch; 8 epochs = 280 steps
    train_args=["--dataset", "synthetic", "--epochs", "8", "--batch-size", "128"],
    batch=128,
    bench_args=["--steps", "20", "--repeats", "3"],
    kill_epochs=4,
    edropout_args=["--epochs", "2", "--batch-size", "128", "--edropout-freeze-epoch", "1"],
    fused_model="resnet18",
    fused_steps=20,
)
CPU_SIZE = Size(
    model="lenet5",
    # 500 = 7 x 64 + a ragged 52: --compile must drop it (no recompile)
    train_args=["--dataset", "synthetic", "--train-subset", "500", "--test-subset", "128", "--epochs", "2",
                "--batch-size", "64"],
    batch=64,
    bench_args=["--steps", "2", "--repeats", "1", "--batch-size", "32"],
    kill_epochs=4,
    edropout_args=["--train-subset", "256", "--test-subset", "128", "--epochs", "2", "--batch-size", "64",
                   "--edropout-freeze-epoch", "1"],
    fused_model="lenet5",
    fused_steps=5,
)


@dataclass
class Ctx:
    device: str
    size: Size
    out: Path
    work: Path
    deadline: float
    skip: set[str]
    env: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None,
            log_suffix: str = "") -> subprocess.CompletedProcess:
        """Run cmd with a timeout capped by the budget; its output goes to OUT/logs/NAME.log."""
        limit = max(1.0, min(timeout, self.left()))
        t0 = time.monotonic()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                 timeout=limit)
        except subprocess.TimeoutExpired as exc:
            self.log(name + log_suffix, cmd, _text(exc.stdout), _text(exc.stderr), None, time.monotonic() - t0)
            raise TimeoutError(f"{' '.join(cmd[:6])} ... ran past {limit:.0f} s") from None
        self.log(name + log_suffix, cmd, res.stdout, res.stderr, res.returncode, time.monotonic() - t0)
        return res

    def log(self, name, cmd, stdout, stderr, rc, wall) -> None:
        path = self.out / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        tail = 20000  # keep logs small: the end says what went wrong
        text = (f"$ {' '.join(cmd)}\n# rc={rc} wall={wall:.1f}s\n--- stdout ---\n{(stdout or '')[-tail:]}\n"
                f"--- stderr ---\n{(stderr or '')[-tail:]}\n")
        with open(path, "a") as f:
            f.write(text)

    def check(self, res: subprocess.CompletedProcess, what: str) -> None:
        if res.returncode != 0:
            lines = (res.stderr or res.stdout or "").strip().splitlines()
            raise StepFailed(f"{what} exited {res.returncode}: {lines[-1][:300] if lines else '(no output)'}")


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def cifarlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifarlab", *args]


def worker(name: str, ctx: Ctx, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", ctx.device, *extra]


def worker_result(res: subprocess.CompletedProcess) -> dict:
    for line in reversed(res.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StepFailed("the worker printed no result")


def read_metrics(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def count_recompiles(log: str) -> int:
    """Dynamo's 'Recompiling function ...' lines (TORCH_LOGS=recompiles)."""
    return len(re.findall(r"Recompiling function", log))


def count_cudagraph_rerecords(log: str) -> int:
    """Inductor's 'Re-recording function=...' lines (TORCH_LOGS=cudagraphs; CUDA graphs on the GPU)."""
    return len(re.findall(r"Re-recording function", log))


def train_run(ctx: Ctx, name: str, extra: list[str], timeout: float, env=None) -> tuple[Path, dict, str]:
    run_dir = ctx.work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    res = ctx.run(name, cifarlab("train", "--model", ctx.size.model, *ctx.size.train_args, "--device", ctx.device,
                                 "--progress", "off", "--run-dir", str(run_dir), *extra), timeout, env=env)
    ctx.check(res, "train")
    rows = read_metrics(run_dir)
    rates = [float(r["images_per_s"]) for r in rows]
    steady = rates[1:] or rates  # epoch 1 holds the warm-up (and the compile)
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir, {"epochs": len(rows), "images_per_s": round(statistics.median(steady), 1),
                     "first_epoch_s": round(float(rows[0]["epoch_time_s"]), 2),
                     "steps": len(rows) * -(-int(summary["train_images"]) // ctx.size.batch),
                     "test_acc": summary.get("test_acc"), "wall_s": round(summary["wall_time_s"], 1)}, res.stderr


# -- the steps -----------------------------------------------------------------------------------------

def step_env(ctx: Ctx) -> dict:
    import importlib.util
    import platform

    import torch

    deps = {}
    for mod in ("cifarlab", "numpy", "pandas", "matplotlib", "yaml", "tqdm", "pytorch_grad_cam", "torch_pruning",
                "pytest", "triton"):
        try:  # found, not imported: the steps import them in their own processes
            deps[mod] = "ok" if importlib.util.find_spec(mod) is not None else "missing"
        except Exception as exc:  # a broken install is a finding, not a crash
            deps[mod] = f"broken ({type(exc).__name__})"
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "cuda": torch.version.cuda, "deps": deps, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    if not ctx.cpu and not torch.cuda.is_available():
        raise StepFailed("no CUDA device: run with --cpu for the dry run")
    if deps["cifarlab"] != "ok":
        raise StepFailed("cifarlab does not import (run from the repository root, PYTHONPATH=code)")
    return info


def step_cuda_tests(ctx: Ctx) -> dict:
    if ctx.results.get("env", {}).get("deps", {}).get("pytest", "ok") != "ok":
        return {"skipped": "pytest is not installed"}
    res = ctx.run("cuda_tests", [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:xdist",
                                 "tests/test_gpu_paths.py", "-k", "test_cuda_", "-o", "addopts="], 150)
    last = (res.stdout.strip().splitlines() or ["?"])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", last)}
    if res.returncode != 0:
        raise StepFailed(f"pytest: {last}")
    if not ctx.cpu and counts.get("passed", 0) == 0:
        raise StepFailed(f"no CUDA test ran: {last}")
    return {"pytest": last, **counts}


def step_train_eager(ctx: Ctx) -> dict:
    run_dir, r, _ = train_run(ctx, "train_eager", [], 120)
    ctx.results["_eager_run"] = str(run_dir)
    return r


def step_train_compile(ctx: Ctx) -> dict:
    _, r, err = train_run(ctx, "train_compile", ["--compile"], 240, env={"TORCH_LOGS": "recompiles,cudagraphs"})
    r["recompiles"] = count_recompiles(err)
    if not ctx.cpu:  # --compile-mode auto = reduce-overhead on the GPU: CUDA graphs
        r["cudagraph_rerecords"] = count_cudagraph_rerecords(err)
    eager = ctx.results.get("train_eager", {}).get("images_per_s")
    if eager:
        r["speedup_vs_eager"] = round(r["images_per_s"] / eager, 2)
    if r["recompiles"]:
        raise StepFailed(f"{r['recompiles']} recompile(s): one batch shape per epoch expected (see logs)")
    return r


def step_bench_throughput(ctx: Ctx) -> dict:
    model = ctx.size.model
    res = ctx.run("bench_throughput", cifarlab("bench", "throughput", "--model", model, "--device", ctx.device,
                                               *ctx.size.bench_args, "--out", str(ctx.out / "bench")), 120)
    ctx.check(res, "bench throughput")
    saved = sorted((ctx.out / "bench").glob(f"throughput-{model}-*.json"))[-1]
    r = json.loads(saved.read_text())
    return {"classic_images_per_s": round(r["classic"]["train_images_per_s"], 1),
            "cifarlab_images_per_s": round(r["cifarlab"]["train_images_per_s"], 1),
            "ratio": round(r["ratio"], 2), "json": str(saved.relative_to(ctx.out))}


def step_host_syncs(ctx: Ctx) -> dict:
    extra = [] if "slbi_fused" not in ctx.skip else ["--no-fused"]
    res = ctx.run("host_syncs", worker("host_syncs", ctx, "--model", ctx.size.model, *extra), 180)
    ctx.check(res, "host_syncs worker")
    r = worker_result(res)
    bad = {k: v for k, v in r["syncs_per_step"].items() if v != 0}
    if bad:
        raise StepFailed(f"host syncs inside a training step: {bad} ({r['where']})")
    return r


def step_slbi_fused(ctx: Ctx) -> dict:
    res = ctx.run("slbi_fused", worker("slbi_fused", ctx, "--model", ctx.size.fused_model,
                                       "--steps", str(ctx.size.fused_steps)), 180)
    ctx.check(res, "slbi_fused worker")
    r = worker_result(res)
    if not r["fused_ran"]:
        raise StepFailed("the fused step fell back to eager (torch.compile failed: see logs)")
    if r["max_abs_diff"] > 1e-4:
        raise StepFailed(f"fused and eager steps differ by {r['max_abs_diff']:.2e}")
    return r


def step_kill_resume(ctx: Ctx) -> dict:
    run_dir = ctx.work / "kill_resume"
    shutil.rmtree(run_dir, ignore_errors=True)
    epochs = ctx.size.kill_epochs
    args = cifarlab("train", "--model", ctx.size.model, *ctx.size.train_args, "--device", ctx.device,
                    "--progress", "off", "--run-dir", str(run_dir), "--epochs", str(epochs))
    last = run_dir / "checkpoints" / "last.pt"
    log = (ctx.out / "logs" / "kill_resume.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(args, cwd=ROOT, env=ctx.env, stdout=f, stderr=subprocess.STDOUT)
        limit = min(150.0, ctx.left())
        try:
            while not last.is_file():  # epoch 1 written: kill during epoch 2
                if proc.poll() is not None:
                    raise StepFailed(f"the run ended (rc {proc.returncode}) before its first checkpoint")
                if time.monotonic() - t0 > limit:
                    raise TimeoutError("no checkpoint within the time left")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise StepFailed(f"the run was not killed mid-run (rc {proc.returncode}): make it longer")
    done = len(read_metrics(run_dir))
    if done >= epochs:
        raise StepFailed("the run had finished before the kill")
    res = ctx.run("kill_resume", args + ["--resume"], max(30.0, 150.0 - (time.monotonic() - t0)),
                  log_suffix="")
    ctx.check(res, "train --resume")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    if summary["epochs_completed"] != epochs or [int(r["epoch"]) for r in rows] != list(range(1, epochs + 1)):
        raise StepFailed(f"resumed run has epochs {[r['epoch'] for r in rows]}, expected 1..{epochs}")
    return {"epochs": epochs, "killed_after_epoch": done, "epochs_completed": summary["epochs_completed"],
            "test_acc": summary.get("test_acc"), "wall_s": round(time.monotonic() - t0, 1)}


def step_edropout(ctx: Ctx) -> dict:
    run_dir = ctx.work / "edropout"
    shutil.rmtree(run_dir, ignore_errors=True)
    res = ctx.run("edropout", cifarlab("train", "--recipe", "edropout", "--model", ctx.size.model, "--dataset",
                                       "synthetic", *ctx.size.edropout_args, "--device", ctx.device, "--progress",
                                       "off", "--run-dir", str(run_dir)), 150)
    ctx.check(res, "train --recipe edropout")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    return {"epochs_completed": summary["epochs_completed"], "test_acc": summary.get("test_acc"),
            "images_per_s": round(statistics.median(float(r["images_per_s"]) for r in rows), 1),
            "params_kept_pct": summary.get("params_kept_pct")}


def step_cam(ctx: Ctx) -> dict:
    run_dir = Path(ctx.results.get("_eager_run") or ctx.work / "cam_run")
    if not (run_dir / "checkpoints" / "best.pt").is_file():  # train_eager skipped or failed: a short run
        shutil.rmtree(run_dir, ignore_errors=True)
        res = ctx.run("cam", cifarlab("train", "--model", ctx.size.model, *ctx.size.train_args, "--epochs", "1",
                                      "--device", ctx.device, "--progress", "off", "--run-dir", str(run_dir)), 90,
                      log_suffix="_train")
        ctx.check(res, "train (for cam)")
    out = ctx.out / "gradcam.png"
    res = ctx.run("cam", cifarlab("cam", "--run-dir", str(run_dir), "--n", "4", "--methods", "gradcam,gradcam++",
                                  "--device", ctx.device, "--out", str(out)), 90)
    ctx.check(res, "cam")
    meta = json.loads(out.with_suffix(".json").read_text())
    if not out.is_file():
        raise StepFailed("cam wrote no figure")
    return {"layer": meta["layer"], "road_combined": meta["road_combined"], "figure": out.name}


@dataclass
class Step:
    name: str
    fn: Callable[[Ctx], dict]
    doc: str


STEPS = [
    Step("env", step_env, "torch, CUDA, GPU, dependencies"),
    Step("cuda_tests", step_cuda_tests, "pytest tests/test_gpu_paths.py -k test_cuda_"),
    Step("train_eager", step_train_eager, "training run, eager"),
    Step("train_compile", step_train_compile, "training run, --compile (recompiles counted)"),
    Step("bench_throughput", step_bench_throughput, "bench throughput"),
    Step("host_syncs", step_host_syncs, "host syncs per training step"),
    Step("slbi_fused", step_slbi_fused, "SLBI fused vs eager step"),
    Step("kill_resume", step_kill_resume, "SIGKILL mid-run, then --resume"),
    Step("edropout", step_edropout, "one EDropout run"),
    Step("cam", step_cam, "Grad-CAM on the eager run"),
]


# -- workers (run in their own process by the steps above) ----------------------------------------------

def _worker_trainer(device: str, model: str, optimizer: str, fused: str):
    from cifarlab.config import make_config
    from cifarlab.train import Trainer

    cfg = make_config(model=model, dataset="synthetic", train_subset=1024, test_subset=128, batch_size=128,
                      lr=0.05, device=device, progress="off", epochs=1, optimizer=optimizer, slbi_fused=fused)
    tr = Trainer(cfg, write=False)
    tr._setup()
    return tr


def work_host_syncs(args) -> dict:
    import torch

    from cifarlab.optim.slbi import fused_step_available
    from cifarlab.train.host_sync import count_host_syncs
    from cifarlab.train.trainer import train_step

    dev = torch.device(args.device)
    cases = {"sgd": ("sgd", "off"), "slbi_eager": ("slbi", "off")}
    if not args.no_fused and fused_step_available(dev):
        cases["slbi_fused"] = ("slbi", "on")
    per_step, per_epoch, where, steps = {}, {}, {}, 5
    for name, (opt, fused) in cases.items():
        tr = _worker_trainer(args.device, args.model, opt, fused)
        x, y = next(iter(tr.data.train))
        for _ in range(3):  # warm: state allocated, the fused step compiled
            train_step(tr, x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with count_host_syncs(dev) as c:
            for _ in range(steps):
                train_step(tr, x, y)
        per_step[name] = c.syncs / steps
        where[name] = c.where[:5]
        with count_host_syncs(dev) as c:
            tr._train_epoch(1)
        per_epoch[name] = {"syncs": c.syncs, "steps": len(tr.data.train)}
        if fused == "on" and tr.optimizer.compiled is not True:
            per_step[name] = float("nan")
            where[name] = ["the fused step fell back to eager"]
    return {"syncs_per_step": per_step, "per_epoch": per_epoch, "where": where,
            "note": "per epoch: the one read of the epoch's sums on a GPU (0 on the CPU: .tolist of a CPU tensor)"}


def work_slbi_fused(args) -> dict:
    import copy

    import torch

    from cifarlab.models import build_model
    from cifarlab.optim.slbi import SLBI, slbi_param_groups

    dev = torch.device(args.device)
    torch.manual_seed(0)
    base = build_model(args.model).to(dev)
    g = torch.Generator().manual_seed(1)
    grads = [(torch.randn(p.shape, generator=g) * 1e-2).to(dev) for p in base.parameters()]
    runs = {}
    for name, compiled in (("eager", False), ("fused", True)):
        net = copy.deepcopy(base)
        opt = SLBI(slbi_param_groups(net, lam=1e-3), lr=0.1, mu=10.0, momentum=0.9, weight_decay=5e-4,
                   compiled=compiled)
        times = []
        for i in range(args.steps + 3):
            for p, gr in zip(net.parameters(), grads):
                p.grad = gr
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # warm-up (buffers, compiling) not timed
                times.append(time.perf_counter() - t0)
        runs[name] = (net, opt, 1e3 * statistics.median(times))
    (ne, oe, te), (nf, of, tf) = runs["eager"], runs["fused"]
    diff = max((a - b).abs().max().item() for a, b in zip(ne.parameters(), nf.parameters()))
    gdiff = max((oe.state[a]["gamma"] - of.state[b]["gamma"]).abs().max().item()
                for a, b in zip(ne.parameters(), nf.parameters()) if "gamma" in oe.state[a])
    return {"model": args.model, "steps": args.steps, "eager_ms": round(te, 3), "fused_ms": round(tf, 3),
            "speedup": round(te / tf, 2), "max_abs_diff": max(diff, gdiff), "fused_ran": of.compiled is True}


WORKERS = {"host_syncs": work_host_syncs, "slbi_fused": work_slbi_fused}


# -- the driver -----------------------------------------------------------------------------------------

def write_summary(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    env = next((s["result"] for s in summary["steps"] if s["name"] == "env" and s.get("result")), {})
    lines = [f"# gpu-check ({'CPU dry run' if summary['device'] == 'cpu' else summary['device']})", "",
             f"{summary['date']}; machine: {env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda')}; total {summary['wall_s']:.0f} s (budget {summary['budget_s']:.0f} s); "
             f"command: `{summary['command']}`", "",
             "| step | status | wall s | result |", "|---|---|---|---|"]
    for s in summary["steps"]:
        res = s.get("error") or ", ".join(f"{k}: {v}" for k, v in (s.get("result") or {}).items()
                                          if not isinstance(v, (dict, list)))
        if s["name"] == "host_syncs" and s.get("result"):
            res = "syncs/step " + json.dumps(s["result"]["syncs_per_step"])
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {res.replace('|', '/')} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run: the same steps on the CPU at toy size")
    ap.add_argument("--out", default=None, help="summary folder (default bench/gpu-check, bench/gpu-check-cpu)")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all steps (default 450 on the GPU: under 8 minutes in all; 1200 with --cpu)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet18", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--no-fused", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # one step's in-process part, in its own process
        print(json.dumps(WORKERS[args.worker](args), default=str))
        return 0

    names = [s.name for s in STEPS]
    skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    for s in skip | only:
        if s not in names:
            print(f"error: unknown step {s!r}; steps: {', '.join(names)}", file=sys.stderr)
            return 2
    if only:
        skip |= set(names) - only
    device = "cpu" if args.cpu else "cuda"
    budget = args.budget or (1200.0 if args.cpu else 450.0)
    out = Path(args.out or (ROOT / "bench" / ("gpu-check-cpu" if args.cpu else "gpu-check")))
    if (out / "logs").is_dir():
        shutil.rmtree(out / "logs")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    # synthetic data everywhere: no files, no network
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CODE), os.environ.get("PYTHONPATH")]))}
    if args.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    t_start = time.monotonic()
    ctx = Ctx(device=device, size=CPU_SIZE if args.cpu else GPU_SIZE, out=out, work=work,
              deadline=t_start + budget, skip=skip, env=env)
    summary = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "budget_s": budget, "command": " ".join(["scripts/gpu_check.py", *(argv or sys.argv[1:])]),
               "steps": []}
    failed = False
    try:
        for step in STEPS:
            entry = {"name": step.name, "doc": step.doc, "status": "skipped", "wall_s": 0.0}
            summary["steps"].append(entry)
            if step.name in skip:
                continue
            if ctx.left() < 5:
                entry.update(status="out of time")
                failed = True
                continue
            t0 = time.monotonic()
            print(f"[gpu-check] {step.name} ...", file=sys.stderr, flush=True)
            try:
                result = step.fn(ctx)
                ctx.results[step.name] = result
                entry.update(status="ok", result=result)
            except StepFailed as exc:
                entry.update(status="failed", error=str(exc))
            except TimeoutError as exc:
                entry.update(status="timeout", error=str(exc))
            except Exception as exc:  # a broken step must not lose the others' figures
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
            entry["wall_s"] = round(time.monotonic() - t0, 1)
            failed |= entry["status"] != "ok"
            print(f"[gpu-check] {step.name}: {entry['status']} ({entry['wall_s']} s)"
                  + (f" - {entry['error']}" if entry.get("error") else ""), file=sys.stderr, flush=True)
            summary["wall_s"] = time.monotonic() - t_start
            write_summary(out, summary)  # after every step: a killed check keeps what it measured
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = time.monotonic() - t_start
    write_summary(out, summary)
    print(f"[gpu-check] {'FAILED' if failed else 'passed'} in {summary['wall_s']:.0f} s; summary: "
          f"{out / 'summary.md'}", file=sys.stderr)
    print((out / "summary.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
