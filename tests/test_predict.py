"""Batch scoring on a real Dask cluster: `mlflow-nb predict` equals pyfunc row for row, bad rows land in the rejects
with their reason, nothing is dropped, the model is loaded once per worker, the job is one run."""
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from support import team_server
from conftest import cli_at, cli_cases, run_cli

FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "region"]
REGIONS = ["north", "south", "east", "west"]


def _training_frame():
    "The diabetes rows with a string column: a model with numeric and categorical inputs."
    from mlflow_nb.data import load_dataset
    df = load_dataset("sklearn:diabetes")
    df.insert(10, "region", [REGIONS[i % 4] for i in range(len(df))])
    df["target"] = df["target"] + df["region"].map({"north": 30.0, "south": -30.0, "east": 0.0, "west": 10.0})
    return df


def _scoring_frame(n=24_000, seed=0):
    "Rows to score: resampled features with an id, missing values in every column kind and unseen categories."
    rng = np.random.default_rng(seed)
    df = _training_frame().drop(columns="target").sample(n, replace=True, random_state=seed).reset_index(drop=True)
    df.insert(0, "id", [f"r{i}" for i in range(n)])
    k = max(1, n // 100)
    for c in ("age", "bmi", "s5"): df.loc[rng.choice(n, k, replace=False), c] = np.nan
    df.loc[rng.choice(n, k, replace=False), "region"] = None
    df.loc[rng.choice(n, k, replace=False), "region"] = "atlantis"  # a category the model never saw
    return df


def _train(project, *extra):
    "The model the scoring tests score with (setup: `mlflow-nb train` through the CLI's entry point, in this process)."
    _training_frame().to_csv(project / "train.csv", index=False)
    code, _, err = cli_at(project, "train", "-o", f"data.source={project / 'train.csv'}", "-o", "model.params.n_estimators=20",
                          *extra)
    assert code == 0, err[-3000:]


def _pyfunc(uri, version, frame):
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/diabetes_regressor/{version}").predict(frame[FEATURES])


def _predict_run(client, exp="production"):
    exp_id = client.get_experiment_by_name(exp).experiment_id
    [run] = client.search_runs([exp_id], "tags.`mlflow_nb.kind` = 'predict'")
    return run


def test_predict_equals_pyfunc_row_for_row_and_rejects_bad_rows(project, cluster):
    _train(project)
    rows = _scoring_frame()
    text = rows.astype(object)
    bad = {"r5": ("age", "abc", "age: not a number ('abc')"), "r17": ("bmi", "inf", "bmi: not finite"),
           "r23999": ("s1", "1e999", "s1: not finite"), "r12000": ("bp", "0.1.2", "bp: not a number ('0.1.2')")}
    for rid, (col, value, _) in bad.items(): text.loc[text.id == rid, col] = value
    text.to_csv(project / "rows.csv", index=False)  # about 2.6 MB: three 1 MB partitions
    r = run_cli("predict", "--input", "rows.csv", "--output", "scored", "--model", "diabetes_regressor/1",
                "--keep", "id", "--blocksize", "1", "--scheduler", cluster["address"], "--quiet", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = pd.read_parquet(project / "scored" / "predictions")
    rejects = pd.read_parquet(project / "scored" / "rejects")
    assert sorted(rejects.id) == sorted(bad) and len(preds) + len(rejects) == len(rows)
    for rid, (_, _, reason) in bad.items(): assert rejects.set_index("id").reason[rid].startswith(reason)
    good = rows[~rows.id.isin(bad)].set_index("id")
    preds = preds.set_index("id").loc[good.index]
    np.testing.assert_allclose(preds.prediction.to_numpy(), _pyfunc(f"sqlite:///{project}/mlflow.db", 1, good), rtol=1e-12)
    uri = f"sqlite:///{project}/mlflow.db"
    run = _predict_run(MlflowClient(uri, uri))
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_nb.model_version"] == "1"
    assert (m["rows_in"], m["predictions"], m["rejects"]) == (len(rows), len(rows) - len(bad), len(bad))
    assert m["partitions"] >= 3 and 1 <= m["model_loads"] <= 2 < m["partitions"]  # once per worker, not per part
    assert f"rows in        : {len(rows)}" in r.stdout


def test_predict_a_parquet_folder_numbers_rows_when_there_is_no_key(project, cluster):
    "Two Parquet files of several row groups, scored by alias, without --keep: row_id follows the input's order."
    _train(project)
    assert cli_at(project, "promote", "--version", "1")[0] == 0
    rows = _scoring_frame(n=3000, seed=1).drop(columns="id")
    (project / "in").mkdir()
    rows.iloc[:1800].to_parquet(project / "in" / "a.parquet", row_group_size=500)
    rows.iloc[1800:].to_parquet(project / "in" / "b.parquet", row_group_size=500)
    r = run_cli("predict", "--input", "in", "--output", "out", "--scheduler", cluster["address"], "--quiet", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = pd.read_parquet(project / "out" / "predictions").sort_values("row_id")
    assert list(preds.row_id) == list(range(3000)) and not (project / "out" / "rejects").exists()
    np.testing.assert_allclose(preds.prediction.to_numpy(), _pyfunc(f"sqlite:///{project}/mlflow.db", 1, rows), rtol=1e-12)
    uri = f"sqlite:///{project}/mlflow.db"
    assert _predict_run(MlflowClient(uri, uri)).data.tags["mlflow_nb.alias"] == "champion"


def test_predict_on_the_local_default_numbers_csv_rows_in_input_order(project):
    "No scheduler: threads of the CLI's own process, one model load; a CSV with blank lines, several parts, no key."
    _train(project)
    rows = _scoring_frame(n=24_000, seed=2).drop(columns="id")
    text = rows.to_csv(index=False).splitlines()
    text[1 + 12_345] = text[1 + 12_345].replace(text[1 + 12_345].split(",")[0], "abc", 1)  # row 12345: age "abc"
    blank = {500, 9000, 20000}  # blank lines the CSV reader skips: they must not shift the numbers
    lines = [l for i, t in enumerate(text) for l in ([t, ""] if i in blank else [t])]
    (project / "rows.csv").write_text("\n".join(lines))
    r = run_cli("predict", "--input", "rows.csv", "--output", "out", "--model", "diabetes_regressor/1",
                "--blocksize", "1", "--quiet", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = pd.read_parquet(project / "out" / "predictions").sort_values("row_id")
    rejects = pd.read_parquet(project / "out" / "rejects")
    assert list(rejects.row_id) == [12_345] and rejects.reason[0].startswith("age: not a number ('abc')")
    assert list(preds.row_id) == [i for i in range(len(rows)) if i != 12_345]
    expected = _pyfunc(f"sqlite:///{project}/mlflow.db", 1, rows.drop(index=12_345))
    np.testing.assert_allclose(preds.prediction.to_numpy(), expected, rtol=1e-12)
    uri = f"sqlite:///{project}/mlflow.db"
    m = _predict_run(MlflowClient(uri, uri)).data.metrics
    assert m["partitions"] >= 3 and m["model_loads"] == 1 and m["rows_in"] == len(rows)  # one load, shared by threads


def test_bad_predict_input_is_one_line_and_starts_no_run(project, cluster):
    _train(project)
    rows = _scoring_frame(n=50)
    rows.drop(columns="bmi").to_csv(project / "nobmi.csv", index=False)
    rows.to_csv(project / "ok.csv", index=False)
    (project / "used").mkdir(); (project / "used" / "x").write_text("")
    bad = ((["--input", "nobmi.csv", "--output", "o1"], "nobmi.csv: missing column(s) bmi"),
           (["--input", "ok.csv", "--output", "o2", "--keep", "patient"], "missing column(s) patient"),
           (["--input", "ok.csv", "--output", "used"], "--output used: exists and is not an empty folder"),
           (["--input", "ok.csv", "--output", "o3", "--model", "diabetes_regressor/7"], "no version or alias '7'"),
           (["--input", "ok.csv", "--output", "o4", "--model", "diabetes_regressor"], "expected NAME@ALIAS"),
           (["--input", "none.csv", "--output", "o5"], "--input none.csv: no such file"))
    cases = [["predict", "--model", "diabetes_regressor/1", *args, "--scheduler", cluster["address"]] for args, _ in bad]
    for (args, msg), (code, _, err) in zip(bad, cli_cases(cases, project)):
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    assert client.search_runs([client.get_experiment_by_name("production").experiment_id],
                              "tags.`mlflow_nb.kind` = 'predict'") == []


@pytest.mark.skipif(not team_server.available(), reason="PostgreSQL binaries are not installed")
def test_predict_against_the_server_given_only_by_the_environment(project, team, cluster, monkeypatch):
    tag = project.name.replace("-", "_")[-30:]
    names = ["-o", f"experiments.default=dev_{tag}", "-o", f"experiments.production=prod_{tag}",
             "-o", f"model.name=model_{tag}"]
    env = {"MLFLOW_TRACKING_URI": team["uri"]}
    with monkeypatch.context() as m:
        m.setenv("MLFLOW_TRACKING_URI", team["uri"])
        _train(project, *names)
    _scoring_frame(n=2000).to_csv(project / "rows.csv", index=False)
    r = run_cli("predict", "--input", "rows.csv", "--output", "scored", "--model", f"model_{tag}/1", "--keep", "id",
                "--scheduler", cluster["address"], "--quiet", *names, cwd=project, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _predict_run(MlflowClient(team["uri"], team["uri"]), f"prod_{tag}")
    assert run.info.status == "FINISHED" and run.data.metrics["predictions"] == 2000
    assert len(pd.read_parquet(project / "scored" / "predictions")) == 2000
    assert not (project / "mlflow.db").exists()
