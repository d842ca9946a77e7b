"""`python -m cifarlab bench throughput|optimizer|edropout`: side-by-side speed ratios, each saying
the machine it ran on (CPU model and features, threads, torch, GPU)."""
from __future__ import annotations

from cifarlab.errors import ConfigError

NAME = "bench"
HELP = "benchmarks: training throughput vs the classic loop, optimizer step cost, EDropout overhead"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, help_ in (("throughput", "classic pytorch-cifar loop vs cifarlab's Trainer (ratio b/a last)"),
                        ("optimizer", "one step of each optimizer as a ratio to SGD"),
                        ("edropout", "EDropout search-phase and frozen step as ratios to a plain step")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--model", default="resnet18")
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        p.add_argument("--out", default="bench/results", help="folder for the JSON result")
        if name in ("throughput", "edropout"):
            p.add_argument("--batch-size", type=int, default=128)
            p.add_argument("--steps", type=int, default=10, help="timed training steps per repeat")
        if name == "throughput":
            p.add_argument("--repeats", type=int, default=3)
            p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cifar10", "fashion"])
            p.add_argument("--data-root", default="data")
            p.add_argument("--compile", action="store_true", help="also torch.compile the cifarlab model")
        if name == "optimizer":
            p.add_argument("--repeats", type=int, default=20)
            p.add_argument("--optimizers", default=None, help="comma-separated subset (default: all)")


def _check(args) -> None:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but no CUDA GPU is available")
    for name in ("batch_size", "steps", "repeats"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
    from cifarlab.models import available_models

    if args.model not in available_models():
        raise ConfigError(f"unknown model {args.model!r}; choose one of: {', '.join(available_models())}")


def run(args) -> int:
    import torch

    from cifarlab import bench

    if not getattr(args, "bench", None):
        raise ConfigError("choose a benchmark: throughput, optimizer or edropout")
    _check(args)
    if args.bench == "throughput":
        r = bench.bench_throughput(args.model, args.device, args.batch_size, args.steps, args.repeats,
                                   args.dataset, args.data_root, args.compile, args.out)
        text = bench.format_throughput(r)
    elif args.bench == "optimizer":
        opts = args.optimizers.split(",") if args.optimizers else None
        r = bench.bench_optimizer(args.model, args.device, args.repeats, opts, args.out)
        text = bench.format_optimizer(r)
    else:
        from cifarlab.edropout.bench import bench_edropout, format_result
        from cifarlab.train.precision import resolve_amp

        dev = torch.device(args.device)
        # the precision training would use here (--amp auto: bf16 where the CPU or GPU has it natively)
        amp = resolve_amp("auto", dev)
        r = bench_edropout(model=args.model, device=args.device, batch_size=args.batch_size, steps=args.steps,
                           amp=amp.amp)
        r.update(bench="edropout", amp_reason=amp.reason, **bench.machine_fields(dev))
        bench._save(r, args.out, f"edropout-{args.model}-{dev.type}")
        text = f"machine: {r['machine']}\n" + format_result(r)
    import sys

    print(f"saved {r['saved_to']}", file=sys.stderr)
    print(text)  # the ratio is the last line
    return 0
