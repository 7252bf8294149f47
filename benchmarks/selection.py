"""Best-run selection: select_best_run against one search_runs(max_results=1) call and the guide's full DataFrame.

2,000 finished runs in one SQLite experiment (created with log_batch: rmse, mae, r2, params, the train tag).
Anchors, in the same run: `MlflowClient.search_runs(..., order_by, max_results=1)` (the floor) and
`mlflow.search_runs(...)` of the whole experiment into pandas (what the guide did).
Targets: select_best_run <= 1.5x the single search; far below the full DataFrame.
(select_best_model adds loading the model, which is the same cost whichever way the run was found.)

    python benchmarks/selection.py [--runs 2000] [--rounds 7]
"""
import argparse, os, random, statistics, tempfile, time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow_nb.settings import Artifacts, MlflowConfig, TrackingServer
from mlflow_nb.registry import select_best_run
from mlflow_nb.tracking import setup_tracking


def populate(client, exp_id, n):
    rng = random.Random(0)
    ts = int(time.time() * 1000)
    for i in range(n):
        run = client.create_run(exp_id, tags={"mlflow_nb.kind": "train"}, run_name=f"run-{i}")
        rmse = rng.uniform(40, 80)
        client.log_batch(run.info.run_id,
                         metrics=[Metric("rmse", rmse, ts, 0), Metric("mae", rmse * 0.8, ts, 0), Metric("r2", 1 - rmse / 100, ts, 0)],
                         params=[Param("model.params.n_estimators", str(rng.randint(10, 300))), Param("model.params.max_depth", str(rng.randint(2, 12)))])
        client.set_terminated(run.info.run_id)


def timed(fn):
    t = time.perf_counter(); out = fn(); return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tr = setup_tracking(MlflowConfig(tracking_server=TrackingServer(uri=f"sqlite:///{tmp}/sel.db"), artifacts=Artifacts(store=str(tmp / "art"))))
    client = MlflowClient()
    exp = tr.default_experiment_id
    t0 = time.perf_counter(); populate(client, exp, a.runs)
    print(f"created {a.runs} runs in {time.perf_counter() - t0:.1f} s")
    flt = "attributes.status = 'FINISHED' and tags.`mlflow_nb.kind` = 'train'"
    one = lambda: client.search_runs([exp], flt, order_by=["metrics.`rmse` ASC"], max_results=1)[0]
    ours = lambda: select_best_run("development", "rmse", client=client)
    full = lambda: mlflow.search_runs([exp]).sort_values("metrics.rmse").iloc[0]
    one(); ours(); full()  # warm-up
    t_one, t_ours, t_full = [], [], []
    for r in range(a.rounds):
        (d1, r1), (d2, r2), (d3, r3) = timed(one), timed(ours), timed(full)
        assert r1.info.run_id == r2.info.run_id == r3.run_id
        t_one.append(d1); t_ours.append(d2); t_full.append(d3)
        print(f"round {r + 1}: search_runs(max_results=1) {d1:.4f} s, select_best_run {d2:.4f} s, full DataFrame {d3:.3f} s")
    m1, m2, m3 = (statistics.median(x) for x in (t_one, t_ours, t_full))
    print(f"median of {a.rounds}: search_runs(max_results=1) {m1:.4f} s, select_best_run {m2:.4f} s "
          f"({m2 / m1:.2f}x the single search), full search_runs DataFrame {m3:.3f} s ({m3 / m2:.1f}x slower than select_best_run)")


if __name__ == "__main__":
    main()
