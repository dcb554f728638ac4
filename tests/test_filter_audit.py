"""bench/filter_audit.py: the filter's keep rates follow the law of a weighted draw without replacement (against an
enumeration), and the per-pair log-probability differences do not depend on how the rows are batched."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.helpers import load_bench_script


def inclusion(p: list[float], kept: int) -> np.ndarray:
    """P(i is among the first `kept` draws without replacement, each draw prop. to p among those left): by
    enumerating every ordered draw."""
    out = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), kept):
        prob, left = 1.0, sum(p)
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        out[list(seq)] += prob
    return out


def test_keep_rates_follow_a_draw_without_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_bench_script("filter_audit", monkeypatch)
    gap = np.array([0.0, 1.0, -1.5, 2.5, 0.5])
    mu, s, kept, draws = 0.2, 1.0, 2, 20_000
    # one batch holds every pair, so each draw is one filter step over the same five gaps
    got = script.keep_rates(gap, mu, s, step_pairs=5, kept=kept, draws=draws)
    want = inclusion(list(np.exp(-0.5 * ((gap - mu) / s) ** 2)), kept)
    assert want.sum() == pytest.approx(kept)
    noise = np.sqrt(want * (1 - want) / draws)  # binomial SE of each rate
    assert np.all(np.abs(got - want) < 5 * noise), (got, want)
    # a far-out gap is (almost) never kept; with a huge spread every pair is kept at kept / step_pairs
    far = script.keep_rates(np.array([0.0, 0.1, -0.1, 50.0]), 0.0, 1.0, step_pairs=4, kept=3, draws=2000)
    assert far[-1] < 1e-3 and np.all(far[:3] > 0.99)
    flat = script.keep_rates(np.linspace(-1, 1, 64), 0.0, 1e6, step_pairs=8, kept=6, draws=400)
    assert abs(flat.mean() - 6 / 8) < 1e-12 and np.all(np.abs(flat - 0.75) < 5 * np.sqrt(0.75 * 0.25 / 400))


def test_logp_differences_do_not_depend_on_batching(monkeypatch: pytest.MonkeyPatch, tiny_llama: str) -> None:
    script = load_bench_script("filter_audit", monkeypatch)
    rows = [
        {"prompt": "The film was", "chosen": " a delight from start to end.", "rejected": " dull."},
        {"prompt": "I thought", "chosen": " it worked.", "rejected": " the plot fell apart in the second hour."},
        {"prompt": "Acting", "chosen": " superb", "rejected": " wooden and flat throughout"},
    ]
    run = {"max_length": 48, "max_prompt_length": 16}
    one = script.logp_differences(tiny_llama, tiny_llama, rows, run, batch=1)
    three = script.logp_differences(tiny_llama, tiny_llama, rows, run, batch=3)
    backwards = script.logp_differences(tiny_llama, tiny_llama, rows[::-1], run, batch=2)
    assert np.all(np.isfinite(one)) and np.ptp(one) > 0.1  # distinct pairs, distinct differences
    # padding to a batch's longest row changes float32 sums of a few dozen log-probs only in the last digits
    assert np.allclose(one, three, rtol=1e-4, atol=1e-4)
    assert np.allclose(one, backwards[::-1], rtol=1e-4, atol=1e-4)  # each value lands on its own row
