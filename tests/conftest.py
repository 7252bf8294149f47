"""Shared fixtures: every test gets its own tracking store and leaves no MLFLOW_* variable or active run behind."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def clean_mlflow_state():
    "Restore MLFLOW_* variables and end any run a test left active."
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    import mlflow
    while mlflow.active_run(): mlflow.end_run("KILLED")
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
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    exe = Path(sys.executable).parent / "mlflow-nb"  # the console script installed beside this Python
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
