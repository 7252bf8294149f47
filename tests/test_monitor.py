"""Monitoring against real models, a real webhook receiver, and the scoring service's logged windows."""
import http.server, json, shutil, threading

import numpy as np
import pandas as pd
import pytest

from conftest import CONFIGS, run_cli


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    project = tmp_path_factory.mktemp("monitor")
    shutil.copytree(CONFIGS, project / "configs")
    r = run_cli("train", "-o", "model.params.n_estimators=30", cwd=project)
    assert r.returncode == 0, r.stderr
    assert run_cli("promote", "--version", "1", cwd=project).returncode == 0
    from mlflow_nb.data import load_dataset
    full = load_dataset("sklearn:diabetes")
    shifted = full.assign(bmi=full.bmi + full.bmi.std(), s5=full.s5 * 3)
    shifted.to_csv(project / "shifted.csv", index=False)
    full.sample(300, random_state=0).to_csv(project / "same.csv", index=False)
    return project


class Receiver(http.server.BaseHTTPRequestHandler):
    bodies = []
    def do_POST(self):
        Receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass


def test_cli_flags_the_shifted_features_and_writes_the_report(champion):
    r = run_cli("monitor", "--current", "shifted.csv", "--out", "report", cwd=champion)
    assert r.returncode == 0, r.stderr
    assert "drift          : 2 of 10 features (bmi, s5)" in r.stdout
    assert "alert          : feature_drift bmi" in r.stdout
    page = (champion / "report" / "report.html").read_text()
    assert "2 of 10 features drifted" in page and page.count("<img") >= 2
    same = run_cli("monitor", "--current", "same.csv", cwd=champion)
    assert same.returncode == 0 and "drift          : 0 of 10 features;" in same.stdout, same.stdout


def test_webhook_receives_the_alerts_as_json(champion):
    srv = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/hook"
        r = run_cli("monitor", "--current", "shifted.csv", "-o", "monitor.sinks=[log, webhook]", "-o", f"monitor.webhook_url={url}", cwd=champion)
        assert r.returncode == 0, r.stderr
    finally:
        srv.shutdown()
    [body] = Receiver.bodies
    assert body["source"] == "mlflow_nb" and body["model"] == "diabetes_regressor" and body["version"] == "1"
    kinds = {(a["kind"], a["subject"]) for a in body["alerts"]}
    assert {("feature_drift", "bmi"), ("feature_drift", "s5")} <= kinds
    assert all({"kind", "subject", "value", "threshold", "time", "message"} <= set(a) for a in body["alerts"])


def test_a_dead_webhook_is_reported_not_raised(champion):
    r = run_cli("monitor", "--current", "shifted.csv", "-o", "monitor.sinks=[webhook]", "-o", "monitor.webhook_url=http://127.0.0.1:9/hook",
                "-o", "monitor.webhook_retries=1", "-o", "monitor.webhook_timeout_seconds=1", cwd=champion)
    assert r.returncode == 0
    assert "sink error     : webhook http://127.0.0.1:9/hook:" in r.stderr and "after 2 tries" in r.stderr


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


def test_monitor_errors_are_one_line(champion):
    for args, msg in ((["--current", "nope.csv"], "data.source: file not found"),
                      (["--current", "serving:" + "0" * 32], "no such serving run")):
        r = run_cli("monitor", *args, cwd=champion)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert msg in r.stderr
