"""The scoring service as users run it: `mlflow-nb serve` on a real port, real HTTP."""
import concurrent.futures as cf, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, child_env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class Server:
    "A `mlflow-nb serve` process on a free port, stopped (SIGTERM, then SIGKILL) at the end."
    def __init__(self, project, *extra, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "mlflow-nb"
        self.proc = subprocess.Popen([str(exe), "serve", "--config", str(project / "configs"), "--port", str(self.port), *extra],
                                     cwd=project, env=child_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None: raise RuntimeError(self.proc.stderr.read())
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200: return
            except httpx.HTTPError: pass
            time.sleep(0.2)
        self.stop(); raise RuntimeError("server did not become ready")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(30)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


def _train_and_promote(project, *overrides):
    from mlflow_nb.config import load_config
    from mlflow_nb.registry import promote
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    cfg = load_config(project / "configs", ["model.params.n_estimators=30", *overrides], env={})
    setup_tracking(cfg)
    res = train_model(None, cfg, plots=False)
    promote(cfg.model.estimator.name, res.version, cfg.model.promotion.model_copy(update={"thresholds": {}, "min_delta": 0}), "rmse")
    return res


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import shutil
    project = tmp_path_factory.mktemp("serve")
    shutil.copytree(CONFIGS, project / "configs")
    res = _train_and_promote(project)
    server = Server(project, "-o", "serve.log_window_seconds=0.5")
    from mlflow_nb.data import load_dataset
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    expected = mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{res.version}").predict(X)
    yield project, server, X, expected, res
    server.stop()


def test_predictions_equal_pyfunc_for_single_rows_and_batches(served):
    project, server, X, expected, res = served
    with httpx.Client(base_url=server.url) as c:
        for i in (0, 17, 441):
            r = c.post("/predict", json={"dataframe_records": [X.iloc[i].to_dict()]})
            assert r.status_code == 200 and r.json()["predictions"] == [expected[i]]
            assert r.json()["model_version"] == res.version
        r = c.post("/invocations", json={"dataframe_split": {"columns": list(X.columns), "data": X.values.tolist()}})
        assert r.json()["predictions"] == expected.tolist()
        r = c.post("/predict", json={"inputs": X.head(50).to_dict(orient="records")})
        assert r.json()["predictions"] == expected[:50].tolist()
        meta = c.get("/metadata").json()
        assert meta["version"] == res.version and meta["alias"] == "champion" and meta["run_id"] == res.run_id
        assert [col["name"] for col in meta["input_schema"]] == list(X.columns)
        assert c.get("/health").json() == {"status": "ok"}


def test_concurrent_requests_each_get_their_own_rows_in_order(served):
    project, server, X, expected, _ = served
    rng = np.random.default_rng(0)
    jobs = [sorted(rng.choice(len(X), size=rng.integers(1, 40), replace=False).tolist()) for _ in range(200)]

    def call(idx):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/predict", json={"dataframe_records": X.iloc[idx].to_dict(orient="records")}).json()["predictions"]

    def batches():
        text = httpx.get(f"{server.url}/metrics").text
        assert 'status="500"' not in text
        return int(next(l.split()[-1] for l in text.splitlines() if l.startswith("mlflow_nb_batches_total")))

    before = batches()
    with cf.ThreadPoolExecutor(16) as pool:
        for idx, preds in zip(jobs, pool.map(call, jobs)):
            assert preds == expected[idx].tolist()
    assert batches() - before < len(jobs)  # concurrent requests shared predict calls


BAD = [  # (body or json, headers, expected status, text the error must contain)
    ({"dataframe_records": [{"age": 0.1}]}, None, 422, "missing column"),
    ({"dataframe_records": [{"zip": 1, **{c: 0.0 for c in ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]}}]}, None, 422, "zip"),
    ({"dataframe_records": [{c: "x" for c in ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]}]}, None, 422, "age[0]: expected number"),
    ({"dataframe_records": []}, None, 422, "no rows"),
    ({"inputs": []}, None, 422, "no rows"),
    ({"dataframe_split": {"columns": ["age"], "data": [[1, 2]]}}, None, 422, "dataframe_split.data[0]"),
    ({"something": 1}, None, 422, "expected dataframe_split"),
    (b'{"inputs": [', None, 400, "malformed JSON"),
    (b"", None, 400, "empty body"),
    (b'{"inputs": [{"age": NaN}]}', None, 400, "NaN is not valid JSON"),
    (b'{"inputs": [{"age": Infinity}]}', None, 400, "Infinity is not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, None, 400, "nested deeper"),
    (b'{"inputs": [{"age": ' + b"[" * 60 + b"]" * 60 + b"}]}", None, 422, "missing column"),
    (b'{"dataframe_split": {"columns": ["age","sex","bmi","bp","s1","s2","s3","s4","s5","s6"], "data": [[' + b"[" * 60 + b"1" + b"]" * 60
     + b', 0,0,0,0,0,0,0,0,0]]}}', None, 422, "age[0]: expected number, got list"),
    (b'{"dataframe_split": {"columns": ["age","sex","bmi","bp","s1","s2","s3","s4","s5","s6"], "data": [["1",0,0,0,0,0,0,0,0,0]]}}',
     None, 422, "age[0]: expected number, got str '1'"),
    (b'{"dataframe_split": {"columns": ["age","sex","bmi","bp","s1","s2","s3","s4","s5","s6"], "data": [[true,0,0,0,0,0,0,0,0,0]]}}',
     None, 422, "age[0]: expected number, got bool True"),
    (b'{"dataframe_split": {"columns": ["age","sex","bmi","bp","s1","s2","s3","s4","s5","s6"], "data": [[{"a": 1},0,0,0,0,0,0,0,0,0]]}}',
     None, 422, "age[0]: expected number, got dict"),
    (b'{"inputs": [{"age": 1e400' + b"".join(b', "%s": 0.0' % c.encode() for c in ["sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]) + b"}]}",
     None, 422, "age[0]: expected number, got float inf"),
    (b'{"inputs": [{"age": ' + b"9" * 5000 + b"}]}", None, 400, "malformed JSON"),
    (b"age=1", {"content-type": "text/plain"}, 415, "application/json"),
    (b"{}", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    (b'{"inputs": "' + b"a" * 2_000_000 + b'"}', None, 413, "over the limit"),
    (b"\xff\xfe\x00", None, 400, "malformed JSON"),
    (b'"just a string"', None, 422, "expected dataframe_split"),
    (b"[1, 2, 3]", None, 422, "expected an object"),
]


@pytest.mark.parametrize("body,headers,status,text", BAD)
def test_bad_input_is_a_4xx_naming_the_problem(served, body, headers, status, text):
    project, server, *_ = served
    h = {"content-type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/predict", content=content, headers=h, timeout=30)
    assert r.status_code == status, r.text[:500]
    assert text in r.json()["error"], r.json()
    assert httpx.get(f"{server.url}/health").status_code == 200  # still up


def test_reload_swaps_versions_without_failing_requests_in_flight(served):
    project, server, X, expected, res = served
    new = _train_and_promote(project, "model.params.max_depth=3")
    new_expected = mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{new.version}").predict(X.head(5))
    stop = time.time() + 4
    def hammer():
        out = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while time.time() < stop:
                r = c.post("/predict", json={"dataframe_records": X.head(5).to_dict(orient="records")})
                out.append((r.status_code, r.json()["model_version"], r.json()["predictions"]))
        return out
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(hammer) for _ in range(4)]
        time.sleep(1)
        r = httpx.post(f"{server.url}/reload", timeout=60)
        assert r.status_code == 200 and r.json() == {"previous_version": res.version, "version": new.version}
        results = [x for f in futs for x in f.result()]
    assert all(code == 200 for code, _, _ in results)
    by_version = {v: p for _, v, p in results}
    assert by_version[res.version] == expected[:5].tolist() and by_version[new.version] == new_expected.tolist()
    # back to the first version for the other tests
    from mlflow_nb.registry import rollback
    rollback("diabetes_regressor")
    assert httpx.post(f"{server.url}/reload").json()["version"] == res.version


def test_bearer_token_protects_predict_and_reload(served):
    project, _, X, expected, _ = served
    server = Server(project, "-o", "serve.log_predictions=false", env={"MLFLOW_NB_SERVE_TOKEN": "s3cret"})
    try:
        body = {"dataframe_records": X.head(1).to_dict(orient="records")}
        assert httpx.post(f"{server.url}/predict", json=body).status_code == 401
        assert httpx.post(f"{server.url}/predict", json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{server.url}/reload").status_code == 401
        r = httpx.post(f"{server.url}/predict", json=body, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["predictions"] == [expected[0]]
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open
    finally:
        server.stop()


def test_predictions_are_logged_in_batches_to_one_serving_run(served):
    project, server, X, *_ = served
    for _ in range(5): httpx.post(f"{server.url}/predict", json={"dataframe_records": X.head(3).to_dict(orient="records")})
    time.sleep(1.5)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db", f"sqlite:///{project}/mlflow.db")
    prod = client.get_experiment_by_name("production").experiment_id
    runs = client.search_runs([prod], "tags.`mlflow_nb.kind` = 'serve'")
    assert len(runs) == 1  # one run for the server's life, not one per request
    arts = client.list_artifacts(runs[0].info.run_id, "predictions")
    assert arts and all(a.path.endswith(".parquet") for a in arts)
    hist = client.get_metric_history(runs[0].info.run_id, "window_rows")
    assert sum(m.value for m in hist) >= 15
