import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

import chimera as cp
from chimera._cli import _parser

from .nodes import Counter, SaysHello, Stubborn
from .records import on_record
from .test_process import children_of, cli_worker


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chimera", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"chimera {cp.__version__}"


def test_help():
    result = run("--help")
    assert result.returncode == 0
    assert "usage: chimera" in result.stdout


def test_the_manager_help_shows_the_default_port(capsys):
    with pytest.raises(SystemExit) as exit:
        _parser().parse_args(["manager", "--help"])
    assert exit.value.code == 0
    assert "default: 9000; 0 picks a free port" in " ".join(capsys.readouterr().out.split())


async def test_the_manager_and_the_demo_write_to_the_same_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with cp.AsyncManager(port=0) as manager:
        pass
    assert manager.logdir == tmp_path / "chimera-sessions"
    assert manager.logdir.is_dir()
    assert not (manager.logdir / "nodes.log").exists()  # (no node logged: not left empty)
    for command in ("manager", "demo"):
        assert _parser().parse_args([command]).logdir == "chimera-sessions"


@pytest.mark.parametrize("command", ["manager", "worker", "demo"])
def test_the_help_of_each_command_says_what_a_second_ctrl_c_does(capsys, command):
    with pytest.raises(SystemExit):
        _parser().parse_args([command, "--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert "a second one stops" in help and "(exit status 128 + the signal's number" in help


def test_unknown_option_is_an_error():
    result = run("--frobnicate")
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chimera", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


def stop(*processes: subprocess.Popen | None) -> None:
    """Kill what is still running of *processes* (started by this test)."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def status(port: int, token: str | None) -> int:
    """The HTTP status of the manager's ``/api/state`` with *token* presented."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/state")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_manager_takes_its_token_from_chimera_token_unless_given_one(tmp_path):
    from_env = start(
        "manager", "--port", "0", "--logdir", str(tmp_path), env={"CHIMERA_TOKEN": "env"}
    )
    given = start(
        "manager",
        *("--port", "0", "--logdir", str(tmp_path), "--token", "option"),
        env={"CHIMERA_TOKEN": "env"},
    )
    try:
        port = int(from_env.stdout.readline().rsplit(":", 1)[1])
        assert [status(port, token) for token in (None, "option", "env")] == [401, 401, 200]
        port = int(given.stdout.readline().rsplit(":", 1)[1])
        assert [status(port, token) for token in (None, "env", "option")] == [401, 401, 200]
    finally:
        stop(from_env, given)


def test_the_manager_says_an_ipv6_address_as_a_worker_takes_it(tmp_path):
    manager = start("manager", "--host", "::1", "--port", "0", "--logdir", str(tmp_path))
    try:
        line = manager.stdout.readline()
        assert line.startswith("chimera manager listening on [::1]:"), line
        port = int(line.rsplit(":", 1)[1])
        worker = start("worker", "--name", "lab", "--manager", line.split()[-1])
        try:
            said = worker.stdout.readline().strip()
            assert said == f"chimera worker 'lab' connected to [::1]:{port}"
            manager.send_signal(signal.SIGINT)  # (the worker then ends by itself)
            assert worker.wait(timeout=20) == 0, worker.stderr.read()[-3000:]
        finally:
            stop(worker)
    finally:
        stop(manager)


def test_manager_and_worker_commands_connect_and_stop_on_ctrl_c(tmp_path):
    import json
    import signal
    import socket
    import urllib.request

    manager = start("manager", "--port", "0", "--logdir", str(tmp_path))
    worker = None
    try:
        line = manager.stdout.readline()
        assert line.startswith("chimera manager listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        worker = start("worker", "--name", "lab", "--manager", f"127.0.0.1:{port}")
        assert (
            worker.stdout.readline().strip()
            == f"chimera worker 'lab' connected to 127.0.0.1:{port}"
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as answer:
            assert [w["name"] for w in json.load(answer)["workers"]] == ["lab"]
        manager.send_signal(signal.SIGINT)
        assert manager.wait(timeout=20) == 0, manager.stderr.read()[-3000:]
        # The manager left: the worker says so and ends by itself.
        assert worker.stdout.readline().strip() == "chimera worker: the manager left"
        assert worker.wait(timeout=20) == 0, worker.stderr.read()[-3000:]
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        for process in (manager, worker):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_worker_without_a_manager_fails_clearly():
    import socket

    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chimera",
            "worker",
            "--name",
            "w",
            "--manager",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"no manager at 127.0.0.1:{port}" in result.stderr
    assert "is the manager running, on that host and port?" in result.stderr


async def test_a_worker_whose_token_is_not_its_managers_says_so_in_one_line(tmp_path):
    command = [sys.executable, "-m", "chimera", "worker", "--name", "w", "--token", "wrong"]
    environment = {k: v for k, v in os.environ.items() if k != "CHIMERA_TOKEN"}
    with trio.fail_after(30):
        async with cp.AsyncManager(tmp_path / "logs", port=0, token="s3cret") as manager:
            result = await trio.run_process(
                [*command, "--manager", f"127.0.0.1:{manager.port}"],
                capture_stderr=True,
                check=False,
                env=environment,
            )
            port = manager.port
    said = result.stderr.decode()
    assert result.returncode == 1
    assert "Traceback" not in said
    assert said.splitlines()[-1].startswith(
        f"chimera worker: the manager at http://127.0.0.1:{port} has another token than worker "
        "'w' (token= or CHIMERA_TOKEN)"
    )


def test_a_manager_url_is_not_a_manager_address():
    result = run("worker", "--name", "w", "--manager", "http://127.0.0.1:9000")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "chimera worker: error: argument --manager: expected HOST:PORT ([::1]:9000 for an IPv6 "
        "address), a port 1 to 65535, not 'http://127.0.0.1:9000'"
    )


BAD_PORT = "argument --port: expected a port 0 to 65535"
BAD_ADDRESS = "argument --manager: expected HOST:PORT"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["manager", "--port", "70000"], BAD_PORT),
        (["manager", "--port", "-1"], BAD_PORT),
        (["worker", "--name", "w", "--manager", "127.0.0.1:70000"], BAD_ADDRESS),
        (["worker", "--name", "w", "--manager", "127.0.0.1:0"], BAD_ADDRESS),
        (["worker", "--name", "w", "--manager", "127.0.0.1"], BAD_ADDRESS),
        (["worker", "--name", "w", "--manager", "::1"], BAD_ADDRESS),  # (no port)
        (["worker", "--name", "w", "--manager", ":9000"], BAD_ADDRESS),
        (["worker", "--name", "w", "--manager", "[::1:9000"], BAD_ADDRESS),
        (["worker", "--name", "w", "--manager", "[127.0.0.1]:9000"], BAD_ADDRESS),
        (
            ["manager", "--host", ""],
            "argument --host: not a host name or IP address: '' (every interface is "
            "'0.0.0.0', or '::')",
        ),
        (["manager", "--host", "[::1"], "argument --host: not a host name or IP address: '[::1'"),
        (
            ["worker", "--name", "", "--manager", "127.0.0.1:9000"],
            "argument --name: worker name '' is not a valid file name: it is empty",
        ),
        (
            ["worker", "--name", "a/b", "--manager", "127.0.0.1:9000"],
            "argument --name: worker name 'a/b' is not a valid file name: it holds '/'",
        ),
        *[
            (
                ["demo", "--seconds", bad],
                f"argument --seconds: expected a number of seconds above 0, not '{bad}'",
            )
            for bad in ("0", "-1", "nan", "inf", "ten")
        ],
        (
            ["demo", "--camera", "-5"],
            "argument --camera: expected a camera index, 0 or more, not '-5'",
        ),
        *[
            (
                ["worker", "--name", "w", *chimerapys],  # (ChimeraPy's cp-worker's)
                f"{chimerapys[0]} is ChimeraPy's cp-worker's: give the Manager as "
                "--manager HOST:PORT (for example --manager 127.0.0.1:9000)",
            )
            for chimerapys in (["--ip", "10.0.0.2", "--port", "9000"], ["--port", "9000"])
        ],
    ],
)
def test_bad_arguments_are_usage_errors(capsys, argv, error):
    with pytest.raises(SystemExit) as exit:
        _parser().parse_args(argv)
    assert exit.value.code == 2
    assert f"chimera {argv[0]}: error: {error}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "manager"),
    [
        ("lab-pc:9000", ("lab-pc", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("::1:9000", ("::1", 9000)),  # (as before brackets were taken)
        ("10.0.0.5:1", ("10.0.0.5", 1)),
        ("münchen:9000", ("münchen", 9000)),
    ],
)
def test_a_manager_address_may_be_written_as_users_write_them(given, manager):
    args = _parser().parse_args(["worker", "--name", "w", "--manager", given])
    assert args.manager == manager


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_every_port_from_0_to_65535_is_taken(port):
    assert _parser().parse_args(["manager", "--port", str(port)]).port == port


def test_a_bad_port_is_one_line_of_error_not_a_traceback(tmp_path):
    result = run("manager", "--port", "70000", "--logdir", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "chimera manager: error: argument --port: expected a port 0 to 65535 "
        "(0 picks a free one), not '70000'"
    )


def test_a_manager_on_a_port_in_use_says_so_in_one_line(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run("manager", "--port", str(port), "--logdir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"chimera manager: [Errno 98] the manager cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    )


def test_a_worker_stops_on_ctrl_c_and_the_manager_sees_it_leave(tmp_path):
    import json
    import signal
    import urllib.request

    manager = start("manager", "--port", "0", "--logdir", str(tmp_path))
    worker = None
    try:
        port = int(manager.stdout.readline().rsplit(":", 1)[1])
        worker = start("worker", "--name", "lab", "--manager", f"127.0.0.1:{port}")
        assert worker.stdout.readline().startswith("chimera worker 'lab' connected")
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=20) == 0, worker.stderr.read()[-3000:]
        assert "SIGINT, stopping" in worker.stderr.read()
        url = f"http://127.0.0.1:{port}/api/state"
        for _ in range(200):  # the manager notices the closed connection at once
            with urllib.request.urlopen(url, timeout=10) as answer:
                if not json.load(answer)["workers"]:
                    break
        else:
            raise AssertionError("the manager still lists the worker")
    finally:
        for process in (manager, worker):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


async def test_a_worker_with_keep_temp_keeps_its_temporary_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    graph = cp.Graph()
    graph.add_node(Counter("counter", limit=0))
    environment = {**os.environ, "TMPDIR": str(temp)}
    with trio.fail_after(30), open(tmp_path / "worker.log", "w") as log:
        async with cp.AsyncManager(tmp_path / "logs", port=0) as manager:
            async with cli_worker(
                manager, "keeper", "--keep-temp", env=environment, stderr=log
            ) as process:
                await manager.commit_graph(graph, {"keeper": ["counter"]})  # makes the folder
                await manager.shutdown()
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
    (kept,) = temp.glob("chimera-worker-*")
    assert (
        f"worker 'keeper': its temporary folder {kept} is kept"
        in (tmp_path / "worker.log").read_text()
    )


async def test_the_manager_logs_the_nodes_of_a_worker_in_another_process(tmp_path):
    graph = cp.Graph()
    graph.add_node(SaysHello("greeter"))
    said = trio.Event()  # (set in this thread: the Manager's loop is this one)
    with on_record("chimera.manager.node", "[far/greeter] hello from my process", said.set):
        with trio.fail_after(30):
            async with cp.AsyncManager(tmp_path / "logs", port=0) as manager:
                async with cli_worker(manager, "far", stderr=subprocess.DEVNULL) as worker:
                    await manager.commit_graph(graph, {"far": ["greeter"]})
                    await said.wait()
                    await manager.shutdown()
                    worker.send_signal(signal.SIGINT)  # (it removes its folder as it leaves)
                    assert await worker.wait() == 0


def _few_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


async def test_a_worker_out_of_file_descriptors_says_which_limit_to_raise(tmp_path):
    graph = cp.Graph()
    graph.add_nodes_from([Counter(f"n{i}", limit=0) for i in range(30)])
    with trio.fail_after(60):
        async with cp.AsyncManager(tmp_path / "logs", port=0) as manager:
            async with cli_worker(
                manager, "small", stderr=subprocess.DEVNULL, preexec_fn=_few_open_files
            ) as worker:
                with pytest.raises(RuntimeError) as caught:
                    await manager.commit_graph(graph, {"small": [f"n{i}" for i in range(30)]})
                await manager.shutdown()
                worker.send_signal(signal.SIGINT)  # (it removes its folder as it leaves)
                assert await worker.wait() == 0
    assert "Too many open files" in str(caught.value)
    assert str(caught.value).endswith(
        "(the worker may have 64 files open, sockets and pipes included, and each node takes "
        "a few: raise the limit where it starts, e.g. `ulimit -n 4096`)"
    )


async def read_until(stream: trio.abc.ReceiveStream, text: str) -> str:
    """What *stream* says until it has said *text* (or until it ends, if never)."""
    said = b""
    while text.encode() not in said and (chunk := await stream.receive_some()):
        said += chunk
    return said.decode()


@asynccontextmanager
async def worker_waiting_for_an_answer(*before: str) -> AsyncIterator[trio.Process]:
    """A ``chimera worker`` (its command run by *before*, if given) that
    connected to something that accepts and never answers: it waits for the
    answer (10 s). Killed at the end if it has not exited."""
    command = [*before, sys.executable, "-m", "chimera", "worker", "--name", "w", "--manager"]
    with trio.socket.socket() as silent:
        await silent.bind(("127.0.0.1", 0))
        silent.listen()
        worker = await trio.lowlevel.open_process(
            [*command, f"127.0.0.1:{silent.getsockname()[1]}"], stderr=subprocess.PIPE
        )
        try:
            with trio.fail_after(30):
                connection, _ = await silent.accept()
            with connection:
                yield worker
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=str)
async def test_a_worker_stops_at_once_on_a_signal_while_it_connects(signum):
    async with worker_waiting_for_an_answer() as worker:
        with trio.fail_after(5):  # not the 10 s it waits for an answer
            worker.send_signal(signum)
            assert await worker.wait() == 0
            said = await read_until(worker.stderr, "(the end)")
    assert f"chimera worker: {signum.name}, stopping" in said
    assert "Traceback" not in said and "no manager" not in said


@pytest.mark.skipif(shutil.which("nohup") is None, reason="needs nohup")
async def test_a_worker_started_with_nohup_outlives_its_terminal():
    async with worker_waiting_for_an_answer("nohup") as worker:
        with trio.fail_after(5):
            worker.send_signal(signal.SIGHUP)  # its terminal closed: nothing happens...
            worker.send_signal(signal.SIGTERM)  # ... and this one stops it
            assert await worker.wait() == 0
            said = await read_until(worker.stderr, "(the end)")
    assert "chimera worker: SIGTERM, stopping; SIGTERM again stops at once" in said
    assert "SIGHUP" not in said


def test_a_third_signal_changes_nothing(capsys):
    from chimera._cli import _Stop

    stop, killed = _Stop("worker", "stopping"), []
    stop.on_force(lambda: killed.append(True))
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        stop.take(signum)
    assert stop.forced == signal.SIGTERM and killed == [True]  # (exit status 143, not 129)
    assert capsys.readouterr().err.splitlines() == [
        "chimera worker: SIGINT, stopping; Ctrl-C again stops at once",
        "chimera worker: SIGTERM again, stopping at once (exit status 143)",
    ]


def test_a_signal_before_the_command_runs_stops_it_before_it_connects():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]  # (closed: no manager there)
    # A SIGTERM while the command starts up, before its event loop runs.
    script = (
        "import logging, signal, sys\n"
        "from chimera import _cli\n"
        "configure = logging.basicConfig\n"
        "def basic_config(**options):\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    configure(**options)\n"
        "logging.basicConfig = basic_config\n"
        "sys.exit(_cli.main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "worker", "--name", "w", "--manager", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "chimera worker: SIGTERM, stopping" in result.stderr
    assert "no manager" not in result.stderr


@pytest.fixture
def stop_signals_restored() -> Iterator[None]:
    """For a test that runs the CLI's ``main`` in this process: the handlers
    of the signals it takes are as they were once the test ends."""
    from chimera._cli import STOP_SIGNALS

    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_once_the_command_returns_its_signals_are_ignored(capsys, stop_signals_restored):
    from chimera._cli import STOP_SIGNALS, main

    assert main([]) == 2  # (no command: a usage error, with the help)
    after = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    assert after == dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN)
    assert "usage: chimera" in capsys.readouterr().err


async def test_ctrl_c_in_a_terminal_stops_a_workers_nodes_cleanly(tmp_path):
    # A terminal's Ctrl-C reaches the whole process group: the Worker's zygote too.
    graph = cp.Graph()
    graph.add_node(Counter("counter", limit=0))
    with trio.fail_after(60):
        async with cp.AsyncManager(tmp_path / "logs", port=0) as manager:
            async with cli_worker(
                manager, "w", stderr=subprocess.PIPE, start_new_session=True
            ) as worker:
                await manager.commit_graph(graph, {"w": ["counter"]})
                await manager.start()
                os.killpg(worker.pid, signal.SIGINT)
                assert await worker.wait() == 0
                said = await read_until(worker.stderr, "(the end)")
    assert "chimera worker: SIGINT, stopping" in said
    assert "zygote" not in said and "Traceback" not in said and " ERROR " not in said, said


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux)")
async def test_a_second_ctrl_c_stops_a_worker_at_once_killing_its_nodes(tmp_path):
    graph = cp.Graph()
    graph.add_node(Stubborn("stubborn"))  # its teardown never ends; it ignores SIGTERM
    with trio.fail_after(60):
        async with cp.AsyncManager(tmp_path / "logs", port=0) as manager:
            async with cli_worker(manager, "w", stderr=subprocess.PIPE) as worker:
                await manager.commit_graph(graph, {"w": ["stubborn"]})
                await manager.start()
                (zygote,) = children_of(worker.pid)
                (node,) = children_of(zygote)
                node_exit = os.pidfd_open(node)
                worker.send_signal(signal.SIGINT)
                said = await read_until(worker.stderr, "still closing 'stubborn'")
                worker.send_signal(signal.SIGINT)
                with trio.fail_after(5):  # not the 12 s + 2 s that closing the node takes
                    assert await worker.wait() == 130
                    said += await read_until(worker.stderr, "(the end)")
                    await trio.lowlevel.wait_readable(node_exit)  # the node's process is gone
                os.close(node_exit)
    assert "chimera worker: SIGINT, stopping; Ctrl-C again stops at once" in said
    assert "chimera worker: SIGINT again, stopping at once (exit status 130)" in said
    assert "Traceback" not in said


def test_demo_records_collects_and_sums_up_a_multimodal_session(tmp_path):
    import json

    import av
    import pandas as pd
    import soundfile

    result = run("demo", "--seconds", "2", "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert " WARNING " not in result.stderr and " ERROR " not in result.stderr, result.stderr
    # Of the log, only how collecting goes shows below warnings.
    informed = [line for line in result.stderr.splitlines() if " INFO " in line]
    assert all(" chimera.collect INFO " in line for line in informed), result.stderr
    (session,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert result.stdout.strip().endswith(f"session: {session}")
    assert "recording" in result.stdout and "collecting" in result.stdout
    table = [line.split() for line in result.stdout.splitlines() if line.startswith("local/")]
    assert sorted((row[0], row[2]) for row in table) == [
        ("local/camera", "video.mp4"),
        ("local/microphone", "audio.wav"),
        ("local/motion", "motion.csv"),
        ("local/sensor", "sensor.csv"),
    ]
    node = session / "local"
    with av.open(str(node / "camera" / "video.mp4")) as video:
        frames = sum(1 for _ in video.decode(video=0))
    audio, rate = soundfile.read(node / "microphone" / "audio.wav")
    rows = len(pd.read_csv(node / "sensor" / "sensor.csv"))
    # Two seconds of each, give or take the time the nodes take to start and stop.
    assert 40 <= frames <= 80 and rate == 48000 and 1.3 <= len(audio) / rate <= 2.7
    assert 130 <= rows <= 270
    meta = json.loads((session / "meta.json").read_text())
    counts = {s["stream"]: s["count"] for n in meta["streams"].values() for s in n["streams"]}
    assert counts["video"] == frames and counts["sensor"] == rows


@pytest.mark.parametrize(("given", "microphone"), [("3", 3), ("default", "default")])
def test_demo_takes_a_microphone_by_index_or_by_name(
    tmp_path, monkeypatch, stop_signals_restored, given, microphone
):
    from chimera import _demo
    from chimera._cli import main

    taken = []

    async def run_demo(seconds, logdir, camera, microphone, enough):
        taken.append(microphone)

    monkeypatch.setattr(_demo, "run_demo", run_demo)
    assert main(["demo", "--logdir", str(tmp_path), "--microphone", given]) == 0
    assert taken == [microphone]


async def test_demo_stopped_before_it_records_records_nothing(tmp_path):
    from chimera._demo import run_demo

    said: list[str] = []
    enough = trio.Event()
    enough.set()  # (a Ctrl-C while the nodes were being made)
    with trio.fail_after(60):
        session = await run_demo(2, tmp_path, say=said.append, enough=enough)
    assert session is None
    assert said[-1] == "stopped before the recording began: nothing recorded"
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


async def test_demo_stopped_while_it_records_says_when_then_collects(tmp_path):
    from chimera._demo import run_demo

    said: list[str] = []
    enough = trio.Event()

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("recording"):
            enough.set()  # (a Ctrl-C after the first second)

    with trio.fail_after(60):
        session = await run_demo(10, tmp_path, say=say, enough=enough)
    assert session is not None and (session / "meta.json").exists()
    recording = [line for line in said if line.startswith("recording")]
    assert len(recording) == 1  # (no second line for that second)
    after = said[said.index(recording[0]) + 1 :]
    assert re.fullmatch(r"stopped after \d+\.\d s", after[0]) and after[1] == "collecting ..."


def test_demo_refuses_a_camera_it_cannot_open(tmp_path):
    result = run("demo", "--seconds", "1", "--logdir", str(tmp_path), "--camera", "99")
    assert result.returncode == 1
    assert "cannot open camera 99" in result.stderr
