"""Team scale: the same code against an `mlflow server` on PostgreSQL; concurrency counts; faults.

The server comes from the environment when .ci/run started one (MLFLOW_NB_TEAM_DIR, with state.json), or is
started here for the session. Everything binds 127.0.0.1 and is stopped at the end.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, ROOT, child_env, run_cli
from support import team_server

FAST = ["-o", "model.params.n_estimators=20", "-o", "validation.cv_folds=3"]


def _runs(client, exp_name, flt=""):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], flt, max_results=5000) if exp else []


def test_pipeline_registry_and_monitoring_against_the_server(tproject):
    project, uri, exp, model = tproject
    r = run_cli("run", *FAST, cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(uri, uri)
    [parent] = _runs(client, exp, "tags.`mlflow_nb.kind` = 'pipeline'")
    kids = _runs(client, exp, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.info.run_name for k in kids) == sorted(["train", "validate", "select", "promote", "monitor"])
    assert all(k.info.status == "FINISHED" for k in kids)
    for k in kids:  # the executed notebooks went through the server's artifact proxy
        assert {a.path for a in client.list_artifacts(k.info.run_id, "notebook")} == {f"notebook/{k.info.run_name}.ipynb", f"notebook/{k.info.run_name}.html"}
    assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
    # registry commands, by URI only
    assert run_cli("train", *FAST, "-o", "model.params.max_depth=3", cwd=project).returncode == 0
    r = run_cli("promote", "--version", "2", "-o", "promotion.min_delta=1000", cwd=project)
    assert r.returncode == 2 and "gate beat-champion" in r.stderr
    assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
    assert run_cli("history", cwd=project).returncode == 0
    # monitoring writes its run and report through the server
    from mlflow_nb.data import load_dataset
    load_dataset("sklearn:diabetes").to_csv(project / "current.csv", index=False)
    r = run_cli("monitor", "--current", "current.csv", cwd=project)
    assert r.returncode == 0 and "(and in monitoring run" in r.stdout, r.stderr[-2000:]


def test_a_killed_pipeline_is_cleaned_up_and_a_rerun_succeeds(project):
    "SIGKILL the pipeline runner mid-step: its runs end FAILED at the next start; the champion is untouched."
    assert run_cli("train", *FAST, cwd=project).returncode == 0
    assert run_cli("promote", "--version", "1", cwd=project).returncode == 0
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    exe = Path(sys.executable).parent / "mlflow-nb"
    proc = subprocess.Popen([str(exe), "run", *FAST], cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=child_env())
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the validate step is running
        if any(r.info.run_name == "validate" for r in _runs(client, "development", "attributes.status = 'RUNNING'")): break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    stuck = _runs(client, "development", "attributes.status = 'RUNNING'")
    assert {r.info.run_name for r in stuck} >= {"pipeline", "validate"}
    r = run_cli("run", *FAST, "--steps", "train,validate", cwd=project)
    assert r.returncode == 0, r.stderr[-2000:]
    for s in stuck:
        run = client.get_run(s.info.run_id)
        assert run.info.status == "FAILED" and run.data.tags["mlflow_nb.error"].startswith("orphaned: process")
    assert _runs(client, "development", "attributes.status = 'RUNNING'") == []
    # the champion moved only through the passing promote step of the re-run (or stayed): never by the killed one
    hist = client.get_registered_model("diabetes_regressor").tags
    assert all(json.loads(v)["action"] == "promote" for k, v in hist.items() if k.startswith("mlflow_nb.promotion."))


def test_the_scoring_service_keeps_answering_while_the_tracking_server_is_down(tproject, team):
    project, uri, exp, model = tproject
    assert run_cli("train", *FAST, cwd=project).returncode == 0
    assert run_cli("promote", "--version", "1", cwd=project).returncode == 0
    from test_serve import Server
    from mlflow_nb.data import load_dataset
    X = load_dataset("sklearn:diabetes").drop(columns="target").head(3).to_dict(orient="records")
    server = Server(project, "-o", "serve.log_window_seconds=0.5")
    try:
        team_server.stop_mlflow(team)
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
            team.update(team_server.restart_mlflow(team))
    finally:
        server.stop()
