"""Drift detection: mlflow_nb's full drift check against Evidently's DataDriftPreset on the same frames.

200,000 x 20 numeric rows of N(0, 1) as reference; the current frame the same with columns f0..f4 shifted by
+0.5 sd (fixed seed). mlflow_nb: build the reference profile AND run every statistic (PSI, KS with p-value,
Wasserstein, on all columns) -- timed together and apart. Evidently 0.7.23 (`Report([DataDriftPreset()])`) runs
in its own environment (it does not import under pandas 3): benchmarks/.work/evidently-venv, made with
    python -m venv benchmarks/.work/evidently-venv
    benchmarks/.work/evidently-venv/bin/pip install "evidently==0.7.23" "pandas<3" pyarrow
Both read the same Parquet files; peak memory above the loaded data is measured with tracemalloc in each process.
Target: >= 10x faster, the same 5 columns flagged and no others.

    python benchmarks/drift.py [--rounds 3] [--rows 200000]
"""
import argparse, json, os, statistics, subprocess, sys, time, tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

WORK = Path(__file__).resolve().parent / ".work"
EVIDENTLY_PY = WORK / "evidently-venv" / "bin" / "python"
SHIFTED = [f"f{i}" for i in range(5)]

EVIDENTLY = r"""
import json, sys, time, tracemalloc
import pandas as pd
ref, cur = pd.read_parquet(sys.argv[1]), pd.read_parquet(sys.argv[2])
from evidently import Report
from evidently.presets import DataDriftPreset
tracemalloc.start()
t = time.perf_counter()
snap = Report([DataDriftPreset()]).run(current_data=cur, reference_data=ref)
secs = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1]
drifted = [m["config"]["column"] for m in snap.dict()["metrics"]
           if m["config"]["type"].endswith("ValueDrift") and m["value"] >= m["config"]["threshold"]]
print(json.dumps({"seconds": secs, "peak_mb": peak / 2**20, "drifted": sorted(drifted)}))
"""


def make_frames(rows, cols=20, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(cols)]
    ref = pd.DataFrame(rng.normal(size=(rows, cols)), columns=names)
    cur = pd.DataFrame(rng.normal(size=(rows, cols)), columns=names)
    cur[SHIFTED] += 0.5
    return ref, cur


def ours(ref, cur):
    from mlflow_nb.data import build_profile
    from mlflow_nb.drift import drift_report
    tracemalloc.start()
    t0 = time.perf_counter()
    profile = build_profile(ref)
    t1 = time.perf_counter()
    rep = drift_report(profile, cur)
    t2 = time.perf_counter()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": t2 - t0, "profile_s": t1 - t0, "check_s": t2 - t1, "peak_mb": peak / 2**20, "drifted": sorted(rep.drifted)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000)
    a = ap.parse_args()
    if not EVIDENTLY_PY.exists(): raise SystemExit(f"make the Evidently environment first (see {__file__}'s docstring)")
    WORK.mkdir(exist_ok=True)
    ref, cur = make_frames(a.rows)
    rp, cp = WORK / "reference.parquet", WORK / "current.parquet"
    ref.to_parquet(rp); cur.to_parquet(cp)
    ref, cur = pd.read_parquet(rp), pd.read_parquet(cp)  # the same frames Evidently reads
    print(f"data: 2 frames of {a.rows:,} x 20 float64 = {2 * ref.memory_usage().sum() / 2**20:.0f} MB; shifted: {SHIFTED}")
    mine, theirs = [], []
    for r in range(a.rounds):
        mine.append(ours(ref, cur))
        out = subprocess.run([str(EVIDENTLY_PY), "-c", EVIDENTLY, str(rp), str(cp)], capture_output=True, text=True)
        if out.returncode: raise SystemExit(out.stderr[-2000:])
        theirs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        m, e = mine[-1], theirs[-1]
        print(f"round {r + 1}: mlflow_nb {m['seconds']:.3f} s (profile {m['profile_s']:.3f} + check {m['check_s']:.3f}), "
              f"peak {m['peak_mb']:.0f} MB, flagged {m['drifted']} | Evidently {e['seconds']:.2f} s, peak {e['peak_mb']:.0f} MB, "
              f"flagged {e['drifted']}")
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    ms, es = med(mine, "seconds"), med(theirs, "seconds")
    same = all(x["drifted"] == SHIFTED for x in mine) and all(x["drifted"] == SHIFTED for x in theirs)
    print(f"median of {a.rounds}: mlflow_nb {ms:.3f} s (check alone {med(mine, 'check_s'):.3f} s), peak {med(mine, 'peak_mb'):.0f} MB above the data; "
          f"Evidently {es:.2f} s, peak {med(theirs, 'peak_mb'):.0f} MB; {es / ms:.1f}x faster; "
          f"both flagged exactly {SHIFTED}: {same}")


if __name__ == "__main__":
    main()
