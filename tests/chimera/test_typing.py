"""chimera ships its type hints (``py.typed``): code that uses it as documented
must type-check, a type checker must catch the common mistakes, and chimera
itself type-checks."""

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import chimera

HERE = Path(__file__).parent
ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"

#: How users' code is checked: chimera's own errors are not reported.
AS_USED = ["--follow-imports=silent", "--python-version=3.10"]


def mypy(*paths: Path, cache: Path, options: Sequence[str] = AS_USED) -> list[tuple[str, int, str]]:
    """mypy's errors on *paths* with *options*, as (file name, line, error
    code); chimera is found where it is imported from."""
    env = dict(os.environ, MYPYPATH=str(Path(chimera.__file__).parents[1]))
    arguments = [*options, "--no-error-summary", "--cache-dir", str(cache), *map(str, paths)]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    errors = re.findall(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.MULTILINE)
    assert result.returncode == (1 if errors else 0), result.stdout + result.stderr
    return [(Path(file).name, int(line), code) for file, line, code in errors]


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, str]]:
    examples = sorted(EXAMPLES.rglob("*.py"))
    assert examples
    files = [HERE / "typed" / "as_documented.py", HERE / "typed" / "mistakes.py", *examples]
    return mypy(*files, cache=tmp_path_factory.mktemp("mypy-cache"))


def test_code_written_as_documented_type_checks(reported):
    assert [error for error in reported if error[0] != "mistakes.py"] == []


def test_a_type_checker_catches_misspelt_names_and_wrong_arguments(reported):
    lines = (HERE / "typed" / "mistakes.py").read_text().splitlines()
    expected = [
        ("mistakes.py", number, match[1])
        for number, line in enumerate(lines, 1)
        if (match := re.search(r"# error: ([a-z-]+)$", line))
    ]
    assert len(expected) == 7
    assert sorted(error for error in reported if error[0] == "mistakes.py") == expected


def test_chimera_itself_type_checks(tmp_path):
    # With its own settings (pyproject.toml), for the Python running the tests
    # (a check for 3.10 needs 3.10's packages: exceptiongroup). ~7 s on 2 cores.
    options = ["--config-file", str(ROOT / "pyproject.toml")]
    assert mypy(ROOT / "chimera", ROOT / "transports", cache=tmp_path, options=options) == []
