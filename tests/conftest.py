"""Shared fixtures: every test gets its own tracking store and leaves no MLFLOW_* variable or active run behind."""
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
ROOT = Path(__file__).resolve().parents[1]
STORE_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")


def child_env(extra: dict | None = None) -> dict:
    "The environment for a subprocess: this one without the store variables MLflow exports when a URI is set."
    return {**{k: v for k, v in os.environ.items() if k not in STORE_VARS}, "MLFLOW_DISABLE_TELEMETRY": "true", **(extra or {})}
CONFIGS = ROOT / "configs"


def _default_store() -> Path:
    "Where a test that forgets to choose a store would write (one file per xdist worker)."
    return ROOT / "tests" / f".unused-default-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.db"


@pytest.fixture(autouse=True)
def clean_mlflow_state():
    "Point MLflow at a store no test may write to; restore MLFLOW_* variables and end any run a test left active."
    import mlflow
    for k in STORE_VARS: os.environ.pop(k, None)  # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to children
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    default = _default_store()
    default.unlink(missing_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{default}"); mlflow.set_registry_uri(f"sqlite:///{default}")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    while mlflow.active_run(): mlflow.end_run("KILLED")
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]: del os.environ[k]
    os.environ.update(saved)
    if default.exists():
        default.unlink()
        pytest.fail("this test wrote to the default tracking store: give it a store of its own (the `project` fixture)")


@pytest.fixture
def project(tmp_path, monkeypatch):
    "A config folder in a temporary project whose SQLite store and artifacts live in `tmp_path`."
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k != "MLFLOW_DISABLE_TELEMETRY"]:
        monkeypatch.delenv(k)
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args):
    "The CLI in this process (each case still goes through argparse, the config loader and the error handler)."
    from mlflow_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main(list(args))
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()



def run_cli(*args, cwd=None, timeout=300, env=None):
    "Run the installed `mlflow-nb` command in a subprocess."
    full_env = child_env(env)
    exe = Path(sys.executable).parent / "mlflow-nb"  # the console script installed beside this Python
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def cli_cases(cases: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each argument list: the first through the installed `mlflow-nb` in a
    subprocess (what a shell sees), the others through the same entry point, `main`, in this process (argparse, the
    config loader, the command and the error handler: everything but a fresh interpreter's 2 s of imports)."""
    first = run_cli(*cases[0], cwd=cwd)
    return [(first.returncode, first.stdout, first.stderr), *(cli_at(cwd, *args) for args in cases[1:])]


def cli_at(cwd: Path, *args) -> tuple[int, str, str]:
    """`cli(*args)` from the folder `cwd`: for a test's setup steps (train, promote) when the test is about what comes
    after them, so that they cost their work and not a fresh interpreter's imports."""
    here = os.getcwd()
    os.chdir(cwd)
    try: return cli(*args)
    finally: os.chdir(here)


@pytest.fixture(scope="session")
def team(tmp_path_factory):
    "PostgreSQL + an `mlflow server` on loopback: {'uri', 'dir', ...}; skips the test where PostgreSQL is not installed."
    from support import team_server
    given = os.environ.get("MLFLOW_NB_TEAM_DIR")
    if given:
        yield json.loads((Path(given) / "state.json").read_text()); return
    if not team_server.available(): pytest.skip("PostgreSQL binaries are not installed")
    d = tmp_path_factory.mktemp("team")
    state = team_server.start(d)
    try: yield state
    finally: team_server.stop(d)


def _project_on(tmp_path: Path, uri: str):
    "A config folder pointing at the server `uri`, with its own experiment and model names."
    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg)
    tag = tmp_path.name.replace("-", "_")[-40:]
    text = (cfg / "mlflow_config.yaml").read_text()
    text = text.replace('uri: "sqlite:///../mlflow.db"', f'uri: "{uri}"')
    text = text.replace('default: "development"', f'default: "dev_{tag}"').replace('production: "production"', f'production: "prod_{tag}"')
    (cfg / "mlflow_config.yaml").write_text(text)
    model = (cfg / "model_config.yaml").read_text().replace('name: "diabetes_regressor"', f'name: "model_{tag}"')
    (cfg / "model_config.yaml").write_text(model)
    return tmp_path, uri, f"dev_{tag}", f"model_{tag}"


@pytest.fixture
def tproject(tmp_path, team):
    "(project, uri, experiment, model): a project on the team server (tests share the server)."
    return _project_on(tmp_path, team["uri"])


@pytest.fixture
def own_server(tmp_path_factory, team):
    "An MLflow server of this test's own, on the team PostgreSQL: for tests that stop it (the shared one stays up)."
    from support import team_server
    state = team_server.start_private_mlflow(team, tmp_path_factory.mktemp("own-server"))
    try: yield state
    finally: team_server.stop_mlflow(state)


@pytest.fixture
def oproject(tmp_path, own_server):
    "(project, uri, experiment, model) on `own_server`."
    return _project_on(tmp_path, own_server["uri"])


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    "{'address', 'dir'} of a running Dask scheduler with two single-threaded workers (.ci/run's, or started here)."
    from support import dask_cluster
    return dask_cluster.shared(lambda: tmp_path_factory.mktemp("dask"))
