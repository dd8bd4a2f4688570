"""`ficoco warm -- COMMAND`: run COMMAND (e.g. `snakemake --cores 2`) beside a warm interpreter.

Why: a toy-world evaluate job computes for about 2 s, but a fresh interpreter spends about 6 s
importing torch, transformers, datasets and wandb before it starts. The demo runs about 90 such jobs
on 2 cores, so most of its time went to imports.

How:
- `ficoco warm` starts a server (`python -m ficoco.warm --serve SOCKET`) that binds a Unix socket,
  imports the heavy modules once (`PRELOADED`), and forks one child per request.
- It then runs COMMAND with `FICOCO_WARM_SOCKET` set. Every `ficoco run | calibrate | measure`
  started under COMMAND (`DELEGATED`) sends its argv, working directory, environment and stdin /
  stdout / stderr to the server. The forked child takes them over and runs the command's `main`,
  and the client exits with the child's status.
- The job's own work is the same code a fresh process runs: the self-check, the journal, W&B and the
  invariants, with the job's environment and torch's thread count from the job's OMP_NUM_THREADS
  (and the other thread counts Snakemake sets with it, which must agree).
  tests/test_warm.py checks that a job's predictions, metrics and costs are identical run either way.

When a job runs cold instead (it says so in its log and then runs as usual, in its own process):
- it runs inside a Slurm job (SLURM_JOB_ID), which must compute in its own allocation;
- no server answers at FICOCO_WARM_SOCKET;
- the job's environment differs from the server's in a variable that libraries read when they are
  imported (`IMPORT_TIME_PREFIXES`), or its thread counts disagree.

Killing is forwarded. SIGTERM, SIGINT and SIGHUP sent to the client go to the job. If the client is
killed outright (SIGKILL), the job sees its connection close and kills itself with SIGKILL. Either
way a killed job leaves what a killed fresh job leaves: a journal to resume.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SOCKET_ENV = "FICOCO_WARM_SOCKET"
DELEGATED = ("run", "calibrate", "measure")      # `ficoco` commands a warm child runs
PRELOADED = ("torch", "transformers.models.llava.modeling_llava", "datasets", "wandb",
             "wandb.sdk.launch.inputs.internal",   # what wandb.init imports
             "ficoco.evaluate", "ficoco.calibrate", "ficoco.measure", "ficoco.methods", "ficoco.models.llava",
             "ficoco.doctor", "ficoco.benchmarks.fetch", "ficoco.tracking")
# variables that torch, transformers, huggingface_hub, datasets, tokenizers, OpenMP or Python read when
# loaded: a job whose value differs from the server's would not get what a fresh process gets
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_", "OMP_",
                        "MKL_", "KMP_", "GOMP_", "CUDA", "NVIDIA_", "PYTHON", "LD_")
# thread counts, which Snakemake sets for every job to its `threads`: the child sets torch's from them
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_LENGTH_BYTES = 8


def _say(message: str) -> None:
    print(f"ficoco warm: {message}", file=sys.stderr, flush=True)


def import_time_differences(job_env: dict[str, str], server_env: dict[str, str]) -> list[str]:
    """Names of import-time variables (but the thread counts) whose values differ between the job and the server.

    The job's environment is taken with the offline defaults that the delegated commands set before
    their first Hugging Face import (`ficoco.evaluate.offline_environment`), as the server sets them.
    """
    from ficoco.evaluate import OFFLINE_VARIABLES

    job_env = {**{name: "1" for name in OFFLINE_VARIABLES}, **job_env}
    names = {name for name in (*job_env, *server_env) if name.startswith(IMPORT_TIME_PREFIXES)}
    return sorted(name for name in names - set(THREAD_VARIABLES) if job_env.get(name) != server_env.get(name))


# ---- the client: one `ficoco run | calibrate | measure` process under `ficoco warm`

def delegate(argv: list[str]) -> int | None:
    """Run `ficoco ARGV` in a warm child; its exit status, or None when the job must run cold (said on stderr)."""
    path = os.environ[SOCKET_ENV]
    if os.environ.get("SLURM_JOB_ID"):             # Slurm placed this job: it runs there, in its allocation
        _say(f"running cold: inside Slurm job {os.environ['SLURM_JOB_ID']}")
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError as error:
        _say(f"running cold: no warm interpreter at {path} ({error.strerror or error})")
        return None
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    replies = connection.makefile("r")
    try:
        socket.send_fds(connection, [len(payload).to_bytes(_LENGTH_BYTES, "big")], [0, 1, 2])
        connection.sendall(payload)
        first = replies.readline()
    except OSError as error:                        # the server went away before the job started
        first = ""
        _say(f"the warm interpreter failed: {error}")
    if not first:
        _say("running cold: the warm interpreter closed the connection before the job started")
        return None
    reply = json.loads(first)
    if "cold" in reply:
        _say(f"running cold: {reply['cold']}")
        return None
    child, forwarded = reply["pid"], []

    def forward(received, frame):
        forwarded.append(received)
        os.kill(child, received)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    last = replies.readline()
    if last:
        return int(json.loads(last)["exit"])
    if forwarded:                                    # the job died of the signal sent here: so does this process
        signal.signal(forwarded[-1], signal.SIG_DFL)
        os.kill(os.getpid(), forwarded[-1])
    _say(f"the job (warm child {child}) ended without an exit status: killed by a signal?")
    return 1


# ---- the server

def serve(path: str) -> None:
    """Bind `path`, import `PRELOADED`, then fork a child per connection (until terminated)."""
    from ficoco.evaluate import offline_environment

    offline_environment()                           # what the delegated commands set before importing HF
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C stops COMMAND; `ficoco warm` then stops the server
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)                             # clients connecting now wait in the backlog
    listener.listen(128)
    server_env = dict(os.environ)                   # what the imports below saw
    start = time.perf_counter()
    for name in PRELOADED:
        importlib.import_module(name)
    import torch

    default_threads = torch.get_num_threads()      # what a process without thread counts gets
    # what importing set (torch sets TORCHINDUCTOR_CACHE_DIR): a fresh job's imports set the same
    import_effects = {name: value for name, value in os.environ.items() if server_env.get(name) != value}
    _say(f"ready in {time.perf_counter() - start:.1f} s (pid {os.getpid()}; {', '.join(PRELOADED[:4])} imported)")
    listener.settimeout(1.0)                        # wake once a second to reap finished children
    while True:
        _reap_children()
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        connection.settimeout(None)
        if os.fork() == 0:                          # the child never returns into this loop
            code = 1
            try:
                listener.close()
                code = _serve_job(connection, server_env, import_effects, default_threads)
            except BaseException:                   # noqa: BLE001 - said on the job's log when it got that far
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        connection.close()


def _reap_children() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, _LENGTH_BYTES, 3)
    length = int.from_bytes(header, "big")
    payload = bytearray()
    while len(payload) < length:
        chunk = connection.recv(length - len(payload))
        if not chunk:
            raise ConnectionError("the client closed the connection mid-request")
        payload += chunk
    return json.loads(payload), fds


def _reply(connection: socket.socket, message: dict) -> None:
    connection.sendall((json.dumps(message) + "\n").encode())


def _serve_job(connection: socket.socket, server_env: dict[str, str], import_effects: dict[str, str],
               default_threads: int) -> int:
    """In the forked child: become the job (fds, cwd, environment, threads), run it, report its status."""
    request, fds = _receive(connection)
    env = {name: value for name, value in request["env"].items() if name != SOCKET_ENV}
    differences = import_time_differences(env, server_env)
    env.update(import_effects)
    if differences:
        _reply(connection, {"cold": f"{', '.join(differences)} differ(s) from the warm interpreter's environment"})
        return 0
    thread_counts = {env[name] for name in THREAD_VARIABLES if name in env}
    threads = thread_counts.pop() if len(thread_counts) == 1 else str(default_threads) if not thread_counts else None
    if threads is None or not threads.isdigit() or int(threads) < 1:
        given = ", ".join(f"{name}={env[name]}" for name in THREAD_VARIABLES if name in env)
        _reply(connection, {"cold": f"thread counts {given}: one positive integer for all of them runs warm"})
        return 0
    for target, fd in enumerate(fds):                # the client's stdin, stdout, stderr (the job's log)
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tempfile.tempdir = None                          # found again from the job's TMPDIR, as a fresh process does
    import torch

    torch.set_num_threads(int(threads))
    from ficoco import cli

    sys.argv = [cli.__file__, *request["argv"]]
    _reply(connection, {"pid": os.getpid()})
    _say(f"running in a warm child (pid {os.getpid()}) of the server (pid {os.getppid()})")
    done = threading.Event()
    threading.Thread(target=_die_with_client, args=(connection, done), daemon=True).start()
    code = _run(cli, request["argv"])
    import atexit

    atexit._run_exitfuncs()                          # what a fresh process runs at exit (W&B's teardown)
    sys.stdout.flush()
    sys.stderr.flush()
    done.set()
    _reply(connection, {"exit": code})
    return code


def _run(cli, argv: list[str]) -> int:
    """`cli.main(argv)` with a fresh interpreter's exit status for SystemExit, Ctrl-C and uncaught errors."""
    import traceback

    try:
        return int(cli.main(argv) or 0)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:                            # noqa: BLE001 - as the interpreter would: traceback, status 1
        traceback.print_exc()
        return 1


def _die_with_client(connection: socket.socket, done: threading.Event) -> None:
    """The client is gone (SIGKILLed) before the job finished: end the job as that kill would have."""
    try:
        connection.recv(1)
    except OSError:
        pass
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGKILL)


# ---- the launcher

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ficoco warm",
        description="Run COMMAND (e.g. `snakemake --cores 2`) beside a warm interpreter: every `ficoco run`, "
                    "`calibrate` and `measure` it starts on this machine runs in a fork of an interpreter that "
                    "has already imported torch, transformers, datasets and wandb (same code, same numbers; "
                    "about 6 s less per job).",
        usage="ficoco warm [--] COMMAND [ARGS ...]")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, e.g. snakemake --cores 2")
    command = parser.parse_args(argv).command
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("give the command to run, e.g. `ficoco warm -- snakemake --cores 2`")
    with tempfile.TemporaryDirectory(prefix="ficoco-warm-") as folder:
        path = str(Path(folder) / "socket")
        server_env = {name: value for name, value in os.environ.items() if name not in THREAD_VARIABLES}
        server = subprocess.Popen([sys.executable, "-m", "ficoco.warm", "--serve", path], env=server_env)
        try:
            while not os.path.exists(path):          # bound: jobs may connect from now on
                if server.poll() is not None:
                    _say(f"the server exited with status {server.returncode} before it listened; "
                         f"running {command[0]} without it")
                    break
                time.sleep(0.02)
            try:
                process = subprocess.Popen(command, env={**os.environ, SOCKET_ENV: path})
            except FileNotFoundError:
                _say(f"{command[0]}: command not found")
                return 127
            while True:
                try:
                    return process.wait()
                except KeyboardInterrupt:            # Ctrl-C reached COMMAND too: wait for it to stop
                    continue
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"] and len(sys.argv) == 3:
        serve(sys.argv[2])
    else:
        sys.exit(main())
