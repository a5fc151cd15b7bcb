"""Local packages shipped to the Workers (ChimeraPy's ``send_packages``)."""

from __future__ import annotations

import hashlib
import importlib
import io
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import trio

import chimera as cp
from chimera._packages import extract, pack

from .test_process import cluster


def write_package(root: Path) -> Path:
    """A package ``devpkg`` whose node writes where its module was imported from."""
    folder = root / "devpkg"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(
        "from pathlib import Path\n"
        "import chimera\n"
        "from .helpers import where\n"
        "class Camera(chimera.Node):\n"
        "    def __init__(self, name, out):\n"
        "        super().__init__(name)\n"
        "        self.out = out\n"
        "    def prep(self):\n"
        "        Path(self.out).write_text(where())\n"
    )
    (folder / "helpers.py").write_text("def where():\n    return __file__\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "stale.pyc").write_bytes(b"not shipped")
    return folder


async def test_send_packages_lets_node_processes_import_a_package_only_the_manager_has(
    tmp_path, monkeypatch
):
    folder = write_package(tmp_path / "src")
    monkeypatch.syspath_prepend(str(folder.parent))
    module = importlib.import_module("devpkg")
    # The node processes do not search the folder: as if it were on another machine,
    # where an older version of the package is installed: the shipped one wins.
    installed = write_package(tmp_path / "installed").parent
    search = [p for p in sys.path if p != str(folder.parent)]
    monkeypatch.setattr(sys, "path", [str(installed), *search])
    monkeypatch.setitem(sys.modules, "devpkg", module)
    monkeypatch.delitem(sys.modules, "devpkg.helpers")
    graph = cp.Graph()
    graph.add_node(module.Camera("camera", str(tmp_path / "where.txt")))
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            packages = [{"name": "devpkg", "path": folder}]
            assert await manager.commit_graph(graph, {"local": ["camera"]}, packages)
            loaded_from = Path((tmp_path / "where.txt").read_text())
            assert loaded_from.parent.name == "devpkg" and "chimera-worker-" in str(loaded_from)
            assert loaded_from.parent.parent.parent.exists()
            assert not (loaded_from.parent / "__pycache__" / "stale.pyc").exists()
            await manager.shutdown()
    # The Worker's temporary folder went with it, and its path left sys.path.
    assert not loaded_from.parent.parent.parent.exists()
    assert not [p for p in sys.path if "chimera-worker-" in p]


@pytest.mark.parametrize(
    ("package", "problem"),
    [
        ({"name": "devpkg", "path": "/nonexistent/devpkg"}, "neither a folder nor a .py file"),
        ({"name": "dev-pkg", "path": "."}, "not a Python identifier"),
        ({"name": "class", "path": "."}, "not a Python identifier"),
        ({"name": "json", "path": "."}, "a module of Python's standard library"),
        ({"path": "."}, '{"name": ..., "path": ...}'),
    ],
)
async def test_a_bad_package_is_a_commit_graph_error_and_nothing_starts(tmp_path, package, problem):
    graph = cp.Graph()
    graph.add_node(cp.Node("idle"))
    with trio.fail_after(60):
        async with cluster(tmp_path, "local") as manager:
            with pytest.raises(cp.CommitGraphError, match="cannot commit") as caught:
                await manager.commit_graph(graph, {"local": ["idle"]}, [package])
            assert problem in str(caught.value)
            assert manager.nodes == {}


async def test_packages_are_served_only_with_the_token(tmp_path):
    folder = write_package(tmp_path / "src")
    with trio.fail_after(60):
        async with cp.AsyncManager(tmp_path / "logs", port=0, token="s3cret") as manager:
            await manager.distribute_packages([{"name": "devpkg", "path": folder}])
            url = f"http://{manager.host}:{manager.port}/packages/devpkg.zip"
            async with httpx.AsyncClient() as client:
                assert (await client.get(url)).status_code == 401
                answer = await client.get(url, headers={"Authorization": "Bearer s3cret"})
                missing = await client.get(
                    url.replace("devpkg", "other"), params={"token": "s3cret"}
                )
    assert answer.status_code == 200
    assert sorted(zipfile.ZipFile(io.BytesIO(answer.content)).namelist()) == [
        "devpkg/__init__.py",
        "devpkg/helpers.py",
    ]
    assert missing.status_code == 404


def test_a_package_named_otherwise_than_its_path_is_shipped_under_its_name_with_a_warning(
    tmp_path, caplog
):
    (tmp_path / "audpkg").mkdir()
    (tmp_path / "audpkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "tool.py").write_text("VALUE = 2\n")
    pack({"name": "audpkg", "path": tmp_path / "audpkg"})
    pack({"name": "tool", "path": tmp_path / "tool.py"})
    assert not caplog.records
    package = pack({"name": "otherpkg", "path": tmp_path / "audpkg"})
    [said] = [r.getMessage() for r in caplog.records]
    assert said == (
        f"package 'otherpkg': its path {tmp_path / 'audpkg'} is 'audpkg': nodes import it as "
        "'otherpkg' (is the name right?)"
    )
    extract("otherpkg", package.data, package.sha256, tmp_path / "out")
    assert (tmp_path / "out" / "otherpkg" / "__init__.py").read_text() == "VALUE = 1\n"


def test_a_module_file_is_a_package_too(tmp_path):
    (tmp_path / "tool.py").write_text("VALUE = 1\n")
    package = pack({"name": "tool", "path": tmp_path / "tool.py"})
    extract("tool", package.data, package.sha256, tmp_path / "out")
    assert (tmp_path / "out" / "tool.py").read_text() == "VALUE = 1\n"


def test_a_package_shipped_again_replaces_the_earlier_version_whole(tmp_path):
    # (A module dropped from the package must not stay importable on the Worker.)
    source = write_package(tmp_path / "src")
    first = pack({"name": "devpkg", "path": source})
    extract("devpkg", first.data, first.sha256, tmp_path / "out")
    (source / "helpers.py").unlink()
    (source / "__init__.py").write_text("VERSION = 2\n")
    second = pack({"name": "devpkg", "path": source})
    extract("devpkg", second.data, second.sha256, tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out" / "devpkg").iterdir())
    assert files == ["__init__.py"]
    assert (tmp_path / "out" / "devpkg" / "__init__.py").read_text() == "VERSION = 2\n"
    # A module file in place of the folder, and back.
    (tmp_path / "devpkg.py").write_text("VERSION = 3\n")
    module = pack({"name": "devpkg", "path": tmp_path / "devpkg.py"})
    extract("devpkg", module.data, module.sha256, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["devpkg.py"]
    extract("devpkg", second.data, second.sha256, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["devpkg"]


def test_links_in_a_package_are_shipped_as_what_they_point_to(tmp_path):
    # A package in development often links to a folder of data or code beside it.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "calibration.py").write_text("GAIN = 2\n")
    source = tmp_path / "src"
    source.mkdir()
    (source / "__init__.py").write_text("")
    (source / "shared").symlink_to(tmp_path / "shared", target_is_directory=True)
    (source / "config.py").symlink_to(tmp_path / "shared" / "calibration.py")
    package = pack({"name": "devpkg", "path": source})
    extract("devpkg", package.data, package.sha256, tmp_path / "out")
    assert (tmp_path / "out" / "devpkg" / "shared" / "calibration.py").read_text() == "GAIN = 2\n"
    assert (tmp_path / "out" / "devpkg" / "config.py").read_text() == "GAIN = 2\n"
    (source / "shared" / "up").symlink_to(source, target_is_directory=True)
    with pytest.raises(ValueError, match="links to a folder it is in"):
        pack({"name": "devpkg", "path": source})


def test_a_download_that_is_not_what_was_packed_is_refused(tmp_path):
    package = pack({"name": "devpkg", "path": write_package(tmp_path / "src")})
    with pytest.raises(ValueError, match="SHA-256"):
        extract("devpkg", package.data[:-1] + b"!", package.sha256, tmp_path / "out")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("devpkg/../../escaped.py", "x = 1\n")
    data = buffer.getvalue()
    sha256 = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="outside the package"):
        extract("devpkg", data, sha256, tmp_path / "out")
    assert not (tmp_path / "escaped.py").exists()
