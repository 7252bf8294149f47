"""Serving: `mlflow-nb serve` against `mlflow models serve` (1 and 2 workers) and BentoML 1.4.40 adaptive batching.

The default RandomForest(100, max_depth=10) trained on the demo data and promoted to @champion in a fresh SQLite
store. Every server runs on a loopback port, the same model behind each:

- `mlflow models serve -m models:/diabetes_regressor@champion --env-manager local --workers N`
- `mlflow-nb serve [--workers N]`, with its prediction log on (every request is logged to the serving run), scoring
  with its compiled path (`mlflow_nb.compiled`, checked at load by `mlflow_nb.guard`)
- "mlflow-nb sklearn": the same, started with MLFLOW_NB_SERVE_COMPILED=0, scoring with `pipeline.predict(DataFrame)`
- a BentoML service, `@bentoml.api(batchable=True)` with BentoML's default batching settings, 1 worker, loading
  the same `model.skops` file with the same trusted types (access log off, as ours)

wrk (Debian package `wrk`) posts the same 1-row or 100-row body again and again: `dataframe_split` JSON to
`/invocations` for MLflow and mlflow-nb, `{"rows": [[...]]}` to `/predict` for BentoML. Each (server, body,
connections) run is warmed up for 2 s, then measured for `--duration` seconds in each of `--rounds` rounds; the
rounds are interleaved (every run of round 1, then every run of round 2, ...) so a noisy neighbour hits all sides
alike. Medians of requests/s, p50 and p99. After each run of mlflow-nb the script reads `/metrics` and reports the
prediction log's dropped requests and write errors and the 5xx answers during that run; at the end it stops the
servers (SIGTERM) and reports how each serving run ended. Before the servers start it times one in-process predict
of 1 to 800 rows both ways (`pipeline.predict` and the compiled predictor, median of 50, answers checked equal):
the ceiling of each configuration. Results: benchmarks/results/fastpath.json.

Targets (issue 14): 1 row c=8 >= 25x MLflow's req/s with p99 <= 1/25 of MLflow's and 0 prediction-log drops;
100 rows >= 18x; c=1 p50 <= MLflow's; --workers 2 on both sides >= 25x; against BentoML at c=8 and c=32 >= 4x its
req/s with 0 errors on our side (its non-2xx reported).

    python benchmarks/serving.py [--rounds 3] [--duration 10] [--bentoml-python PATH] [--skip-bentoml]

BentoML lives in a benchmark-only environment (it is not a dependency of the project). Build it once with
    python -m venv /work/benchenv/bentoml
    /work/benchenv/bentoml/bin/pip install "bentoml==1.4.40" "scikit-learn==$(pip show scikit-learn | sed -n 's/Version: //p')" \
        "skops==$(pip show skops | sed -n 's/Version: //p')" pandas numpy
and point the script at its python with --bentoml-python or MLFLOW_NB_BENCH_BENTOML (default
/work/benchenv/bentoml/bin/python). Run it under the machine-wide lock:
    flock /tmp/mlflow_nb_bench.lock python benchmarks/serving.py
"""
from __future__ import annotations
import argparse, json, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BIN, free_port, median, start_server, stop_server, temp_project, write_results  # noqa: E402

BENTO_SERVICE = '''
import json, os
import bentoml
import numpy as np
import pandas as pd
from skops.io import load

@bentoml.service(workers=1)
class Regressor:
    def __init__(self):
        self.model = load(os.environ["BENCH_MODEL_FILE"], trusted=json.loads(os.environ["BENCH_TRUSTED_TYPES"]))
        self.columns = json.loads(os.environ["BENCH_COLUMNS"])

    @bentoml.api(batchable=True)
    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict(pd.DataFrame(rows, columns=self.columns))
'''

WRK_SCRIPT = '''wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "r")
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  io.write(string.format("JSON {{\\"requests\\": %d, \\"rps\\": %f, \\"p50\\": %f, \\"p99\\": %f, \\"errors\\": %d, \\"non2xx\\": %d}}\\n",
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
'''

TARGETS = [  # (label, anchor (server, body, connections), ours, target ratio of req/s)
    ("1 row, c=8", ("mlflow", "1 row", 8), ("mlflow-nb", "1 row", 8), 25),
    ("100 rows, c=8", ("mlflow", "100 rows", 8), ("mlflow-nb", "100 rows", 8), 18),
    ("1 row, c=1", ("mlflow", "1 row", 1), ("mlflow-nb", "1 row", 1), None),
    ("--workers 2, 1 row, c=8", ("mlflow x2", "1 row", 8), ("mlflow-nb x2", "1 row", 8), 25),
    ("BentoML, 1 row, c=8", ("bentoml", "1 row", 8), ("mlflow-nb", "1 row", 8), 4),
    ("BentoML, 1 row, c=32", ("bentoml", "1 row", 32), ("mlflow-nb", "1 row", 32), 4),
]
# Each comparison twice: mlflow-nb with its compiled scoring path (the default), and "mlflow-nb sklearn", the same
# service started with MLFLOW_NB_SERVE_COMPILED=0 so that every batch goes through `pipeline.predict(DataFrame)`.
COMPARISONS = [row for label, anchor, ours, target in TARGETS
               for row in ((label, anchor, ours, target),
                           (f"{label} [pipeline.predict]", anchor, (ours[0].replace("mlflow-nb", "mlflow-nb sklearn"),
                                                                     *ours[1:]), target))]


def prepare(d: Path, cfg):
    "Train and promote the default model; write the request bodies; (model name, bodies, BentoML environment)."
    import mlflow
    from mlflow_nb.data import load_dataset
    from mlflow_nb.promotion import promote
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    setup_tracking(cfg)
    res = train_model(None, cfg, plots=False)
    name = cfg.model.estimator.name
    promote(name, res.version, cfg.model.promotion, cfg.model.primary_metric)
    X = load_dataset(cfg.model.data.source).drop(columns=cfg.model.data.target)
    bodies = {}
    for label, rows in (("1 row", 1), ("100 rows", 100)):
        values = X.head(rows).values.tolist()
        for kind, doc in (("split", {"dataframe_split": {"columns": list(X.columns), "data": values}}), ("bento", {"rows": values})):
            path = d / f"body-{kind}-{rows}.json"; path.write_text(json.dumps(doc)); bodies[(kind, label)] = path
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{res.version}", dst_path=str(d / "model")))
    trusted = mlflow.models.Model.load(str(model_dir)).flavors["sklearn"]["skops_trusted_types"]
    bento_env = {"BENCH_MODEL_FILE": str(model_dir / "model.skops"), "BENCH_TRUSTED_TYPES": json.dumps(trusted),
                 "BENCH_COLUMNS": json.dumps(list(X.columns))}
    return name, bodies, bento_env, X


def ceiling(name: str, X, sizes=(1, 4, 8, 16, 32, 400, 800)) -> tuple[dict, dict]:
    """Seconds of one in-process predict of n rows, median of 50 after a warm-up, the floor of a batch:
    ({n: `pipeline.predict(DataFrame)`}, {n: the compiled predictor on the same rows as request columns}), the model
    loaded as the service loads it; the two answers are checked equal bit for bit."""
    import statistics
    import numpy as np
    from mlflow_nb.schema import validate_columns
    from mlflow_nb.serve import load_served_model
    model = load_served_model(name, "champion")
    if model.compiled is None: raise SystemExit(f"the served model was not compiled: {model.scoring}")
    timed = lambda fn, arg: statistics.median(_seconds(fn, arg) for _ in range(50))
    by_pipeline, by_compiled = {}, {}
    for n in sizes:
        rows = X.sample(n, replace=True, random_state=0)
        cols, _, problems = validate_columns(rows.to_dict(orient="records"), model.input_schema)
        assert not problems, problems
        frame = rows.reset_index(drop=True)
        assert np.array_equal(model.predict(frame), model.compiled.predict(cols)), "the compiled path differs"
        by_pipeline[n], by_compiled[n] = timed(model.predict, frame), timed(model.compiled.predict, cols)
    return by_pipeline, by_compiled


def _seconds(fn, arg) -> float:
    t = time.perf_counter(); fn(arg); return time.perf_counter() - t


def server_commands(d: Path, name: str, bento_python: str | None, bento_env: dict) -> dict:
    "name -> (command(port), environment, health path, scoring path, body kind)."
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    def mlflow_serve(workers):
        return lambda port: [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)]
    def ours(workers):
        return lambda port: [str(BIN / "mlflow-nb"), "serve", "--config", str(d / "configs"), "--port", str(port),
                             "--workers", str(workers)]
    servers = {"mlflow": (mlflow_serve(1), env, "/health", "/invocations", "split"),
               "mlflow-nb": (ours(1), env, "/ready", "/invocations", "split"),
               "mlflow x2": (mlflow_serve(2), env, "/health", "/invocations", "split"),
               "mlflow-nb x2": (ours(2), env, "/ready", "/invocations", "split")}
    plain = {**env, "MLFLOW_NB_SERVE_COMPILED": "0"}  # the same service scoring with pipeline.predict(DataFrame)
    servers.update({"mlflow-nb sklearn": (ours(1), plain, "/ready", "/invocations", "split"),
                    "mlflow-nb sklearn x2": (ours(2), plain, "/ready", "/invocations", "split")})
    if bento_python:
        bento_dir = d / "bento"; bento_dir.mkdir()
        (bento_dir / "service.py").write_text(BENTO_SERVICE)
        benv = {**os.environ, **bento_env, "BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": str(bento_dir / "home"),
                "BENTOML_CONFIG_OPTIONS": "api_server.logging.access.enabled=false"}
        benv.pop("PYTHONPATH", None)
        exe = str(Path(bento_python).parent / "bentoml")
        servers["bentoml"] = (lambda port: [exe, "serve", f"{bento_dir}/service.py:Regressor", "--host", "127.0.0.1",
                                            "--port", str(port)], benv, "/readyz", "/predict", "bento")
    return servers


def wrk(url: str, body: Path, conns: int, seconds: float) -> dict:
    script = Path(tempfile.mkdtemp(prefix="mlflow_nb_wrk_")) / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=body))
    out = subprocess.run(["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{seconds:g}s", "--timeout", "10s",
                          "-s", str(script), url], capture_output=True, text=True)
    shutil.rmtree(script.parent, ignore_errors=True)
    m = re.search(r"JSON (\{.*\})", out.stdout)
    if not m: raise SystemExit(f"wrk failed on {url} (c={conns}): {out.stdout[-1500:]!r} {out.stderr[-1500:]!r}")
    return json.loads(m.group(1))


def service_counters(port: int) -> dict:
    "Drops, write errors and 5xx answers so far, from mlflow-nb's /metrics."
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out = {"dropped": 0.0, "log_errors": 0.0, "5xx": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "mlflow_nb_prediction_log_dropped_total": out["dropped"] += s.value
            elif s.name == "mlflow_nb_prediction_log_errors_total": out["log_errors"] += s.value
            elif s.name == "mlflow_nb_requests_total" and s.labels.get("status", "").startswith("5"): out["5xx"] += s.value
    return out


def rows_answered(port: int) -> float:
    "Rows mlflow-nb answered with predictions so far (every worker), from /metrics."
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "mlflow_nb_rows_predicted_total")


def measure(servers: dict, ports: dict, bodies: dict, runs: list, rounds: int, seconds: float) -> dict:
    "{(server, body, conns): [wrk result + counters, per round]}, rounds interleaved after one warm-up each."
    results = {k: [] for k in runs}
    for key in runs:
        server, body, conns = key
        _, _, _, path, kind = servers[server]
        wrk(f"http://127.0.0.1:{ports[server]}{path}", bodies[(kind, body)], conns, 2)
    for r in range(rounds):
        for key in runs:
            server, body, conns = key
            _, _, _, path, kind = servers[server]
            ours = server.startswith("mlflow-nb")
            before = service_counters(ports[server]) if ours else None
            m = wrk(f"http://127.0.0.1:{ports[server]}{path}", bodies[(kind, body)], conns, seconds)
            if ours:
                after = service_counters(ports[server])
                m.update({k: after[k] - before[k] for k in after})
            results[key].append(m)
            extra = f"  dropped {m['dropped']:.0f} log errors {m['log_errors']:.0f} 5xx {m['5xx']:.0f}" if ours else ""
            print(f"round {r + 1} {server:<13} {body:<8} c={conns:<2}: {m['rps']:8.1f} req/s  p50 {m['p50']:7.2f} ms  "
                  f"p99 {m['p99']:7.2f} ms  errors {m['errors']} non-2xx {m['non2xx']}{extra}", flush=True)
    return results


def serving_runs(d: Path) -> list[dict]:
    "Status and logged rows of every serving run in the store."
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{d / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`mlflow_nb.kind` = 'serve'")
    return [{"run_id": r.info.run_id, "status": r.info.status,
             "logged_rows": sum(m.value for m in client.get_metric_history(r.info.run_id, "window_rows"))} for r in runs]


def summarise(results: dict, rounds: int, seconds: float, floors: tuple[dict, dict]) -> list[dict]:
    """The comparisons, with the ceiling of each: one worker answers at most c requests per in-process predict of
    their rows (c rows for 1-row bodies, 8 x 100 for 100-row bodies), whatever its HTTP layer costs (the compiled
    predictor's time for the compiled service, `pipeline.predict`'s for "mlflow-nb sklearn")."""
    rows = []
    med = lambda key, f: median(x[f] for x in results[key])
    print(f"\nmedians of {rounds} rounds of {seconds:g} s:")
    for label, anchor, ours, target in COMPARISONS:
        if anchor not in results or ours not in results: continue
        row = {"case": label, "anchor": anchor[0], "target_ratio": target,
               **{f"anchor_{f}": med(anchor, f) for f in ("rps", "p50", "p99")},
               **{f"ours_{f}": med(ours, f) for f in ("rps", "p50", "p99")},
               "anchor_non2xx": sum(x["non2xx"] for x in results[anchor]), "anchor_errors": sum(x["errors"] for x in results[anchor]),
               "ours_non2xx": sum(x["non2xx"] for x in results[ours]), "ours_errors": sum(x["errors"] for x in results[ours]),
               "ours_dropped": sum(x["dropped"] for x in results[ours]), "ours_5xx": sum(x["5xx"] for x in results[ours]),
               "ours_log_errors": sum(x["log_errors"] for x in results[ours])}
        row["rps_ratio"] = row["ours_rps"] / row["anchor_rps"]
        conns, batch_rows = ours[2], ours[2] * (100 if ours[1] == "100 rows" else 1)
        workers = 2 if ours[0].endswith("x2") else 1
        floor = floors[0] if "sklearn" in ours[0] else floors[1]
        if batch_rows // workers in floor:  # c requests split over the workers: each predicts c / workers rows at a time
            row["ceiling_rps"] = workers * (conns // workers) / floor[batch_rows // workers]
            row["ceiling_ratio"] = row["ceiling_rps"] / row["anchor_rps"]
        row["p99_ratio"] = row["anchor_p99"] / row["ours_p99"]
        row["p50_ratio"] = row["anchor_p50"] / row["ours_p50"]
        rows.append(row)
        print(f"{label:<24} {anchor[0]:<10} {row['anchor_rps']:8.1f} req/s p50 {row['anchor_p50']:6.2f} p99 {row['anchor_p99']:7.2f} ms "
              f"(non-2xx {row['anchor_non2xx']}) | mlflow-nb {row['ours_rps']:8.1f} req/s p50 {row['ours_p50']:6.2f} "
              f"p99 {row['ours_p99']:6.2f} ms | {row['rps_ratio']:.1f}x req/s (target {target or '-'}x), p99 "
              f"{row['p99_ratio']:.1f}x lower, p50 {row['p50_ratio']:.2f}x | ours: dropped {row['ours_dropped']:.0f}, "
              f"errors {row['ours_errors'] + row['ours_non2xx']}"
              + (f" | ceiling {row['ceiling_rps']:.0f} req/s = {row['ceiling_ratio']:.1f}x" if "ceiling_rps" in row else ""), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10, help="seconds of each measured wrk run")
    ap.add_argument("--bentoml-python", default=os.environ.get("MLFLOW_NB_BENCH_BENTOML", "/work/benchenv/bentoml/bin/python"))
    ap.add_argument("--skip-bentoml", action="store_true")
    ap.add_argument("--only", nargs="*", help="comparison labels to run (default: all)")
    a = ap.parse_args()
    if not shutil.which("wrk"): raise SystemExit("wrk is needed: apt-get install wrk")
    bento = None if a.skip_bentoml else a.bentoml_python
    if bento and not Path(bento).exists():
        raise SystemExit(f"no BentoML environment at {bento}: build it (see the docstring) or pass --skip-bentoml")
    comparisons = [c for c in COMPARISONS if (not a.only or c[0] in a.only) and (bento or c[1][0] != "bentoml")]
    runs = list(dict.fromkeys(k for c in comparisons for k in (c[1], c[2])))
    with temp_project() as (d, cfg):
        name, bodies, bento_env, X = prepare(d, cfg)
        floors = ceiling(name, X)
        for what, floor in zip(("pipeline.predict", "compiled"), floors):
            print(f"in-process {what}: " + ", ".join(f"{n} rows {t * 1000:.3f} ms" for n, t in floor.items()), flush=True)
        servers = server_commands(d, name, bento, bento_env)
        needed = list(dict.fromkeys(k[0] for k in runs))
        ports, procs = {}, {}
        try:
            for s in needed:
                cmd, env, health, _, _ = servers[s]
                ports[s] = free_port()
                procs[s] = start_server(cmd(ports[s]), ports[s], cwd=d, env=env, health=health)
            results = measure(servers, ports, bodies, runs, a.rounds, a.duration)
            answered = sum(rows_answered(ports[s]) for s in needed if s.startswith("mlflow-nb"))
        finally:
            for p in procs.values(): stop_server(p)
        rows = summarise(results, a.rounds, a.duration, floors)
        ended = serving_runs(d)
        logged = sum(r["logged_rows"] for r in ended)
        print(f"serving runs after SIGTERM: {[r['status'] for r in ended]}; rows answered {answered:.0f}, "
              f"rows in the serving runs {logged:.0f}")
        write_results("fastpath", {"rounds": a.rounds, "duration_s": a.duration, "comparisons": rows,
                                   "serving_runs": ended, "predict_seconds_by_rows": floors[0],
                                   "compiled_seconds_by_rows": floors[1],
                                   "rows_answered": answered, "rows_logged": logged,
                                   "runs": {" | ".join(map(str, k)): v for k, v in results.items()}})


if __name__ == "__main__":
    main()
