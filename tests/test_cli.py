"""The `mlflow-nb` command itself: bad arguments are one line and exit 2, bad input leaves no run RUNNING and moves
no alias, and importing the package stays light."""
import subprocess, sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, cli


BAD_ARGS = [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["teach"], "invalid choice: 'teach'"),
    ([], "the following arguments are required: COMMAND"),
    (["train", "-o", "no_equals"], "expected KEY.SUB=VALUE"),
    (["train", "-o", "nosuchsection.x=1"], "unknown key 'nosuchsection'"),
    (["promote"], "--version N or --best"),
    (["promote", "--version", "1", "--best"], "not allowed with argument"),
    (["sweep", "--workers", "two"], "invalid int value: 'two'"),
    (["sweep", "--workers", "0", "-g", "model.params.max_depth=2,3"], "--workers: must be at least 1"),
    (["sweep", "-g", "max_depth"], "expected KEY=V1,V2"),
    (["run", "--steps", "train,deploy"], "unknown step 'deploy'"),
    (["run", "-p", "1bad=2"], "expected NAME=VALUE"),
    (["run", "-y", "metric: !!set {r2: null}"], "-y metric: only JSON values"),
    (["run", "-y", "metric: !!binary cjI="], "-y metric: only JSON values (text, numbers, true/false, null, lists, mappings) are allowed, got bytes"),
    (["run", "-y", "\"__import__('os').system('touch pwned')\": 1"], "parameter names must be Python names"),
    (["train", "-o", "model.params.max_depth=!!set {3: null}"], "override model.params.max_depth=!!set {3: null}: only JSON values"),
    (["serve", "--port", "http"], "invalid int value: 'http'"),
    (["serve", "--model", "onlyname"], "expected NAME@ALIAS"),
    (["monitor"], "the following arguments are required: --current"),
    (["cleanup", "--older-than", "-1"], "--older-than: must be >= 0 hours"),
    (["reproduce"], "the following arguments are required: run_id"),
]


@pytest.mark.parametrize("args,expected", BAD_ARGS)
def test_bad_cli_arguments_are_one_line_exit_2(project, args, expected):
    code, out, err = cli(*args)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_no_run_left_running_and_no_alias_moved_by_bad_input(project):
    assert cli("train", "-o", "model.params.n_estimators=10")[0] == 0
    assert cli("promote", "--version", "1")[0] == 0
    for args in (["train", "-o", "data.target=nope"], ["train", "-o", "model.type=KNeighborsRegressor", "-o", "model.params={n_neighbors: 9999}"],
                 ["promote", "--version", "7"], ["promote", "--version", "1", "-o", "promotion.thresholds.rmse={max: 1}"],
                 ["rollback"], ["run", "-p", "metric=nope", "--steps", "select"]):
        code, out, err = cli(*args)
        assert code in (1, 2), (args, err)
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    assert all(r.info.status != "RUNNING" for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"


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


def test_help_and_argument_errors_import_neither_mlflow_nor_scikit_learn():
    "`mlflow-nb --help` and a mistyped argument answer at once: the command's module pulls in no ML library."
    probe = "import sys, mlflow_nb.cli; print(sorted(m for m in ('mlflow', 'sklearn', 'pandas') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    for args in (["--help"], ["train", "--bogus"]):
        probe = ("import sys, mlflow_nb.cli\ntry: mlflow_nb.cli.main(%r)\nexcept SystemExit: pass\n"
                 "print(sorted(m for m in ('mlflow', 'sklearn') if m in sys.modules), file=sys.stderr)" % (args,))
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
        assert r.stderr.strip().splitlines()[-1] == "[]", (args, r.stderr)
