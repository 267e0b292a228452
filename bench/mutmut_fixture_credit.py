"""pytest plugin that bench/mutation.py loads into mutmut's runs: a fixture's work counts for
every test that uses the fixture.

mutmut 3 maps each function to the tests that reached it, gathering the functions hit since the
previous test at each test's teardown, and later runs a mutant only against the tests mapped to
its function. A module- or session-scoped fixture runs inside the setup of the first test that
asks for it, so what the fixture reached was credited to that one test: a test that only reads a
shared trained run was never run against the mutants of the code that trained it, and those
mutants were counted as survivors (set_anomaly, 2026-12-02: 5 of its survivors were killed by a
test that read a shared run once it was collected with them). With this plugin the functions a
fixture's setup reaches are added to every test whose closure holds that fixture. Kill rates were
under-reported by the old mapping, never inflated; this makes each mutant's test set larger, so
it costs time only where a mutant survives the first tests.

Only mutmut's stats pass is touched (``MUTANT_UNDER_TEST == "stats"``); mutant runs and plain
pytest runs see a plugin that does nothing.
"""

from __future__ import annotations

import pytest


class FixtureCredit:
    """Records what each fixture's setup hit and hands it to every test that uses the fixture.

    ``hits()`` is the live set the instrumented code adds function names to (mutmut's
    ``state()._stats``) and ``active()`` says whether hits are being collected now."""

    def __init__(self, hits, active) -> None:
        self._hits, self.active = hits, active
        self.by_fixture: dict[int, set[str]] = {}  # id(FixtureDef) -> functions its setup reached

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if not self.active():
            yield
            return
        hits = self._hits()
        earlier = set(hits)  # the test's own hits so far, set aside while the fixture runs
        hits.clear()
        try:
            yield
        finally:
            self.by_fixture.setdefault(id(fixturedef), set()).update(hits)
            hits.update(earlier)

    @pytest.hookimpl(tryfirst=True)  # before mutmut's own teardown hook takes the hits
    def pytest_runtest_teardown(self, item, nextitem):
        if not self.active():
            return
        hits = self._hits()
        for fixturedefs in item._fixtureinfo.name2fixturedefs.values():
            for fixturedef in fixturedefs:
                hits.update(self.by_fixture.get(id(fixturedef), ()))


def pytest_configure(config) -> None:
    try:
        from mutmut.mutation.trampoline import get_mutant_under_test
        from mutmut.state import state
    except ImportError:  # plain pytest without mutmut: nothing to credit
        return
    config.pluginmanager.register(FixtureCredit(lambda: state()._stats, lambda: get_mutant_under_test() == "stats"),
                                  "mutmut-fixture-credit")
