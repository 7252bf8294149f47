"""Config files as users write them: every malformed file, key or value is one line naming the file and the key,
exit 2, and nothing is created in any store."""
import pytest

from conftest import CONFIGS, cli, run_cli


MODEL_EDITS = [  # (old text, new text, what the one-line error must say)
    ("test_size: 0.2", "test_size: 1.5", "training.test_size: must be between 0 and 1, got 1.5"),
    ("test_size: 0.2", "test_size: 0", "training.test_size: must be between 0 and 1, got 0"),
    ("test_size: 0.2", "test_size: lots", "training.test_size: input should be a valid number"),
    ("random_state: 42", "random_state: 4.5", "training.random_state: input should be a valid integer"),
    ("test_size:", "test_sise:", "training.test_sise: unknown key (did you mean 'test_size'?"),
    ("training:", "trainning:", "trainning: unknown key (did you mean 'training'?"),
    ('type: "RandomForestRegressor"', 'type: "RandomForestRegresor"', "model.type: unknown model type 'RandomForestRegresor'"),
    ('type: "RandomForestRegressor"', 'type: "os.system"', "model.type:"),
    ("max_depth: 10", "max_dpeth: 10", "model.params.max_dpeth: RandomForestRegressor has no parameter 'max_dpeth'"),
    ("n_estimators: 100", "n_estimators: -1", "model.params.n_estimators:"),
    ("max_depth: 10", "max_depth: deep", "model.params.max_depth:"),
    ('- "mae"', '- "mea"', "metrics.1: unknown metric 'mea' (did you mean 'mae'?)"),
    ('- "rmse"', '- "accuracy"', "metrics.0: 'accuracy' is a classification metric"),
    ('- "mae"', '- "rmse"', "metrics: each metric may appear once"),
    ("cv_folds: 5", "cv_folds: 1", "validation.cv_folds: input should be greater than or equal to 2, got 1"),
    ('name: "diabetes_regressor"', 'name: "team/diabetes"', "model.name: 'team/diabetes' cannot be a registered model name (it contains '/')"),
    ('name: "diabetes_regressor"', 'name: "diabetes@v2"', "model.name: 'diabetes@v2' cannot be a registered model name (it contains '@')"),
    ('name: "diabetes_regressor"', "name: ''", "model.name: string should have at least 1 character"),
    ('alias: "champion"', 'alias: "my champion!"', "promotion.alias: string should match pattern"),
    ("rmse: {max: 70.0}", "rmse: {}", "promotion.thresholds.rmse: give min, max or both"),
    ("rmse: {max: 70.0}", "accuracy: {min: 0.9}", "promotion.thresholds.accuracy: not a metric this model logs"),
    ("min_delta: 0.0", "min_delta: -1", "promotion.min_delta: input should be greater than or equal to 0"),
    ('target: "target"', "target: [a, b]", "data.target: input should be a valid string"),
    ("features: null", "features: target", "data.features: input should be a valid list"),
    ("model:\n", "model: 3\nold_model:\n", "model: expected a mapping of keys, got 3"),
    ("validation:\n  cv_folds: 5", "validation:\n  cv_folds: 5\n   oops: [", "YAML syntax error"),
]
MLFLOW_EDITS = [
    ('level: "INFO"', 'level: "LOUD"', "logging.level: input should be 'DEBUG'"),
    ('default: "development"', 'default: "  "', "experiments.default: must not be empty"),
    ('production: "production"', 'production: "development"', "experiments: production must differ from default (both are 'development')"),
    ('uri: "sqlite:///../mlflow.db"', 'uri: "ftp://files.example.com/mlflow"', "tracking_server.uri: unsupported store 'ftp://files.example.com/mlflow'"),
    ('uri: "sqlite:///../mlflow.db"', 'uri: "./mlruns"', "tracking_server.uri: unsupported store './mlruns'"),
    ('uri: "sqlite:///../mlflow.db"', 'uri: "ftp://admin:hunter2@files.example.com/x"', "unsupported store 'ftp://admin:***@files.example.com/x'"),
    ("tracking_server:", "tracking_servers:", "tracking_servers: unknown key (did you mean 'tracking_server'?"),
]
SERVING_EDITS = [
    ("port: 8080", "port: 99999", "serve.port: input should be less than or equal to 65535"),
    ("max_wait_ms: 2.0", "max_wait_ms: -1", "serve.max_wait_ms: input should be greater than or equal to 0"),
    ('sinks: ["log", "mlflow"]', 'sinks: ["email"]', "monitor.sinks.0: input should be 'log', 'mlflow' or 'webhook'"),
    ("rmse: 0.25", "rmsd: 0.25", "monitor.performance_tolerance: unknown metric 'rmsd'"),
    ('sinks: ["log", "mlflow"]', 'sinks: ["log", "webhook"]', "monitor: sinks lists 'webhook' but webhook_url is not set"),
    ("webhook_url: null", 'webhook_url: "file:///etc/passwd"', "monitor.webhook_url: must be an http:// or https:// URL"),
]


@pytest.mark.parametrize("fname,old,new,expected", [("model_config.yaml", *e) for e in MODEL_EDITS] +
                         [("mlflow_config.yaml", *e) for e in MLFLOW_EDITS] + [("serving_config.yaml", *e) for e in SERVING_EDITS])
def test_malformed_config_is_one_line_exit_2_and_touches_nothing(project, fname, old, new, expected):
    f = project / "configs" / fname
    text = f.read_text()
    assert old in text, f"test case does not apply: {old!r}"
    f.write_text(text.replace(old, new, 1))
    for command in (["train"], ["run"], ["promote", "--best"]):
        code, out, err = cli(*command)
        assert code == 2, (command, err)
        assert err.startswith(f"mlflow-nb: error: configs/{fname}: ") and expected in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (project / "mlflow.db").exists()  # a bad config is caught before any store is opened


def test_empty_and_missing_config_files(project):
    (project / "configs" / "model_config.yaml").write_text("")
    assert "model_config.yaml: file is empty" in cli("train")[2]
    (project / "configs" / "model_config.yaml").unlink()
    assert "model_config.yaml: file not found" in cli("train")[2]
    assert "config folder not found" in cli("train", "--config", "nowhere")[2]




def test_a_bad_config_through_the_installed_command(project):
    "The console script, in a fresh process: the same one line, exit 2, and no store created."
    f = project / "configs" / "model_config.yaml"
    f.write_text(f.read_text().replace("cv_folds:", "cv_fold:"))
    r = run_cli("init", cwd=project)
    assert r.returncode == 2 and r.stderr.startswith("mlflow-nb: error: configs/model_config.yaml: validation.cv_fold: unknown key")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (project / "mlflow.db").exists()


def test_the_shipped_serving_config_shows_every_setting():
    "Each key of the serve and monitor sections appears, commented, in configs/serving_config.yaml."
    import yaml
    from mlflow_nb.settings import Monitor, Serve
    shipped = yaml.safe_load((CONFIGS / "serving_config.yaml").read_text())
    for section, cls in (("serve", Serve), ("monitor", Monitor)):
        missing = sorted(set(cls.model_fields) - set(shipped[section]))
        assert not missing, f"serving_config.yaml: {section}: keys not shown: {missing}"
