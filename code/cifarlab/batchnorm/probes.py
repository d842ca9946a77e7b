"""The three Santurkar et al. (2018) probes, as pure functions of (model, loss, batch, gradient).

At weights w with mini-batch gradient g (the direction the optimizer is about to use), for each
step size eta:

    loss_eta      = L(w - eta g)                                  (loss landscape)
    grad_diff_eta = ||grad L(w) - grad L(w - eta g)||_2           (gradient predictiveness)
    ratio_eta     = grad_diff_eta / ||eta g||_2
    beta          = max over eta of ratio_eta                     (effective beta-smoothness)

Norms are global: all parameters that have a gradient, flattened into one vector.

Two kinds of step sizes:
- absolute (``etas``): eta itself, as in the common student version, eta in {0.2, 0.1, 0.05,
  0.02, 0.01}. The distance moved, ||eta g||, then scales with the gradient norm, which differs
  between networks by more than 20x (issue 13: median ||g|| 0.28 with BN, 6.2 without), so the
  two networks are probed at different distances.
- relative (``rel_etas``): a fraction of the gradient step. One step of the course's optimizer
  (Adam) moves every coordinate by about lr, so its length is about ``step = lr * sqrt(P)`` for P
  parameters; eta_rel moves the distance ``eta_rel * step`` along -g, i.e.
  eta = eta_rel * step / ||g||. The paper moves up to 0.4 times the gradient step. Both networks
  of a pair (P differs by 2 per BN channel) are probed at the same distances.

Mode and precision (documented choices):
- The loss is the one the optimizer minimises: BatchNorm in *train mode using the batch's
  statistics*; the running statistics are NOT updated (the forwards run through
  ``torch.func.functional_call`` on cloned buffers).
- Always in the model's own precision: autocast is switched off inside the probe even when
  training runs under bf16 autocast, so small-step differences measure the landscape, not
  bf16 rounding. Gradient differences are taken in the parameters' dtype (float64 for a float64
  model) before the norm is converted to float32.
- The reference gradient grad L(w) is computed here, with the same RNG state as every shifted
  forward: a model with dropout sees one mask in all of them, so grad_diff -> 0 as eta -> 0.
  (The training pass's ``.grad`` was taken with another mask, and under DDP it is the mean over
  ranks; it stays the direction g.)

Weights are never written (the shifted weights are new tensors), ``p.grad`` is never touched,
and the RNG streams (CPU and the model's CUDA device) are forked, so the training run continues
exactly as without probing. Results are tensors left on the model's device; nothing is read
back to the host (the caller decides when to sync).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Mapping

import torch
import torch.nn as nn
from torch.func import functional_call

from cifarlab.errors import ConfigError


def check_etas(etas: Iterable[float], allow_empty: bool = False, what: str = "probe step sizes") -> list[float]:
    """Step sizes as a list of positive finite floats, or ConfigError."""
    try:
        out = [float(e) for e in etas]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be numbers, got {etas!r}") from None
    if not out and not allow_empty:
        raise ConfigError(f"{what} must not be empty")
    bad = [e for e in out if not (math.isfinite(e) and e > 0)]
    if bad:
        raise ConfigError(f"{what} must be positive and finite, got {bad}")
    return out


def _norm32(t: torch.Tensor) -> torch.Tensor:
    """L2 norm in the tensor's own precision (float32 at least), returned as float32."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return torch.linalg.vector_norm(t).float()


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors flattened into one vector (a 0-d float32 tensor)."""
    norms = [_norm32(t) for t in tensors]
    if not norms:
        raise ConfigError("no gradients to probe: does the model have trainable parameters with .grad?")
    return torch.linalg.vector_norm(torch.stack(norms))


def gradient_step_length(lr: float, n_params: int) -> float:
    """Length of one Adam step that moves each of ``n_params`` coordinates by ``lr``: lr * sqrt(P)."""
    return float(lr) * math.sqrt(n_params)


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


@contextlib.contextmanager
def _fp32(device: torch.device):
    """No autocast inside the probe, whatever the caller runs under (CPU and CUDA alike)."""
    with contextlib.ExitStack() as stack:
        for kind in {"cpu", device.type}:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def param_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient the optimizer will use: ``p.grad`` of every trainable parameter that has one."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _loss_and_grad(model, loss_fn, params, buffers, names, x, y):
    """One functional forward/backward: (detached float loss, gradients of ``names``)."""
    logits = functional_call(model, (params, buffers), (x,))
    loss = loss_fn(logits, y)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
    return loss.detach().float(), grads


def gradient_at(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                shift: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0, train: bool = True):
    """(L(w - eta*shift), grad L(w - eta*shift)) without touching weights, .grad, buffers or RNG.

    Train mode by default (BatchNorm on the batch's statistics, as the optimizer sees it), in
    the model's own precision. Returns the loss (0-d float tensor) and a name -> gradient dict
    for the parameters in ``shift`` (all trainable parameters when ``shift`` is None).
    """
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    names = list(shift) if shift is not None else [n for n, p in named.items() if p.requires_grad]
    with _mode(model, train), _frozen_rng(device), _fp32(device), torch.enable_grad():
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        params = {n: p.detach() for n, p in named.items()}
        for n in names:
            w = params[n] if shift is None else params[n] - eta * shift[n].to(params[n].dtype)
            params[n] = w.detach().requires_grad_(True)
        loss, grads = _loss_and_grad(model, loss_fn, params, buffers, names, x, y)
    return loss, dict(zip(names, grads))


def probe_along_gradient(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                         etas: Iterable[float] = (), grad: Mapping[str, torch.Tensor] | None = None,
                         base_grad: Mapping[str, torch.Tensor] | None = None,
                         rel_etas: Iterable[float] = (), step_length: float | torch.Tensor | None = None,
                         train: bool = True) -> dict[str, torch.Tensor]:
    """Loss, gradient difference and their ratio along -g for each step size, plus beta.

    ``etas`` are absolute step sizes; ``rel_etas`` fractions of ``step_length`` (the length of
    the gradient step, see ``gradient_step_length``), moved along -g/||g||. ``grad`` is the
    direction g (default: the parameters' ``.grad``, the gradient the optimizer is about to
    use). ``base_grad`` is grad L(w) in the difference; by default it is computed here under the
    same RNG state and mode as the shifted gradients (pass it only when it was).

    Returns tensors on the model's device, one entry per step size, absolute ones first:
    ``eta`` [E] (the absolute step size, computed for the relative ones), ``eta_rel`` [E]
    (eta * ||g|| / step_length; NaN without a step length), ``relative`` [E] (bool),
    ``distance`` [E] (||eta g||), ``loss`` [E], ``grad_diff`` [E], ``ratio`` [E], ``beta``
    (max ratio over the absolute etas), ``beta_rel`` (over the relative ones; NaN when a kind is
    absent), ``grad_norm`` (||g||) and ``base_loss`` (L(w) with the probe's RNG state).
    A zero gradient gives NaN ratios (no direction to probe).
    """
    etas = check_etas(etas, allow_empty=True)
    rel_etas = check_etas(rel_etas, allow_empty=True, what="relative probe step sizes")
    if not etas and not rel_etas:
        raise ConfigError("probe step sizes must not be empty")
    if rel_etas and step_length is None:
        raise ConfigError("relative probe step sizes need the gradient step's length (step_length)")
    g = dict(grad) if grad is not None else param_grads(model)
    names = list(g)
    if not names:
        raise ConfigError("no gradients to probe: call backward() first or pass grad=")
    if base_grad is not None:
        missing = [n for n in names if n not in base_grad]
        if missing:
            raise ConfigError(f"base_grad lacks parameters {missing[:3]}")
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    g_list = [g[n].detach() for n in names]
    g_norm = global_norm(g_list)
    abs_t = torch.tensor(etas, device=device, dtype=torch.float32)
    if rel_etas:
        step = torch.as_tensor(step_length, device=device, dtype=torch.float32)
        # eta = eta_rel * step / ||g||: the distance moved is eta_rel * step for every network
        rel_t = torch.tensor(rel_etas, device=device, dtype=torch.float32) * step / g_norm
        eta_t = torch.cat([abs_t, rel_t])
        eta_rel = eta_t * g_norm / step
    else:
        eta_t = abs_t
        eta_rel = torch.full_like(abs_t, float("nan"))
    losses, diffs = [], []
    with _mode(model, train), _frozen_rng(device) as reset_rng, _fp32(device), torch.enable_grad():
        # one clone of the buffers per probe: in train mode BN reads batch statistics, so the
        # (discarded) running-stat updates on the clones never influence the outputs
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        frozen = {n: p.detach() for n, p in named.items()}
        if base_grad is None:
            params = dict(frozen)
            for n in names:
                params[n] = frozen[n].detach().requires_grad_(True)
            reset_rng()  # the reference sees the same dropout mask as every shifted forward
            base_loss, base_list = _loss_and_grad(model, loss_fn, params, buffers, names, x, y)
        else:
            base_loss = torch.full((), float("nan"), device=device)
            base_list = [base_grad[n].detach() for n in names]
        # absolute etas as Python floats (exact in a float64 model), relative ones as 0-d tensors
        multipliers = list(etas) + ([rel_t[j] for j in range(len(rel_etas))] if rel_etas else [])
        for m in multipliers:
            params = dict(frozen)
            for n, gn in zip(names, g_list):
                dt = frozen[n].dtype
                step_n = (m.to(dt) if isinstance(m, torch.Tensor) else m) * gn.to(dt)
                params[n] = (frozen[n] - step_n).requires_grad_(True)
            reset_rng()
            loss, grads = _loss_and_grad(model, loss_fn, params, buffers, names, x, y)
            losses.append(loss)
            # subtract in the parameters' own precision, then take the norm (float32 out)
            diffs.append(global_norm([b - a.to(b.dtype) for a, b in zip(base_list, grads)]))
    loss_t = torch.stack(losses)
    diff_t = torch.stack(diffs)
    distance = eta_t * g_norm
    ratio = diff_t / distance
    relative = torch.zeros(len(eta_t), dtype=torch.bool, device=device)
    relative[len(etas):] = True
    nan = torch.full((), float("nan"), device=device)
    beta = ratio[:len(etas)].max() if etas else nan
    beta_rel = ratio[len(etas):].max() if rel_etas else nan
    return {"eta": eta_t, "eta_rel": eta_rel, "relative": relative, "distance": distance, "loss": loss_t,
            "grad_diff": diff_t, "ratio": ratio, "beta": beta, "beta_rel": beta_rel, "grad_norm": g_norm,
            "base_loss": base_loss}
