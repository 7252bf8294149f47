"""The demo pipeline: wall time of `mlflow-nb run`, each step, and papermill's per-step overhead.

Each round copies configs/ into a fresh folder (fresh SQLite store) and runs
  (a) `mlflow-nb run` (five papermill step notebooks, each a child run), timed end to end and per step, and
  (b) the same five library step functions in one Python process (the anchor: no kernels, no notebooks).
Overhead per step = papermill step time - in-process step time. Target: the demo pipeline under 45 s.

    python benchmarks/pipeline.py [--rounds 3]
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
STEPS = ("train", "validate", "select", "promote", "monitor")

IN_PROCESS = """
import time, json, sys
t0 = time.perf_counter()
from mlflow_nb.steps import start_step, finish_step, train_step, validate_step, select_step, promote_step, monitor_step
import mlflow
from mlflow_nb.config import load_config
from mlflow_nb.tracking import setup_tracking
fns = dict(train=train_step, validate=validate_step, select=select_step, promote=promote_step, monitor=monitor_step)
out = {"import": time.perf_counter() - t0}
tr = setup_tracking(load_config(sys.argv[1]))
parent = mlflow.MlflowClient().create_run(tr.default_experiment_id, run_name="pipeline")
for name, fn in fns.items():
    t = time.perf_counter()
    run = mlflow.MlflowClient().create_run(tr.default_experiment_id, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id})
    step = start_step(name, sys.argv[1], run_id=run.info.run_id, parent_run_id=parent.info.run_id)
    fn(step)
    mlflow.MlflowClient().set_terminated(run.info.run_id)
    out[name] = time.perf_counter() - t
out["total"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def fresh_project():
    d = Path(tempfile.mkdtemp())
    shutil.copytree(ROOT / "configs", d / "configs")
    return d


def papermill_round():
    d = fresh_project()
    exe = Path(sys.executable).parent / "mlflow-nb"
    t = time.perf_counter()
    r = subprocess.run([str(exe), "run"], cwd=d, capture_output=True, text=True)
    total = time.perf_counter() - t
    if r.returncode: raise SystemExit(r.stderr[-2000:])
    steps = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in STEPS: steps[parts[0]] = float(line.rsplit("(", 1)[1].split()[0])
    return total, steps


def in_process_round():
    import json
    d = fresh_project()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", IN_PROCESS, str(d / "configs")], cwd=d, capture_output=True, text=True)
    total = time.perf_counter() - t
    if r.returncode: raise SystemExit(r.stderr[-2000:])
    return total, json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    pm, ip = [], []
    for i in range(a.rounds):
        pm.append(papermill_round()); ip.append(in_process_round())
        print(f"round {i + 1}: mlflow-nb run {pm[-1][0]:.1f} s " + " ".join(f"{s}={pm[-1][1][s]:.1f}" for s in STEPS)
              + f" | in-process {ip[-1][0]:.1f} s " + " ".join(f"{s}={ip[-1][1][s]:.1f}" for s in STEPS))
    med = statistics.median
    print(f"median of {a.rounds}: mlflow-nb run {med(t for t, _ in pm):.1f} s wall; one process {med(t for t, _ in ip):.1f} s wall "
          f"(imports {med(x['import'] for _, x in ip):.1f} s)")
    for s in STEPS:
        p, q = med(x[s] for _, x in pm), med(x[s] for _, x in ip)
        print(f"  {s:<9} papermill {p:5.1f} s   in-process {q:5.1f} s   overhead {p - q:4.1f} s")


if __name__ == "__main__":
    main()
