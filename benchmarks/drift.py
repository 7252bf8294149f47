"""Drift: mlflow_nb's drift check against Evidently 0.7.23's DataDriftPreset on the same frames, warm and cold.

Data: reference and current frames of `--rows` x 20 N(0, 1) values (fixed seed), f0..f4 of the current shifted by
+0.5 sd, written once to Parquet; every measured process reads the same files.

Like with like, and what differs:
- mlflow_nb builds the reference profile -- a quantile SKETCH of each reference column (1,001 quantiles, decile bins,
  mean, sd) -- and runs every statistic (PSI, KS with its p-value, Wasserstein) on every column against it.
  Evidently's preset compares each column with the full raw reference (it picks the test per column). One side
  therefore compares with a sketch of the reference and the other with the reference itself: the figures say so.
- Each side runs in its own fresh process (tracemalloc there measures its peak above the loaded data), imports its
  library, makes one untimed warm-up call, then `--rounds` timed calls: the warm figure is their median.
- Cold: the first call in a fresh process, import included, against the warm median of the same process. For
  mlflow_nb three cold figures: the drift check as `mlflow-nb monitor` pays it (the CLI has loaded the config module
  before any check, so that is loaded first, untimed; the profile is read from JSON, as the CLI downloads it); the
  check plus the HTML report with its charts (the CLI always writes the report); and the check in a process where
  nothing of mlflow_nb was loaded before. The target is cold <= 2x warm for the first.

Evidently does not import under pandas 3, so it runs in its own environment, made once with:
    python3.11 -m venv /work/benchenv/evidently
    /work/benchenv/evidently/bin/pip install "evidently==0.7.23" "pandas<3" pyarrow
(elsewhere: --evidently-python PATH).

    flock /tmp/mlflow_nb_bench.lock python benchmarks/drift.py [--rounds 5] [--rows 200000]
Writes benchmarks/results/monitor.json.
"""
from __future__ import annotations
import argparse, json, subprocess, sys, time, tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, median, ratio, write_results

WORK = ROOT / "benchmarks" / ".work"
EVIDENTLY_PY = Path("/work/benchenv/evidently/bin/python")
SHIFTED = [f"f{i}" for i in range(5)]

EVIDENTLY = r"""
import json, statistics, sys, time, tracemalloc
import pandas as pd
ref, cur = pd.read_parquet(sys.argv[1]), pd.read_parquet(sys.argv[2])
rounds = int(sys.argv[3])
t0 = time.perf_counter()
from evidently import Report
from evidently.presets import DataDriftPreset
def check():
    snap = Report([DataDriftPreset()]).run(current_data=cur, reference_data=ref)
    return sorted(m["config"]["column"] for m in snap.dict()["metrics"]
                  if m["config"]["type"].endswith("ValueDrift") and m["value"] >= m["config"]["threshold"])
drifted = check()
cold = time.perf_counter() - t0
times = []
for _ in range(rounds):
    t = time.perf_counter(); check(); times.append(time.perf_counter() - t)
tracemalloc.start(); check(); peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
print(json.dumps({"warm_s": statistics.median(times), "rounds_s": times, "cold_s": cold, "peak_mb": peak / 2**20,
                  "drifted": drifted}))
"""


def make_frames(rows: int, cols: int = 20, seed: int = 0):
    import numpy as np, pandas as pd
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(cols)]
    ref = pd.DataFrame(rng.normal(size=(rows, cols)), columns=names)
    cur = pd.DataFrame(rng.normal(size=(rows, cols)), columns=names)
    cur[SHIFTED] += 0.5
    return ref, cur


def child_warm(rounds: int) -> dict:
    "mlflow_nb in this fresh process: profile + check, warm-up then timed rounds; the check alone; peak memory."
    import pandas as pd
    ref, cur = pd.read_parquet(WORK / "reference.parquet"), pd.read_parquet(WORK / "current.parquet")
    from mlflow_nb.data import build_profile
    from mlflow_nb.drift import drift_report
    drifted = sorted(drift_report(build_profile(ref), cur).drifted)  # warm-up
    total, check = [], []
    for _ in range(rounds):
        t0 = time.perf_counter(); profile = build_profile(ref)
        t1 = time.perf_counter(); drift_report(profile, cur)
        t2 = time.perf_counter(); total.append(t2 - t0); check.append(t2 - t1)
    tracemalloc.start()
    drift_report(build_profile(ref), cur)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"warm_s": median(total), "check_s": median(check), "rounds_s": total, "peak_mb": peak / 2**20,
            "drifted": drifted}


def child_cold(rounds: int, preload: str, report: bool) -> dict:
    "The first drift check (and report) in this fresh process against the median of the later ones."
    import pandas as pd
    cur = pd.read_parquet(WORK / "current.parquet")
    profile = json.loads((WORK / "profile.json").read_text())  # what the CLI downloads from the training run
    if preload == "config": import mlflow_nb.config  # noqa: F401  -- `mlflow-nb monitor` has loaded it before any check
    def check():
        from mlflow_nb.drift import drift_report
        drift = drift_report(profile, cur)
        if report:
            from mlflow_nb.drift import drift_charts
            from mlflow_nb.monitor import CheckResult, html_report
            html_report(CheckResult("models:/m@champion", "1", drift, None, [], drift_charts(drift, profile, cur)))
        return drift
    t0 = time.perf_counter(); drifted = sorted(check().drifted); cold = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t = time.perf_counter(); check(); times.append(time.perf_counter() - t)
    return {"cold_s": cold, "warm_s": median(times), "rounds_s": times, "drifted": drifted}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode: raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(rows: int) -> None:
    "The Parquet files every process reads, and the profile JSON of the reference."
    from mlflow_nb.data import build_profile
    WORK.mkdir(parents=True, exist_ok=True)
    ref, cur = make_frames(rows)
    ref.to_parquet(WORK / "reference.parquet"); cur.to_parquet(WORK / "current.parquet")
    (WORK / "profile.json").write_text(json.dumps(build_profile(ref)))
    mb = 2 * ref.memory_usage().sum() / 2**20
    print(f"data: 2 frames of {rows:,} x 20 float64 = {mb:.0f} MB; shifted: {SHIFTED}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per cold figure (medians over them)")
    ap.add_argument("--evidently-python", default=str(EVIDENTLY_PY))
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        kind, *rest = a.child
        res = child_warm(a.rounds) if kind == "warm" else child_cold(a.rounds, rest[0], rest[1] == "report")
        print(json.dumps(res)); return
    if not Path(a.evidently_python).exists():
        raise SystemExit(f"make the Evidently environment first (see {__file__}'s docstring)")
    prepare(a.rows)
    rounds = str(a.rounds)
    ours = run_child("warm", "--rounds", rounds)
    out = subprocess.run([a.evidently_python, "-c", EVIDENTLY, str(WORK / "reference.parquet"),
                          str(WORK / "current.parquet"), rounds], capture_output=True, text=True)
    if out.returncode: raise SystemExit(out.stderr[-3000:])
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    cold = {}
    for name, preload, what in (("check, as mlflow-nb monitor pays it", "config", "check"),
                                ("check + HTML report with charts, as mlflow-nb monitor pays it", "config", "report"),
                                ("check, nothing of mlflow_nb loaded before", "none", "check")):
        runs = [run_child("cold", preload, what, "--rounds", rounds) for _ in range(a.processes)]
        cold[name] = {"cold_s": median(r["cold_s"] for r in runs), "warm_s": median(r["warm_s"] for r in runs),
                      "processes": runs, "drifted": runs[0]["drifted"]}
    same = ours["drifted"] == SHIFTED == theirs["drifted"] and all(r["drifted"] == SHIFTED for c in cold.values()
                                                                     for r in c["processes"])
    print(f"warm, median of {a.rounds}: mlflow_nb {ours['warm_s']:.3f} s (profile from the raw reference + check; the "
          f"check alone {ours['check_s']:.3f} s against the quantile sketch), "
          f"peak {ours['peak_mb']:.0f} MB above the data | "
          f"Evidently {theirs['warm_s']:.2f} s against the raw reference, peak {theirs['peak_mb']:.0f} MB | "
          f"{ratio(theirs['warm_s'], ours['warm_s']):.0f}x faster; both flagged exactly {SHIFTED}: {same}")
    for name, c in cold.items():
        print(f"cold, {name}: first call {c['cold_s']:.3f} s, warm {c['warm_s']:.3f} s: "
              f"{c['cold_s'] / c['warm_s']:.2f}x "
              f"(medians over {a.processes} fresh processes)")
    print(f"cold, Evidently (import + first report): {theirs['cold_s']:.2f} s, warm {theirs['warm_s']:.2f} s")
    write_results("monitor", {
        "rows": a.rows, "columns": 20, "shifted": SHIFTED, "rounds": a.rounds, "same_columns_flagged": same,
        "note": "mlflow_nb compares with its reference profile (a quantile sketch of 1,001 quantiles per column, built "
                "from the raw reference inside the timed warm figure); Evidently compares with the raw reference",
        "mlflow_nb": ours, "evidently": theirs, "speedup_warm": ratio(theirs["warm_s"], ours["warm_s"]),
        "cold": {name: {**c, "cold_over_warm": c["cold_s"] / c["warm_s"]} for name, c in cold.items()},
        "target": "warm >= 10x Evidently with the same columns flagged; "
                  "cold <= 2x warm for the check as mlflow-nb monitor pays it"})


if __name__ == "__main__":
    main()
