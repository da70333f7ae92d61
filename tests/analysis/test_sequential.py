"""Group-sequential boundaries and repeated confidence intervals (moue.analysis.sequential):
published boundaries (ldbounds, Reboussin et al. 2000; gsDesign), Brownian-motion simulations with
a known null, and the simultaneous coverage of repeated confidence intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from moue.analysis.sequential import MAX_BOUNDARY, boundaries, boundary, obf_spending, rci, t_to_z

IRREGULAR = (0.13, 0.3, 0.55, 0.8, 1.0)
EQUAL5 = (0.2, 0.4, 0.6, 0.8, 1.0)


def _null_paths(fractions, n_paths, seed):
    """Z_k = S_k / sqrt(t_k) of ``n_paths`` Brownian motions in information time, one column per look."""
    t = np.asarray(fractions)
    steps = np.random.default_rng(seed).normal(size=(n_paths, t.size)) * np.sqrt(np.diff(t, prepend=0.0))
    return np.cumsum(steps, axis=1) / np.sqrt(t)


def _cumulative_crossing(z, c):
    """The share of paths that have crossed ``|Z_j| >= c_j`` at some look j <= k, for each k."""
    return np.logical_or.accumulate(np.abs(z) >= c, axis=1).mean(axis=0)


def _mc_tolerance(p, n):
    """Four Monte Carlo standard errors of a share p from n draws, plus one draw."""
    return 4 * np.sqrt(p * (1 - p) / n) + 1 / n


# --- published values ---

def test_five_equal_looks_match_ldbounds():
    # ldbounds::bounds(t = 1:5 / 5, iuse = 1, alpha = 0.025 per side) = gsDesign sfLDOF at one-sided 0.025
    published = [4.8769, 3.3569, 2.6803, 2.2898, 2.0310]
    np.testing.assert_allclose(boundaries(EQUAL5), published, atol=2e-3)


def test_one_and_two_looks():
    assert boundaries([1.0]) == pytest.approx([stats.norm.isf(0.025)], abs=1e-6)  # 1.95996
    np.testing.assert_allclose(boundaries([0.5, 1.0]), [2.963, 1.969], atol=2e-3)


def test_spending_function_values():
    assert obf_spending(0.0) == 0.0
    assert obf_spending(1.0) == obf_spending(1.7) == 0.05
    # each side spends gsDesign's sfLDOF(0.025, t = 0.5) = 2 - 2 Phi(2.2414 / sqrt(0.5)) = 0.001525
    assert obf_spending(0.5) == pytest.approx(2 * 0.001525, rel=1e-3)
    spent = obf_spending(np.linspace(0.0, 1.0, 11))
    assert np.all(np.diff(spent) > 0) and spent[-1] == 0.05


def test_boundaries_use_only_the_looks_so_far():
    full = boundaries(IRREGULAR)
    np.testing.assert_allclose(boundaries(IRREGULAR[:3]), full[:3], rtol=1e-9)
    assert boundary(IRREGULAR[:3], 0.8) == pytest.approx(full[3], rel=1e-9)


def test_a_look_past_the_end_spends_the_rest():
    np.testing.assert_allclose(boundaries([0.2, 0.4, 0.6, 0.8, 1.3]), boundaries(EQUAL5), rtol=1e-12)


def test_a_look_that_spends_nothing_gets_the_cap():
    c = boundaries([1e-4, 0.5, 1.0])
    assert c[0] == MAX_BOUNDARY
    np.testing.assert_allclose(c[1:], boundaries([0.5, 1.0]), atol=1e-6)


# --- simulation under the null: the boundaries spend what the spending function says ---

def test_irregular_looks_keep_the_false_positive_rate():
    n = 40_000
    z = _null_paths(IRREGULAR, n, seed=11)
    crossed = _cumulative_crossing(z, boundaries(IRREGULAR))
    assert abs(crossed[-1] - 0.05) < 0.006
    spent = obf_spending(np.array(IRREGULAR))
    np.testing.assert_array_less(np.abs(crossed - spent), _mc_tolerance(spent, n))


def test_stopping_before_the_end_spends_alpha_at_the_last_fraction():
    n, looks = 40_000, IRREGULAR[:3]
    z = _null_paths(looks, n, seed=12)
    crossed = _cumulative_crossing(z, boundaries(looks))[-1]
    spent = obf_spending(0.55)
    assert abs(crossed - spent) < _mc_tolerance(spent, n)
    assert crossed < 0.03  # far below the 5% a look at t = 1 would spend


def test_naive_looks_inflate_the_false_positive_rate():
    z = _null_paths(EQUAL5, 40_000, seed=13)
    assert _cumulative_crossing(z, stats.norm.isf(0.025))[-1] > 0.12  # Armitage et al. 1969: 0.142


# --- repeated confidence intervals ---

def _simultaneous_coverage(looks, c, mu, sd, n_studies, seed, df_of=None):
    """The share of studies whose intervals at every look (cumulative means of normal data, ``looks``
    cumulative counts) contain ``mu``: the known ``sd`` when ``df_of`` is None, else the sample sd
    with ``df_of(n)`` degrees of freedom."""
    x = np.random.default_rng(seed).normal(mu, sd, size=(n_studies, looks[-1]))
    covered = np.ones(n_studies, dtype=bool)
    for n, c_k in zip(looks, c):
        mean = x[:, :n].mean(axis=1)
        if df_of is None:
            low, high = rci(mean, sd / np.sqrt(n), c_k)
        else:
            low, high = rci(mean, x[:, :n].std(axis=1, ddof=1) / np.sqrt(n), c_k, df=df_of(n))
        covered &= (low <= mu) & (mu <= high)
    return covered.mean()


def test_repeated_intervals_cover_simultaneously_where_naive_ones_do_not():
    looks = (20, 40, 60, 80, 100)
    c = boundaries(np.array(looks) / looks[-1])
    repeated = _simultaneous_coverage(looks, c, mu=0.3, sd=2.0, n_studies=20_000, seed=21)
    naive = _simultaneous_coverage(looks, [stats.norm.isf(0.025)] * 5, mu=0.3, sd=2.0, n_studies=20_000, seed=21)
    assert 0.94 <= repeated <= 0.96
    assert naive == pytest.approx(0.858, abs=0.012)  # 1 - 0.142 (Armitage et al. 1969)


def test_repeated_intervals_at_irregular_looks():
    looks = (13, 30, 55, 80, 100)
    c = boundaries(np.array(looks) / looks[-1])
    assert _simultaneous_coverage(looks, c, mu=-1.0, sd=0.5, n_studies=20_000, seed=22) >= 0.94


def test_t_based_intervals_with_few_runs():
    looks = (3, 6, 9, 12, 15)
    c = boundaries(np.array(looks) / looks[-1])
    with_t = _simultaneous_coverage(looks, c, mu=0.3, sd=2.0, n_studies=20_000, seed=23, df_of=lambda n: n - 1)
    with_z = _simultaneous_coverage(looks, c, mu=0.3, sd=2.0, n_studies=20_000, seed=23, df_of=lambda n: np.inf)
    assert with_t >= 0.935 and with_z < 0.9


def test_rci_quantiles():
    assert rci(1.0, 2.0, 2.5) == (-4.0, 6.0)
    low, high = rci(0.0, 1.0, stats.norm.isf(0.025), df=9)
    assert high == pytest.approx(stats.t.isf(0.025, 9), rel=1e-9) and low == -high  # 2.262
    assert rci(0.0, 1.0, MAX_BOUNDARY, df=9) == (-np.inf, np.inf)


# --- t to z ---

def test_t_to_z():
    assert t_to_z(2.0, np.inf) == 2.0
    assert t_to_z(2.262, 9) == pytest.approx(1.96, abs=1e-3)
    assert t_to_z(stats.t.isf(0.025, 9), 9) == pytest.approx(stats.norm.isf(0.025), abs=1e-9)
    np.testing.assert_allclose(t_to_z([-3.0, 3.0, 0.5], [5, 5, np.inf]), [-t_to_z(3.0, 5), t_to_z(3.0, 5), 0.5])
    assert t_to_z(30.0, 4) == pytest.approx(stats.norm.isf(stats.t.sf(30.0, 4)))  # the far tail stays finite


# --- bad input ---

@pytest.mark.parametrize("fractions", [[], [0.5, 0.4], [0.3, 0.3], [0.0, 1.0], [-0.1, 0.5], [0.5, np.nan],
                                       [1.0, 1.2], [0.5, 1.0, 1.1]])
def test_bad_fractions_raise(fractions):
    with pytest.raises(ValueError, match="fractions"):
        boundaries(fractions)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.05, 1.5])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        boundaries(EQUAL5, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        obf_spending(0.5, alpha=alpha)


def test_bad_rci_and_t_input_raise():
    with pytest.raises(ValueError, match="c "):
        rci(0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="se "):
        rci(0.0, -1.0, 2.0)
    with pytest.raises(ValueError, match="df "):
        rci(0.0, 1.0, 2.0, df=0)
    with pytest.raises(ValueError, match="df "):
        t_to_z(2.0, -1)
    with pytest.raises(ValueError, match="t "):
        obf_spending(-0.1)
