"""EDropout overhead benchmark: a search-phase step and a frozen step against a plain step.

``bench_edropout`` runs the Trainer's own step (``train.trainer.train_step``: forward + loss, backward,
after-backward hooks, optimizer step, batch-end hooks) on random data in three variants
  plain  : no callback;
  search : the EDropout callback scoring NS candidates, evolving and masking the step;
  frozen : the callback after early convergence (mask only, no search);
interleaved round by round (plain, search, frozen, plain, ...) so that a shared machine's
drifting load hits all three alike, and reports the median step times and the two ratios.
The issue's targets: search <= 4x plain (8 no-grad candidate forwards on top of one
forward + backward: about 3.7x is the floor), frozen <= 1.1x.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_edropout(model: str = "resnet18", device: str = "cpu", batch_size: int = 128, steps: int = 3,
                   warmup: int = 1, states: int = 8, image_size: int = 32, in_channels: int = 3,
                   num_classes: int = 10, chunk: int | None = None, probe: bool | None = None, amp: str = "auto",
                   channels_last: str = "auto", seed: int = 0) -> dict:
    """Median seconds per training step (plain / EDropout search / EDropout frozen) and the ratios."""
    from cifarlab.config import make_config
    from cifarlab.edropout.callback import EDropout
    from cifarlab.models import build_model
    from cifarlab.optim import build_optimizer
    from cifarlab.train.trainer import train_step

    dev = torch.device(device)
    torch.manual_seed(seed)
    net = build_model(model, num_classes=num_classes, in_channels=in_channels).to(dev)
    on_gpu = dev.type == "cuda"
    use_cl = channels_last == "on" or (channels_last == "auto" and on_gpu)
    use_bf16 = amp == "bf16" or (amp == "auto" and on_gpu)
    if use_cl:
        net = net.to(memory_format=torch.channels_last)
    cfg = make_config(model=model, recipe="edropout", edropout_states=states, seed=seed)
    opt = build_optimizer(cfg, net)
    x = torch.randn(batch_size, in_channels, image_size, image_size, device=dev)
    if use_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    trainer = SimpleNamespace(cfg=cfg, model=net, train_model=net, optimizer=opt, device=dev, epoch=1, callbacks=[],
                              global_step=0, autocast=autocast, loss_fn=lambda z, t: F.cross_entropy(z, t),
                              rundir=None, run_dir=None, is_main=True)
    search = EDropout(states=states, freeze_epoch=10**9, chunk=chunk, probe=probe, seed=seed, export=False)
    search.setup(net, dev)
    frozen = EDropout(states=states, freeze_epoch=10**9, seed=seed, export=False)
    frozen.setup(net, dev)
    frozen.masks.remove()  # one set of masking forwards at a time: switched per variant below
    frozen.masks = search.masks
    frozen.frozen = True
    frozen.state = search.pop[0].clone()

    def step(cb):
        trainer.callbacks = [] if cb is None else [cb]
        _, loss = train_step(trainer, x, y)
        if cb is not None:
            cb.on_batch_end(trainer, loss)

    def timed(cb) -> float:
        if cb is None:
            search.masks.remove()  # the plain step runs the untouched model
        else:
            search.masks.install()
        _sync(dev)
        t0 = time.perf_counter()
        step(cb)
        _sync(dev)
        return time.perf_counter() - t0

    variants = {"plain": None, "search": search, "frozen": frozen}
    for _ in range(warmup):
        for cb in variants.values():
            timed(cb)
    times = {k: [] for k in variants}
    for _ in range(steps):
        for k, cb in variants.items():
            times[k].append(timed(cb))
    search.masks.remove()
    probing = probe if probe is not None else dev.type == "cpu"
    scoring = "probe (one forward per candidate, kept filters only)" if probing else \
        f"stacked ({chunk or states} candidates per forward)"
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model, "device": str(dev), "batch_size": batch_size, "states": states, "steps": steps,
        "units": search.masks.size, "scoring": scoring, "bf16": use_bf16, "channels_last": use_cl,
        "plain_step_s": med["plain"], "search_step_s": med["search"], "frozen_step_s": med["frozen"],
        "search_ratio": med["search"] / med["plain"], "frozen_ratio": med["frozen"] / med["plain"],
        "threads": torch.get_num_threads(),
    }


def format_result(r: dict) -> str:
    return (f"EDropout bench: {r['model']} on {r['device']}, batch {r['batch_size']}, {r['states']} states "
            f"({r['units']} units; scoring: {r['scoring']}), {r['steps']} timed steps per variant\n"
            f"  plain step   {r['plain_step_s'] * 1e3:9.1f} ms\n"
            f"  search step  {r['search_step_s'] * 1e3:9.1f} ms   {r['search_ratio']:.2f}x plain (target <= 4x)\n"
            f"  frozen step  {r['frozen_step_s'] * 1e3:9.1f} ms   {r['frozen_ratio']:.2f}x plain (target <= 1.1x)")
