"""Stores as users reach them: `init`, several processes opening one fresh SQLite file, the store given only by
`MLFLOW_TRACKING_URI`, and `cleanup` of runs whose process died (and only those)."""
import multiprocessing as mp, os, sqlite3, subprocess, sys

import mlflow, pytest
from mlflow.tracking import MlflowClient

from conftest import child_env, run_cli


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


def _setup_worker(uri, store, barrier, results):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow_nb.settings import MlflowConfig, TrackingServer, Artifacts
    from mlflow_nb.tracking import setup_tracking
    barrier.wait()
    try:
        tr = setup_tracking(MlflowConfig(tracking_server=TrackingServer(uri=uri), artifacts=Artifacts(store=store)))
        results.put(("ok", tr.experiment_ids["default"]))
    except BaseException as e:
        results.put(("error", repr(e)))


@pytest.mark.parametrize("cache", ["user", "empty"])
def test_four_processes_set_up_the_same_fresh_sqlite_store(tmp_path, cache, monkeypatch):
    "Four processes create one store at once; with an empty cache they race to make the empty-store template too."
    if cache == "empty": monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
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
    if cache == "empty":  # one template was made, without experiments, and nothing else was left in the cache
        name = f"empty-store-mlflow-{mlflow.__version__}.db"
        assert sorted(p.name for p in (tmp_path / "cache" / "mlflow_nb").iterdir()) == [name, f"{name}.lock"]
        template = tmp_path / "cache" / "mlflow_nb" / name
        assert sqlite3.connect(template).execute("select count(*) from experiments").fetchone() == (0,)
        assert sqlite3.connect(template).execute("select version_num from alembic_version").fetchall() == head




def test_the_store_given_only_by_the_environment_is_the_only_store_written(project):
    "MLFLOW_TRACKING_URI=sqlite:///team.db, relative, from a sub-folder: everything lands in sub/team.db, nothing elsewhere."
    sub = project / "work"; sub.mkdir()
    env = {"MLFLOW_TRACKING_URI": "sqlite:///team.db"}
    for args in (["train", "-o", "model.params.n_estimators=5"], ["train", "-o", "model.params.n_estimators=6"],
                 ["promote", "--best"], ["select"]):
        r = run_cli(*args, "--config", "../configs", cwd=sub, env=env)
        assert r.returncode == 0, (args, r.stderr)
    uri = f"sqlite:///{sub / 'team.db'}"
    client = MlflowClient(uri, uri)
    dev = client.get_experiment_by_name("development")
    assert len(client.search_runs([dev.experiment_id])) == 2
    assert client.get_model_version_by_alias("diabetes_regressor", "champion")
    assert sorted(p.name for p in project.rglob("*.db")) == ["team.db"]  # not the config file's ../mlflow.db


def test_a_process_that_loads_its_config_twice_keeps_the_users_store(project):
    "The sweep bug: the second load in a process that had set up tracking fell back to the config file's store."
    code = ("from mlflow_nb.config import load_config; from mlflow_nb.tracking import setup_tracking\n"
            "a = load_config('configs'); setup_tracking(a); b = load_config('configs'); setup_tracking(b)\n"
            "print(a.tracking_uri); print(b.tracking_uri)")
    r = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                       env=child_env({"MLFLOW_TRACKING_URI": "sqlite:///env.db"}), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"sqlite:///{project / 'env.db'}"] * 2


def test_cleanup_ends_only_the_runs_whose_process_is_gone(project):
    from mlflow_nb.core import TAG_BOOT, TAG_PID
    from mlflow_nb.tracking import process_tags
    assert run_cli("init", cwd=project).returncode == 0
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name("development").experiment_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        ours = process_tags()  # this machine's boot and PID namespace
        orphan = client.create_run(exp, tags={**ours, TAG_PID: str(dead.pid)}).info.run_id
        live = client.create_run(exp, tags={**ours, TAG_PID: str(alive.pid)}).info.run_id
        # a container sharing this host name: its own PID namespace, where that pid may well be alive
        twin = client.create_run(exp, tags={**ours, TAG_BOOT: ours[TAG_BOOT].split("/")[0] + "/pid:[1]",
                                            TAG_PID: str(dead.pid)}).info.run_id
        r = run_cli("cleanup", cwd=project)
        assert r.returncode == 0 and f"marked FAILED : {orphan}" in r.stdout and "1 orphaned run(s) ended" in r.stdout, r.stdout
        status = {k: client.get_run(k).info.status for k in (orphan, live, twin)}
        assert status == {orphan: "FAILED", live: "RUNNING", twin: "RUNNING"}
        assert client.get_run(orphan).data.tags["mlflow_nb.error"].startswith("orphaned: process")
        r = run_cli("cleanup", "--older-than", "0", cwd=project)
        assert r.returncode == 0 and "2 orphaned run(s) ended" in r.stdout, r.stdout
    finally:
        alive.kill(); alive.wait()
