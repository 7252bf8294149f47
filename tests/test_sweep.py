"""Sweeps and searches on a real Dask cluster: grid, random and TPE trials as child runs, in the store the user named.

The cluster is a real `dask scheduler` with two `dask worker` processes on loopback: the one .ci/run started
(MLFLOW_NB_DASK_SCHEDULER) or one started here for the session. Without --scheduler a sweep starts its own
LocalCluster. The team server (PostgreSQL + mlflow server) comes from conftest's `team` fixture.
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_nb.core import store_lock
from support import dask_cluster, team_server
from conftest import child_env, cli_cases, run_cli

TRIAL, KIND, PID, ERROR, BEST = "mlflow_nb.sweep_trial", "mlflow_nb.kind", "mlflow_nb.pid", "mlflow_nb.error", "mlflow_nb.sweep.best_run_id"
needs_server = pytest.mark.skipif(not team_server.available(), reason="PostgreSQL binaries are not installed")


SENT_ARTIFACTS = {"configs/mlflow_config.yaml", "configs/model_config.yaml", "configs/serving_config.yaml",
                  "configs/effective_config.json", "monitoring/reference_profile.json"}


def _runs(client, exp_name, flt=""):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], flt, max_results=5000) if exp else []


class _Observer:
    """Watches a SQLite store another process may still be creating. Opening an `MlflowClient` runs MLflow's
    migration, so the client is opened only once the file exists, and under the lock mlflow-nb creates it under:
    this process never migrates beside the sweep."""
    def __init__(self, uri): self.uri, self._client = uri, None

    @property
    def client(self):
        if self._client is None:
            with store_lock(self.uri): self._client = MlflowClient(self.uri, self.uri)
        return self._client

    def running_trials(self):
        "RUNNING trial runs, [] while the store does not exist yet."
        if self._client is None and not Path(self.uri[len("sqlite:///"):]).exists(): return []
        client = self.client
        with store_lock(self.uri): return _runs(client, "development", f"attributes.status = 'RUNNING' and tags.`{TRIAL}` != ''")


def _count(client, exp, metric_keys, artifact_paths):
    "(trial runs, finished ones, their metrics among metric_keys, their artifacts among artifact_paths)."
    runs = _runs(client, exp, f"tags.`{TRIAL}` != ''")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    metrics = sum(1 for r in finished for k in metric_keys if k in r.data.metrics)
    arts = 0
    for r in finished:
        present = {a.path for a in client.list_artifacts(r.info.run_id, "configs")} | \
                  {a.path for a in client.list_artifacts(r.info.run_id, "monitoring")}
        arts += len(present & artifact_paths)
    return len(runs), len(finished), metrics, arts


def _sweep_runs(client, exp):
    return _runs(client, exp, f"tags.`{KIND}` = 'sweep'")


def _trials(client, exp, sweep_id):
    return _runs(client, exp, f"tags.mlflow.parentRunId = '{sweep_id}'")


def _one_finished_per_trial(runs, numbers):
    "Each trial number has exactly one FINISHED run; no run is RUNNING."
    finished = sorted(int(r.data.tags[TRIAL]) for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(numbers), finished
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _no_stray_store(project, cluster):
    assert not (project / "mlflow.db").exists()  # the config file's default store was never opened
    if cluster and cluster.get("dir"): assert not (Path(cluster["dir"]) / "mlflow.db").exists()


# -- bad input: one line, exit 2, nothing started ---------------------------------------------------------------

BAD = [(["sweep"], "search space is empty"),
       (["sweep", "-g", "model.params.max_depth=3,oops"], "max_depth"),
       (["sweep", "-g", "model.params.nope=1,2"], "nope"),
       (["sweep", "-g", "model.params.max_depth=4,4,5"], "-g: model.params.max_depth: 4 is listed twice"),
       (["sweep", "-g", "model.params.max_depth=[1,2"], "-g 'model.params.max_depth=[1,2': a value is not valid YAML"),
       (["sweep", "--grid-file", "bad.yaml"], "--grid-file bad.yaml: line 2: YAML syntax error"),
       (["sweep", "--space", "list.yaml"], "--space list.yaml: expected a mapping"),
       (["sweep", "--search", "tpe", "--space", "reversed.yaml"], "--space reversed.yaml: model.params.max_depth: low 16 is above high 2"),
       (["sweep", "--space", "range.yaml"], "model.params.max_depth: a grid search needs a list of values"),
       (["sweep", "--search", "random", "--space", "range.yaml", "--trials", "0"], "--trials: must be at least 1"),
       (["sweep", "--search", "bayes", "-g", "model.params.max_depth=2,3"], "invalid choice: 'bayes'"),
       (["sweep", "--space", "nofile.yaml"], "--space: nofile.yaml: file not found"),
       (["sweep", "--search", "tpe", "--space", "range.yaml", "--study-storage", "nosuch://x"], "--study-storage nosuch://x"),
       (["sweep", "-g", "model.params.max_depth=2,3", "--scheduler", "tcp://127.0.0.1:9"], "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered")]


def test_bad_sweep_arguments_exit_2_in_one_line_and_start_nothing(project):
    (project / "bad.yaml").write_text("model.params.max_depth: [2, 4\nx: 1\n")
    (project / "list.yaml").write_text("- 1\n- 2\n")
    (project / "reversed.yaml").write_text("model.params.max_depth: {int: [16, 2]}\n")
    (project / "range.yaml").write_text("model.params.max_depth: {int: [2, 16]}\n")
    for (args, msg), (code, _, err) in zip(BAD, cli_cases([args for args, _ in BAD], project)):
        assert code == 2, (args, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (args, err)
    uri = f"sqlite:///{project}/mlflow.db"
    if (project / "mlflow.db").exists():
        assert _sweep_runs(MlflowClient(uri, uri), "development") == []


# -- the store named only by MLFLOW_TRACKING_URI (issue 11.1), more trials than workers ---------------------------

GRID_8 = ["-g", "model.params.n_estimators=10,20", "-g", "model.params.max_depth=2,4,6,8"]


def test_sweep_8_trials_4_local_workers_store_given_only_by_the_environment(project, tmp_path_factory):
    "No --tracking-uri, config untouched: every trial logs to the env's store, nothing anywhere else."
    uri = f"sqlite:///{tmp_path_factory.mktemp('elsewhere') / 'team.db'}"
    r = run_cli("sweep", "--workers", "4", "--quiet", *GRID_8, cwd=project, env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "database is locked" not in r.stderr and "alembic" not in r.stderr.lower()
    assert "rmse" in r.stdout  # the summary table
    client = MlflowClient(uri, uri)
    assert _count(client, "development", ("rmse", "mae", "r2"), SENT_ARTIFACTS) == (8, 8, 8 * 3, 8 * 5)
    [sweep] = _sweep_runs(client, "development")
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["trials_finished"] == 8
    assert sweep.data.metrics["trials_failed"] == 0 and sweep.data.params["sweep.workers"] == "4"
    assert "sweep_trials.json" in {a.path for a in client.list_artifacts(sweep.info.run_id)}
    _one_finished_per_trial(_trials(client, "development", sweep.info.run_id), range(8))
    _no_stray_store(project, None)


def test_trials_on_one_worker_reuse_split_data_only_when_the_data_settings_match(project):
    "One worker runs all four trials in order; the two with test_size 0.5 must not train on the 0.2 split it kept."
    r = run_cli("sweep", "--workers", "1", "--quiet", "-g", "training.test_size=0.2,0.5", "-g",
                "model.params.max_depth=2,3", "-o", "model.params.n_estimators=5", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    [sweep] = _sweep_runs(client, "development")
    runs = _trials(client, "development", sweep.info.run_id)
    _one_finished_per_trial(runs, range(4))
    for run in runs:  # the evaluation set each trial logged: ceil(test_size x 442 diabetes rows)
        [test] = [i.dataset for i in run.inputs.dataset_inputs if i.dataset.name == "evaluation"]
        share = float(run.data.params["training.test_size"])
        assert json.loads(test.profile)["num_rows"] == {0.2: 89, 0.5: 221}[share], (share, test.profile)


@needs_server
def test_sweep_8_trials_on_the_cluster_against_the_server_given_only_by_the_environment(project, team, cluster):
    exp = f"dev_{project.name.replace('-', '_')[-30:]}"
    r = run_cli("sweep", "--scheduler", cluster["address"], "--quiet", *GRID_8, "-o", f"experiments.default={exp}",
                "-o", f"experiments.production=p{exp}", cwd=project, env={"MLFLOW_TRACKING_URI": team["uri"]}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(team["uri"], team["uri"])
    assert _count(client, exp, ("rmse", "mae", "r2"), SENT_ARTIFACTS) == (8, 8, 8 * 3, 8 * 5)
    [sweep] = _sweep_runs(client, exp)
    assert sweep.info.status == "FINISHED" and sweep.data.params["sweep.scheduler"] == cluster["address"]
    _one_finished_per_trial(_trials(client, exp, sweep.info.run_id), range(8))
    _no_stray_store(project, cluster)


# -- a worker lost mid-trial --------------------------------------------------------------------------------------

def _worker_pids(address):
    from distributed import Client
    with Client(address, timeout=10) as c: return set(c.run(os.getpid).values())


def _wait_for_workers(address, n=2):
    from distributed import Client
    with Client(address, timeout=10) as c: c.wait_for_workers(n, timeout=120)


def test_a_worker_killed_mid_trial_leaves_exactly_one_finished_run_per_trial(project, cluster):
    "SIGKILL the worker running a trial: Dask reruns the task, the lost attempt's run ends KILLED."
    uri = f"sqlite:///{project}/mlflow.db"
    exe = Path(sys.executable).parent / "mlflow-nb"
    proc = subprocess.Popen([str(exe), "sweep", "--scheduler", cluster["address"], "--quiet", "--tracking-uri", uri,
                             "-o", "model.params.n_estimators=300", "-g", "model.params.max_depth=2,3,4,5"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    workers, killed, deadline = _worker_pids(cluster["address"]), None, time.time() + 180
    observer = _Observer(uri)
    try:
        while killed is None and time.time() < deadline and proc.poll() is None:
            for run in observer.running_trials():
                pid = int(run.data.tags[PID].split("@")[0])
                if pid in workers:
                    os.kill(pid, signal.SIGKILL); killed = run; break
            time.sleep(0.1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None: proc.kill()
        _wait_for_workers(cluster["address"])  # the nanny restarts the worker it lost
    assert killed is not None, "no trial was seen running on a worker"
    assert proc.returncode == 0, err[-3000:]
    client = observer.client
    [sweep] = _sweep_runs(client, "development")
    runs = _trials(client, "development", sweep.info.run_id)
    _one_finished_per_trial(runs, range(4))
    lost = client.get_run(killed.info.run_id)
    assert lost.info.status == "KILLED" and lost.data.tags[ERROR].startswith("attempt lost")
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["trials_finished"] == 4


def test_sigterm_mid_sweep_leaves_no_run_running(project):
    "SIGTERM the command while its LocalCluster trains: the sweep run ends KILLED, its trials' runs are ended too."
    uri = f"sqlite:///{project}/mlflow.db"
    exe = Path(sys.executable).parent / "mlflow-nb"
    proc = subprocess.Popen([str(exe), "sweep", "--workers", "2", "--quiet", "-o", "model.params.n_estimators=300",
                             "-g", "model.params.max_depth=2,3,4,5,6,7"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    observer, deadline = _Observer(uri), time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None and not observer.running_trials():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    client = observer.client
    [sweep] = _sweep_runs(client, "development")
    assert sweep.info.status == "KILLED"
    trials = _trials(client, "development", sweep.info.run_id)
    assert trials and not [r for r in trials if r.info.status == "RUNNING"]


# -- Optuna searches ----------------------------------------------------------------------------------------------

SPACE = "model.params.max_depth: {int: [2, 12]}\nmodel.params.max_features: {float: [0.3, 1.0]}\n"


def _check_study_logged(client, sweep, trials):
    "The sweep run holds the best trial (pointing at the best child), the history and the plots."
    arts = {a.path for a in client.list_artifacts(sweep.info.run_id, "optuna")}
    assert {"optuna/best_trial.json", "optuna/history.json", "optuna/optimization_history.png",
            "optuna/param_importances.png", "optuna/param_importances.json"} <= arts, arts
    best_child = min((r for r in trials if r.info.status == "FINISHED"), key=lambda r: r.data.metrics["rmse"])
    assert sweep.data.tags[BEST] == best_child.info.run_id
    assert sweep.data.metrics["best_rmse"] == pytest.approx(best_child.data.metrics["rmse"])
    for r in trials:  # each child carries the params it was asked to train
        assert 2 <= int(r.data.params["model.params.max_depth"]) <= 12
        assert 0.3 <= float(r.data.params["model.params.max_features"]) <= 1.0


def test_tpe_search_on_the_cluster_resumes_its_study(project, cluster):
    (project / "space.yaml").write_text(SPACE)
    uri, storage = f"sqlite:///{project}/mlflow.db", f"sqlite:///{project}/optuna.db"
    args = ["sweep", "--scheduler", cluster["address"], "--quiet", "--search", "tpe", "--space", "space.yaml",
            "-o", "model.params.n_estimators=10", "--study-storage", storage, "--study-name", "depth"]
    r = run_cli(*args, "--trials", "6", cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(uri, uri)
    [first] = _sweep_runs(client, "development")
    trials = _trials(client, "development", first.info.run_id)
    _one_finished_per_trial(trials, range(6))
    assert len({r.data.params["model.params.max_features"] for r in trials}) == 6  # sampled, not repeated
    _check_study_logged(client, first, trials)
    r = run_cli(*args, "--trials", "3", cwd=project)  # the same study, resumed: its trials go on numbering
    assert r.returncode == 0, r.stderr[-3000:]
    second = next(s for s in _sweep_runs(client, "development") if s.info.run_id != first.info.run_id)
    _one_finished_per_trial(_trials(client, "development", second.info.run_id), range(6, 9))
    history = json.loads(Path(client.download_artifacts(second.info.run_id, "optuna/history.json", str(project))).read_text())
    assert [h["number"] for h in history] == list(range(9)) and second.data.tags["mlflow_nb.sweep.study"] == "depth"


@needs_server
def test_random_search_with_the_study_in_the_team_postgresql(project, team, cluster):
    "Workers, the tracking server on PostgreSQL and the Optuna storage (a second database there) together."
    import optuna, psycopg2
    db = f"optuna_{project.name.replace('-', '_')[-30:]}".lower()
    conn = psycopg2.connect(host="127.0.0.1", port=team["pg_port"], user="postgres", dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE runs outside a transaction
    try: conn.cursor().execute(f"CREATE DATABASE {db}")
    finally: conn.close()
    storage, exp = f"postgresql+psycopg2://postgres@127.0.0.1:{team['pg_port']}/{db}", f"dev_{db}"
    (project / "space.yaml").write_text(SPACE)
    r = run_cli("sweep", "--scheduler", cluster["address"], "--quiet", "--search", "random", "--trials", "4",
                "--space", "space.yaml", "--study-storage", storage, "-o", "model.params.n_estimators=10",
                "-o", f"experiments.default={exp}", "-o", f"experiments.production=p{exp}", cwd=project,
                env={"MLFLOW_TRACKING_URI": team["uri"]}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(team["uri"], team["uri"])
    [sweep] = _sweep_runs(client, exp)
    trials = _trials(client, exp, sweep.info.run_id)
    _one_finished_per_trial(trials, range(4))
    _check_study_logged(client, sweep, trials)
    study = optuna.load_study(study_name="diabetes_regressor-random", storage=storage)
    assert sorted(t.number for t in study.trials if t.state.name == "COMPLETE") == [0, 1, 2, 3]
    assert sweep.data.params["sweep.study_storage"] == storage
    _no_stray_store(project, cluster)


# -- the store goes down mid-sweep ---------------------------------------------------------------------------------

@needs_server
def test_server_stopped_mid_sweep_gives_a_clear_error_and_nothing_half_registered(oproject, own_server):
    project, uri, exp, model = oproject
    exe = Path(sys.executable).parent / "mlflow-nb"
    proc = subprocess.Popen([str(exe), "sweep", "--workers", "2", "--quiet", "-g", "model.params.max_depth=2,3,4,5,6,7"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    client = MlflowClient(uri, uri)
    deadline = time.time() + 120
    while time.time() < deadline and not any(r.info.status == "FINISHED" for r in _runs(client, exp, f"tags.`{TRIAL}` != ''")):
        time.sleep(0.3)
    team_server.stop_mlflow(own_server)
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        own_server.update(team_server.restart_mlflow(own_server))
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlflow-nb: ") and ("unreachable" in last or "failed" in last), err[-2000:]
    assert time.time() - t0 < 200  # bounded retries, not MLflow's default minutes per call
    client = MlflowClient(uri, uri)
    assert client.search_registered_models(f"name = '{model}'") == []  # sweeps register nothing: nothing half-registered
    r = run_cli("cleanup", "--older-than", "0", cwd=project)
    assert r.returncode == 0
    assert [x for x in _runs(client, exp) if x.info.status == "RUNNING"] == []
