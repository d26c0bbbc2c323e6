"""The docstring examples of every engine module run and print what they show.

Each module of the imported ``engine`` package (the installed one under ``.ci/run``),
the compiled core included, goes through :func:`doctest.testmod` with the current folder set
to a fresh temporary folder, so an example that makes files leaves nothing behind in the tree.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import engine


def _modules() -> list[str]:
    names = ["engine"]
    for info in pkgutil.walk_packages(engine.__path__, prefix="engine."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_every_module_is_found():
    # The walk must see the compiled core and the ops package, or the tests below prove little.
    assert {"engine._core", "engine.image", "engine.repository", "engine.ops.convert"} <= \
        set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    for test in finder.find(module, name):
        out: list[str] = []
        result = runner.run(test, out=out.append)
        if result.failed:
            failures.append("".join(out))
    assert not failures, f"docstring examples of {name} fail:\n" + "\n".join(failures)


def test_the_public_classes_have_examples():
    # A guard against the doctests disappearing (and the test above passing on nothing).
    import engine.repository

    tests = doctest.DocTestFinder(exclude_empty=True).find(engine.repository.Repository)
    assert sum(len(t.examples) for t in tests) >= 3
