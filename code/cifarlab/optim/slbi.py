"""SLBI, the optimizer of DessiLBI (Fu et al., ICML 2020), and an Adam-style variant.

Every sparse parameter W (conv or linear weight) carries two state tensors, ``z`` (the paper's
V) and ``gamma`` (the sparse companion Gamma), both starting at zero. With step size a, the
loss direction d (gradient after weight decay and momentum) and W, Gamma taken before the step:

    W     <- W - a*kappa*d - a*kappa*(W - Gamma)/mu
    z     <- z + (a/mu)*(W - Gamma)
    Gamma <- kappa * Prox_lam(z)

Prox is the element-wise soft threshold sign(z)*max(|z|-lam, 0) for penalty "elementwise"
(linear weights) and the group soft threshold z_g*max(0, 1 - lam/||z_g||_2) with one group per
output filter (index along dim 0) for penalty "group" (conv weights). Parameters with penalty
None (biases, BatchNorm) take the plain step W <- W - a*kappa*d (note the kappa, as in the
official code). Momentum is heavy-ball: buf = m*buf + g (buf = g on the first step), d = buf.

Weight decay follows the PyTorch convention: wd*W is added to the gradient before momentum,
and only for parameters with more than one dimension. The official code differs (REFERENCE
§2 quirk): it adds wd*W to the momentum buffer in place after the momentum update (so decay
accumulates in the buffer) and also skips parameters whose name contains "bn". With wd = 0
(the recipes' setting for LeNet-5) both agree exactly.

The step is vectorised with ``torch._foreach_*`` over each group's parameters and works in place
(no parameter-sized temporaries once the momentum buffers exist); the per-filter norms of the
group prox are one small kernel per tensor, concatenated for one threshold. Nothing reads a
value back to the host, so a step never synchronises with the device.

Speed: the eager foreach step still makes ~9 memory passes per sparse tensor against SGD's ~4
(resnet18 on 2 CPU cores: 2.0x an SGD step). ``compiled=True`` runs the momentum/W/z update as
one torch.compile'd pass per tensor (same equations up to float rounding): 1.0-1.1x SGD with
weight decay 5e-4. ``compiled="auto"`` (what training uses, ``--slbi-fused auto``) takes the
compiled step where torch.compile can build it (Triton on CUDA, a C++ compiler on the CPU) and
falls back to the eager step, with one warning, if compiling fails.
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
import warnings
from typing import Iterable

import torch
import torch.nn as nn
from torch.optim import Optimizer

from cifarlab.errors import ConfigError
from cifarlab.optim.registry import register_optimizer

PENALTIES = ("group", "elementwise", None)
NEVER = 2000  # the official "never activated" epoch; used by the toolbox's first-activation record


# -- the two proximal maps (pure; tests pin them) ---------------------------------------------

def soft_threshold(z: torch.Tensor, lam: float) -> torch.Tensor:
    """sign(z)*max(|z|-lam, 0), written as z - clamp(z, -lam, lam) (bit-identical, one fewer op)."""
    return z - z.clamp(-lam, lam)


def group_scale(z: torch.Tensor, lam: float) -> torch.Tensor:
    """max(0, 1 - lam/||z_g||) per group g = index along dim 0 (0 where ||z_g|| = 0)."""
    norms = _row_norms(z)
    return (1.0 - lam / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min_(0.0)


def group_soft_threshold(z: torch.Tensor, lam: float) -> torch.Tensor:
    """z_g * max(0, 1 - lam/||z_g||_2), one group per output filter (dim 0)."""
    s = group_scale(z, lam)
    return z * s.view(-1, *([1] * (z.dim() - 1)))


def resolve_penalty(penalty, p: torch.Tensor):
    """'auto' picks by shape: 4-D (conv) -> group, 2-D (linear) -> elementwise, else None."""
    if penalty != "auto":
        return penalty
    return {4: "group", 2: "elementwise"}.get(p.dim())


def slbi_param_groups(model: nn.Module, lam: float | None = None, fc_lam: float | None = None,
                      layers: Iterable[str] | None = None) -> list[dict]:
    """Conv weights -> group sparsity (one group per filter), linear weights -> element-wise
    sparsity (lambda ``fc_lam``, default ``lam``), everything else -> the plain update.
    ``layers``: restrict sparsity to these module names (others get the plain update).

    A group carries ``lam`` only when one is given here: a group value overrides the
    optimizer's argument, so writing a default into every group would silently turn
    ``SLBI(slbi_param_groups(m), lam=0.5)`` into a lambda-1 run."""
    wanted = None if layers is None else set(layers)
    conv, linear, plain = [], [], []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            sparse_ok = pname == "weight" and (wanted is None or mname in wanted)
            if sparse_ok and isinstance(module, nn.modules.conv._ConvNd):
                conv.append(p)
            elif sparse_ok and isinstance(module, nn.Linear):
                linear.append(p)
            else:
                plain.append(p)
    if wanted is not None:
        missing = wanted - {n for n, _ in model.named_modules()}
        if missing:
            raise ConfigError(f"slbi layers not in the model: {', '.join(sorted(missing))}")
    conv_group = {"params": conv, "penalty": "group"}
    linear_group = {"params": linear, "penalty": "elementwise"}
    if lam is not None:
        conv_group["lam"] = linear_group["lam"] = lam
    if fc_lam is not None:
        linear_group["lam"] = fc_lam
    groups = [conv_group, linear_group, {"params": plain, "penalty": None}]
    return [g for g in groups if g["params"]]


class SLBI(Optimizer):
    """Split Linearized Bregman Iteration with heavy-ball momentum (see the module docstring).

    Per parameter group: ``penalty`` in {"group", "elementwise", None, "auto"} (default
    "auto": by shape) and ``lam`` may be overridden. State per sparse parameter: ``z`` and
    ``gamma`` (zero at construction), plus ``momentum_buffer`` once stepped. ``compiled=True``
    runs the sparse update through torch.compile (fused; same equations up to float rounding);
    ``compiled="auto"`` does so where a compiler is available and falls back to eager otherwise.
    """

    def __init__(self, params, lr: float, kappa: float = 1.0, mu: float = 100.0, lam: float = 1.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, penalty="auto", compiled: bool | str = False):
        _check("lr", lr, positive=True)
        _check("kappa", kappa, positive=True)
        _check("mu", mu, positive=True)
        _check("lam", lam)
        _check("weight_decay", weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"SLBI momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, kappa=kappa, mu=mu, lam=lam, momentum=momentum,
                        weight_decay=weight_decay, penalty=penalty)
        super().__init__(params, defaults)
        # compiled: the sparse update (momentum, W, z) as one torch.compile'd function, fused into
        # one pass per tensor (plus the prox's norm and write) instead of ~9 memory-bound kernels.
        if compiled not in (True, False, "auto"):
            raise ConfigError(f"SLBI compiled must be True, False or 'auto', got {compiled!r}")
        self.compiled = compiled
        self._fallback_ok = compiled == "auto"  # "auto" may fall back to eager; True must compile
        for group in self.param_groups:
            if group["penalty"] not in PENALTIES + ("auto",):
                raise ConfigError(f"SLBI penalty must be 'group', 'elementwise', None or 'auto', "
                                  f"got {group['penalty']!r}")
            _check("lam", group["lam"])
            for p in group["params"]:
                if resolve_penalty(group["penalty"], p) is not None:
                    self.state[p]["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # -- the loss direction d (SLBIAdam overrides this) ------------------------------------------
    def _direction(self, group: dict, params: list, grads: list) -> list:
        """d = momentum buffer of (g + wd*W). In place on the buffers: fresh large tensors cost
        page faults on the CPU, so a step allocates nothing of parameter size once warm."""
        wd, m = group["weight_decay"], group["momentum"]
        decay = [i for i, p in enumerate(params) if p.dim() > 1] if wd != 0 else []
        if m == 0:
            if not decay:
                return list(grads)
            d = list(grads)  # g + wd*W without touching p.grad: one new tensor per decayed param
            decayed = torch._foreach_add([grads[i] for i in decay], [params[i] for i in decay], alpha=wd)
            for j, i in enumerate(decay):
                d[i] = decayed[j]
            return d
        old_bufs, old_grads = [], []
        for p, g in zip(params, grads):
            st = self.state[p]
            if "momentum_buffer" not in st:  # first step: buf = g (+ wd*W below)
                st["momentum_buffer"] = g.detach().clone(memory_format=torch.preserve_format)
            else:
                old_bufs.append(st["momentum_buffer"])
                old_grads.append(g)
        if old_bufs:
            torch._foreach_mul_(old_bufs, m)
            torch._foreach_add_(old_bufs, old_grads)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if decay:  # buf = m*buf + g + wd*W, the same as folding wd*W into g first
            torch._foreach_add_([bufs[i] for i in decay], [params[i] for i in decay], alpha=wd)
        return bufs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise ConfigError("SLBI does not support sparse gradients")
            if self._use_compiled(params[0].device) and self._fusable(group, params):
                self._fused_update(group, params, grads)
                continue
            d = self._direction(group, params, grads)
            self._update(group, params, d)
        return loss

    def _use_compiled(self, device: torch.device) -> bool:
        if self.compiled == "auto":  # resolved once, on the first step (parameters are on their device)
            self.compiled = fused_step_available(device)
        return bool(self.compiled)

    def _fusable(self, group: dict, params: list) -> bool:
        return (type(self)._direction is SLBI._direction and group["momentum"] != 0
                and all("momentum_buffer" in self.state[p] for p in params))

    def _fused_update(self, group: dict, params: list, grads: list) -> None:
        """Same equations: the pointwise part compiled (one pass per tensor), the prox eager."""
        lr, kappa, mu, lam = group["lr"], group["kappa"], group["mu"], group["lam"]
        m, wd = group["momentum"], group["weight_decay"]
        kinds: dict = {"group": [], "elementwise": [], None: []}
        for p, g in zip(params, grads):
            kinds[resolve_penalty(group["penalty"], p)].append((p, g))
        plain = kinds.pop(None)
        if plain:
            ps = [p for p, _ in plain]
            self._update(group, ps, self._direction(group, ps, [g for _, g in plain]))
        for penalty, pairs in kinds.items():
            if not pairs:
                continue
            ps = [p for p, _ in pairs]
            st = [self.state[p] for p in ps]
            zs, gammas = [s["z"] for s in st], [s["gamma"] for s in st]
            hp = self._hyper_tensor(group, ps[0], (lr * kappa, lr / mu, lr * kappa / mu, m, wd))
            gs = [g for _, g in pairs]
            try:  # compiling happens before the graph runs: a failure has mutated nothing yet
                _compiled_pointwise()(ps, gs, [s["momentum_buffer"] for s in st], zs, gammas, hp, wd != 0)
            except Exception as exc:  # any compiler failure: the eager step is exact
                if not self._fallback_ok:
                    raise
                warnings.warn(f"SLBI: torch.compile failed ({type(exc).__name__}: {exc}); "
                              f"using the eager step", RuntimeWarning, stacklevel=3)
                self.compiled = False
                self._update(group, ps, self._direction(group, ps, gs))
                continue
            _prox(penalty, zs, gammas, kappa, lam)

    def _hyper_tensor(self, group: dict, p: torch.Tensor, values: tuple) -> torch.Tensor:
        """The fused step's hyper-parameters as a tensor on the parameter's device (cached per
        group; uploaded again only when a value changes, e.g. the lr once per epoch). Not a
        0-d CPU tensor: Inductor reads a CPU scalar from a CUDA kernel only in some operand
        orders (``hp[4] * p`` would hand the kernel a host pointer). Not Python floats: with
        dynamic=False each new lr would compile a new graph."""
        cache = self.__dict__.setdefault("_hp_cache", {})
        key = (id(group), p.device, p.dtype)
        hit = cache.get(key)
        if hit is None or hit[0] != values:
            t = torch.tensor(values, dtype=p.dtype)
            hit = cache[key] = (values, t.to(p.device, non_blocking=True) if p.device.type != "cpu" else t)
        return hit[1]

    def _update(self, group: dict, params: list, d: list) -> None:
        lr, kappa, mu, lam = group["lr"], group["kappa"], group["mu"], group["lam"]
        by_penalty: dict = {"group": ([], []), "elementwise": ([], []), None: ([], [])}
        for p, di in zip(params, d):
            ps, ds = by_penalty[resolve_penalty(group["penalty"], p)]
            ps.append(p)
            ds.append(di)
        plain_p, plain_d = by_penalty[None]
        if plain_p:
            torch._foreach_add_(plain_p, plain_d, alpha=-lr * kappa)
        for penalty in ("group", "elementwise"):
            ps, ds = by_penalty[penalty]
            if not ps:
                continue
            zs = [self.state[p]["z"] for p in ps]
            gammas = [self.state[p]["gamma"] for p in ps]
            # Gamma_old is recomputed from z below, so its buffer holds Gamma_old - W_old meanwhile:
            # an exact difference (no cancellation in z) and no temporary.
            torch._foreach_sub_(gammas, ps)                           # gamma := Gamma - W
            torch._foreach_add_(zs, gammas, alpha=-lr / mu)           # z += (a/mu)(W - Gamma)
            torch._foreach_add_(ps, gammas, alpha=lr * kappa / mu)    # W -= (a kappa/mu)(W - Gamma)
            torch._foreach_add_(ps, ds, alpha=-lr * kappa)            # W -= a kappa d
            _prox(penalty, zs, gammas, kappa, lam)


def _prox(penalty: str, zs: list, gammas: list, kappa: float, lam: float) -> None:
    """Gamma <- kappa * Prox_lam(z), written into the gamma buffers (no parameter-sized temporaries)."""
    if penalty == "elementwise":
        # kappa*soft(z) = -kappa*(clamp(z, -lam, lam) - z), bit-identical to sign*max(|z|-lam, 0)
        for z, g in zip(zs, gammas):
            torch.clamp(z, -lam, lam, out=g)
        torch._foreach_sub_(gammas, zs)
        torch._foreach_mul_(gammas, -kappa)
    else:
        # per-filter norms (any memory format), one threshold over all of this group's filters
        norms = torch.cat([_row_norms(z) for z in zs])
        scale = (1.0 - lam / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min_(0.0)
        scale.mul_(kappa)
        for z, g, s in zip(zs, gammas, scale.split([z.shape[0] for z in zs])):
            torch.mul(z, s.view(-1, *([1] * (z.dim() - 1))), out=g)


def _sparse_pointwise(ps, grads, bufs, zs, gammas, hp, decay: bool):
    """Momentum, z and W updates of REFERENCE §2 (momentum > 0, buffers present), per tensor so
    that torch.compile fuses them into one pass: read g, buf, W, Gamma, z; write buf, W, z.
    hp = [a*kappa, a/mu, a*kappa/mu, momentum, wd] as a tensor on the parameters' device (every
    tensor operand of the graph lives there), so a new lr does not recompile.
    The prox stays eager (norm pass + one write of Gamma): inside the graph, inductor recomputes
    z in the norm's reduction and delays the W store, which costs more passes than it saves."""
    for p, g, b, z, gam in zip(ps, grads, bufs, zs, gammas):
        if decay and p.dim() > 1:
            g = g + hp[4] * p
        b.mul_(hp[3]).add_(g)
        diff = p - gam
        z.add_(diff * hp[1])
        p.sub_(b * hp[0] + diff * hp[2])


_COMPILED = None


def _compiled_pointwise():
    global _COMPILED
    if _COMPILED is None:  # compiled on first use
        _COMPILED = torch.compile(_sparse_pointwise, dynamic=False)
    return _COMPILED


def fused_step_available(device: torch.device) -> bool:
    """Whether torch.compile can build the fused step here: Triton on CUDA, a C++ compiler on the CPU."""
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False
        return has_triton()
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return False


def _row_norms(z: torch.Tensor) -> torch.Tensor:
    """L2 norm of each slice along dim 0 (one group per output filter / unit)."""
    if z.dim() == 1:
        return z.abs()
    return torch.linalg.vector_norm(z, dim=tuple(range(1, z.dim())))


class SLBIAdam(SLBI):
    """SLBI with an Adam direction: d = m_hat / (sqrt(v_hat) + eps) from bias-corrected moments
    of the (weight-decayed) gradient; the W/z/Gamma updates are those of SLBI. With Adam's small
    step sizes z moves slowly (a/mu per step), so lam or mu usually need lowering."""

    def __init__(self, params, lr: float = 1e-3, kappa: float = 1.0, mu: float = 100.0, lam: float = 1.0,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, penalty="auto"):
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ConfigError(f"SLBIAdam betas must be in [0, 1), got {tuple(betas)}")
        _check("eps", eps, positive=True)
        super().__init__(params, lr=lr, kappa=kappa, mu=mu, lam=lam, momentum=0.0,
                         weight_decay=weight_decay, penalty=penalty)
        for group in self.param_groups:
            group.setdefault("betas", tuple(betas))
            group.setdefault("eps", eps)

    def _direction(self, group: dict, params: list, grads: list) -> list:
        g = super()._direction(group, params, grads)  # weight decay only (momentum is 0)
        b1, b2 = group["betas"]
        ms, vs, steps = [], [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU: reading it is no device sync
            st["step"] += 1
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            steps.append(st["step"].item())
        torch._foreach_lerp_(ms, g, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, g, g, value=1 - b2)
        # d = (m / bc1) / (sqrt(v / bc2) + eps)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - b2 ** t) for t in steps])
        torch._foreach_add_(denom, group["eps"])
        d = torch._foreach_div(ms, denom)
        torch._foreach_div_(d, [1 - b1 ** t for t in steps])
        return d


def _check(name: str, value, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"SLBI {name} must be {'positive' if positive else 'non-negative'}, got {value!r}")


# -- factories for build_optimizer (cfg.optimizer = "slbi" / "slbi_adam") ------------------------

@register_optimizer("slbi")
def _slbi_factory(model: nn.Module, cfg) -> SLBI:
    groups = slbi_param_groups(model, lam=cfg.slbi_lambda, fc_lam=cfg.slbi_fc_lambda)
    compiled = {"auto": "auto", "on": True, "off": False}[cfg.slbi_fused]
    return SLBI(groups, lr=cfg.lr, kappa=cfg.slbi_kappa, mu=cfg.slbi_mu, lam=cfg.slbi_lambda,
                momentum=cfg.momentum, weight_decay=cfg.weight_decay, compiled=compiled)


@register_optimizer("slbi_adam")
def _slbi_adam_factory(model: nn.Module, cfg) -> SLBIAdam:
    groups = slbi_param_groups(model, lam=cfg.slbi_lambda, fc_lam=cfg.slbi_fc_lambda)
    return SLBIAdam(groups, lr=cfg.lr, kappa=cfg.slbi_kappa, mu=cfg.slbi_mu, lam=cfg.slbi_lambda,
                    betas=tuple(cfg.betas), eps=1e-8 if cfg.eps is None else cfg.eps,
                    weight_decay=cfg.weight_decay)


# -- cost of one step against SGD (the `bench optimizer` figure) ---------------------------------

def slbi_step_ratio(model_name: str = "resnet18", device: str = "cpu", repeats: int = 20,
                    momentum: float = 0.9, weight_decay: float = 5e-4, model: nn.Module | None = None,
                    compiled: bool = False) -> dict:
    """Median time of one SLBI step over one SGD(foreach) step with the same momentum and weight
    decay on copies of the same model with the same gradients. Steps are interleaved so that
    load on a shared machine hits all alike. ``compiled``: also time SLBI(compiled=True)
    (compiled during the warm-up, not timed). Returns {"sgd_ms", "slbi_ms", "ratio",
    ["slbi_compiled_ms", "ratio_compiled"], ...}."""
    import copy

    if model is None:
        from cifarlab.models import build_model

        model = build_model(model_name)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in model.parameters()]

    def copy_with_grads() -> nn.Module:
        m = copy.deepcopy(model).to(dev)
        for p, g in zip(m.parameters(), grads):
            p.grad = g.to(dev)
        return m

    opts = {"sgd": torch.optim.SGD(copy_with_grads().parameters(), lr=0.01, momentum=momentum,
                                   weight_decay=weight_decay, foreach=True),
            "slbi": SLBI(slbi_param_groups(copy_with_grads()), lr=0.01, momentum=momentum,
                         weight_decay=weight_decay)}
    if compiled:
        opts["slbi_compiled"] = SLBI(slbi_param_groups(copy_with_grads()), lr=0.01, momentum=momentum,
                                     weight_decay=weight_decay, compiled=True)

    def timed(opt) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up: momentum buffers allocated, the compiled step compiled, caches hot
        for opt in opts.values():
            timed(opt)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(repeats):
        for k, opt in opts.items():
            times[k].append(timed(opt))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out = {"model": model_name, "device": str(dev), "params": sum(p.numel() for p in model.parameters()),
           "repeats": repeats, "momentum": momentum, "weight_decay": weight_decay,
           "threads": torch.get_num_threads(), "sgd_ms": ms["sgd"], "slbi_ms": ms["slbi"],
           "ratio": ms["slbi"] / ms["sgd"]}
    if compiled:
        out.update(slbi_compiled_ms=ms["slbi_compiled"], ratio_compiled=ms["slbi_compiled"] / ms["sgd"])
    return out
