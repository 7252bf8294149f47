"""The scoring service as users run it: `mlflow-nb serve` on a real port, real HTTP, real stores."""
import concurrent.futures as cf, json, os, shutil, signal, socket, statistics, subprocess, sys, threading, time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, child_env, cli_at, run_cli
from support import team_server

COLUMNS = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class Server:
    "A `mlflow-nb serve` process on a free port, stopped (SIGTERM, then SIGKILL) at the end."
    def __init__(self, project, *extra, env=None, host="127.0.0.1"):
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        exe = Path(sys.executable).parent / "mlflow-nb"
        self.proc = subprocess.Popen([str(exe), "serve", "--config", str(project / "configs"), "--host", host,
                                      "--port", str(self.port), *extra], cwd=project, env=child_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None: raise RuntimeError(self.proc.stderr.read())
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200: return
            except httpx.HTTPError: pass
            time.sleep(0.2)
        self.stop(); raise RuntimeError("server did not become ready")

    def stop(self) -> tuple[int, str]:
        "SIGTERM (the way a process manager stops it); (exit code, stderr)."
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try: self.proc.wait(60)
            except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
        return self.proc.returncode, self.proc.stderr.read()

    def metrics(self) -> dict:
        "{(name, labels...): value} of /metrics, parsed with prometheus_client's own parser."
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {(s.name, *sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _train(project, *overrides):
    from mlflow_nb.config import load_config
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    cfg = load_config(project / "configs", ["model.params.n_estimators=30", *overrides], env={})
    setup_tracking(cfg)
    return train_model(None, cfg, plots=False)


def _train_and_promote(project, *overrides):
    from mlflow_nb.promotion import promote
    from mlflow_nb.config import load_config
    res = _train(project, *overrides)
    cfg = load_config(project / "configs", list(overrides), env={})
    promote(cfg.model.estimator.name, res.version, cfg.model.promotion.model_copy(update={"thresholds": {}, "min_delta": 0}), "rmse")
    return res


def _new_project(tmp_path_factory, name):
    project = tmp_path_factory.mktemp(name)
    shutil.copytree(CONFIGS, project / "configs")
    return project


def _store(project) -> MlflowClient:
    "A client of the project's store; MLflow's fluent API points there too (conftest resets it after each test)."
    uri = f"sqlite:///{project}/mlflow.db"
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def _serving_run(project):
    client = _store(project)
    prod = client.get_experiment_by_name("production").experiment_id
    runs = client.search_runs([prod], "tags.`mlflow_nb.kind` = 'serve'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run for the server's life, not one per request
    return client, runs[0]


def _logged_rows(project) -> pd.DataFrame:
    "Every row the serving run's prediction log holds."
    client, run = _serving_run(project)
    frames = [pd.read_parquet(client.download_artifacts(run.info.run_id, a.path))
              for a in client.list_artifacts(run.info.run_id, "predictions")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["age"])


def _body(rows) -> dict:
    return {"dataframe_records": rows.to_dict(orient="records") if isinstance(rows, pd.DataFrame) else rows}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = _new_project(tmp_path_factory, "serve")
    res = _train_and_promote(project)
    server = Server(project, "-o", "serve.log_window_seconds=0.5")
    from mlflow_nb.data import load_dataset
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    expected = mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{res.version}").predict(X)
    yield project, server, X, expected, res
    server.stop()


@pytest.fixture(scope="module")
def other_version(served):
    "A second version of the served model, not promoted."
    return str(_train(served[0], "model.params.max_depth=4").version)


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
        r = c.post("/predict", json={"inputs": {c: X[c].head(3).tolist() for c in X.columns}})
        assert r.json()["predictions"] == expected[:3].tolist()
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
            return c.post("/predict", json=_body(X.iloc[idx])).json()["predictions"]

    before = server.metrics()
    with cf.ThreadPoolExecutor(16) as pool:
        for idx, preds in zip(jobs, pool.map(call, jobs)):
            assert preds == expected[idx].tolist()
    after = server.metrics()
    assert ("mlflow_nb_requests_total", ("path", "/predict"), ("status", "500")) not in after
    rows = sum(len(j) for j in jobs)
    assert after[("mlflow_nb_rows_predicted_total",)] - before[("mlflow_nb_rows_predicted_total",)] == rows
    assert after[("mlflow_nb_batches_total",)] - before[("mlflow_nb_batches_total",)] < len(jobs)  # requests shared predict calls


BAD = [  # (body or json, headers, expected status, text the error must contain)
    ({"dataframe_records": [{"age": 0.1}]}, None, 422, "missing column"),
    ({"dataframe_records": [{"zip": 1, **{c: 0.0 for c in COLUMNS}}]}, None, 422, "zip"),
    ({"dataframe_records": [{c: "x" for c in COLUMNS}]}, None, 422, "age[0]: expected number"),
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
    (b'{"inputs": [{"age": 1e400' + b"".join(b', "%s": 0.0' % c.encode() for c in COLUMNS[1:]) + b"}]}",
     None, 422, "age[0]: expected number, got float inf"),
    (b'{"inputs": [{"age": ' + b"9" * 5000 + b"}]}", None, 400, "malformed JSON"),
    (b"age=1", {"content-type": "text/plain"}, 415, "application/json"),
    (b"{}", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    (b'{"inputs": "' + b"a" * 2_000_000 + b'"}', None, 413, "over the limit"),
    (b"\xff\xfe\x00", None, 400, "malformed JSON"),
    (b'"just a string"', None, 422, "expected dataframe_split"),
    (b"[1, 2, 3]", None, 422, "expected an object"),
    ({"dataframe_records": [{f"k{i}": 1} for i in range(100)]}, None, 422, "missing column"),  # 110 problems, 10 listed
]


@pytest.mark.parametrize("body,headers,status,text", BAD)
def test_bad_input_is_a_4xx_naming_the_problem(served, body, headers, status, text):
    project, server, *_ = served
    h = {"content-type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/predict", content=content, headers=h, timeout=30)
    assert r.status_code == status, r.text[:500]
    assert text in r.json()["error"], r.json()
    assert len(r.json()["problems"]) <= 11
    assert httpx.get(f"{server.url}/health").status_code == 200  # still up


def _hostile(records: int) -> bytes:
    "A dataframe_records body whose every record uses a key of its own (the issue's 55 KB body has 4,000)."
    return json.dumps({"dataframe_records": [{f"k{i}": 1} for i in range(records)]}).encode()


def test_hostile_keys_get_their_422_fast_and_health_answers_meanwhile(served):
    project, server, *_ = served
    small, large = _hostile(4_000), _hostile(70_000)  # 55 KB and ~1 MB (under the 1 MiB limit)
    assert len(small) < 60_000 and 900_000 < len(large) < 1_048_576
    h = {"content-type": "application/json"}
    for body in (small, large):
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/predict", content=body, headers=h, timeout=60)
        assert r.status_code == 422 and r.json()["problems"][-1]["message"] == "and 1015 more problems"
        assert time.perf_counter() - t < 2.0, time.perf_counter() - t  # quadratic validation took ~1 s and minutes
    stop, sent = time.time() + 6, []
    def attack():
        with httpx.Client(base_url=server.url, headers=h, timeout=60) as c:
            while time.time() < stop: sent.append(c.post("/predict", content=large).status_code)
    latencies = []
    with cf.ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(attack) for _ in range(2)]
        time.sleep(0.5)
        while time.time() < stop - 0.5:
            t = time.perf_counter(); assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - t); time.sleep(0.05)
        for f in futs: f.result()
    assert sent and set(sent) == {422}
    # one such body took minutes on the event loop before; now /health waits for no body (a noisy 2-core machine)
    assert max(latencies) < 1.0 and statistics.median(latencies) < 0.25, (max(latencies), statistics.median(latencies))


def test_chunked_body_over_the_limit_is_413_and_the_connection_is_closed(served):
    project, server, *_ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"[" + b"1," * 32_767 + b"1"  # 64 KiB per chunk; the limit is 1 MiB
        answer = b""
        try:
            for _ in range(40):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                s.settimeout(0.01)
                try: answer += s.recv(65536)
                except socket.timeout: pass
                s.settimeout(30)
                if answer: break
        except (BrokenPipeError, ConnectionResetError): pass  # the server answered and closed while we were sending
        s.settimeout(10)
        while True:  # read to the end: the server must close the connection after its answer
            try: data = s.recv(65536)
            except ConnectionResetError: break
            if not data: break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"connection: close" in head.lower() and b"over the limit" in body
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_one_bad_request_never_fails_the_requests_batched_with_it(served):
    project, server, X, expected, _ = served
    bad = {**X.iloc[0].to_dict(), "bmi": 1e39}  # a valid double that overflows the forest's float32
    before = server.metrics()
    stop = time.time() + 4
    def good(i):
        out = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while time.time() < stop:
                r = c.post("/predict", json={"dataframe_records": [X.iloc[i].to_dict()]})
                out.append((r.status_code, r.json()["predictions"]))
        return i, out
    def offender():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return [c.post("/predict", json={"dataframe_records": [bad]}) for _ in range(40)]
    with cf.ThreadPoolExecutor(9) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = pool.submit(offender).result()
        results = [f.result() for f in goods]
    for r in bads:
        assert r.status_code == 422 and "cannot score this input" in r.json()["error"] and "float32" in r.json()["error"]
    for i, out in results:
        assert out and all(code == 200 and preds == [expected[i]] for code, preds in out)
    after = server.metrics()
    assert ("mlflow_nb_requests_total", ("path", "/predict"), ("status", "500")) not in after
    shared = after[("mlflow_nb_batches_total",)] - before[("mlflow_nb_batches_total",)]
    answered = sum(len(out) for _, out in results)
    assert shared < answered  # the good requests were batched (so the offender shared batches with them)


def test_reload_swaps_versions_without_failing_requests_in_flight(served):
    project, server, X, expected, res = served
    new = _train_and_promote(project, "model.params.max_depth=3")
    new_expected = mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{new.version}").predict(X.head(5))
    stop = time.time() + 4
    def hammer():
        out = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while time.time() < stop:
                r = c.post("/predict", json=_body(X.head(5)))
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
    from mlflow_nb.promotion import rollback  # back to the first version for the other tests
    rollback("diabetes_regressor")
    assert httpx.post(f"{server.url}/reload").json()["version"] == res.version


def test_concurrent_reloads_never_install_an_older_model_over_a_newer_one(served, other_version):
    project, server, *_ = served
    champion = str(_store(project).get_model_version_by_alias("diabetes_regressor", "champion").version)
    big = str(_train(project, "model.params.n_estimators=400").version)  # slow to load: reloads of it finish last
    client, other = _store(project), other_version

    def cycle():
        """Reloads in a stream, staggered, while the alias moves from `big` to `other`: what /metadata showed. Each
        loop goes on past the 4 s until one of its reloads started after the move (a slow host loads `big` for
        seconds), and the watch goes on 2 s after the last reload answered."""
        client.set_registered_model_alias("diabetes_regressor", "champion", big)
        assert httpx.post(f"{server.url}/reload", timeout=60).json()["version"] == big
        stop, moved, done, seen, answers = time.time() + 4, threading.Event(), threading.Event(), [], []
        def reload_loop(seed):
            rng, after = np.random.default_rng(seed), False
            with httpx.Client(base_url=server.url, timeout=120) as c:
                while (time.time() < stop or not after) and time.time() < stop + 300:
                    time.sleep(rng.uniform(0, 0.3))  # staggered: some reloads always straddle the move
                    after = moved.is_set()
                    r = c.post("/reload")
                    assert r.status_code == 200, r.text
                    answers.append((after, r.json()["version"]))
        def watch():
            with httpx.Client(base_url=server.url, timeout=60) as c:
                while not done.wait(0.005): seen.append(c.get("/metadata").json()["version"])
                until = time.time() + 2
                while time.time() < until: seen.append(c.get("/metadata").json()["version"]); time.sleep(0.005)
        with cf.ThreadPoolExecutor(6) as pool:
            watcher, loops = pool.submit(watch), [pool.submit(reload_loop, i) for i in range(5)]
            time.sleep(1.2)
            client.set_registered_model_alias("diabetes_regressor", "champion", other); moved.set()
            try:
                for f in loops: f.result()
            finally: done.set()
            watcher.result()
        return seen, answers

    try:
        for _ in range(2):
            seen, answers = cycle()
            # once the newer version was served, the older one never came back
            assert other in seen and big not in seen[seen.index(other):], seen
            assert all(v == other for after, v in answers if after)
    finally:  # the module's later tests expect the champion served
        client.set_registered_model_alias("diabetes_regressor", "champion", champion)
        assert httpx.post(f"{server.url}/reload", timeout=120).json()["version"] == champion


def test_bearer_token_protects_predict_and_reload(served):
    "On a non-loopback address (127.0.0.2: not a loopback *name*), as a token is meant to be used: and no warning."
    project, _, X, expected, _ = served
    server = Server(project, "-o", "serve.log_predictions=false", env={"MLFLOW_NB_SERVE_TOKEN": "s3cret"}, host="127.0.0.2")
    try:
        body = {"dataframe_records": X.head(1).to_dict(orient="records")}
        assert httpx.post(f"{server.url}/predict", json=body).status_code == 401
        assert httpx.post(f"{server.url}/predict", json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{server.url}/reload").status_code == 401
        r = httpx.post(f"{server.url}/predict", json=body, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["predictions"] == [expected[0]]
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open
    finally:
        code, err = server.stop()
    assert "without a token" not in err, err


def test_a_non_loopback_host_without_a_token_warns(served):
    "(With a token, the same host is quiet: the bearer-token test above.)"
    project, *_ = served
    server = Server(project, "-o", "serve.log_predictions=false", host="127.0.0.2")
    assert httpx.get(f"{server.url}/health").status_code == 200
    code, err = server.stop()
    assert "warning: serving on 127.0.0.2 without a token" in err, err


def test_serve_a_version_by_number(served, other_version):
    project, server, X, expected, res = served
    _store(project)
    other = other_version
    other_expected = mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{other}").predict(X.head(3))
    pinned = Server(project, "--model", f"diabetes_regressor/{other}", "-o", "serve.log_predictions=false")
    try:
        meta = httpx.get(f"{pinned.url}/metadata").json()
        assert meta["version"] == other and meta["alias"] is None
        assert httpx.post(f"{pinned.url}/predict", json=_body(X.head(3))).json()["predictions"] == other_expected.tolist()
    finally:
        pinned.stop()
    code, _, err = cli_at(project, "serve", "--config", str(project / "configs"), "--model", "diabetes_regressor/99",
                          "--port", str(free_port()))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'99'" in err, err


def test_the_service_follows_the_alias_when_polling(served, other_version):
    project, server, X, expected, res = served
    client, other = _store(project), other_version
    polling = Server(project, "-o", "serve.poll_seconds=0.3", "-o", "serve.log_predictions=false")
    try:
        assert httpx.get(f"{polling.url}/metadata").json()["version"] == res.version
        client.set_registered_model_alias("diabetes_regressor", "champion", other)
        deadline = time.time() + 20
        while time.time() < deadline and httpx.get(f"{polling.url}/metadata").json()["version"] != other: time.sleep(0.1)
        assert httpx.get(f"{polling.url}/metadata").json()["version"] == other
        assert httpx.post(f"{polling.url}/predict", json=_body(X.head(1))).json()["model_version"] == other
    finally:
        client.set_registered_model_alias("diabetes_regressor", "champion", res.version)
        polling.stop()


def test_batching_rules(served):
    "A lone client never waits; concurrent clients share predict calls; max_batch_rows is a hard cap."
    project, _, X, expected, _ = served
    server = Server(project, "-o", "serve.max_wait_ms=400", "-o", "serve.max_batch_rows=5", "-o", "serve.log_predictions=false")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:  # one client: answered without the 400 ms wait
            lat = []
            for i in range(20):
                t = time.perf_counter(); r = c.post("/predict", json=_body(X.iloc[[i]])); lat.append(time.perf_counter() - t)
                assert r.json()["predictions"] == [expected[i]]
        assert statistics.median(lat) < 0.2, lat
        time.sleep(0.3)
        sizes = [2, 3] * 40 + [12]  # and one request larger than the cap: scored in predict calls of at most 5 rows
        starts = np.cumsum([0, *sizes])[:-1] % (len(X) - 12)
        def call(job):
            start, n = job
            with httpx.Client(base_url=server.url, timeout=60) as c:
                return c.post("/predict", json=_body(X.iloc[start:start + n])).json()["predictions"] == expected[start:start + n].tolist()
        with cf.ThreadPoolExecutor(8) as pool: assert all(pool.map(call, zip(starts.tolist(), sizes)))
        m = server.metrics()
        calls = m[("mlflow_nb_batch_rows_count",)]
        assert m[("mlflow_nb_batch_rows_sum",)] == 20 + sum(sizes)  # every row in exactly one predict call
        assert m[("mlflow_nb_batch_rows_bucket", ("le", "5.0"))] == calls  # none over the cap
        assert calls - m[("mlflow_nb_batch_rows_bucket", ("le", "4.0"))] > 2  # calls of 5 rows: 2+3 merged (or a chunk)
        assert m[("mlflow_nb_batches_total",)] == calls < 20 + len(sizes) + 2  # fewer calls than requests (+ 2 chunks)
    finally:
        server.stop()


def _marker_rows(X, markers) -> list[dict]:
    "Rows whose `age` is a marker value only this test sends."
    base = X.iloc[0].to_dict()
    return [{**base, "age": float(m)} for m in markers]


def test_prediction_log_keeps_every_row_under_sustained_load_and_ends_the_run(tmp_path_factory):
    from mlflow_nb.data import load_dataset
    project = _new_project(tmp_path_factory, "serve_load")
    _train_and_promote(project)
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    # a 1,000-request queue and the default 60 s window: only flushing by size keeps up with this load
    server = Server(project, "-o", "serve.log_queue_requests=1000")
    stop, counter, lock, sent, requests = time.time() + 20, iter(range(10**9)), threading.Lock(), [], []
    def client():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while time.time() < stop:
                with lock: m = 1_000_000 + next(counter)
                k = 1 + m % 3
                r = c.post("/predict", json={"dataframe_records": _marker_rows(X, [m + i / 10 for i in range(k)])})
                assert r.status_code == 200, r.text
                with lock: sent.extend(m + i / 10 for i in range(k)); requests.append(m)
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            for f in [pool.submit(client) for _ in range(8)]: f.result()
        m = server.metrics()
        assert m[("mlflow_nb_prediction_log_dropped_total",)] == 0 and m[("mlflow_nb_prediction_log_errors_total",)] == 0
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert len(requests) > 1000  # more than the queue holds: a log flushed only by its 60 s timer would have dropped
    logged = _logged_rows(project)
    mine = logged[logged["age"] >= 1_000_000]["age"]
    assert len(mine) == len(sent) and sorted(mine) == sorted(sent)  # every row once, none lost, none twice
    client, run = _serving_run(project)
    assert run.info.status == "FINISHED"


def test_a_full_log_queue_drops_and_counts(tmp_path_factory):
    from mlflow_nb.data import load_dataset
    project = _new_project(tmp_path_factory, "serve_drops")
    _train_and_promote(project)
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    server = Server(project, "-o", "serve.log_queue_requests=2", "-o", "serve.log_flush_rows=1")
    markers = list(range(2_000_000, 2_000_400))
    def call(m):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/predict", json={"dataframe_records": _marker_rows(X, [m])}).status_code
    try:
        with cf.ThreadPoolExecutor(8) as pool: assert set(pool.map(call, markers)) == {200}
        dropped = server.metrics()[("mlflow_nb_prediction_log_dropped_total",)]
    finally:
        code, err = server.stop()
    assert code == 0, err
    logged = _logged_rows(project)
    kept = logged[logged["age"] >= 2_000_000]["age"]
    assert dropped > 0  # each window takes the store tens of ms; meanwhile a 2-request queue overflows
    assert len(kept) + dropped == len(markers) and kept.is_unique  # every request either logged or counted


def test_a_reload_that_changes_the_schema_keeps_logging(tmp_path_factory):
    from mlflow_nb.data import load_dataset
    project = _new_project(tmp_path_factory, "serve_schema")
    _train_and_promote(project)
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    server = Server(project, "-o", "serve.log_window_seconds=0.3")
    try:
        assert httpx.post(f"{server.url}/predict", json={"dataframe_records": _marker_rows(X, [3_000_000, 3_000_001])}).status_code == 200
        narrow = _train(project, "data.features=[age, bmi, bp]")  # worse than the champion: moved by hand
        _store(project).set_registered_model_alias("diabetes_regressor", "champion", narrow.version)
        assert httpx.post(f"{server.url}/reload", timeout=60).status_code == 200
        r = httpx.post(f"{server.url}/predict", json={"dataframe_records": [{"age": 3_000_002.0, "bmi": 0.1, "bp": 0.2}]})
        assert r.status_code == 200, r.text
        time.sleep(1)
        assert server.metrics()[("mlflow_nb_prediction_log_errors_total",)] == 0
        r = httpx.post(f"{server.url}/predict", json={"dataframe_records": [{"age": 3_000_003.0, "bmi": 0.1, "bp": 0.2}]})
        assert r.status_code == 200
    finally:
        code, err = server.stop()
    assert code == 0, err
    logged = _logged_rows(project)
    assert sorted(logged[logged["age"] >= 3_000_000]["age"]) == [3_000_000, 3_000_001, 3_000_002, 3_000_003]
    assert _serving_run(project)[1].info.status == "FINISHED"


class _Odd(mlflow.pyfunc.PythonModel):
    "A pickled model: twice the age, NaN for a negative age, infinity above 100."
    def predict(self, context, model_input, params=None):
        age = model_input["age"].to_numpy(dtype=float)
        return np.where(age < 0, np.nan, np.where(age > 100, np.inf, 2 * age))


def test_a_pickled_model_is_refused_unless_the_config_allows_its_flavor(tmp_path_factory):
    project = _new_project(tmp_path_factory, "serve_pickle")
    uri = f"sqlite:///{project}/mlflow.db"
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    mlflow.set_experiment("pickled")
    frame = pd.DataFrame({"age": [1.0, 2.0]})
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the server cannot import this test module
    try:
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=_Odd(), registered_model_name="diabetes_regressor",
                                           signature=mlflow.models.infer_signature(frame, np.array([2.0, 4.0])))
    finally: cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    MlflowClient(uri, uri).set_registered_model_alias("diabetes_regressor", "champion", info.registered_model_version)
    env = {"MLFLOW_TRACKING_URI": uri}  # the store given the way the README's team section gives it
    r = run_cli("serve", "--config", str(project / "configs"), "--port", str(free_port()), cwd=project, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "refusing to load" in r.stderr and "python_function" in r.stderr and "Traceback" not in r.stderr
    server = Server(project, "-o", "serve.allow_flavors=[python_function]", env=env)
    try:
        r = httpx.post(f"{server.url}/predict", json={"inputs": [{"age": 3.0}, {"age": -1.0}, {"age": 101.0}]})
        assert r.status_code == 200 and r.json()["predictions"] == [6.0, None, None]  # JSON has no NaN: null
        assert b"NaN" not in r.content and b"Infinity" not in r.content
        assert server.metrics()[("mlflow_nb_nonfinite_predictions_total",)] == 2
    finally:
        server.stop()


def test_two_workers_share_the_load_one_serving_run_and_the_metrics(tmp_path_factory):
    from mlflow_nb.data import load_dataset
    project = _new_project(tmp_path_factory, "serve_workers")
    res = _train_and_promote(project)
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    expected = mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{res.version}").predict(X.head(1))
    server = Server(project, "--workers", "2", "-o", "serve.log_window_seconds=0.5")
    markers = list(range(4_000_000, 4_000_300))
    def call(m):
        with httpx.Client(base_url=server.url, timeout=30) as c:  # a new connection each time: both workers answer
            return c.post("/predict", json={"dataframe_records": _marker_rows(X, [m])}).status_code
    try:
        with cf.ThreadPoolExecutor(8) as pool: assert set(pool.map(call, markers)) == {200}
        r = httpx.post(f"{server.url}/predict", json=_body(X.head(1)))
        assert r.json()["predictions"] == expected.tolist()
        m = server.metrics()
        assert m[("mlflow_nb_requests_total", ("path", "/predict"), ("status", "200"))] == len(markers) + 1
    finally:
        code, err = server.stop()
    assert code == 0, err
    logged = _logged_rows(project)
    rows = logged[logged["age"] >= 4_000_000]
    assert sorted(rows["age"]) == markers
    client, run = _serving_run(project)
    assert run.info.status == "FINISHED"
    files = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert len({f.split("-")[2] for f in files}) == 2  # windows from two worker processes, in one run


def _mixed_csv(path):
    "A small CSV with an integer column without gaps, a float, a string and a boolean column."
    rng = np.random.default_rng(7)
    n = 300
    frame = pd.DataFrame({"count": rng.integers(0, 20, n), "ratio": rng.normal(1, 0.3, n).round(3),
                          "color": rng.choice(["red", "green", "blue"], n), "flag": rng.choice([True, False], n)})
    frame["target"] = (3 * frame["count"] + 10 * frame["ratio"] + 5 * (frame["color"] == "red") + 2 * frame["flag"]
                       + rng.normal(0, 1, n))
    frame.to_csv(path, index=False)


def test_missing_values_in_every_column_kind_score_alike_everywhere(tmp_path_factory):
    """Issue 11.4: pyfunc, `mlflow models serve` and `mlflow-nb serve` all score rows with a gap in any column, and ours
    gives a row the same answer alone as in a batch (scikit-learn imputes a None only beside text: ours sends NaN)."""
    project = _new_project(tmp_path_factory, "serve_missing")
    _mixed_csv(project / "data.csv")
    cfg = project / "configs" / "model_config.yaml"
    text = cfg.read_text().replace('source: "sklearn:diabetes"', 'source: "../data.csv"')
    cfg.write_text(text.replace('name: "diabetes_regressor"', 'name: "mixed"'))
    for cmd in (["train"], ["promote", "--version", "1"]):
        code, _, err = cli_at(project, *cmd, "--config", str(project / "configs"), "-o", "model.params.n_estimators=20")
        assert code == 0, err
    _store(project)
    full = {"count": 4, "ratio": 1.2, "color": "red", "flag": "True"}  # as the model's signature types them
    rows = [full] + [{**full, col: None} for col in full] + [{c: None for c in full}]
    pyfunc = mlflow.pyfunc.load_model("models:/mixed@champion").predict(pd.DataFrame(rows)).tolist()
    assert len(pyfunc) == len(rows) and all(np.isfinite(pyfunc))
    ours = Server(project, "-o", "serve.log_predictions=false")
    try:
        schema = {c["name"]: c["type"] for c in httpx.get(f"{ours.url}/metadata").json()["input_schema"]}
        assert schema == {"count": "double", "ratio": "double", "color": "string", "flag": "string"}, schema
        r = httpx.post(f"{ours.url}/invocations", json={"dataframe_records": rows})
        assert r.status_code == 200, r.text
        served_ours = r.json()["predictions"]
        alone = [httpx.post(f"{ours.url}/invocations", json={"dataframe_records": [row]}).json()["predictions"][0]
                 for row in rows]
        assert alone == served_ours  # a row's answer never depends on the rows batched with it (all-None text too)
    finally:
        ours.stop()
    port = free_port()
    uri = f"sqlite:///{project}/mlflow.db"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    theirs = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", "models:/mixed@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], cwd=project, start_new_session=True,
                              env=child_env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert theirs.poll() is None, theirs.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200: break
            except httpx.HTTPError: time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": rows}, timeout=60)
        assert r.status_code == 200, r.text
        served_theirs = r.json()["predictions"]
    finally:
        os.killpg(theirs.pid, signal.SIGTERM); theirs.wait(30)
    assert served_ours == pyfunc == served_theirs


def test_the_scoring_service_keeps_answering_while_the_tracking_server_is_down(oproject, own_server):
    "Its own server, stopped under it (the shared team server stays up for the tests beside this one)."
    project, uri, exp, model = oproject
    assert cli_at(project, "train", "-o", "model.params.n_estimators=20")[0] == 0
    assert cli_at(project, "promote", "--version", "1")[0] == 0
    from mlflow_nb.data import load_dataset
    X = load_dataset("sklearn:diabetes").drop(columns="target").head(3).to_dict(orient="records")
    server = Server(project, "-o", "serve.log_window_seconds=0.5")
    try:
        team_server.stop_mlflow(own_server)
        try:
            for _ in range(20):
                r = httpx.post(f"{server.url}/predict", json={"dataframe_records": X}, timeout=10)
                assert r.status_code == 200 and len(r.json()["predictions"]) == 3
            time.sleep(1.5)  # a log window fails to reach the store: counted, not fatal
            assert httpx.get(f"{server.url}/health").status_code == 200
            assert httpx.post(f"{server.url}/predict", json={"dataframe_records": X}, timeout=10).status_code == 200
            assert httpx.post(f"{server.url}/reload", timeout=120).status_code == 503  # says so, keeps the model
            assert httpx.post(f"{server.url}/predict", json={"dataframe_records": X}, timeout=10).status_code == 200
        finally:
            own_server.update(team_server.restart_mlflow(own_server))
    finally:
        server.stop()


def test_the_compiled_path_is_checked_at_load_and_answers_what_the_pipeline_answers(served):
    """Issue 14: the served forest is scored by its compiled form (checked at load, reported in /metadata), which
    answers exactly `pipeline.predict` for rows with gaps and extremes, and hands a value past float32 back to the
    pipeline (422 as before); MLFLOW_NB_SERVE_COMPILED=0 serves the same answers through `pipeline.predict`."""
    from mlflow_nb.registry import load_model
    project, server, X, expected, res = served
    _store(project)
    pipeline = load_model(f"models:/diabetes_regressor/{res.version}").model
    rng = np.random.default_rng(3)
    rows = X.head(300).astype(object).where(rng.random((300, X.shape[1])) > 0.2, None).to_dict(orient="records")
    rows += [{**rows[0], "bmi": v} for v in (0.0, -0.0, 5e-324, -1e-300, 1e6, -1e6, 3e36)]
    wanted = pipeline.predict(pd.DataFrame(rows, columns=COLUMNS, dtype=float)).tolist()
    plain = Server(project, "-o", "serve.log_predictions=false", env={"MLFLOW_NB_SERVE_COMPILED": "0"})
    try:
        for s, compiled in ((server, True), (plain, False)):
            with httpx.Client(base_url=s.url, timeout=60) as c:
                assert c.get("/metadata").json()["scoring"]["compiled"] is compiled
                assert c.post("/invocations", json={"dataframe_records": rows}).json()["predictions"] == wanted
                for i in (0, 7, 299):  # alone, as the batcher often scores one request
                    assert c.post("/predict", json={"dataframe_records": [rows[i]]}).json()["predictions"] == [wanted[i]]
                r = c.post("/predict", json={"dataframe_records": [{**rows[1], "bmi": 1e39}]})
                assert r.status_code == 422 and "float32" in r.json()["error"], r.text
        scoring = httpx.get(f"{server.url}/metadata").json()["scoring"]
        assert scoring["estimator"] == "RandomForestRegressor" and scoring["checked_rows"] > 500 and scoring["fallbacks"] >= 1
        assert "MLFLOW_NB_SERVE_COMPILED" in httpx.get(f"{plain.url}/metadata").json()["scoring"]["reason"]
    finally:
        plain.stop()
