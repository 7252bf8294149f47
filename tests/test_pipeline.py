"""The papermill pipeline end to end: five nested step runs, a failing step, reproduce."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

FAST = ["-o", "model.params.n_estimators=30", "-o", "validation.cv_folds=3"]


def _client(project):
    return MlflowClient(f"sqlite:///{project}/mlflow.db", f"sqlite:///{project}/mlflow.db")


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return {r.info.run_name: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")}


def _pipeline_runs(client):
    exp = client.get_experiment_by_name("development").experiment_id
    return client.search_runs([exp], "tags.`mlflow_nb.kind` = 'pipeline'", order_by=["start_time ASC"])


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
    "One full `mlflow-nb run` on a fresh project (shared by the tests that only read it)."
    import shutil
    from conftest import CONFIGS
    project = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(CONFIGS, project / "configs")
    r = run_cli("run", *FAST, cwd=project)
    return project, r


def test_run_completes_five_nested_steps_and_promotes(finished_pipeline):
    project, r = finished_pipeline
    assert r.returncode == 0, r.stderr[-3000:]
    client = _client(project)
    [parent] = _pipeline_runs(client)
    assert parent.info.status == "FINISHED"
    kids = _children(client, parent.info.run_id)
    assert list(sorted(kids)) == sorted(["train", "validate", "select", "promote", "monitor"])
    for name, run in kids.items():
        assert run.info.status == "FINISHED", name
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
        assert arts == {f"notebook/{name}.ipynb", f"notebook/{name}.html"}, (name, arts)
    train = kids["train"]
    assert train.data.tags["mlflow_nb.kind"] == "train" and "cv_rmse_mean" in train.data.metrics  # validate handed back
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"
    assert parent.data.tags["mlflow_nb.promote.outcome"] == "promoted"
    assert "current_rmse" in kids["monitor"].data.metrics
    assert "champion" in r.stdout or "promote" in r.stdout


def test_reproduce_a_finished_pipeline_reports_identical_metrics(finished_pipeline):
    project, _ = finished_pipeline
    client = _client(project)
    parent = _pipeline_runs(client)[0]
    r = run_cli("reproduce", parent.info.run_id, cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all metrics identical" in r.stdout
    assert "DIFFERS" not in r.stdout and r.stdout.count("identical") >= 10
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"  # untouched


def test_a_failing_step_fails_parent_and_child_and_keeps_the_champion(finished_pipeline):
    project, _ = finished_pipeline
    client = _client(project)
    r = run_cli("run", *FAST, "-p", "metric=bogus", cwd=project)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("mlflow-nb: step select failed in cell"), r.stderr[-2000:]
    assert "unknown metric 'bogus'" in lines[-1]
    failed = _pipeline_runs(client)[-1]
    assert failed.info.status == "FAILED"
    kids = _children(client, failed.info.run_id)
    assert set(kids) == {"train", "validate", "select"}  # later steps skipped
    assert kids["select"].info.status == "FAILED"
    assert {a.path for a in client.list_artifacts(kids["select"].info.run_id, "notebook")} == {"notebook/select.ipynb", "notebook/select.html"}
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"
    running = [x for e in client.search_experiments() for x in client.search_runs([e.experiment_id], "attributes.status = 'RUNNING'")]
    assert running == []


def test_bad_pipeline_arguments_exit_2(project):
    for args, msg in ((["run", "--steps", "train,deploy"], "unknown step 'deploy'"),
                      (["run", "-p", "colour=red"], "-p colour: no step takes"),
                      (["run", "-y", "[1, 2]"], "expected a mapping"),
                      (["reproduce", "f" * 32], "not found")):
        r = run_cli(*args, cwd=project)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_mlproject_pipeline_entry_point(project):
    "`mlflow run . -e pipeline --env-manager local` adopts MLflow's run as the pipeline run."
    import os, shutil, subprocess, sys
    from pathlib import Path
    from conftest import ROOT
    for f in ("MLproject", "python_env.yaml"): shutil.copy(ROOT / f, project / f)
    shutil.copytree(ROOT / "nbs" / "pipeline", project / "nbs" / "pipeline")
    bin_dir = str(Path(sys.executable).parent)
    from conftest import child_env
    env = child_env({"PATH": bin_dir + os.pathsep + os.environ["PATH"], "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"})
    r = subprocess.run([f"{bin_dir}/mlflow", "run", ".", "-e", "pipeline", "--env-manager", "local", "--experiment-name",
                        "development", "-P", "steps=train", "-P", "config=configs"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    client = _client(project)
    [parent] = _pipeline_runs(client)
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.project.entryPoint") == "pipeline"
    assert list(_children(client, parent.info.run_id)) == ["train"]
