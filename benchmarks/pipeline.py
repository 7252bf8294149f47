"""The demo pipeline: wall time of `mlflow-nb run` (five papermill step notebooks), each step, and two anchors.

Each round, interleaved, on a fresh copy of configs/ (fresh SQLite store, so every round pays the store's creation):
  (a) `mlflow-nb run` as a user runs it, timed end to end, with the per-step times it prints;
  (b) the anchor the target is stated against: ONE trivial notebook (a parameters cell and `x + 1`) executed by
      the papermill CLI in a fresh process (papermill's import, a kernel start, two cells): the floor of any
      papermill step;
  (c) for context, the five library step functions in one Python process (no kernels, no notebooks): the work.
  (a') for context, (a) on a project whose store `mlflow-nb init` created first, untimed (MLflow's migrations).
One unmeasured warm-up round of each first (file caches, bytecode). Targets: (a) <= 25 s and <= 10 x (b).
Besides wall time, each side's CPU time (user + system of the process and everything it started and reaped,
kernels included) is reported: it does not depend on how busy the machine is, and shows what the parallelism buys.

    python benchmarks/pipeline.py [--rounds 3]        (under flock /tmp/mlflow_nb_bench.lock on a shared machine)
"""
import argparse, json, os, re, resource, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BIN, median, temp_project, write_results  # noqa: E402

STEPS = ("train", "validate", "select", "promote", "monitor")
TRIVIAL = {"cells": [
    {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = 1", "outputs": [],
     "execution_count": None, "id": "params"},
    {"cell_type": "code", "metadata": {}, "source": "x + 1", "outputs": [], "execution_count": None, "id": "work"}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5}

IN_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
import mlflow
from mlflow_nb.config import load_config
from mlflow_nb.steps import finish_step, monitor_step, promote_step, select_step, start_step, train_step, validate_step
from mlflow_nb.tracking import setup_tracking
out = {"import": time.perf_counter() - t0}
tr = setup_tracking(load_config(sys.argv[1]))
client = tr.client()
parent = client.create_run(tr.default_experiment_id, run_name="pipeline").info.run_id
for name, fn in dict(train=train_step, validate=validate_step, select=select_step, promote=promote_step,
                     monitor=monitor_step).items():
    t = time.perf_counter()
    run = client.create_run(tr.default_experiment_id, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
    fn(start_step(name, sys.argv[1], run_id=run, parent_run_id=parent))
    client.set_terminated(run)
    out[name] = time.perf_counter() - t
client.set_terminated(parent)
out["total"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def timed(cmd: list[str], cwd) -> tuple[subprocess.CompletedProcess, float, float]:
    "(result, wall seconds, CPU seconds of the command and all it started and waited for)."
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def mlflow_nb_run(init: bool = False) -> dict:
    """(a): `mlflow-nb run` on a fresh project; wall and CPU seconds, and the step times it printed.
    With `init`, (a'): the project's store is created first by `mlflow-nb init`, untimed (a project past its first
    command): the same run without MLflow's schema migrations."""
    with temp_project() as (d, _):
        if init and subprocess.run([str(BIN / "mlflow-nb"), "init"], cwd=d, capture_output=True).returncode:
            raise SystemExit("mlflow-nb init failed")
        r, wall, cpu = timed([str(BIN / "mlflow-nb"), "run"], d)
        if r.returncode: raise SystemExit(f"mlflow-nb run failed: {r.stderr[-2000:]}")
        steps = {m[1]: float(m[2]) for m in re.finditer(r"^  (\w+) +FINISHED +([\d.]+) s$", r.stdout, re.M)}
        if sorted(steps) != sorted(STEPS): raise SystemExit(f"unexpected output:\n{r.stdout}")
        return {"wall": wall, "cpu": cpu, "steps": steps, "noise": r.stderr.strip()}


def trivial_papermill() -> dict:
    "(b): one trivial notebook through the papermill CLI, in a fresh process; wall and CPU seconds."
    with tempfile.TemporaryDirectory() as d:
        nb = Path(d) / "trivial.ipynb"
        nb.write_text(json.dumps(TRIVIAL))
        r, wall, cpu = timed([str(BIN / "papermill"), str(nb), str(Path(d) / "out.ipynb"), "-p", "x", "41",
                              "--no-progress-bar"], d)
        if r.returncode: raise SystemExit(f"papermill failed: {r.stderr[-2000:]}")
        return {"wall": wall, "cpu": cpu}


def in_process() -> dict:
    "(c): the five step functions in one process; wall and CPU seconds, and the parts."
    with temp_project() as (d, _):
        r, wall, cpu = timed([sys.executable, "-c", IN_PROCESS, str(d / "configs")], d)
        if r.returncode: raise SystemExit(f"in-process steps failed: {r.stderr[-2000:]}")
        return {"wall": wall, "cpu": cpu, **json.loads(r.stdout.strip().splitlines()[-1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow_nb_run(); trivial_papermill(); in_process()  # warm-up, not measured
    runs, trivial, inproc, inited = [], [], [], []
    for i in range(a.rounds):
        runs.append(mlflow_nb_run()); trivial.append(trivial_papermill()); inproc.append(in_process())
        inited.append(mlflow_nb_run(init=True))
        print(f"round {i + 1}: mlflow-nb run {runs[-1]['wall']:.1f} s ("
              + " / ".join(f"{runs[-1]['steps'][s]:.1f}" for s in STEPS) + f"; CPU {runs[-1]['cpu']:.1f} s), "
              f"after init {inited[-1]['wall']:.1f} s, "
              f"trivial papermill {trivial[-1]['wall']:.1f} s (CPU {trivial[-1]['cpu']:.1f} s), "
              f"in-process {inproc[-1]['wall']:.1f} s (CPU {inproc[-1]['cpu']:.1f} s)", flush=True)
    wall, anchor = median(r["wall"] for r in runs), median(t["wall"] for t in trivial)
    cpu, anchor_cpu = median(r["cpu"] for r in runs), median(t["cpu"] for t in trivial)
    steps = {s: median(r["steps"][s] for r in runs) for s in STEPS}
    outside = median(r["wall"] - sum(r["steps"].values()) for r in runs)
    print(f"median of {a.rounds}: mlflow-nb run {wall:.1f} s = steps {sum(steps.values()):.1f} s "
          f"({' / '.join(f'{steps[s]:.1f}' for s in STEPS)}) + {outside:.1f} s outside the steps; "
          f"one trivial papermill notebook {anchor:.1f} s: {wall / anchor:.1f}x; "
          f"five steps in one process {median(r['wall'] for r in inproc):.1f} s")
    print(f"CPU: mlflow-nb run {cpu:.1f} s, trivial papermill {anchor_cpu:.1f} s ({cpu / anchor_cpu:.1f}x), "
          f"five steps in one process {median(r['cpu'] for r in inproc):.1f} s")
    met = lambda ok: "met" if ok else "NOT met"
    after_init = median(r["wall"] for r in inited)
    print(f"after `mlflow-nb init` (store created untimed): {after_init:.1f} s, {after_init / anchor:.1f}x")
    print(f"targets: <= 25 s: {met(wall <= 25)}; <= 10x one trivial papermill notebook: {met(wall <= 10 * anchor)}"
          f" (after init: {met(after_init <= 10 * anchor)})")
    write_results("pipeline", {
        "rounds": a.rounds, "mlflow_nb_run_seconds": [r["wall"] for r in runs],
        "step_seconds": [r["steps"] for r in runs],
        "mlflow_nb_run_cpu_seconds": [r["cpu"] for r in runs], "trivial_papermill": trivial,
        "in_process_seconds": [r["wall"] for r in inproc],
        "in_process_parts": inproc, "stderr_of_mlflow_nb_run": [r["noise"] for r in runs],
        "after_init_seconds": [r["wall"] for r in inited], "after_init_step_seconds": [r["steps"] for r in inited],
        "median": {"mlflow_nb_run": wall, "steps": steps, "outside_steps": outside, "trivial_papermill": anchor,
                   "in_process": median(r["wall"] for r in inproc), "ratio_to_trivial": wall / anchor,
                   "after_init": after_init, "after_init_ratio_to_trivial": after_init / anchor,
                   "cpu": {"mlflow_nb_run": cpu, "trivial_papermill": anchor_cpu,
                           "in_process": median(r["cpu"] for r in inproc)}},
        "targets": {"seconds": 25, "ratio_to_trivial": 10}})


if __name__ == "__main__":
    main()
