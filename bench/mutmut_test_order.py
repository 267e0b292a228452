"""pytest plugin that bench/mutation.py loads into mutmut's runs: each mutant's tests run
cheapest first.

mutmut hands pytest a mutant's tests as a list made from a set (no useful order) and stops at
the first failure (``-x``), in a fresh fork per mutant: a wiring test that reads a shared trained
run pays for that training again for every mutant it is handed. So a mutant a millisecond unit
test kills could first be made to train a family. In mutmut's stats pass this plugin writes what
each test cost on its own (setup, call and teardown) and what each shared fixture's setup cost
(class, module, package or session scope); in a mutant run it orders the tests greedily: next the
one that is cheapest given the shared fixtures already set up (a module's fixtures last while its
tests run, a session's to the end). The tests run are the same; only the order changes, and
with it how long a killed mutant takes to die.

``MUTANT_UNDER_TEST`` says which run this is: "stats" writes the costs, any other run with a
costs file reorders; plain pytest (no mutmut) sees a plugin that does nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

COSTS = Path("mutmut-test-costs.json")  # relative to the runs' working directory (mutmut's mutants/)
SHARED_SCOPES = ("class", "module", "package", "session")
LASTS_FOR_A_MODULE = ("class", "module")  # torn down when the next test is in another file


def shared_fixtures(item) -> list[tuple[str, str]]:
    """(key, scope) of each shared fixture ``item`` uses: the definition that applies to it."""
    out = []
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name)
        if defs and defs[-1].scope in SHARED_SCOPES:
            out.append((fixture_key(defs[-1]), defs[-1].scope))
    return out


def fixture_key(fixturedef) -> str:
    return f"{fixturedef.baseid}::{fixturedef.argname}"


def cheapest_first(tests: list[str], own: dict[str, float], fixture_cost: dict[str, float],
                   fixtures: dict[str, list[tuple[str, str]]], file_of: dict[str, str]) -> list[str]:
    """``tests`` reordered greedily: each step takes the test whose own cost (unknown: 0) plus the
    setup of its shared fixtures not already live is least (ties: the earlier in ``tests``). A
    class- or module-scoped fixture is live only while tests of its file run."""
    live: set[tuple[str, str]] = set()  # (fixture key, file it was set up for, "" for the session)
    remaining, order, current = list(tests), [], None

    def instance(key: str, scope: str, test: str) -> tuple[str, str]:
        return key, file_of[test] if scope in LASTS_FOR_A_MODULE else ""

    def cost(test: str) -> float:
        return own.get(test, 0.0) + sum(fixture_cost.get(key, 0.0) for key, scope in fixtures[test]
                                        if instance(key, scope, test) not in live)

    while remaining:
        best = min(remaining, key=cost)  # min keeps the first of equals
        remaining.remove(best)
        if file_of[best] != current:
            live = {(key, where) for key, where in live if where == ""}
            current = file_of[best]
        live |= {instance(key, scope, best) for key, scope in fixtures[best]}
        order.append(best)
    return order


class CostRecorder:
    """The stats pass: each test's own wall time and each shared fixture's setup (without the
    fixtures it set up in turn), written to :data:`COSTS` at the end of the session."""

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        self.fixture_cost: dict[str, float] = {}
        self._inner = [0.0]       # per open fixture setup: time spent in setups nested in it
        self._shared_in_test = 0.0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        self._inner.append(0.0)
        began = time.perf_counter()
        yield
        took = time.perf_counter() - began
        nested = self._inner.pop()
        self._inner[-1] += took
        if fixturedef.scope in SHARED_SCOPES:
            self.fixture_cost[fixture_key(fixturedef)] = took - nested
            self._shared_in_test += took - nested

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._shared_in_test = 0.0
        began = time.perf_counter()
        yield
        self.own[item.nodeid] = time.perf_counter() - began - self._shared_in_test

    def pytest_sessionfinish(self, session):
        COSTS.write_text(json.dumps({"own": self.own, "fixture_cost": self.fixture_cost}))


class CheapestFirst:
    """A mutant run: the collected tests reordered by :func:`cheapest_first`."""

    def __init__(self, costs: dict) -> None:
        self.costs = costs

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        by_id = {item.nodeid: item for item in items}
        order = cheapest_first(list(by_id), self.costs["own"], self.costs["fixture_cost"],
                               {n: shared_fixtures(i) for n, i in by_id.items()},
                               {n: str(i.path) for n, i in by_id.items()})
        items[:] = [by_id[n] for n in order] + [i for i in items if i is not by_id[i.nodeid]]


def pytest_configure(config) -> None:
    try:
        from mutmut.mutation.trampoline import get_mutant_under_test
    except ImportError:  # plain pytest without mutmut
        return
    if get_mutant_under_test() == "stats":
        config.pluginmanager.register(CostRecorder(), "mutmut-test-costs")
    elif COSTS.exists():
        config.pluginmanager.register(CheapestFirst(json.loads(COSTS.read_text())), "mutmut-cheapest-first")
