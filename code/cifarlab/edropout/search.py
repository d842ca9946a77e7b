"""The EDropout search, as small pure tensor functions (Salehinejad & Valaee 2021; REFERENCE §4).

A population is a bool tensor ``(NS, D)``: NS candidate state vectors over D prunable units
(True = unit kept). Every function works on whatever device its inputs live on and draws its
randomness from an explicit ``torch.Generator``, so the search never leaves the training
device and a resumed run repeats it exactly. No function synchronises with the host.

One iteration (binary DE/rand/1/bin, as in the paper's code):
  1. ``donors``: for each candidate i, three distinct others x1, x2, x3;
  2. ``mutate``: per gene, with probability F = 0.1, a mutant bit, otherwise x1's bit:
       rule "original" (the released code): v = 1 - x1 if x2 == x3 else 0
       rule "textbook" (binary DE):          v = 1 - x1 if x2 != x3 else x1
  3. ``crossover``: binomial, CR = 0.9, with one forced gene j_rand per candidate;
  4. the trials are scored by ``margin_energy`` on the current mini-batch;
  5. ``select``: a trial replaces its parent only if it costs strictly less.
The draws are separated from the rules (``draw_*`` vs. the rest) so tests can pin the rules
with hand-written random numbers.
"""
from __future__ import annotations

import torch

MUTATION_RULES = ("original", "textbook")
MUTATION_PROB = 0.1  # F: per-gene probability that the mutant bit differs from x1's
CROSSOVER_RATE = 0.9  # CR
ENERGY_SCALE = 10.0  # the released code multiplies the mean margin by -10
HISTORY = 9  # early convergence: the best cost repeats one of the previous 9


def margin_energy(logits: torch.Tensor, y: torch.Tensor, scale: float = ENERGY_SCALE) -> torch.Tensor:
    """Cost of each candidate: -scale * mean over the batch of (true-class logit - best other logit).

    ``logits`` is ``(..., B, C)`` (a leading candidate dimension is allowed), ``y`` is ``(B,)``;
    returns ``(...)`` in float32. Lower is better (a confidently correct network has a large margin).
    """
    z = logits.float()
    idx = y.reshape((1,) * (z.dim() - 2) + (-1, 1)).expand(*z.shape[:-1], 1)
    true = z.gather(-1, idx).squeeze(-1)
    others = z.scatter(-1, idx, float("-inf")).amax(-1)
    return -scale * (true - others).mean(-1)


def init_population(ns: int, d: int, p0: float, generator: torch.Generator) -> torch.Tensor:
    """NS random states, each bit kept with probability p0 (Bernoulli), on the generator's device."""
    dev = generator.device
    return torch.rand(ns, d, generator=generator, device=dev) < p0


def random_state(d: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    """One state keeping exactly round(keep * d) units (at least one), chosen uniformly."""
    k = max(1, int(round(keep * d)))
    order = torch.randperm(d, generator=generator, device=generator.device)
    state = torch.zeros(d, dtype=torch.bool, device=generator.device)
    state[order[:k]] = True
    return state


def draw_donors(ns: int, generator: torch.Generator) -> torch.Tensor:
    """``(NS, 3)`` long: for each i three distinct indices, none equal to i (a random permutation
    of the others, cut to 3: argsort of uniforms with the diagonal pushed last)."""
    if ns < 4:
        raise ValueError(f"DE/rand/1 needs at least 4 candidates, got {ns}")
    r = torch.rand(ns, ns, generator=generator, device=generator.device)
    r.fill_diagonal_(2.0)
    return r.argsort(dim=1)[:, :3]


def mutate(pop: torch.Tensor, donors: torch.Tensor, r: torch.Tensor, rule: str = "original",
           prob: float = MUTATION_PROB) -> torch.Tensor:
    """Mutant vectors ``(NS, D)`` from donors ``(NS, 3)`` and uniforms ``r`` ``(NS, D)``.

    A gene is touched where ``r < prob``; untouched genes copy x1.
    "original": touched -> (1 - x1) where x2 == x3, else 0 (the released code's rule);
    "textbook": touched -> (1 - x1) where x2 != x3, else x1 (x1 XOR (x2 XOR x3) on touched genes).
    """
    x1, x2, x3 = pop[donors[:, 0]], pop[donors[:, 1]], pop[donors[:, 2]]
    hit = r < prob
    if rule == "original":
        return torch.where(hit, (x2 == x3) & ~x1, x1)
    if rule == "textbook":
        return torch.where(hit & (x2 != x3), ~x1, x1)
    raise ValueError(f"unknown mutation rule {rule!r}; choose one of: {', '.join(MUTATION_RULES)}")


def crossover(parent: torch.Tensor, mutant: torch.Tensor, r: torch.Tensor, jrand: torch.Tensor,
              rate: float = CROSSOVER_RATE) -> torch.Tensor:
    """Binomial crossover: the mutant's gene where ``r < rate`` or at position ``jrand[i]``
    (so every trial takes at least one mutant gene), the parent's elsewhere."""
    take = r < rate
    take[torch.arange(parent.shape[0], device=parent.device), jrand] = True
    return torch.where(take, mutant, parent)


def select(pop: torch.Tensor, costs: torch.Tensor, trial: torch.Tensor, trial_costs: torch.Tensor):
    """Greedy selection: trial i replaces parent i only if it costs strictly less.
    Returns (population, costs); a kept parent keeps its old cost."""
    better = trial_costs < costs
    return torch.where(better[:, None], trial, pop), torch.where(better, trial_costs, costs)


def draw_trial_randoms(ns: int, d: int, generator: torch.Generator):
    """All the random numbers of one generation, in a fixed order: donors, mutation uniforms,
    crossover uniforms, j_rand."""
    dev = generator.device
    donors = draw_donors(ns, generator)
    r_mut = torch.rand(ns, d, generator=generator, device=dev)
    r_cross = torch.rand(ns, d, generator=generator, device=dev)
    jrand = torch.randint(0, d, (ns,), generator=generator, device=dev)
    return donors, r_mut, r_cross, jrand


def trial_population(pop: torch.Tensor, generator: torch.Generator, rule: str = "original",
                     prob: float = MUTATION_PROB, rate: float = CROSSOVER_RATE) -> torch.Tensor:
    """Mutation then crossover: the NS trial vectors of one generation."""
    donors, r_mut, r_cross, jrand = draw_trial_randoms(pop.shape[0], pop.shape[1], generator)
    return crossover(pop, mutate(pop, donors, r_mut, rule, prob), r_cross, jrand, rate)


def best_of(pop: torch.Tensor, costs: torch.Tensor):
    """(best state, its cost): the lowest cost; the first such candidate on ties.

    Selected with index_select on a 1-element index tensor: indexing with the 0-d argmin
    (``pop[i]``) would read it on the host (``.item()``), a sync per step on a GPU."""
    i = costs.argmin().reshape(1)
    return pop.index_select(0, i)[0], costs.index_select(0, i)[0]


def convergence_step(history: torch.Tensor, best_cost: torch.Tensor):
    """Early-convergence test: does ``best_cost`` equal one of the previous best costs in
    ``history`` (a ring of the last 9; NaN = empty slot, never equal)? Returns
    (repeated: 0-d bool tensor, the history with best_cost appended and the oldest dropped)."""
    repeated = (history == best_cost).any()
    return repeated, torch.cat([history[1:], best_cost.reshape(1).to(history.dtype)])
