"""Logging the default model: mlflow_nb's log_sklearn_model against MLflow's defaults.

The default config's pipeline (preprocessing + RandomForestRegressor(100, max_depth=10)) fitted on the demo
data, logged N times into a SQLite store. Anchor: `mlflow.sklearn.log_model` with MLflow's defaults
(requirements inferred; skops needs the tree types trusted, so they are passed). Target: under 1 s.

    python benchmarks/log_model.py [--rounds 5] [--anchor-rounds 3]
"""
import argparse, os, statistics, tempfile, time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow
from mlflow_nb.config import load_config
from mlflow_nb.estimators import build_estimator
from mlflow_nb.data import build_pipeline
from mlflow_nb.tracking import setup_tracking, tracked_run
from mlflow_nb.train import log_sklearn_model, prepare_data, skops_trusted_types

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--anchor-rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(ROOT / "configs", [f"tracking_server.uri=sqlite:///{tmp}/b.db", f"artifacts.store={tmp}/art"], env={})
    setup_tracking(cfg)
    prep = prepare_data(cfg)
    model = build_pipeline(build_estimator(cfg.model.estimator.type, cfg.model.estimator.params, 42), prep.X).fit(prep.split.X_train, prep.split.y_train)
    ours, anchor = [], []
    with tracked_run("warm-up"): log_sklearn_model(model, prep.split.X_train)
    for r in range(max(a.rounds, a.anchor_rounds)):
        if r < a.rounds:
            with tracked_run("ours"):
                t = time.perf_counter(); log_sklearn_model(model, prep.split.X_train); ours.append(time.perf_counter() - t)
        if r < a.anchor_rounds:
            with tracked_run("anchor"):
                t = time.perf_counter()
                mlflow.sklearn.log_model(model, name="model", input_example=prep.split.X_train.head(5),
                                         skops_trusted_types=skops_trusted_types(model))
                anchor.append(time.perf_counter() - t)
        print(f"round {r + 1}: mlflow_nb {ours[-1]:.3f} s" + (f", MLflow defaults {anchor[-1]:.3f} s" if r < a.anchor_rounds else ""))
    o, m = statistics.median(ours), statistics.median(anchor)
    print(f"median: mlflow_nb log_sklearn_model {o:.3f} s ({a.rounds} rounds), "
          f"mlflow.sklearn.log_model defaults {m:.3f} s ({a.anchor_rounds} rounds), {m / o:.1f}x faster")


if __name__ == "__main__":
    main()
