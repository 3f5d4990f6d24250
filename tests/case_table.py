"""Turning an op's case table into pytest parameters: every implementation
runs each case it can take, and the cases it cannot take are not generated
for it (``refusals`` lists them with the reason, for a coverage test)."""
from __future__ import annotations

import pytest


def case_params(cases, runs, problem):
    """pytest params (case name, *run values) of every case in ``cases`` and
    run in ``runs`` (pytest.params: an implementation and its mode) that
    ``problem(case, *run values)`` accepts (returns None). A run's marks
    (such as ``gpu``) carry over."""
    return [pytest.param(name, *run.values, id=f"{name}-{run.id}", marks=run.marks)
            for run in runs for name, case in cases.items()
            if problem(case, *run.values) is None]


def refusals(cases, runs, problem) -> dict[tuple[str, str], str]:
    """{(case name, run id): why that run does not take the case}."""
    found = {}
    for run in runs:
        for name, case in cases.items():
            reason = problem(case, *run.values)
            if reason is not None:
                found[name, run.id] = reason
    return found
