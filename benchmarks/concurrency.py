"""Concurrency: sweeps against an `mlflow server` on PostgreSQL and against a fresh SQLite store, counted.

Three consecutive rounds of (a) 16 parameter sets with 8 workers against the server and (b) 8 with 4 workers
against a fresh SQLite file. After each, the store is asked what arrived: runs FINISHED, the three metrics of
each run, and the five artifacts each run logs (three config files, the effective config, the reference
profile). Reports sustained runs/s (trials / wall time of `mlflow-nb sweep`) and every shortfall as an error.

    python benchmarks/concurrency.py [--rounds 3]
"""
import argparse, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support import team_server  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

ARTIFACTS = {"configs/mlflow_config.yaml", "configs/model_config.yaml", "configs/serving_config.yaml",
             "configs/effective_config.json", "monitoring/reference_profile.json"}


def project(uri: str | None) -> Path:
    d = Path(tempfile.mkdtemp()); shutil.copytree(ROOT / "configs", d / "configs")
    if uri:
        f = d / "configs" / "mlflow_config.yaml"
        f.write_text(f.read_text().replace('uri: "sqlite:///../mlflow.db"', f'uri: "{uri}"')
                     .replace('default: "development"', f'default: "dev_{d.name}"'))
    return d


def sweep(d: Path, workers: int, grid: list[str]) -> float:
    t = time.perf_counter()
    args = [str(Path(sys.executable).parent / "mlflow-nb"), "sweep", "--quiet", "--workers", str(workers)]
    for g in grid: args += ["-g", g]
    r = subprocess.run(args, cwd=d, capture_output=True, text=True)
    if r.returncode: raise SystemExit(r.stderr[-2000:])
    return time.perf_counter() - t


def count(uri: str, experiment: str, expected: int) -> dict:
    c = MlflowClient(uri, uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], "tags.`mlflow_nb.sweep_trial` != ''", max_results=1000)
    fin = [r for r in runs if r.info.status == "FINISHED"]
    metrics = sum(k in r.data.metrics for r in fin for k in ("rmse", "mae", "r2"))
    arts = sum(len(ARTIFACTS & ({a.path for a in c.list_artifacts(r.info.run_id, "configs")} |
                                {a.path for a in c.list_artifacts(r.info.run_id, "monitoring")})) for r in fin)
    errors = (expected - len(fin)) + (3 * expected - metrics) + (5 * expected - arts)
    return {"runs": len(runs), "finished": len(fin), "metrics": metrics, "artifacts": arts, "errors": errors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    state_dir = Path(tempfile.mkdtemp())
    state = team_server.start(state_dir)
    try:
        for r in range(a.rounds):
            d = project(state["uri"])
            secs = sweep(d, 8, ["model.params.n_estimators=10,20,30,40", "model.params.max_depth=2,4,6,8"])
            c = count(state["uri"], f"dev_{d.name}", 16)
            print(f"round {r + 1}: server (PostgreSQL), 16 trials / 8 workers: {secs:.1f} s, {16 / secs:.2f} runs/s, {c}")
            d = project(None)
            secs = sweep(d, 4, ["model.params.n_estimators=10,20", "model.params.max_depth=2,4,6,8"])
            c = count(f"sqlite:///{d}/mlflow.db", "development", 8)
            print(f"round {r + 1}: fresh SQLite, 8 trials / 4 workers: {secs:.1f} s, {8 / secs:.2f} runs/s, {c}")
    finally:
        team_server.stop(state_dir)


if __name__ == "__main__":
    main()
