"""Monitoring as users reach it: `mlflow-nb monitor` against real trained models (a regressor, and a classifier trained
by `mlflow-nb run`), real webhook receivers on loopback, the scoring service's logged windows, hostile input."""
import http.server, json, math, re, shutil, threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, cli_at, cli_cases, run_cli
from mlflow_nb.core import TAG_ALERTS, TAG_KIND, TAG_STEP, TAG_UNCHECKED_METRICS

EXTERNAL = re.compile(r"""(src|href)=['"]?https?:|url\(|<script|<link""")  # anything a browser would fetch or run

SECRET = "T000/B000/SECRET-TOKEN"


def _client(project):
    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(uri, uri)


def _monitor_runs(project):
    client = _client(project)
    exp = client.get_experiment_by_name("production")
    return [] if exp is None else client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = 'monitor'",
                                                     order_by=["attributes.start_time DESC"])


def _lines(out: str) -> dict[str, str]:
    "The `name : value` lines of `mlflow-nb monitor`'s output (the last of each name)."
    return {k.strip(): v.strip() for k, _, v in (l.partition(": ") for l in out.splitlines()) if v}


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    "A regressor trained on the diabetes data less 100 rows it never sees, promoted to @champion."
    project = tmp_path_factory.mktemp("monitor")
    shutil.copytree(CONFIGS, project / "configs")
    from mlflow_nb.data import load_dataset
    full = load_dataset("sklearn:diabetes")
    unseen = full.sample(100, random_state=0)
    full.drop(unseen.index).to_csv(project / "known.csv", index=False)
    unseen.to_csv(project / "unseen.csv", index=False)
    full.assign(bmi=full.bmi + full.bmi.std(), s5=full.s5 * 3).to_csv(project / "shifted.csv", index=False)
    code, _, err = cli_at(project, "train", "-o", "model.params.n_estimators=30", "-o", f"data.source={project / 'known.csv'}")
    assert code == 0, err
    assert cli_at(project, "promote", "--version", "1")[0] == 0
    return project


def test_cli_flags_the_shifted_features_and_writes_the_report(champion):
    r = run_cli("monitor", "--current", "shifted.csv", "--out", "report", cwd=champion)
    assert r.returncode == 0, r.stderr
    assert "drift          : 2 of 10 features (bmi, s5)" in r.stdout
    assert "alert          : feature_drift bmi" in r.stdout
    assert "Downloading artifacts" not in r.stderr  # no progress bars between the lines a user reads
    page = (champion / "report" / "report.html").read_text()
    assert "2 of 10 features drifted" in page and page.count("<img") == 3  # bmi, s5 and the prediction
    assert not EXTERNAL.search(page)  # self-contained: nothing to fetch, nothing to run


def test_performance_is_checked_on_rows_the_model_never_saw(champion):
    r = run_cli("monitor", "--current", "unseen.csv", cwd=champion)
    assert r.returncode == 0, r.stderr
    out = _lines(r.stdout)
    assert out["drift"].startswith("0 of 10 features;"), r.stdout
    for metric in ("rmse", "mae", "r2"):  # every configured metric, each against its own training value
        current, training = out[metric].split(" (training ")
        assert float(current) != float(training.split(",")[0]), out[metric]  # other rows: not the training's own test split
        change, tolerance = re.search(r"([\d.]+)% (?:worse|better); tolerance ([\d.]+)%", out[metric]).groups()
        assert out[metric].endswith("DEGRADED") == ("worse" in out[metric] and float(change) > float(tolerance)), out[metric]
    assert not out["rmse"].endswith("DEGRADED") and not out["mae"].endswith("DEGRADED"), r.stdout  # within 25%
    [run] = _monitor_runs(champion)[:1]
    assert {"current_rmse", "degradation_rmse", "current_r2"} <= set(run.data.metrics)
    assert run.data.metrics["metrics_unchecked"] == 0 and run.data.tags[TAG_UNCHECKED_METRICS] == ""


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    """A three-class data set with numeric and text columns (scikit-learn's wine plus a `hue_band` column derived from
    `hue`), 40 rows held back; a RandomForestClassifier with f1, accuracy and roc_auc trained and promoted by
    `mlflow-nb run`, configured the way a user does it: in model_config.yaml."""
    from mlflow_nb.data import load_dataset
    project = tmp_path_factory.mktemp("wine")
    shutil.copytree(CONFIGS, project / "configs")
    data = load_dataset("sklearn:wine")
    data.insert(len(data.columns) - 1, "hue_band", pd.cut(data.hue, [0, 0.8, 1.1, 9], labels=["pale", "medium", "deep"]).astype(str))
    unseen = data.sample(40, random_state=0)
    data.drop(unseen.index).to_csv(project / "wine.csv", index=False)
    unseen.to_csv(project / "unseen.csv", index=False)
    unseen[unseen.target == 1].to_csv(project / "one_class.csv", index=False)
    # a recalibrated instrument: colour intensity and flavanoids read at 40% of their value
    data.assign(color_intensity=data.color_intensity * 0.4, flavanoids=data.flavanoids * 0.4).to_csv(project / "shifted.csv", index=False)
    path = project / "configs" / "model_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"name": "wine_classifier", "type": "RandomForestClassifier", "params": {"n_estimators": 30, "max_depth": 6}}
    cfg["data"]["source"] = "../wine.csv"
    cfg["metrics"] = ["f1", "accuracy", "roc_auc"]
    cfg["validation"]["cv_folds"] = 3
    cfg["promotion"]["thresholds"] = {"accuracy": {"min": 0.8}}
    path.write_text(yaml.safe_dump(cfg))
    r = run_cli("run", cwd=project, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return project


def test_a_classifiers_collapse_raises_performance_alerts(wine):
    client = _client(wine)
    pipeline_monitor = client.search_runs([client.get_experiment_by_name("development").experiment_id],
                                          f"tags.`{TAG_STEP}` = 'monitor'")
    # the pipeline's own monitor step checks the held-out rows the champion was evaluated on: drift only, its
    # metrics named as not checked (comparing them there would compare each metric with itself)
    assert pipeline_monitor and not {"current_f1", "current_accuracy", "current_roc_auc"} & set(pipeline_monitor[0].data.metrics)
    unchecked = pipeline_monitor[0].data.tags["mlflow_nb.unchecked_metrics"]
    assert all(f"{m}: not checked" in unchecked for m in ("f1", "accuracy", "roc_auc")), unchecked
    healthy = run_cli("monitor", "--current", "unseen.csv", cwd=wine)
    assert healthy.returncode == 0, healthy.stderr
    assert "DEGRADED" not in healthy.stdout and "alert" not in healthy.stdout, healthy.stdout
    r = run_cli("monitor", "--current", "shifted.csv", cwd=wine)
    assert r.returncode == 0, r.stderr
    out = _lines(r.stdout)
    assert out["drift"].startswith("2 of 14 features (flavanoids, color_intensity)"), r.stdout
    for metric in ("accuracy", "f1"):
        assert out[metric].endswith("DEGRADED"), out[metric]
        assert f"alert          : performance {metric}: {metric} is " in r.stdout
    assert math.isfinite(float(out["roc_auc"].split()[0])), out["roc_auc"]  # computed from predict_proba, not dropped
    run = _monitor_runs(wine)[0]
    assert run.data.metrics["current_accuracy"] < 0.8 and "current_roc_auc" in run.data.metrics
    assert run.data.metrics["degradation_accuracy"] > 0.05 and run.data.tags[TAG_ALERTS] != "0"


def test_a_metric_that_cannot_be_computed_is_reported_not_dropped(wine):
    r = run_cli("monitor", "--current", "one_class.csv", cwd=wine)
    assert r.returncode == 0, r.stderr
    out = _lines(r.stdout)
    assert out["roc_auc"].startswith("not computed: Only one class is present"), r.stdout
    assert "accuracy" in out and "f1" in out
    run = _monitor_runs(wine)[0]
    assert run.data.tags[TAG_UNCHECKED_METRICS].startswith("roc_auc: not computed: Only one class")
    assert run.data.metrics["metrics_unchecked"] == 1 and "current_roc_auc" not in run.data.metrics
    table = json.loads(Path(_client(wine).download_artifacts(run.info.run_id, "monitoring/performance.json")).read_text())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert rows["roc_auc"]["note"].startswith("not computed") and rows["roc_auc"]["current"] is None


class Receiver(http.server.BaseHTTPRequestHandler):
    "Answers every POST with the server's `status` (and `location` for a redirect); keeps each body."
    def do_POST(self):
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(self.server.status)
        if self.server.location: self.send_header("location", self.server.location)
        self.end_headers()
    def log_message(self, *a): pass


@pytest.fixture
def receivers():
    "Start receivers on loopback: `receivers(status, location=None)`; all are shut down at the end."
    started = []
    def start(status=204, location=None):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        srv.status, srv.location, srv.bodies = status, location, []
        srv.url = f"http://127.0.0.1:{srv.server_port}/hooks/{SECRET}?token=abc"
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return srv
    yield start
    for srv in started: srv.shutdown(); srv.server_close()


def _monitor_with_webhook(project, url, *extra):
    return run_cli("monitor", "--current", "shifted.csv", "-o", "monitor.sinks=[log, webhook]", "-o", f"monitor.webhook_url={url}",
                   *extra, cwd=project)


def test_webhook_receives_the_alerts_as_json(champion, receivers):
    hook = receivers(204)
    r = _monitor_with_webhook(champion, hook.url)
    assert r.returncode == 0, r.stderr
    [body] = hook.bodies
    assert body["source"] == "mlflow_nb" and body["model"] == "diabetes_regressor" and body["version"] == "1"
    kinds = {(a["kind"], a["subject"]) for a in body["alerts"]}
    assert {("feature_drift", "bmi"), ("feature_drift", "s5")} <= kinds
    assert all({"kind", "subject", "value", "threshold", "time", "message"} <= set(a) for a in body["alerts"])


def test_a_redirecting_webhook_is_not_followed(champion, receivers):
    target = receivers(204)
    redirecting = receivers(307, location=target.url)
    r = _monitor_with_webhook(champion, redirecting.url, "-o", "monitor.webhook_retries=2")
    assert r.returncode == 0, r.stderr
    assert (len(redirecting.bodies), len(target.bodies)) == (1, 0)  # one try, and the redirect's target got nothing
    assert f"sink error     : webhook http://127.0.0.1:{redirecting.server_port}/***: HTTP 307: redirects are not " \
           "followed after 1 try" in r.stderr


def test_a_4xx_is_not_retried_and_the_token_url_is_never_shown(champion, receivers):
    gone = receivers(404)
    before = len(_monitor_runs(champion))
    r = _monitor_with_webhook(champion, gone.url, "-o", "monitor.webhook_retries=3", "-o", "monitor.sinks=[log, mlflow, webhook]")
    assert r.returncode == 0, r.stderr
    assert len(gone.bodies) == 1
    assert "HTTP 404 after 1 try" in r.stderr
    for secret in ("SECRET-TOKEN", "token=abc"):
        assert secret not in r.stdout + r.stderr
    runs = _monitor_runs(champion)
    assert len(runs) == before + 1  # this check's own monitoring run, newest first
    assert not any("SECRET" in v for v in runs[0].data.tags.values())


def test_5xx_and_dead_receivers_are_retried(champion, receivers):
    from mlflow_nb.alerts import post_webhook
    failing = receivers(503)
    err = post_webhook(failing.url, {"x": 1}, timeout=2, retries=2, backoff=0.01)
    assert len(failing.bodies) == 3 and err.endswith("HTTP 503 after 3 tries") and "SECRET" not in err
    r = run_cli("monitor", "--current", "shifted.csv", "-o", "monitor.sinks=[webhook]", "-o",
                f"monitor.webhook_url=http://127.0.0.1:9/hooks/{SECRET}", "-o", "monitor.webhook_retries=1",
                "-o", "monitor.webhook_timeout_seconds=1", cwd=champion)
    assert r.returncode == 0
    assert "sink error     : webhook http://127.0.0.1:9/***: URLError" in r.stderr and "after 2 tries" in r.stderr
    assert "SECRET" not in r.stderr


def test_only_http_urls_are_sent_to():
    from mlflow_nb.alerts import post_webhook
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/hook", "gopher://127.0.0.1:70/x"):
        err = post_webhook(url, {"x": 1}, retries=3)
        assert err.endswith("refused: only http:// and https:// URLs are sent to") and "passwd" not in err


def test_the_report_survives_inf_values_and_mathjax_like_names():
    "Column names that look like TeX stay text, in the charts and the page; infinite values neither crash nor vanish."
    from mlflow_nb.alerts import alerts_from
    from mlflow_nb.settings import Monitor
    from mlflow_nb.data import build_profile
    from mlflow_nb.drift import drift_charts, drift_report
    from mlflow_nb.monitor import CheckResult, html_report, performance_check
    rng = np.random.default_rng(0)
    names = [r"$\notacommand{x}$", "$y^2$", r"cost ($\$$)"]
    ref = pd.DataFrame({names[0]: rng.normal(size=3000), names[1]: rng.normal(size=3000), names[2]: rng.choice(["$a$", "b"], 3000)})
    cur = ref.assign(**{names[0]: np.where(np.arange(3000) % 5 == 0, np.inf, ref[names[0]] + 1),
                        names[1]: np.where(np.arange(3000) % 7 == 0, -np.inf, ref[names[1]]),
                        names[2]: rng.choice(["$a$", "b", "$new$"], 3000)})
    profile = build_profile(ref)
    drift = drift_report(profile, cur)
    assert set(drift.drifted) == set(names), drift.table  # every statistic stays finite, the infinities show as drift
    assert np.isfinite(drift.table[["psi", "cramers_v"]].to_numpy(dtype=float)).any(axis=1).all()
    perf = performance_check({"rmse": 2.0, "accuracy": 0.5}, {"rmse": 0.0, "accuracy": 0.9})  # rmse: infinitely worse
    alerts = alerts_from(drift, perf, Monitor())
    result = CheckResult("models:/m@champion", "1", drift, perf, alerts, drift_charts(drift, profile, cur))
    page = html_report(result)
    assert page.count("<img") == 3 and "inf" in page
    assert "tex2jax_ignore mathjax_ignore" in page  # MathJax leaves the report's text alone wherever it is shown
    assert r"$\notacommand{x}$" in page and r"cost ($\$$)" in page  # names as written
    assert not EXTERNAL.search(page)


def test_monitor_refuses_a_pickled_champion_in_one_line(champion, tmp_path):
    "A champion saved with pickle would run code when loaded: refused before it is loaded, and no run is left."
    import mlflow
    from mlflow_nb.data import PROFILE_PATH, build_profile, load_dataset
    marker = tmp_path / "unpickled"
    class Trap:  # unpickling it creates the marker file
        def __reduce__(self): return (Path.touch, (marker,))
        def predict(self, X): return np.zeros(len(X))
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    mlflow.set_tracking_uri(f"sqlite:///{champion}/mlflow.db"); mlflow.set_registry_uri(f"sqlite:///{champion}/mlflow.db")
    with mlflow.start_run(experiment_id=_client(champion).get_experiment_by_name("development").experiment_id):
        mlflow.sklearn.log_model(Trap(), name="model", serialization_format="cloudpickle", registered_model_name="pickled",
                                 pip_requirements=["scikit-learn"])
        mlflow.log_dict(build_profile(X), PROFILE_PATH)
    _client(champion).set_registered_model_alias("pickled", "champion", "1")
    before = len(_monitor_runs(champion))
    r = run_cli("monitor", "--current", "shifted.csv", "-o", "model.name=pickled", cwd=champion)
    assert r.returncode == 2, r.stdout + r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("mlflow-nb: error: models:/pickled/1: refusing to load a model whose flavors are"), line
    assert "cloudpickle" in line and not marker.exists()
    assert len(_monitor_runs(champion)) == before


def test_monitor_reads_the_serving_windows(champion):
    import httpx
    from test_serve import Server
    from mlflow_nb.data import load_dataset
    X = load_dataset("sklearn:diabetes").drop(columns="target")
    server = Server(champion, "-o", "serve.log_window_seconds=0.3")
    try:
        for i in range(0, 400, 50):
            assert httpx.post(f"{server.url}/predict", json={"dataframe_records": X.iloc[i:i + 50].to_dict(orient="records")}).status_code == 200
    finally:
        server.stop()  # writes the last window
    r = run_cli("monitor", "--current", "serving", cwd=champion)
    assert r.returncode == 0, r.stderr
    assert "checked        : 400 rows of serving" in r.stdout and "drift          : 0 of 10 features;" in r.stdout
    assert "rmse           : not checked: the current data has no 'target' column" in r.stdout


def test_bad_current_data_is_refused_in_one_line(champion):
    from mlflow_nb.data import load_dataset
    full = load_dataset("sklearn:diabetes")
    full.astype({"bmi": object}).assign(bmi=lambda d: d.bmi.where(d.index != 7, "high")).to_csv(champion / "text.csv", index=False)
    full.drop(columns="s5").to_csv(champion / "missing.csv", index=False)
    full.assign(bmi=np.where(full.index % 3 == 0, np.inf, full.bmi)).to_csv(champion / "inf.csv", index=False)
    before = len(_monitor_runs(champion))
    bad = ((["--current", "nope.csv"], "data.source: file not found"),
           (["--current", "serving:" + "0" * 32], "no such serving run"),
           (["--current", "text.csv"], "current data: column 'bmi' must hold numbers, as at training; row 7 holds 'high'"),
           (["--current", "missing.csv"], "current data lacks the column 's5' of the reference profile"),
           (["--current", "inf.csv"], "models:/diabetes_regressor/1 cannot score the current rows: ValueError: Input X contains infinity"),
           (["--current", "shifted.csv", "--alias", "nobody"], "model 'diabetes_regressor' has no version or alias 'nobody'"))
    for (args, msg), (code, _, err) in zip(bad, cli_cases([["monitor", *args] for args, _ in bad], champion)):
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert msg in err, err
    assert len(_monitor_runs(champion)) == before  # no run started, none left RUNNING


def test_monitoring_records_its_run_and_report_through_the_server(tproject):
    project, uri, dev, model = tproject
    assert cli_at(project, "train", "-o", "model.params.n_estimators=20")[0] == 0
    assert cli_at(project, "promote", "--version", "1")[0] == 0
    from mlflow_nb.data import load_dataset
    load_dataset("sklearn:diabetes").to_csv(project / "current.csv", index=False)
    r = run_cli("monitor", "--current", "current.csv", cwd=project)
    assert r.returncode == 0 and "(and in monitoring run" in r.stdout, r.stderr[-2000:]
    client = MlflowClient(uri, uri)
    [run] = client.search_runs([client.get_experiment_by_name(dev.replace("dev_", "prod_")).experiment_id],
                               f"tags.`{TAG_KIND}` = 'monitor'")
    assert "current_rmse" in run.data.metrics  # labelled data: performance checked
    assert any(a.path.endswith(".html") for a in client.list_artifacts(run.info.run_id, "monitoring")), \
        [a.path for a in client.list_artifacts(run.info.run_id)]
