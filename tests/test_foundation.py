"""Foundation: the CLI on real stores, safe concurrent store creation, import weight."""
import multiprocessing as mp, os, sqlite3, subprocess, sys, time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_cli


def test_init_creates_store_experiments_and_environment_run(project):
    r = run_cli("init", cwd=project)
    assert r.returncode == 0, r.stderr
    assert (project / "mlflow.db").exists()  # ../mlflow.db resolved against configs/, not the cwd
    client = MlflowClient(f"sqlite:///{project}/mlflow.db", f"sqlite:///{project}/mlflow.db")
    dev = client.get_experiment_by_name("development")
    assert dev.artifact_location == (project / "artifacts" / "development").as_uri()
    assert client.get_experiment_by_name("production") is not None
    runs = client.search_runs([dev.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["env.python"].count(".") == 2
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "configs")}
    assert arts == {"configs/mlflow_config.yaml", "configs/model_config.yaml", "configs/serving_config.yaml"}


def test_init_from_another_directory_uses_the_same_store(project):
    sub = project / "nbs"; sub.mkdir()
    assert run_cli("init", "--config", "../configs", cwd=sub).returncode == 0
    assert (project / "mlflow.db").exists() and not (sub / "mlflow.db").exists()


@pytest.mark.parametrize("edit,expected", [
    (("test_size: 0.2", "test_size: 1.5"), "model_config.yaml: training.test_size: must be between 0 and 1, got 1.5"),
    (("cv_folds:", "cv_fold:"), "model_config.yaml: validation.cv_fold: unknown key"),
    (('- "r2"', '- "r3"'), "model_config.yaml: metrics.2: unknown metric 'r3'"),
    (("max_depth: 10", "max_depth: deep"), "model_config.yaml: model.params.max_depth:"),
])
def test_bad_config_is_one_line_exit_2(project, edit, expected):
    f = project / "configs" / "model_config.yaml"
    f.write_text(f.read_text().replace(*edit))
    r = run_cli("init", cwd=project)
    assert r.returncode == 2
    assert r.stderr.startswith("mlflow-nb: error: configs/" + expected), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (project / "mlflow.db").exists()  # nothing was created


def test_bad_cli_arguments_exit_2(project):
    for args in (["init", "--bogus"], ["nope"], [], ["init", "-o", "no_equals_sign"]):
        r = run_cli(*args, cwd=project)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def _setup_worker(uri, store, barrier, results):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow_nb.config import MlflowConfig, TrackingServer, Artifacts
    from mlflow_nb.tracking import setup_tracking
    barrier.wait()
    try:
        tr = setup_tracking(MlflowConfig(tracking_server=TrackingServer(uri=uri), artifacts=Artifacts(store=store)))
        results.put(("ok", tr.experiment_ids["default"]))
    except BaseException as e:
        results.put(("error", repr(e)))


@pytest.mark.parametrize("attempt", range(2))
def test_four_processes_set_up_the_same_fresh_sqlite_store(tmp_path, attempt):
    db = tmp_path / "fresh.db"
    uri = f"sqlite:///{db}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_setup_worker, args=(uri, str(tmp_path / "art"), barrier, results)) for _ in range(4)]
    for p in procs: p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs: p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert [o[0] for o in outcomes] == ["ok"] * 4, outcomes
    assert len({o[1] for o in outcomes}) == 1  # one experiment, not four
    # the schema is complete: a later client opens it and finds both experiments
    client = MlflowClient(uri, uri)
    names = {e.name for e in client.search_experiments()}
    assert {"development", "production"} <= names
    head = sqlite3.connect(db).execute("select version_num from alembic_version").fetchall()
    assert len(head) == 1


HEAVY = ("torch", "fastapi", "papermill")


def _heavy_after(code):
    probe = f"import sys; {code}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_import_is_light():
    assert _heavy_after("import mlflow_nb") == "[]"
    # the library modules add nothing heavy of their own: fastapi comes only with mlflow itself (mlflow.gateway)
    assert _heavy_after("import mlflow_nb.config, mlflow_nb.tracking, mlflow_nb.repro, mlflow_nb.cli") == \
        _heavy_after("import mlflow")
    assert "torch" not in _heavy_after("import mlflow_nb.config, mlflow_nb.tracking, mlflow_nb.repro, mlflow_nb.cli")
    assert "papermill" not in _heavy_after("import mlflow_nb.config, mlflow_nb.tracking, mlflow_nb.repro, mlflow_nb.cli")
