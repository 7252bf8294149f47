"""Serving: `mlflow-nb serve` against `mlflow models serve --env-manager local`, same model, same load.

The default RandomForest trained on the demo data and promoted to @champion in a fresh SQLite store; each
server runs alone (one worker) on a loopback port while wrk (Debian package `wrk`) drives it:
  single-row requests at concurrency 8, 100-row requests at concurrency 8, single-row at concurrency 1.
N rounds each, medians of requests/s and p50/p99 latency, and the ratio. In-process `predict` is the ceiling.
Targets: single rows >= 10x MLflow's requests/s with p99 <= 1/5 of MLflow's; 100 rows >= 8x;
at concurrency 1, a p50 no worse than MLflow's.

    python benchmarks/serving.py [--rounds 3] [--duration 15]
"""
import argparse, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def prepare():
    from mlflow_nb.config import load_config
    from mlflow_nb.data import load_dataset
    from mlflow_nb.registry import promote
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    d = Path(tempfile.mkdtemp()); shutil.copytree(ROOT / "configs", d / "configs")
    cfg = load_config(d / "configs")
    setup_tracking(cfg)
    res = train_model(None, cfg, plots=False)
    promote(cfg.model.estimator.name, res.version, cfg.model.promotion, cfg.model.primary_metric)
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    return d, cfg, X, res


def start(cmd, cwd, env, port):
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx
    for _ in range(600):
        if proc.poll() is not None: raise SystemExit(proc.stderr.read()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200: return proc
        except httpx.HTTPError: pass
        time.sleep(0.2)
    proc.kill(); raise SystemExit("server did not start")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try: proc.wait(30)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def wrk(url, body_file, conns, duration):
    lua = Path(tempfile.mkdtemp()) / "post.lua"
    lua.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                   f'local f = io.open("{body_file}", "r")\nwrk.body = f:read("*a")\nf:close()\n'
                   'done = function(summary, latency, requests)\n'
                   '  io.write(string.format("JSON {\\"rps\\": %f, \\"p50\\": %f, \\"p99\\": %f, \\"errors\\": %d, \\"non2xx\\": %d}\\n",\n'
                   '    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,\n'
                   '    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))\nend\n')
    out = subprocess.run(["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{duration}s", "--timeout", "10s", "-s", str(lua), url],
                         capture_output=True, text=True).stdout
    return json.loads(re.search(r"JSON (\{.*\})", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=15)
    a = ap.parse_args()
    if not shutil.which("wrk"): raise SystemExit("wrk is needed: apt-get install wrk")
    d, cfg, X, res = prepare()
    uri = cfg.tracking_uri
    bodies = {}
    for name, rows in (("1 row", 1), ("100 rows", 100)):
        p = d / f"body{rows}.json"
        p.write_text(json.dumps({"dataframe_split": {"columns": list(X.columns), "data": X.head(rows).values.tolist()}}))
        bodies[name] = p
    # the ceiling: the estimator's predict in this process
    import mlflow
    model = mlflow.sklearn.load_model(f"models:/{cfg.model.estimator.name}/{res.version}")
    for rows in (1, 100):
        xs = X.head(rows); model.predict(xs)
        t = time.perf_counter(); n = 200
        for _ in range(n): model.predict(xs)
        print(f"ceiling: in-process predict of {rows} row(s): {(time.perf_counter() - t) / n * 1000:.2f} ms ({n / (time.perf_counter() - t):.0f}/s)")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    servers = {
        "mlflow models serve": lambda port: [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{cfg.model.estimator.name}@champion",
                                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        "mlflow-nb serve": lambda port: [str(BIN / "mlflow-nb"), "serve", "--config", str(d / "configs"), "--port", str(port)],
    }
    cases = [("1 row", 8), ("100 rows", 8), ("1 row", 1)]
    results = {}
    for name, cmd in servers.items():
        port = free_port()
        proc = start(cmd(port), d, env, port)
        try:
            path = "/invocations"
            for body, conns in cases:
                wrk(f"http://127.0.0.1:{port}{path}", bodies[body], conns, 2)  # warm-up
                for r in range(a.rounds):
                    m = wrk(f"http://127.0.0.1:{port}{path}", bodies[body], conns, a.duration)
                    results.setdefault((name, body, conns), []).append(m)
                    print(f"{name:<20} {body:<8} c={conns}: {m['rps']:8.1f} req/s  p50 {m['p50']:7.2f} ms  p99 {m['p99']:7.2f} ms  "
                          f"errors {m['errors']} non-2xx {m['non2xx']}", flush=True)
        finally:
            stop(proc)
    med = lambda k, f: statistics.median(x[f] for x in results[k])
    print(f"\nmedians of {a.rounds} rounds of {a.duration} s:")
    for body, conns in cases:
        m, o = ("mlflow models serve", body, conns), ("mlflow-nb serve", body, conns)
        print(f"{body:<8} c={conns}: MLflow {med(m, 'rps'):7.1f} req/s p50 {med(m, 'p50'):6.2f} p99 {med(m, 'p99'):6.2f} ms | "
              f"mlflow-nb {med(o, 'rps'):7.1f} req/s p50 {med(o, 'p50'):6.2f} p99 {med(o, 'p99'):6.2f} ms | "
              f"{med(o, 'rps') / med(m, 'rps'):.1f}x req/s, p99 {med(m, 'p99') / med(o, 'p99'):.1f}x lower, "
              f"p50 {med(m, 'p50') / med(o, 'p50'):.2f}x")


if __name__ == "__main__":
    main()
