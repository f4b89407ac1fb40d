"""The examples in the package's docstrings run, and show what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import taskrunners

pytestmark = pytest.mark.timeout(300)

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(taskrunners.__path__, "taskrunners.")
)


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_in_the_docstrings_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {name} failed"


def test_the_public_modules_have_examples():
    documented = [
        name
        for name in ("taskrunners.sync", "taskrunners.task_runners", "taskrunners.flows", "taskrunners.states")
        if any(test.examples for test in doctest.DocTestFinder().find(importlib.import_module(name)))
    ]
    assert len(documented) == 4, documented
