"""chimera ships its type hints (``py.typed``): code that uses it as documented
must type-check, and a type checker must catch the common mistakes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chimera

HERE = Path(__file__).parent
EXAMPLES = Path(__file__).parents[2] / "examples"


def mypy(*paths: Path, cache: Path) -> list[tuple[str, int, str]]:
    """mypy's errors on *paths*, as (file name, line, error code); chimera is
    found where it is imported from, and its own errors are not reported."""
    env = dict(os.environ, MYPYPATH=str(Path(chimera.__file__).parents[1]))
    options = ["--follow-imports=silent", "--python-version=3.10", "--no-error-summary"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *options, "--cache-dir", str(cache), *map(str, paths)],
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
