"""A real Dask cluster for the tests and CI: one `dask scheduler` and two `dask worker` processes on loopback.

    python tests/support/dask_cluster.py start DIR   # prints the scheduler address; state and logs in DIR
    python tests/support/dask_cluster.py stop DIR    # stops them (by the PIDs recorded in DIR)

The workers run one thread each, in DIR (so a relative store a worker wrongly opened would show up there), with
no MLFLOW_* store variable in their environment: whatever store a task logs to, the task was told.
"""
import atexit, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

BIN = Path(sys.executable).parent
STORE_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "DASK_SCHEDULER_ADDRESS")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _env():
    return {**{k: v for k, v in os.environ.items() if k not in STORE_VARS}, "MLFLOW_DISABLE_TELEMETRY": "true"}


def _spawn(cmd, folder, log):
    return subprocess.Popen(cmd, cwd=folder, env=_env(), stdout=open(folder / log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def start(folder, workers: int = 2) -> dict:
    "Start a scheduler and `workers` single-threaded workers; {'address', 'pids', 'dir'}."
    d = Path(folder).resolve(); d.mkdir(parents=True, exist_ok=True)
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [_spawn([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                     "--no-dashboard"], d, "scheduler.log")]
    procs += [_spawn([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                      "--no-dashboard", "--name", f"worker-{i}"], d, f"worker-{i}.log") for i in range(workers)]
    state = {"address": address, "pids": [p.pid for p in procs], "dir": str(d)}
    (d / "state.json").write_text(json.dumps(state))
    from distributed import Client
    deadline = time.time() + 120
    while True:
        try:
            with Client(address, timeout=5) as c: c.wait_for_workers(workers, timeout=60)
            return state
        except (OSError, TimeoutError):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                stop(d); raise RuntimeError(f"the Dask cluster did not start; see the logs in {d}")
            time.sleep(1)


def stop(folder) -> None:
    "Stop the processes started in `folder` (each whole process group: a worker's nanny and its worker)."
    f = Path(folder).resolve() / "state.json"
    if not f.exists(): return
    pids = json.loads(f.read_text())["pids"]
    for pid in reversed(pids):
        try: os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError: pass
    deadline = time.time() + 5
    for pid in pids:
        while time.time() < deadline:
            try: os.kill(pid, 0); time.sleep(0.1)
            except ProcessLookupError: break
        try: os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError: pass
    f.unlink()


_SHARED: dict = {}


def shared(make_folder) -> dict:
    "The tests' cluster: the one .ci/run started (MLFLOW_NB_DASK_SCHEDULER), else one started once per process."
    given = os.environ.get("MLFLOW_NB_DASK_SCHEDULER")
    if given: return {"address": given, "dir": os.environ.get("MLFLOW_NB_DASK_DIR", "")}
    if not _SHARED:
        d = make_folder()
        _SHARED.update(start(d))
        atexit.register(stop, d)
    return _SHARED


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"): raise SystemExit(__doc__)
    if sys.argv[1] == "start": print(start(sys.argv[2])["address"])
    else: stop(sys.argv[2])
