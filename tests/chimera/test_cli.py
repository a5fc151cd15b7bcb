import subprocess
import sys

import chimera


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chimera", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"chimera {chimera.__version__}"


def test_help():
    result = run("--help")
    assert result.returncode == 0
    assert "usage: chimera" in result.stdout


def test_unknown_option_is_an_error():
    result = run("--frobnicate")
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr
