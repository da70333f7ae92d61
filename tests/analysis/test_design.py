"""The adaptive design's state machine (moue.analysis.design): its initial round, the paired
criterion against the optimum allocation of stratified sampling with costs (Cochran 1977, section
5.5), its stops, its JSON state, failed trials, and the errors of its inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from moue.analysis.design import MIN_DF, Candidate, Design, DesignSpec, law_half_width, parse_target
from moue.analysis.errors import AnalysisError

COSTS = (1.0, 4.0, 16.0)  # sqrt: 1, 2, 4


def _paired(seeds=40, costs=COSTS):
    out = []
    for seed in range(seeds):
        for s, c in enumerate(costs):
            for arm in ("reference", "variant"):
                out.append(Candidate(index=len(out), cost=c, seed=seed, arm=arm, stratum=(s,), setting=(s, arm),
                                     label=f"s{s} {arm} seed{seed}"))
    return tuple(out)


def _law(seeds=6, costs=(8.0, 1.0, 30.0, 4.0)):
    """compute_power candidates, listed in no cost order (the initial round must sort them)."""
    return tuple(Candidate(index=seed * len(costs) + s, cost=c * 1e11, seed=seed, rows=({"C": c * 1e11},),
                           setting=(s,), label=f"s{s} seed{seed}")
                 for seed in range(seeds) for s, c in enumerate(costs))


def _spec(target="family:MoUE-style", precision=0.01, budget=1e9, batch=2):
    return DesignSpec(target=target, precision=precision, budget_flops=budget, batch=batch)


def _pair_losses(d, rng, effect=-0.01, sd=0.02):
    """Finish every pending trial: a reference loss of 3 and a variant of 3 (1 + effect + noise)."""
    noise = {}
    for i in d.pending:
        c = d.by_index[i]
        e = noise.setdefault((c.stratum, c.seed), rng.normal(0, sd))
        d.observe(i, [3.0 if c.arm == "reference" else 3.0 * (1 + effect + e)])


def _law_losses(d, rng, sd=0.01):
    for i in d.pending:
        C = d.by_index[i].rows[0]["C"]
        d.observe(i, [70.04 * C ** -0.133 * math.exp(rng.normal(0, sd))])


# --- the initial round ---

def test_initial_paired_round_is_each_strata_first_pair_and_a_second_in_the_cheapest():
    d = Design(spec=_spec(), candidates=_paired())
    picks = [d.by_index[i] for i in d.initial()]
    units = sorted({(c.stratum[0], c.seed) for c in picks})
    assert units == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert all({c.arm for c in picks if (c.stratum[0], c.seed) == u} == {"reference", "variant"} for u in units)
    assert [c.cost for c in picks] == sorted(c.cost for c in picks)
    assert d.pending == [c.index for c in picks] and d.initial() == []  # proposed once


def test_initial_law_round_is_each_settings_lowest_seed_cheapest_first_within_budget():
    d = Design(spec=_spec("exponent:compute_power.alpha", 0.003, budget=14e11), candidates=_law())
    picks = [d.by_index[i] for i in d.initial()]
    assert [c.cost / 1e11 for c in picks] == [1.0, 4.0, 8.0]  # 30 would pass the budget of 14
    assert all(c.seed == 0 for c in picks)


# --- the paired criterion ---

def test_paired_allocation_follows_cochrans_optimum_with_costs():
    """Many rounds of a design that cannot stop (a margin it never decides): pairs per stratum
    ~ 1 / sqrt(cost) (Cochran 1977, section 5.5): ratios 4 : 2 : 1 for costs 1 : 4 : 16."""
    d = Design(spec=_spec(precision=0.0001, budget=900.0), candidates=_paired(seeds=120))
    rng = np.random.default_rng(1)
    d.initial()
    for _ in range(60):
        _pair_losses(d, rng)
        assert not d.step().stop
    n = np.array([len(v) for _, v in sorted(d._pairs().items())])
    np.testing.assert_allclose(n / n[-1], [4.0, 2.0, 1.0], rtol=0.15)


# --- stops ---

def _run(d, finish, rng, rounds=500):
    d.initial()
    for _ in range(rounds):
        finish(d, rng)
        look = d.step()
        if look.stop:
            return look
    raise AssertionError("the design never stopped")


def test_budget_stop_says_so():
    d = Design(spec=_spec(precision=0.0001, budget=60.0), candidates=_paired())
    look = _run(d, _pair_losses, np.random.default_rng(0))
    assert look.stop.startswith("budget spent") and look.verdict == "undecided"
    assert d.spent() <= 60.0 and not look.proposals


def test_candidates_exhausted_stop_says_so():
    d = Design(spec=_spec("exponent:compute_power.alpha", 1e-6, budget=1e15), candidates=_law(seeds=3))
    look = _run(d, _law_losses, np.random.default_rng(0))
    assert look.stop == "candidates exhausted" and look.verdict == "undecided"
    assert sorted(d.proposed) == sorted(c.index for c in d.candidates)


def test_law_target_stops_when_its_interval_is_narrow_enough():
    d = Design(spec=_spec("exponent:compute_power.alpha", 0.01, budget=1e15), candidates=_law(seeds=6))
    look = _run(d, _law_losses, np.random.default_rng(0))
    assert look.verdict == "reached" and look.half_width <= 0.01 and look.lo <= 0.133 <= look.hi


def test_no_decision_on_a_noise_estimate_under_min_df():
    """A paired target is first analysed when its pair sd has MIN_DF degrees of freedom, however
    clear its first pairs; a law target's width stop waits for MIN_DF runs beyond its parameters."""
    d = Design(spec=_spec(), candidates=_paired())
    d.initial()
    _pair_losses(d, np.random.default_rng(0), effect=-0.2, sd=0.001)
    look = d.step()
    assert not look.analysed and look.verdict == "undecided" and not look.stop
    assert math.isinf(look.hi) and "1 degrees of freedom" in look.note
    looks = [look]
    while not looks[-1].stop:
        _pair_losses(d, np.random.default_rng(len(looks)), effect=-0.2, sd=0.001)
        looks.append(d.step())
    first = next(lk for lk in looks if lk.analysed)
    assert first is looks[-1] and first.verdict == "detected"
    assert sum(len(v) for v in d._pairs().values()) - len(COSTS) == MIN_DF  # pairs less strata

    law = Design(spec=_spec("exponent:compute_power.alpha", 1.0, budget=1e15), candidates=_law(seeds=6))
    look = _run(law, _law_losses, np.random.default_rng(0))
    assert look.verdict == "reached" and look.n_trials == MIN_DF + 2
    assert all("degrees of freedom" in lk.note for lk in law.looks[:-1])


def test_law_interval_is_the_t_scaled_bootstrap_sd():
    d = Design(spec=_spec("exponent:compute_power.alpha", 1e-6, budget=1e15), candidates=_law(seeds=4))
    rng = np.random.default_rng(4)
    d.initial()
    for _ in range(4):
        _law_losses(d, rng)
        look = d.step()
    r = d.fit()
    k, sd = len(d.results), np.std(r.bootstrap[:, 1], ddof=1)
    expected = stats.t.ppf(0.975, k - 2) * math.sqrt(k / (k - 2)) * sd
    assert law_half_width(r, "alpha") == pytest.approx(expected, rel=1e-12)
    assert look.half_width == pytest.approx(expected, rel=1e-12) and look.estimate == r.params["alpha"]


# --- persistence ---

@pytest.mark.parametrize("target", ["family:MoUE-style", "exponent:compute_power.alpha"])
def test_state_round_trip_continues_identically(target):
    paired = target.startswith("family")
    cands, finish = (_paired(), _pair_losses) if paired else (_law(), _law_losses)
    spec = _spec(target, 0.0001 if paired else 1e-6, budget=1e15)
    d = Design(spec=spec, candidates=cands, seed=3)
    rng = np.random.default_rng(2)
    d.initial()
    for _ in range(8):  # past the first analysis of a paired target (its pair sd's df >= MIN_DF)
        finish(d, rng)
        d.step()
    finish(d, rng)
    e = Design(spec=spec, candidates=cands)
    e.restore(d.state())
    assert e.state() == d.state() and e.pending == d.pending == []
    a, b = d.step(), e.step()
    assert [p.index for p in a.proposals] == [p.index for p in b.proposals] != []
    assert (a.estimate, a.lo, a.hi, a.boundary if paired else 0) == (b.estimate, b.lo, b.hi, b.boundary if paired else 0)


# --- failed trials ---

@pytest.mark.parametrize("bad", [None, [math.nan], [math.inf]])
def test_a_failed_trial_is_recorded_and_its_pair_not_used(bad):
    d = Design(spec=_spec(), candidates=_paired())
    first = d.initial()
    for i in first:
        c = d.by_index[i]
        d.observe(i, [3.0 if c.arm == "reference" else 2.97])
    variant = next(i for i in first if d.by_index[i].arm == "variant" and d.by_index[i].stratum == (1,))
    d.observe(variant, bad)
    assert variant in d.results and d.results[variant] is None
    assert (1,) not in d._pairs() and len(d._pairs()[(0,)]) == 2
    look = d.step()
    assert look.n_trials == len(first)


def test_observe_of_a_trial_never_proposed_raises():
    d = Design(spec=_spec(), candidates=_paired())
    with pytest.raises(AnalysisError, match="not proposed"):
        d.observe(5, [1.0])


# --- errors ---

@pytest.mark.parametrize("kw, field", [
    ({"target": "family"}, "design.target"),
    ({"target": "bogus:x"}, "design.target"),
    ({"precision": 0.0}, "design.precision"),
    ({"precision": math.nan}, "design.precision"),
    ({"precision": 1.5}, "design.precision"),  # a paired margin is a fraction
    ({"budget_flops": -1.0}, "design.budget_flops"),
    ({"budget_flops": "lots"}, "design.budget_flops"),
    ({"batch": 0}, "design.batch"),
    ({"batch": 2.5}, "design.batch"),
    ({"batch": True}, "design.batch"),
])
def test_bad_spec_names_the_field(kw, field):
    args = {"target": "family:MoUE-style", "precision": 0.01, "budget_flops": 1e9, "batch": 2} | kw
    with pytest.raises(AnalysisError) as err:
        DesignSpec(**args)
    assert err.value.field == field


def test_parse_target_errors_name_the_choices():
    assert parse_target("family:MoUE-style") == ("family", "MoUE-style", None)
    assert parse_target("exponent:compute_power.alpha") == ("exponent", "compute_power", "alpha")
    with pytest.raises(AnalysisError, match="family, comparison, exponent, term"):
        parse_target("law:compute_power.alpha")
    with pytest.raises(AnalysisError, match="known: .*compute_power"):
        parse_target("exponent:no_such_law.alpha")
    with pytest.raises(AnalysisError, match="it has A, alpha"):
        parse_target("exponent:compute_power.beta")
    with pytest.raises(AnalysisError, match="LAW.PARAM"):
        parse_target("term:compute_power")


def test_a_paired_target_needs_both_arms():
    only_ref = tuple(c for c in _paired(seeds=2) if c.arm == "reference")
    with pytest.raises(AnalysisError, match="no variant or no reference"):
        Design(spec=_spec(), candidates=only_ref)


def test_a_unit_with_two_runs_of_one_arm_is_refused():
    """Two token budgets at one size and seed would pair whichever run came last (review of issue 34)."""
    cands = [Candidate(index=i, cost=1.0, seed=0, arm=arm, stratum=(0,), setting=(budget, arm))
             for i, (budget, arm) in enumerate([(a, b) for a in (1, 2) for b in ("reference", "variant")])]
    with pytest.raises(AnalysisError, match="several runs of one arm"):
        Design(spec=_spec(), candidates=tuple(cands))


def test_arms_that_never_share_a_size_and_seed_are_refused():
    cands = (Candidate(index=0, cost=1.0, seed=0, arm="reference", stratum=(0,)),
             Candidate(index=1, cost=1.0, seed=1, arm="variant", stratum=(0,)))
    with pytest.raises(AnalysisError, match="no pair to compare"):
        Design(spec=_spec(), candidates=cands)


def test_a_diverged_cooldown_branch_keeps_the_trial():
    d = Design(spec=_spec(), candidates=_paired(seeds=3))
    first = d.initial()
    for i in first:
        d.observe(i, [3.0, math.nan])  # the final loss, and a branch that diverged
    assert all(d.results[i] is not None for i in first)
    assert sum(len(v) for v in d._pairs().values()) == len(first) // 2
    d2 = Design(spec=_spec(), candidates=_paired(seeds=3))
    d2.initial()
    d2.observe(first[0], [math.nan, 3.0])  # the final loss diverged: the trial failed
    assert d2.results[first[0]] is None


def test_the_initial_round_is_whole_pairs_within_the_budget():
    d = Design(spec=_spec(budget=1.5), candidates=_paired(seeds=3))  # one trial of the cheapest pair
    assert d.initial() == []
    d = Design(spec=_spec(budget=2.0), candidates=_paired(seeds=3))
    assert len(d.initial()) == 2
