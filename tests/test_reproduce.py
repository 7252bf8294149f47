"""`mlflow-nb reproduce` on training runs, as users reach it: identical metrics, warnings when the code moved, and
a stored config treated as untrusted input (no module imported on its say-so, no file read outside the project)."""
import json, shutil, subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

FAST = ["-o", "model.params.n_estimators=10"]


def _git(project, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=project, check=True, capture_output=True)


def _train(project, *args) -> str:
    r = run_cli("train", "--no-register", *FAST, *args, cwd=project)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("run            : ")[1].split()[0]


def _client(project):
    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(uri, uri)


def test_a_training_run_reproduces_identically_and_warns_when_the_commit_moved(project):
    _git(project, "init", "-q", "-b", "main"); _git(project, "add", "configs"); _git(project, "commit", "-q", "-m", "one")
    run_id = _train(project)
    run = _client(project).get_run(run_id)
    assert run.data.tags["mlflow.source.git.commit"]  # every model-producing run carries its environment
    assert run.data.params["env.scikit-learn"] and run.data.params["training.random_state"] == "42"
    r = run_cli("reproduce", run_id, cwd=project)
    assert r.returncode == 0 and "all metrics identical" in r.stdout, r.stdout + r.stderr
    assert "warning" not in r.stderr
    (project / "notes.txt").write_text("a change\n"); _git(project, "add", "notes.txt"); _git(project, "commit", "-q", "-m", "two")
    r = run_cli("reproduce", run_id, cwd=project)
    assert r.returncode == 0 and "warning: git commit differs" in r.stderr, r.stderr


def _tamper(project, run_id, edit) -> None:
    "Rewrite the run's logged effective config as an attacker with write access to the artifact store could."
    client = _client(project)
    path = client.download_artifacts(run_id, "configs/effective_config.json", str(project / "dl"))
    doc = json.loads(open(path).read())
    edit(doc)
    art = project / "artifacts" / "development"
    target = next(art.rglob("effective_config.json"))
    target.write_text(json.dumps(doc))


def test_a_stored_config_cannot_make_reproduce_import_a_module(project):
    run_id = _train(project)
    (project / "evil_estimators.py").write_text(
        "from pathlib import Path\nPath('imported.flag').write_text('x')\n"
        "from sklearn.linear_model import Ridge as Model\n")
    _tamper(project, run_id, lambda d: d["model"]["model"].update(type="evil_estimators.Model", params={}))
    r = run_cli("reproduce", run_id, cwd=project, env={"PYTHONPATH": str(project)})
    assert r.returncode == 2 and "module 'evil_estimators' is not imported here" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (project / "imported.flag").exists()  # refused before anything imported it


def test_a_stored_config_cannot_make_reproduce_read_a_file_outside_the_project(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "data.csv"
    from mlflow_nb.data import load_dataset
    load_dataset("sklearn:diabetes").to_csv(outside, index=False)
    run_id = _train(project, "-o", f"data.source={outside}")
    r = run_cli("reproduce", run_id, cwd=project)
    assert r.returncode == 2 and "outside this project folder: name the data to read with --data" in r.stderr, r.stderr
    shutil.copy(outside, project / "copy.csv")
    r = run_cli("reproduce", run_id, "--data", "copy.csv", cwd=project)
    assert r.returncode == 0 and "all metrics identical" in r.stdout, r.stdout + r.stderr


def test_a_cross_validated_training_run_reproduces_its_cv_metrics_too(project):
    r = run_cli("train", "--cv", "--no-register", *FAST, "-o", "validation.cv_folds=3", cwd=project)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.split("run            : ")[1].split()[0]
    r = run_cli("reproduce", run_id, cwd=project)
    assert r.returncode == 0 and "all metrics identical" in r.stdout and "cv_rmse_mean" in r.stdout, r.stdout + r.stderr
