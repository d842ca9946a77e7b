"""The EDropout search functions: what mutation testing (make mutate) found unpinned in
edropout/search.py - defaults, rates passed through, strict boundaries, draws from the explicit
generator only, the ring length, error messages. tests/test_edropout.py pins the rules by hand."""
from __future__ import annotations

import pytest
import torch

from cifarlab.edropout import search as S


def bits(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


# the 8 cases of (x1, x2, x3) for candidate 0, whose donors are candidates 1, 2, 3
CASES = bits("00000000", "00001111", "00110011", "01010101")
DONORS = torch.tensor([[1, 2, 3]] * 4)
# the fixed-seed generation of test_edropout.py: candidate 3 differs between the two rules
SEEDED = bits("101011", "001101", "110010", "011110")


def test_the_default_rule_is_the_released_codes():
    hit = torch.zeros(4, 8)
    assert torch.equal(S.mutate(CASES, DONORS, hit), S.mutate(CASES, DONORS, hit, "original"))
    assert not torch.equal(S.mutate(CASES, DONORS, hit), S.mutate(CASES, DONORS, hit, "textbook"))
    default = S.trial_population(SEEDED, torch.Generator().manual_seed(0))
    assert torch.equal(default, S.trial_population(SEEDED, torch.Generator().manual_seed(0), "original"))
    assert not torch.equal(default, S.trial_population(SEEDED, torch.Generator().manual_seed(0), "textbook"))


def test_trial_population_uses_the_rates_it_is_given():
    # prob 1: every gene mutates; rate 0: only the forced gene j_rand comes from the mutant
    pop = torch.Generator().manual_seed(4)
    pop = torch.rand(6, 12, generator=pop) < 0.5
    got = S.trial_population(pop, torch.Generator().manual_seed(1), "textbook", prob=1.0, rate=0.0)
    donors, r_mut, r_cross, jrand = S.draw_trial_randoms(6, 12, torch.Generator().manual_seed(1))
    want = S.crossover(pop, S.mutate(pop, donors, r_mut, "textbook", 1.0), r_cross, jrand, 0.0)
    assert torch.equal(got, want)
    assert int((got != pop).sum(1).max()) <= 1  # at most the forced gene changed
    assert not torch.equal(got, S.trial_population(pop, torch.Generator().manual_seed(1), "textbook"))


def test_thresholds_are_strict():
    # r exactly at F (resp. CR) counts as "not below": the gene is not mutated (resp. not crossed)
    at_f = torch.full((4, 8), S.MUTATION_PROB)
    assert torch.equal(S.mutate(CASES, DONORS, at_f)[0], CASES[1])  # x1 copied
    parent, mutant = bits("0000"), bits("1111")
    at_cr = torch.full((1, 4), S.CROSSOVER_RATE)
    assert S.crossover(parent, mutant, at_cr, torch.tensor([2])).int().tolist() == [[0, 0, 1, 0]]


@pytest.mark.parametrize("draw", [
    lambda g: S.init_population(4, 50, 0.5, g),
    lambda g: S.random_state(50, 0.3, g),
    lambda g: torch.cat([t.flatten().float() for t in S.draw_trial_randoms(5, 7, g)]),
], ids=["init_population", "random_state", "draw_trial_randoms"])
def test_draws_come_from_the_generator_alone(draw):
    # a resumed run repeats the search from the generator's state: the global RNG neither feeds
    # the draws nor is consumed by them
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = draw(torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)
    assert torch.equal(draw(torch.Generator().manual_seed(1)), first)


def test_random_state_keeps_at_least_one_unit():
    g = torch.Generator().manual_seed(0)
    assert int(S.random_state(10, 0.04, g).sum()) == 1  # round(0.4) = 0 -> still one unit
    assert int(S.random_state(10, 0.26, g).sum()) == 3


def test_convergence_ring_holds_exactly_the_last_nine():
    hist = torch.full((S.HISTORY,), float("nan"))
    _, hist = S.convergence_step(hist, torch.tensor(3.0))
    for v in range(10, 10 + S.HISTORY - 1):  # 8 more: 3.0 is now the oldest of 9
        _, hist = S.convergence_step(hist, torch.tensor(float(v)))
        assert hist.shape == (S.HISTORY,)
    assert hist[0] == 3.0 and bool(S.convergence_step(hist, torch.tensor(3.0))[0])
    _, hist = S.convergence_step(hist, torch.tensor(50.0))
    assert not bool(S.convergence_step(hist, torch.tensor(3.0))[0])


def test_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="needs at least 4 candidates, got 3"):
        S.draw_donors(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"unknown mutation rule 'other'; choose one of: original, textbook"):
        S.mutate(CASES, DONORS, torch.zeros(4, 8), "other")
