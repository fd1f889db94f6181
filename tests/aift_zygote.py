"""A pre-imported `aift` for the tests: one process per test worker imports torch, torchvision, Lightning,
torchmetrics and MLflow once, and forks a fresh child for every `aift` command a test runs.

Why: each `python -m aifactory_train.commands.cli ...` spent most of its seconds importing these libraries (measured
on 2 cores: torch 2.5 s, + torchvision 6 s, Lightning 8 s, torchmetrics 9.6 s together ~12 s under load), and the
suite starts a few hundred of them. A forked child is still a process of its own, as a user's command is: its own
working folder, environment, stdout/stderr files, exit code, signal handlers, atexit handlers and process group; only
the import of those five libraries (which read nothing of the environment a test sets) is shared. Libraries whose
import reads the environment (huggingface_hub, transformers, datasets) are NOT preloaded, so a test's HF_* variables
apply as in a real start. `aift(..., fresh=True)` (or AIFT_TEST_FORK=0) runs a real `python -m` start instead.

Protocol (JSON lines): the test process writes {"id", "args", "cwd", "env", "stdout", "stderr"} on the zygote's
stdin; the zygote answers {"id", "pid"} at once and {"id", "status"} (os.waitpid's) when the child ended."""

from __future__ import annotations

import json
import os
import select
import sys

PRELOAD = ("torch", "torchvision", "lightning", "torchmetrics", "mlflow")
CLI_MODULE = "aifactory_train.commands.cli"


def run_child(request: dict, protocol_fds: tuple[int, ...]) -> None:
    """In the forked child: become the `aift` process the test asked for, run it, exit with its code."""
    import atexit
    import importlib.util
    import signal
    import traceback

    code: object = 1
    try:
        os.setpgid(0, 0)  # a timeout kills the whole command, the processes it started included
        for fd in protocol_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)  # also what the command's own subprocesses inherit
            os.close(target)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # as `python -m aifactory_train.commands.cli`: Lightning relaunches ranks with `python -m <__main__ spec>`
        spec = importlib.util.find_spec(CLI_MODULE)
        sys.argv = [spec.origin, *request["args"]]
        import __main__

        __main__.__spec__ = spec
        from aifactory_train.commands.cli import main

        try:
            code = main(list(request["args"]))
        except SystemExit as stop:
            code = stop.code
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (MLflow ends its runs there)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def serve() -> None:
    from aifactory_train.records.telemetry import switch_off_telemetry

    switch_off_telemetry()  # as the CLI does, before the libraries that report usage are imported
    for name in PRELOAD:
        __import__(name)
    import aifactory_train.commands.cli  # noqa: F401 - its own imports are lazy
    import logging

    # Lightning gives its loggers a console handler of their own when it is imported before logging is configured
    # (here: always). `aift train/eval/predict/export` import it after Hydra configured logging, so there it adds
    # none and its messages go where Hydra sends them: as those commands do, the handlers go again.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True

    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # nothing a library prints may reach the protocol
    protocol_fds = (0, answers.fileno())
    running: dict[int, object] = {}
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    while True:
        ready, _, _ = select.select([requests], [], [], 0.05)
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            answers.write(json.dumps({"id": running.pop(pid), "status": status}) + "\n")
        if not ready:
            continue
        line = requests.readline()
        if not line:
            return  # the test process is gone
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, protocol_fds)
        running[pid] = request["id"]
        answers.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")


if __name__ == "__main__":
    serve()
