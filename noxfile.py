"""Sessions: ``tests`` on every installed CPython >= 3.10, ``lint``, ``bench``, ``slow``.

nox finds interpreters on PATH; with pyenv, list them, e.g.
``PYENV_VERSION=3.11.7:3.10.13:3.12.1:3.13.0 nox -s tests``. A missing one is skipped.
"""

from __future__ import annotations

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = False


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The default test run (what CI runs)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS[-1])
def slow(session: nox.Session) -> None:
    """The tests marked slow."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """The benchmarks, in the current environment (pass --quick for a short run)."""
    session.run("python", "benchmarks/data_plane.py", *session.posargs)
    session.run("python", "benchmarks/pipeline.py", *session.posargs)
    session.run("python", "benchmarks/recording.py", *session.posargs)
    session.run("python", "benchmarks/scale.py", *session.posargs)
    session.run("python", "benchmarks/hand_offs.py", *session.posargs)
