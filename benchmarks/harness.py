"""What every benchmark here shares: a throwaway project with its own SQLite store, free loopback ports, servers
started and stopped by PID, medians and ratios, and a machine-readable record of each run.

Each benchmark compares mlflow_nb with a named anchor in the same run, warms both sides up, repeats rounds
interleaved (so a noisy neighbour hits both alike), and writes `benchmarks/results/<name>.json`: the figures,
the medians, every side effect that would flatter a side (drops, errors, cold first calls), and the machine.
"""
from __future__ import annotations
import json, os, platform, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results"


@contextmanager
def temp_project(*overrides: str):
    "A copy of configs/ in a temporary folder whose SQLite store and artifacts live there; yields (folder, Config)."
    from mlflow_nb.config import load_config
    d = Path(tempfile.mkdtemp(prefix="mlflow_nb_bench_"))
    shutil.copytree(ROOT / "configs", d / "configs")
    try: yield d, load_config(d / "configs", list(overrides), env={})
    finally: shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def start_server(cmd: list[str], port: int, cwd=None, env=None, health: str = "/health", timeout: float = 180):
    "Start `cmd` in its own process group and wait until GET `health` answers 200; the Popen."
    import httpx
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None: raise SystemExit(f"{cmd[0]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=1).status_code == 200: return proc
        except httpx.HTTPError: pass
        time.sleep(0.2)
    stop_server(proc); raise SystemExit(f"{cmd[0]} did not become healthy in {timeout:.0f} s")


def stop_server(proc) -> None:
    "SIGTERM the server's process group (its workers too), then SIGKILL after 30 s."
    if proc.poll() is not None: return
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    try: proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()


def median(xs) -> float: return float(statistics.median(xs))


def ratio(anchor: float, ours: float) -> float:
    "How many times better `ours` is than `anchor` for a time (anchor / ours)."
    return anchor / ours if ours else float("inf")


def machine() -> dict:
    vers = {}
    for d in ("mlflow", "scikit-learn", "numpy", "pandas", "dask", "distributed", "optuna", "fastapi", "uvicorn"):
        try: vers[d] = metadata.version(d)
        except metadata.PackageNotFoundError: pass
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(), "versions": vers}


def write_results(name: str, results: dict) -> Path:
    "Write `benchmarks/results/<name>.json` (figures, medians, side effects, machine, date); its path."
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **results}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"results written to {path.relative_to(ROOT)}")
    return path
