"""The differential fuzzer (fadcore.testing.fuzz): a bounded campaign in CI, and the harness.

CI draws a few random programs (hypothesis' ``ci`` profile when CI is set), their gradient
graphs and mutants of each (hostile parameters with re-inferred types, damaged JSON), and
judges every case in a worker subprocess on the reference and numba backends: no signal, no
hang, no untyped exception, and equal results or the same error type. A bigger campaign runs by
hand: ``python -m fadcore.testing.fuzz --programs 300`` (docs/testing.md has its figures).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fadcore as fad
from fadcore.testing import fuzz

CI = bool(os.environ.get("CI"))


def test_bounded_campaign_finds_nothing():
    cases = fuzz.make_cases(programs=6 if CI else 15, mutations=5, seed=20261202)
    origins = {c.origin.split(":")[0] for c in cases}
    assert origins == {"program", "grad-reverse", "grad-mixed", "mutation", "raw"}
    report = fuzz.run_cases(cases)
    assert report.cases == len(cases)
    assert report.ok, report.summary()
    # the campaign is not vacuous: graphs ran and agreed, hostile ones were refused
    assert report.verdicts["ok"] >= len(cases) // 4, report.summary()
    assert report.verdicts["rejected"] >= 1, report.summary()


def test_the_harness_survives_a_crash_and_a_hang():
    good = fad.trace(lambda x: fad.sum(x * 2.0)).graph(fad.clients([np.ones(2)])).to_json()
    texts = [good, fuzz.SELFTEST_CRASH, good, fuzz.SELFTEST_HANG, good, "{not json"]
    cases = [fuzz.Case(i, "test", t, seed=i) for i, t in enumerate(texts)]
    report = fuzz.run_cases(cases, per_case_timeout=10.0)
    got = {c.id: v for c, v, _ in report.failures}
    assert got == {1: "crash", 3: "hang"}
    assert report.verdicts == {"ok": 3, "crash": 1, "hang": 1, "rejected": 1}
    crash = next(d for c, v, d in report.failures if v == "crash")
    assert "signal 11" in crash


@pytest.mark.parametrize("verdict, a, b", [
    ("ok", [[np.array([1.0, np.nan])]], [[np.array([1.0, np.nan])]]),
    ("differs", [[np.array([1.0, np.inf])]], [[np.array([1.0, -np.inf])]]),
    ("differs", [[np.array([1.0, 2.0])]], [[np.array([1.0, 2.001])]]),
    ("differs", [[np.array([1.0])]], [[np.array([1.0], np.float32)]]),
    ("differs", [[np.array([1, 2])]], [[np.array([1, 3])]]),
    ("members", [[np.ones(1)]], [[np.ones(1), np.ones(1)]]),
])
def test_results_are_compared_exactly_enough(verdict, a, b):
    d = fuzz._same(a, b)
    if verdict == "ok":
        assert d is None
    else:
        assert d is not None and ("differs" in d or "vs" in d)
