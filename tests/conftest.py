"""Shared fixtures: every test gets its own tracking store and leaves no MLFLOW_* variable or active run behind."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
ROOT = Path(__file__).resolve().parents[1]
STORE_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")


def child_env(extra: dict | None = None) -> dict:
    "The environment for a subprocess: this one without the store variables MLflow exports when a URI is set."
    return {**{k: v for k, v in os.environ.items() if k not in STORE_VARS}, "MLFLOW_DISABLE_TELEMETRY": "true", **(extra or {})}
_BASELINE_URIS = (f"sqlite:///{ROOT / 'tests' / '.unused-default.db'}",) * 2  # a test that forgets to set a store fails loudly here
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def clean_mlflow_state():
    "Restore MLFLOW_* variables and end any run a test left active."
    import mlflow
    for k in STORE_VARS: os.environ.pop(k, None)  # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to children
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    while mlflow.active_run(): mlflow.end_run("KILLED")
    mlflow.set_tracking_uri(_BASELINE_URIS[0]); mlflow.set_registry_uri(_BASELINE_URIS[1])  # setup_tracking sets both globally
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]: del os.environ[k]
    os.environ.update(saved)


@pytest.fixture
def project(tmp_path, monkeypatch):
    "A config folder in a temporary project whose SQLite store and artifacts live in `tmp_path`."
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k != "MLFLOW_DISABLE_TELEMETRY"]:
        monkeypatch.delenv(k)
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args, cwd=None, timeout=300, env=None):
    "Run the installed `mlflow-nb` command in a subprocess."
    full_env = child_env(env)
    exe = Path(sys.executable).parent / "mlflow-nb"  # the console script installed beside this Python
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
