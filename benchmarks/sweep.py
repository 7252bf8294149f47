"""Sweep scaling on Dask and the per-trial overhead of a sweep trial.

Same data (a synthetic 20,000-row regression CSV, 10 features: each fit takes about a second), same 16
configurations (RandomForestRegressor, n_estimators 40, max_depth 4..11 x max_features 0.5/1.0), three sides:
  (a) `run_sweep` on a LocalCluster of 1 worker process,
  (b) `run_sweep` on a LocalCluster of 2 worker processes (target: (a)/(b) >= 1.7x on 2 cores),
  (c) the anchor: a bare loop in one process: read and split once, then for each config: fit, score, `mlflow.start_run`,
      log params + metrics, `mlflow.sklearn.log_model` in skops format with a signature, an input example (five
      rows) and explicit requirements, as mlflow_nb logs its models (target: a trial <= 1.10 x an iteration of (c));
  (c') the anchor as it was until stop 19, without the input example (MLflow then skips loading the saved model
      and scoring the example: the check `log_model` runs on every model logged with one), reported beside it.
A trial's own cost is measured apart from the sweep's once-per-sweep work (planning, the sweep run, its data set record,
the study's summary and plots): (a) and (c) also run the first `--base-trials` configs (default 8) in every round, and
the per-trial figure is (a, 16 - a, 8) / (c, 16 - c, 8) - 1, the same eight configs (the deeper trees) on both
sides; the whole-sweep ratio (a) / (c) - 1 is reported beside it.
The clusters are started before timing (their start-up is reported apart) and warmed up by a 2-trial sweep, so
the workers have imported everything; the anchor is warmed up by one fit + log. Rounds are interleaved, each on
a fresh SQLite store, created (MLflow's schema migrations, about a second) before the clock starts on every side:
the anchor's `set_experiment` creates its store untimed, so the sweep's is too. Medians are reported.

    flock /tmp/mlflow_nb_bench.lock python benchmarks/sweep.py [--rounds 5] [--trials 16] [--base-trials 8]
"""
from __future__ import annotations
import argparse, itertools, json, math, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median, temp_project, write_results

DEPTHS, FEATURES = list(range(4, 12)), [0.5, 1.0]


def make_data(path: Path, rows: int = 20_000, seed: int = 0) -> None:
    import numpy as np, pandas as pd
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 10))
    y = X @ rng.normal(size=10) + np.sin(X[:, 0] * 3) * 2 + rng.normal(scale=0.5, size=rows)
    pd.DataFrame(X, columns=[f"x{i}" for i in range(10)]).assign(target=y).to_csv(path, index=False)


def grid(trials: int) -> list[dict]:
    combos = [{"model.params.max_depth": d, "model.params.max_features": f} for d, f in itertools.product(DEPTHS, FEATURES)]
    return combos[:trials]


def overrides(folder: Path) -> list[str]:
    return [f"data.source={folder / 'data.csv'}", "model.params.n_estimators=40", "validation.cv_folds=3"]


def sweep_seconds(folder: Path, address: str, trials: int) -> float:
    "One sweep of `trials` configs through the scheduler at `address`, on a fresh store in `folder`."
    from mlflow_nb.sweep import run_sweep, search_space
    combos = grid(trials)
    values = {k: list(dict.fromkeys(json.dumps(c[k]) for c in combos)) for k in combos[0]}  # each value once: the
    space = search_space([f"{k}={','.join(v)}" for k, v in values.items()])  # grid is exactly the anchor's configs
    assert math.prod(len(v) for v in values.values()) == trials, values
    store = folder / f"sweep-{time.time_ns()}.db"
    from mlflow.tracking import MlflowClient
    MlflowClient(f"sqlite:///{store}").search_experiments()  # the store created untimed, as the anchor's is
    t0 = time.perf_counter()
    _, table = run_sweep(folder / "configs", space, "grid", trials, overrides=[*overrides(folder), f"tracking_server.uri=sqlite:///{store}"],
                         scheduler=address, progress=False)
    secs = time.perf_counter() - t0
    assert (table.status == "FINISHED").sum() == trials, table
    return secs


def bare_loop_seconds(folder: Path, trials: int, example: bool = True) -> float:
    "The anchor: fit and log each config in this process with plain MLflow calls (with an input example or not)."
    import mlflow, pandas as pd
    from mlflow.models import infer_signature
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    from sklearn.model_selection import train_test_split
    store = folder / f"bare-{time.time_ns()}.db"
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_experiment("bare")
    t0 = time.perf_counter()
    df = pd.read_csv(folder / "data.csv")  # read and split once, as a sweep's worker now keeps its last trial's data
    X, y = df.drop(columns="target"), df["target"]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=42)
    for c in grid(trials):
        params = {"n_estimators": 40, "max_depth": c["model.params.max_depth"], "max_features": c["model.params.max_features"]}
        with mlflow.start_run():
            model = RandomForestRegressor(random_state=42, **params).fit(Xtr, ytr)
            pred = model.predict(Xte)
            mlflow.log_params(params)
            mlflow.log_metrics({"rmse": mean_squared_error(yte, pred) ** 0.5, "mae": mean_absolute_error(yte, pred),
                                "r2": r2_score(yte, pred)})
            mlflow.sklearn.log_model(model, name="model", signature=infer_signature(Xte.head(5), pred[:5]),
                                     input_example=Xte.head(5) if example else None,
                                     serialization_format="skops", skops_trusted_types=["sklearn.tree._tree.Tree"],
                                     pip_requirements=["mlflow", "scikit-learn"])  # as mlflow_nb logs: skops, no inference
    return time.perf_counter() - t0


def main():
    import logging, warnings
    warnings.filterwarnings("ignore"); logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--base-trials", type=int, default=8, help="the shorter sweep and loop (per-trial cost by difference)")
    args = ap.parse_args()
    assert 0 < args.base_trials < args.trials, "--base-trials must be between 0 and --trials"
    from distributed import LocalCluster
    with temp_project() as (folder, _):
        make_data(folder / "data.csv")
        t = time.perf_counter(); one = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, silence_logs=40)
        start_1 = time.perf_counter() - t
        t = time.perf_counter(); two = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40)
        start_2 = time.perf_counter() - t
        try:
            for c in (one, two): sweep_seconds(folder, c.scheduler_address, 2)  # warm-up: imports on every worker
            bare_loop_seconds(folder, 1); bare_loop_seconds(folder, 1, example=False)
            s1, s2, bare, plain, s1_base, bare_base, per_trial = [], [], [], [], [], [], []
            for r in range(args.rounds):  # each short run next to its long one, so both meet the same host
                s1.append(sweep_seconds(folder, one.scheduler_address, args.trials))
                bare.append(bare_loop_seconds(folder, args.trials))
                s1_base.append(sweep_seconds(folder, one.scheduler_address, args.base_trials))
                bare_base.append(bare_loop_seconds(folder, args.base_trials))
                s2.append(sweep_seconds(folder, two.scheduler_address, args.trials))
                plain.append(bare_loop_seconds(folder, args.trials, example=False))
                per_trial.append((s1[-1] - s1_base[-1]) / (bare[-1] - bare_base[-1]) - 1)
                print(f"round {r + 1}: 1 worker {s1[-1]:.1f} s ({args.base_trials} trials {s1_base[-1]:.1f} s), "
                      f"2 workers {s2[-1]:.1f} s, bare loop {bare[-1]:.1f} s ({args.base_trials} configs "
                      f"{bare_base[-1]:.1f} s; without the input example {plain[-1]:.1f} s); "
                      f"per-trial overhead {100 * per_trial[-1]:+.1f}%", flush=True)
        finally:
            one.close(); two.close()
    m1, m2, mb, mp = median(s1), median(s2), median(bare), median(plain)
    res = {"trials": args.trials, "rounds": args.rounds, "one_worker_s": s1, "two_workers_s": s2, "bare_loop_s": bare,
           "bare_loop_without_example_s": plain,
           "median_one_worker_s": m1, "median_two_workers_s": m2, "median_bare_loop_s": mb,
           "median_bare_loop_without_example_s": mp,
           "base_trials": args.base_trials, "one_worker_base_s": s1_base, "bare_loop_base_s": bare_base,
           "per_trial_overhead_by_round": per_trial, "per_trial_overhead_vs_bare": median(per_trial),
           "scaling_2_vs_1": m1 / m2, "whole_sweep_overhead_vs_bare": m1 / mb - 1,
           "whole_sweep_overhead_vs_bare_without_example": m1 / mp - 1,
           "per_trial_s": {"one_worker": median([(a - b) / (args.trials - args.base_trials) for a, b in zip(s1, s1_base)]),
                           "bare_loop": median([(a - b) / (args.trials - args.base_trials) for a, b in zip(bare, bare_base)])},
           "cluster_start_s": {"one_worker": start_1, "two_workers": start_2}}
    print(f"scaling 2 vs 1 worker: {res['scaling_2_vs_1']:.2f}x (target >= 1.7x); per-trial overhead vs bare loop: "
          f"{100 * res['per_trial_overhead_vs_bare']:+.1f}% (target <= 10%); whole sweep vs bare loop "
          f"{100 * res['whole_sweep_overhead_vs_bare']:+.1f}%; whole sweep against the loop without the input example: "
          f"{100 * res['whole_sweep_overhead_vs_bare_without_example']:+.1f}%")
    write_results("sweep", res)


if __name__ == "__main__":
    main()
