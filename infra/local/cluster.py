"""A local cluster for trying `instaflow-batch submit`: a Ray head with its dashboard, and an S3 server (moto).

    python -m infra.local.cluster start --state out/local-cluster.json [--num-gpus 2] [--upload LOCAL:s3://...]
    python -m infra.local.cluster stop --state out/local-cluster.json

Everything listens on 127.0.0.1, on the ports given or on free ones. `start` writes the state file (addresses,
temp dir, process ids) and prints the variables to export; `stop` ends exactly the processes that `start`
started, by process id. The head's daemons are re-parented to init once `ray start` returns, so they are found
by the private temp dir that their command lines name; `ray stop` is never used, since it stops every Ray on
the machine. The head gets the S3 server's endpoint and test credentials in its environment, as a real cluster's
nodes have their own credentials: jobs submitted to it read and write s3:// without passing any.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from infra.local.s3_server import CREDS, HOST

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0  # then SIGKILL: the GCS server and the autoscaler monitor ignore SIGTERM


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (a port may still be taken before it is used)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def processes_naming(*texts: str) -> list[int]:
    """Ids of this machine's processes whose command line contains one of `texts`, this one excepted."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(text in cmdline for text in texts):
            pids.append(int(entry.name))
    return sorted(pids)


def with_descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them: workers and agents rename their command lines (`ray::IDLE`)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # not a process, or gone meanwhile
            continue
    found, frontier = set(pids), set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)


def _wait_for_url(url: str, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer at {url} within {READY_TIMEOUT_S:.0f} s: {exc}") from None
        time.sleep(0.5)


def start(args: argparse.Namespace) -> dict:
    state_path = Path(args.state)
    if state_path.exists():
        raise SystemExit(f"{state_path} exists: a local cluster may be running; stop it first")
    ray_port, dashboard_port, client_port, agent_port, s3_port = free_ports(5)
    ray_port, dashboard_port, s3_port = args.ray_port or ray_port, args.dashboard_port or dashboard_port, args.s3_port or s3_port
    temp_dir = tempfile.mkdtemp(prefix="ifb-ray-", dir=args.temp_root)  # short: Ray's socket paths must fit
    log_dir = Path(temp_dir) / "launcher"
    log_dir.mkdir()
    endpoint = f"http://{HOST}:{s3_port}"
    state = {"temp_dir": temp_dir, "ray_address": f"{HOST}:{ray_port}",
             "dashboard_url": f"http://{HOST}:{dashboard_port}", "s3_endpoint_url": endpoint,
             "s3_pid": None, "ray_pids": []}

    s3_command = [sys.executable, "-m", "infra.local.s3_server", "--port", str(s3_port), "--quiet"]
    for bucket in args.bucket:
        s3_command += ["--bucket", bucket]
    for upload in args.upload:
        s3_command += ["--upload", upload]
    s3_log = open(log_dir / "s3_server.log", "wb")
    project = str(Path(__file__).resolve().parents[2])  # infra/ is no installed package: import it from here
    s3_env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    s3 = subprocess.Popen(s3_command, stdout=s3_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=s3_env, start_new_session=True)
    state["s3_pid"] = s3.pid
    _write_state(state_path, state)
    _wait_for_log(log_dir / "s3_server.log", "Serving", s3)  # printed once its buckets and uploads are done

    # A job's `python` is the one Ray runs with, as on a cluster whose image has it first on the PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = os.environ | CREDS | {"AWS_ENDPOINT_URL": endpoint, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    autoscaling = []
    if args.autoscaling_config:
        # Ray's fake autoscaler: nodes of the config's types appear as local processes when work waits for them.
        # Its provider finds the GCS on port 6379 only.
        if ray_port != 6379:
            raise SystemExit("the fake autoscaler needs --ray-port 6379")
        env |= {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        autoscaling = [f"--autoscaling-config={Path(args.autoscaling_config).resolve()}"]
    ray_command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", f"--node-ip-address={HOST}",
        f"--port={ray_port}", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true", f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}",
        f"--num-cpus={args.num_cpus}", f"--num-gpus={args.num_gpus}", "--disable-usage-stats", *autoscaling,
    ]
    started = subprocess.run(ray_command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    state["ray_pids"] = processes_naming(*_head_markers(state))
    _write_state(state_path, state)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
    _wait_for_url(f"{state['dashboard_url']}/api/version", "the Ray dashboard")
    state["ray_pids"] = processes_naming(*_head_markers(state))
    _write_state(state_path, state)
    return state


def _wait_for_log(path: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the S3 server did not get ready:\n{path.read_text(errors='replace')}")
        time.sleep(0.2)


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n")


def stop(state_path: str) -> list[int]:
    """Ends the processes of the state file (the Ray head's, the workers they started, the S3 server's), then
    deletes the head's temp dir with its logs."""
    state = json.loads(Path(state_path).read_text())
    markers = _head_markers(state)
    # Recorded at start, plus what the head started since: daemons name the head, workers descend from them.
    ray_pids = with_descendants(
        sorted(set(processes_naming(*markers)) | {pid for pid in state["ray_pids"] if _names(pid, *markers)})
    )
    s3_pids = [state["s3_pid"]] if state["s3_pid"] and _names(state["s3_pid"], "infra.local.s3_server") else []
    stopped = _terminate(ray_pids) + _terminate(s3_pids)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    Path(state_path).unlink()
    return stopped


def _names(pid: int, *texts: str) -> bool:
    """Whether process `pid` is still one we started: its command line names one of `texts` (ids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(text in cmdline for text in texts)


def _head_markers(state: dict) -> tuple[str, str]:
    """What the head's daemons name: its private temp dir, or (the Ray client server) its GCS address."""
    return state["temp_dir"], f"--address={state['ray_address']} "


def _terminate(pids: list[int]) -> list[int]:
    """SIGTERM, then SIGKILL for what is left after STOP_TIMEOUT_S; returns the ids that were signalled."""
    signalled = [pid for pid in pids if _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(_alive(pid) for pid in signalled) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in signalled:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return signalled


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    """Running and not a zombie (a zombie still answers os.kill(pid, 0))."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.cluster", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start a Ray head and an S3 server on 127.0.0.1",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stop_parser = commands.add_parser("stop", help="stop what start started, by process id",
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for sub in (start_parser, stop_parser):
        sub.add_argument("--state", default="out/local-cluster.json", help="the state file (addresses, process ids)")
    start_parser.add_argument("--ray-port", type=int, default=0, help="GCS port (0: a free one)")
    start_parser.add_argument("--dashboard-port", type=int, default=0, help="dashboard and Jobs API port (0: a free one)")
    start_parser.add_argument("--s3-port", type=int, default=0, help="S3 server port (0: a free one)")
    start_parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the head offers")
    start_parser.add_argument("--num-gpus", type=int, default=0, help="GPUs the head offers (logical ones work)")
    start_parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    start_parser.add_argument("--upload", action="append", default=[], metavar="LOCAL:s3://bucket/key",
                              help="file or folder to upload (repeatable)")
    start_parser.add_argument("--temp-root", default="/tmp", help="where the head's private temp dir goes")
    start_parser.add_argument("--autoscaling-config", help="a fake_multinode autoscaler config: GPU nodes appear "
                              "as local processes when jobs wait for them (needs --ray-port 6379)")
    args = parser.parse_args(argv)

    if args.command == "stop":
        stopped = stop(args.state)
        print(f"stopped {len(stopped)} processes: {' '.join(map(str, stopped))}")
        return 0
    try:
        state = start(args)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}\nstopping what was started", file=sys.stderr)
        if Path(args.state).exists():
            stop(args.state)
        return 1
    print(f"Ray head {state['ray_address']}, dashboard {state['dashboard_url']}, S3 {state['s3_endpoint_url']}")
    print(f"state: {args.state}; stop with: python -m infra.local.cluster stop --state {args.state}")
    exports = {"RAY_API_SERVER_ADDRESS": state["dashboard_url"], "AWS_ENDPOINT_URL": state["s3_endpoint_url"],
               **CREDS, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    print("export " + " ".join(f"{name}={value}" for name, value in exports.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
