"""Training on real files through the CLI: messy CSVs, bad data, nothing left RUNNING."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import mlflow
from mlflow.tracking import MlflowClient

from conftest import cli_cases, run_cli


def _messy_csv(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    size = rng.uniform(30, 200, n)
    city = rng.choice(["lisbon", "porto", "braga"], n)
    age = rng.integers(0, 80, n).astype(float)
    price = 1000 * size * np.where(city == "lisbon", 1.5, 1.0) - 200 * age + rng.normal(0, 5000, n)
    df = pd.DataFrame({"size_m2": size, "city": city, "age": age, "garage": rng.choice(["yes", "no"], n), "price": price})
    df.loc[rng.choice(n, 25, replace=False), "size_m2"] = np.nan
    df.loc[rng.choice(n, 25, replace=False), "city"] = None
    df.loc[rng.choice(n, 5, replace=False), "price"] = np.nan  # dropped, counted
    df.to_csv(path, index=False)
    return df


def test_csv_with_missing_values_and_categories_trains_without_manual_preprocessing(project):
    _messy_csv(project / "houses.csv")
    r = run_cli("train", "-o", "data.source=../houses.csv", "-o", "data.target=price",
                "-o", "model.name=houses", "-o", "model.params.n_estimators=30", cwd=project)
    assert r.returncode == 0, r.stderr
    uri = f"sqlite:///{project}/mlflow.db"
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    v = client.get_model_version("houses", "1")
    run = client.get_run(v.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.rows_dropped"] == "5"
    assert run.data.metrics["r2"] > 0.5
    model = mlflow.pyfunc.load_model("models:/houses/1")
    raw = pd.DataFrame({"size_m2": [100.0, np.nan], "city": ["lisbon", "faro"], "age": [10.0, 3.0], "garage": ["no", None]})
    pred = model.predict(raw)  # missing values and an unseen category, straight from raw rows
    assert pred.shape == (2,) and np.isfinite(pred).all()
    # the dataset input names the file and its digest changes with the content
    ds = [d.dataset for d in run.inputs.dataset_inputs]
    assert {d.name for d in ds} == {"training", "evaluation"} and all("houses.csv" in d.source for d in ds)


def test_digest_changes_when_the_data_changes(project):
    df = _messy_csv(project / "houses.csv")
    args = ["train", "--no-register", "-o", "data.source=../houses.csv", "-o", "data.target=price",
            "-o", "model.params.n_estimators=10"]
    assert run_cli(*args, cwd=project).returncode == 0
    df.loc[0, "age"] = 79.0
    df.to_csv(project / "houses.csv", index=False)
    assert run_cli(*args, cwd=project).returncode == 0
    client = MlflowClient(f"sqlite:///{project}/mlflow.db", f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("development")
    runs = client.search_runs([exp.experiment_id])
    digests = [{d.dataset.name: d.dataset.digest for d in r.inputs.dataset_inputs}["training"] for r in runs]
    assert len(set(digests)) == 2


def test_bad_data_fails_before_any_run(project):
    pd.DataFrame({"a": [1, 2, 3, 4, 5], "price": ["1", "2", "cheap", "4", "5"]}).to_csv(project / "t.csv", index=False)
    cases = [
        (["-o", "data.source=../t.csv", "-o", "data.target=price"], "data.target: column 'price' must be numeric for a regressor, got 'cheap'"),
        (["-o", "data.source=../t.csv", "-o", "data.target=cost"], "data.target: column 'cost' not in the data"),
        (["-o", "data.source=../nope.parquet"], "data.source: file not found"),
        (["-o", "model.type=NoSuchModel"], "override model.type=NoSuchModel: unknown model type 'NoSuchModel'"),
        (["-o", "model.params.max_depth=-4"], "override model.params.max_depth=-4: "),
    ]
    for (args, expected), (code, _, err) in zip(cases, cli_cases([["train", *args] for args, _ in cases], project)):
        assert code == 2, (args, err)
        assert expected in err and len(err.strip().splitlines()) == 1, err
    db = project / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
        assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


def test_failure_inside_the_run_marks_it_failed_and_registers_nothing(project):
    r = run_cli("train", "-o", "model.type=KNeighborsRegressor", "-o", "model.params={n_neighbors: 5000}", cwd=project)
    assert r.returncode != 0
    client = MlflowClient(f"sqlite:///{project}/mlflow.db", f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("development")
    runs = client.search_runs([exp.experiment_id])
    assert [x.info.status for x in runs] == ["FAILED"]
    assert client.search_model_versions("name = 'diabetes_regressor'") == []


def test_secrets_never_reach_the_run_nor_the_terminal(tproject):
    "A tracking URI with a password and a webhook token URL: nowhere in params, tags, logged files or errors."
    project, uri, exp, model = tproject
    secret_uri = uri.replace("http://", "http://mlflow:s3cr3t-pw@")
    mlflow_cfg = project / "configs" / "mlflow_config.yaml"
    mlflow_cfg.write_text(mlflow_cfg.read_text().replace(f'uri: "{uri}"', f'uri: "{secret_uri}"'))
    serving = project / "configs" / "serving_config.yaml"
    serving.write_text(serving.read_text().replace("webhook_url: null", 'webhook_url: "https://hooks.example.com/T0/B0/tok3n-XYZ"'))
    r = run_cli("train", "-o", "model.params.n_estimators=5", cwd=project)
    assert r.returncode == 0, r.stderr
    client = MlflowClient(uri, uri)
    [run] = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), r.stdout, r.stderr]
    d = Path(client.download_artifacts(run.info.run_id, "", str(project / "dl")))
    texts += [p.read_text(errors="replace") for p in d.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".txt", ".patch")]
    assert len(texts) > 8 and any("hooks.example.com" in t for t in texts)  # the files are there, redacted
    for t in texts: assert "s3cr3t-pw" not in t and "tok3n-XYZ" not in t
    # an error about an unreachable store does not print the password either
    r = run_cli("select", "--tracking-uri", "http://mlflow:s3cr3t-pw@127.0.0.1:9", cwd=project,
                env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    assert r.returncode != 0 and "s3cr3t-pw" not in r.stdout + r.stderr and "mlflow:***@127.0.0.1:9" in r.stderr, r.stderr
