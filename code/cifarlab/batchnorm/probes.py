"""The three Santurkar et al. (2018) probes, as pure functions of (model, loss, batch, gradient).

At weights w with mini-batch gradient g = grad L(w), for each step size eta:

    loss_eta      = L(w - eta g)                                  (loss landscape)
    grad_diff_eta = ||grad L(w) - grad L(w - eta g)||_2           (gradient predictiveness)
    ratio_eta     = grad_diff_eta / ||eta g||_2
    beta          = max over eta of ratio_eta                     (effective beta-smoothness)

Norms are global: all parameters that have a gradient, flattened into one vector. Step sizes
are absolute (as in the common student version, eta in {0.2, 0.1, 0.05, 0.02, 0.01}), not
multiples of the learning rate.

Mode (a documented choice): the loss is the one the optimizer minimises, i.e. BatchNorm in
*train mode using the batch's statistics*; the running statistics are NOT updated, because the
forward passes run through ``torch.func.functional_call`` on cloned buffers. Weights are never
written (the shifted weights are new tensors), ``p.grad`` is never touched (gradients come from
``torch.autograd.grad`` on the shifted copies), and the RNG streams (CPU and the model's CUDA
device) are forked, so the training run continues exactly as without probing. Inside a probe
every forward pass starts from the same RNG state, so a model with dropout sees the same mask
at every eta (the loss differences then come from the weights alone).

Results are 0-d/1-d tensors left on the model's device: the caller decides when to sync.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torch.func import functional_call

from cifarlab.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_etas(etas: Iterable[float]) -> list[float]:
    """Step sizes as a list of positive finite floats, or ConfigError."""
    try:
        out = [float(e) for e in etas]
    except (TypeError, ValueError):
        raise ConfigError(f"probe step sizes must be numbers, got {etas!r}") from None
    if not out:
        raise ConfigError("probe step sizes must not be empty")
    bad = [e for e in out if not (math.isfinite(e) and e > 0)]
    if bad:
        raise ConfigError(f"probe step sizes must be positive and finite, got {bad}")
    return out


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors flattened into one vector (float32 accumulation)."""
    norms = [torch.linalg.vector_norm(t.float()) for t in tensors]
    if not norms:
        raise ConfigError("no gradients to probe: does the model have trainable parameters with .grad?")
    return torch.linalg.vector_norm(torch.stack(norms))


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool):
    """Set train/eval on every module for the probe and restore each module's own flag."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def _frozen_rng(device: torch.device):
    """Fork the RNG (restored on exit); ``reset()`` rewinds to the state at entry."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(cuda[0]) if cuda else None

        def reset():
            torch.set_rng_state(cpu_state)
            if cuda:
                torch.cuda.set_rng_state(cuda_state, cuda[0])

        yield reset


def param_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient the optimizer will use: ``p.grad`` of every trainable parameter that has one."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _loss_and_grad(model, loss_fn, params, buffers, names, x, y, autocast):
    """One functional forward/backward: (detached float loss, gradients of ``names``)."""
    with autocast():
        logits = functional_call(model, (params, buffers), (x,))
        loss = loss_fn(logits, y)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
    return loss.detach().float(), grads


def gradient_at(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                shift: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0,
                autocast: Callable = contextlib.nullcontext, train: bool = True):
    """(L(w - eta*shift), grad L(w - eta*shift)) without touching weights, .grad, buffers or RNG.

    Returns the loss (0-d float tensor) and a name -> gradient dict for the parameters in
    ``shift`` (all trainable parameters when ``shift`` is None).
    """
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    names = list(shift) if shift is not None else [n for n, p in named.items() if p.requires_grad]
    with _mode(model, train), _frozen_rng(device), torch.enable_grad():
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        params = {n: p.detach() for n, p in named.items()}
        for n in names:
            w = params[n] if shift is None else params[n] - eta * shift[n].to(params[n].dtype)
            params[n] = w.detach().requires_grad_(True)
        loss, grads = _loss_and_grad(model, loss_fn, params, buffers, names, x, y, autocast)
    return loss, dict(zip(names, grads))


def probe_along_gradient(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                         etas: Iterable[float], grad: Mapping[str, torch.Tensor] | None = None,
                         base_grad: Mapping[str, torch.Tensor] | None = None,
                         autocast: Callable = contextlib.nullcontext,
                         train: bool = True) -> dict[str, torch.Tensor]:
    """Loss, gradient difference and their ratio along -g for each eta, plus beta.

    ``grad`` is the direction g (default: the parameters' ``.grad``, i.e. the gradient the
    optimizer is about to use). ``base_grad`` is grad L(w) in the difference; it defaults to
    ``grad``, which is exact when ``.grad`` came from this batch in this mode on one process.
    (Under DistributedDataParallel ``.grad`` is averaged over ranks: pass the local gradient
    from ``gradient_at`` as ``base_grad``.)

    Returns tensors on the model's device: ``eta`` [E], ``loss`` [E], ``grad_diff`` [E],
    ``ratio`` [E], ``beta`` (0-d, max of ratio), ``grad_norm`` (0-d, ||g||).
    A zero gradient gives ratio NaN (0/0: no direction to probe).
    """
    etas = check_etas(etas)
    g = dict(grad) if grad is not None else param_grads(model)
    base = dict(base_grad) if base_grad is not None else g
    names = list(g)
    if not names:
        raise ConfigError("no gradients to probe: call backward() first or pass grad=")
    missing = [n for n in names if n not in base]
    if missing:
        raise ConfigError(f"base_grad lacks parameters {missing[:3]}")
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    g_list = [g[n].detach() for n in names]
    base_list = [base[n].detach() for n in names]
    g_norm = global_norm(g_list)
    losses, diffs = [], []
    with _mode(model, train), _frozen_rng(device) as reset_rng, torch.enable_grad():
        # one clone of the buffers per probe: in train mode BN reads batch statistics, so the
        # (discarded) running-stat updates on the clones never influence the outputs
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        frozen = {n: p.detach() for n, p in named.items()}
        for eta in etas:
            params = dict(frozen)
            for n, gn in zip(names, g_list):
                params[n] = (frozen[n] - eta * gn.to(frozen[n].dtype)).requires_grad_(True)
            reset_rng()
            loss, grads = _loss_and_grad(model, loss_fn, params, buffers, names, x, y, autocast)
            losses.append(loss)
            diffs.append(global_norm([b.float() - a.float() for a, b in zip(base_list, grads)]))
    eta_t = torch.tensor(etas, device=device, dtype=torch.float32)
    loss_t = torch.stack(losses)
    diff_t = torch.stack(diffs)
    ratio = diff_t / (eta_t * g_norm)
    return {"eta": eta_t, "loss": loss_t, "grad_diff": diff_t, "ratio": ratio,
            "beta": ratio.max(), "grad_norm": g_norm}
