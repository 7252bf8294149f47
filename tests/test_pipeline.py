"""The papermill pipeline end to end, through the CLI: five nested step runs whose executed notebooks read as
reports, the store given only by MLFLOW_TRACKING_URI (SQLite and the team server), secrets kept out of
everything logged, hostile parameters, a failing step, Ctrl-C and SIGTERM, the MLflow-project command, reproduce,
and the pages a person opens afterwards (the logged step notebooks, the monitoring report) in a real browser."""
import json, os, re, shutil, signal, socket, sqlite3, subprocess, sys, tempfile, threading, time, uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, ROOT, child_env, cli_at, cli_cases, run_cli
from support.pages import launch, needs_chromium, open_page, problems
from mlflow_nb.core import TAG_UNCHECKED_METRICS

FAST = ["-o", "model.params.n_estimators=30", "-o", "validation.cv_folds=3"]
TINY = ["-o", "model.params.n_estimators=5", "-o", "validation.cv_folds=2"]  # the smallest run that shows a fault
STEPS = ["train", "validate", "select", "promote", "monitor"]
EXE = Path(sys.executable).parent / "mlflow-nb"
YAML_TOKEN, CLI_TOKEN = "YAMLT0KEN8c1f", "CLIT0KEN52ab"  # webhook URL tokens: in serving_config.yaml, and via -o


def _client(uri):
    return MlflowClient(uri, uri)


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return {r.info.run_name: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")}


def _pipeline_runs(client, experiment="development"):
    exp = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([exp], "tags.`mlflow_nb.kind` = 'pipeline'", order_by=["start_time ASC"])


def _running(client):
    return [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], "attributes.status = 'RUNNING'")]


def _new_project(tmp: Path) -> Path:
    "A copy of the project a user runs the pipeline from: configs and the step notebooks."
    shutil.copytree(CONFIGS, tmp / "configs")
    shutil.copytree(ROOT / "nbs" / "pipeline", tmp / "nbs" / "pipeline")
    return tmp


def _run_live(*args, cwd, env=None, timeout=600):
    "Run `mlflow-nb` and note when each stdout line arrived: (returncode, [(seconds, line)], stderr)."
    t0, err = time.perf_counter(), []
    with subprocess.Popen([str(EXE), *args], cwd=cwd, env=child_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, bufsize=1) as p:
        reader = threading.Thread(target=lambda: err.append(p.stderr.read()))
        reader.start()
        lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in p.stdout]
        p.wait(timeout); reader.join()
    return p.returncode, lines, err[0]


def _notebook(client, run_id, step):
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(run_id, f"notebook/{step}.ipynb", d)).read_text())


def _outputs(nb, mime):
    "The `mime` parts of every output of the notebook's code cells."
    return ["".join(o["data"][mime]) if isinstance(o["data"][mime], list) else o["data"][mime]
            for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if mime in o.get("data", {})]


def _everything_logged(client, experiments, model) -> str:
    "Params, tags and every artifact's bytes of every run in `experiments`, and the tags of `model` and its versions."
    chunks = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None: continue
        chunks += [json.dumps(exp.tags), exp.artifact_location]
        for r in client.search_runs([exp.experiment_id], max_results=1000):
            chunks += [json.dumps(r.data.params), json.dumps(r.data.tags), r.info.artifact_uri]
            with tempfile.TemporaryDirectory() as d:
                client.download_artifacts(r.info.run_id, "", d)
                chunks += [f.read_bytes().decode("utf-8", "replace") for f in Path(d).rglob("*") if f.is_file()]
    for m in client.search_registered_models(f"name = '{model}'"):
        chunks += [json.dumps(m.tags), m.description or ""]
    for v in client.search_model_versions(f"name = '{model}'"):
        chunks += [json.dumps(v.tags), v.source or "", v.description or ""]
    return "\n".join(chunks)


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
    """One full `mlflow-nb run` on a fresh project, shared by the tests that only read it. The store is given only by
    MLFLOW_TRACKING_URI (a relative SQLite path other than the config's), and webhook token URLs are set in
    serving_config.yaml and with -o, so that the same run shows where things go and what is kept secret."""
    project = _new_project(tmp_path_factory.mktemp("pipeline"))
    serving = project / "configs" / "serving_config.yaml"
    hook = f'webhook_url: "http://127.0.0.1:9/h/{YAML_TOKEN}"'
    serving.write_text(serving.read_text().replace("webhook_url: null", hook))
    env = {"MLFLOW_TRACKING_URI": "sqlite:///env-store.db"}
    rc, lines, err = _run_live("run", *FAST, "-o", f"monitor.webhook_url=https://hooks.example.com/T/{CLI_TOKEN}",
                               cwd=project, env=env)
    return {"project": project, "rc": rc, "lines": lines, "stdout": "\n".join(l for _, l in lines), "stderr": err,
            "env": env, "uri": f"sqlite:///{project}/env-store.db", 
            "client": _client(f"sqlite:///{project}/env-store.db")}


def test_run_completes_five_nested_steps_and_promotes(finished_pipeline):
    fp = finished_pipeline
    assert fp["rc"] == 0, fp["stderr"][-3000:]
    client = fp["client"]
    [parent] = _pipeline_runs(client)
    assert parent.info.status == "FINISHED"
    kids = _children(client, parent.info.run_id)
    assert sorted(kids) == sorted(STEPS)
    for name, run in kids.items():
        assert run.info.status == "FINISHED", name
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
        assert arts == {f"notebook/{name}.ipynb", f"notebook/{name}.html"}, (name, arts)
    train = kids["train"]
    assert train.data.tags["mlflow_nb.kind"] == "train" and "cv_rmse_mean" in train.data.metrics  # validate handed back
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"
    assert parent.data.tags["mlflow_nb.promote.outcome"] == "promoted"
    monitor = kids["monitor"].data  # drift on the held-out split, labels withheld: performance is reported unchecked
    assert "drifted_share" in monitor.metrics and monitor.metrics["metrics_unchecked"] >= 1
    assert "current_rmse" not in monitor.metrics and "no 'target' column" in monitor.tags[TAG_UNCHECKED_METRICS]
    assert _running(client) == []


def test_the_store_from_the_environment_is_the_only_store(finished_pipeline):
    "MLFLOW_TRACKING_URI=sqlite:///env-store.db (relative): every run is there, no other store anywhere."
    project = finished_pipeline["project"]
    assert finished_pipeline["rc"] == 0, finished_pipeline["stderr"][-3000:]
    dbs = sorted(p.relative_to(project) for p in project.rglob("*.db"))
    assert dbs == [Path("env-store.db")], dbs  # not the config's ../mlflow.db, not nbs/pipeline/mlflow.db
    assert not (project / "mlruns").exists() and not (ROOT / "nbs" / "pipeline" / "mlflow.db").exists()
    notebooks = {p.name for p in (project / "nbs" / "pipeline").iterdir()}
    assert notebooks == {".notest", *(f"{s}.ipynb" for s in STEPS)}, notebooks  # kernels wrote nothing beside them
    db = sqlite3.connect(project / "env-store.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 6  # the pipeline run and its five steps


def test_cli_prints_a_live_line_per_step_and_what_to_do_next(finished_pipeline):
    fp = finished_pipeline
    assert fp["rc"] == 0, fp["stderr"][-3000:]
    assert fp["stderr"].strip() == "", fp["stderr"][-2000:]  # no kernel warnings, no progress bars, no tracebacks
    steps = [(t, l) for t, l in fp["lines"] if re.match(r"^  \w+ +(FINISHED|FAILED|KILLED) +\d+\.\d s$", l)]
    assert [l.split()[:2] for _, l in steps] == [[s, "FINISHED"] for s in STEPS], fp["stdout"]
    end = next(t for t, l in fp["lines"] if l.startswith("pipeline run"))
    assert end - steps[0][0] > 1.0 and steps[1][0] - steps[0][0] > 0.2  # printed as each step ended, not at the end
    out = fp["stdout"]
    assert out.index("next:") > out.index("pipeline run") and "IPKernelApp" not in out and "WARNING" not in out
    nxt = out[out.index("next:"):].splitlines()[1:]
    ui = next(l for l in nxt if l.strip().startswith("open the UI")).split(": ", 1)[1]
    assert ui == f"mlflow ui --backend-store-uri {fp['uri']}"  # this store, runnable as printed
    [parent] = _pipeline_runs(_client(ui.split()[-1]))  # and it is the store holding the pipeline run
    assert parent.info.run_id in out
    champ = next(l for l in nxt if l.strip().startswith("load the champion"))
    assert "models:/diabetes_regressor@champion" in champ and "(version 1)" in champ
    report = Path(next(l for l in nxt if l.strip().startswith("monitoring report")).split(": ", 1)[1])
    monitor = _children(fp["client"], parent.info.run_id)["monitor"]
    assert report.is_file() and report.name == "report.html" and monitor.info.run_id in str(report)
    assert "<html" in report.read_text()[:200].lower()


def test_logged_notebooks_read_as_reports(finished_pipeline):
    "The executed notebooks kept with the runs show plots (train, validate) and tables (select, promote, monitor)."
    client = finished_pipeline["client"]
    [parent] = _pipeline_runs(client)
    kids = {s: r.info.run_id for s, r in _children(client, parent.info.run_id).items()}
    nbs = {s: _notebook(client, kids[s], s) for s in STEPS}
    assert len(_outputs(nbs["train"], "image/png")) >= 3  # predicted vs actual, residuals, feature importance
    assert any("rmse" in t and "r2" in t for t in _outputs(nbs["train"], "text/html"))  # the metrics table
    assert len(_outputs(nbs["validate"], "image/png")) == 1
    assert any("fold 0" in t and "fold 2" in t and "mean" in t for t in _outputs(nbs["validate"], "text/html"))
    assert any("rank" in t and "✓" in t for t in _outputs(nbs["select"], "text/html"))  # the leaderboard
    gates = [t for t in _outputs(nbs["promote"], "text/html") if "passed" in t]
    assert gates and all(g in gates[0] for g in ("run finished", "rmse", "r2", "&lt;= 70", "&gt;= 0.3"))
    assert any("**promoted**" in t for t in _outputs(nbs["promote"], "text/markdown"))
    assert any("psi" in t and "drifted" in t for t in _outputs(nbs["monitor"], "text/html"))  # the drift table
    for s in STEPS:  # the first markdown cell says what the step reads and writes; no progress bars in the report
        first = "".join(nbs[s]["cells"][0]["source"])
        assert nbs[s]["cells"][0]["cell_type"] == "markdown" and "**Reads**" in first and "**Writes**" in first
        assert not any("Downloading artifacts" in t for t in _stderr_texts(nbs[s])), s
    with tempfile.TemporaryDirectory() as d:  # and the rendered HTML beside each carries the same images
        html = Path(client.download_artifacts(kids["train"], "notebook/train.html", d)).read_text()
    assert html.count("data:image/png;base64") >= 3


def _stderr_texts(nb):
    return ["".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("name") == "stderr"]


def test_monitor_notebook_shows_drift_charts(finished_pipeline):
    client = finished_pipeline["client"]
    [parent] = _pipeline_runs(client)
    monitor = _children(client, parent.info.run_id)["monitor"].info.run_id
    assert _outputs(_notebook(client, monitor, "monitor"), "image/png")


def test_secrets_are_in_nothing_logged_or_printed(finished_pipeline):
    "A webhook token URL given with -o appears in no param, tag, artifact, injected parameters cell or output line."
    fp = finished_pipeline
    assert fp["rc"] == 0, fp["stderr"][-3000:]
    logged = _everything_logged(fp["client"], ["development", "production"], "diabetes_regressor")
    assert "injected-parameters" in logged and "monitor.webhook_url=https://hooks.example.com/***" in logged
    assert CLI_TOKEN not in logged and CLI_TOKEN not in fp["stdout"] + fp["stderr"]
    assert YAML_TOKEN not in fp["stdout"] + fp["stderr"]


def test_a_secret_written_in_a_config_file_is_not_logged(finished_pipeline):
    logged = _everything_logged(finished_pipeline["client"], ["development", "production"], "diabetes_regressor")
    assert YAML_TOKEN not in logged


def test_reproduce_a_finished_pipeline_reports_identical_metrics(finished_pipeline):
    fp = finished_pipeline
    client = fp["client"]
    parent = _pipeline_runs(client)[0]
    r = run_cli("reproduce", parent.info.run_id, cwd=fp["project"], env=fp["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all metrics identical" in r.stdout
    assert "DIFFERS" not in r.stdout and r.stdout.count("identical") >= 10
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"  # untouched


def test_a_failing_step_fails_parent_and_child_and_keeps_the_champion(finished_pipeline):
    "A hostile -p value stays a string (papermill escapes it): the select step fails on it, the rest is skipped."
    fp = finished_pipeline
    client, project = fp["client"], fp["project"]
    hostile = "bogus'); open('PWNED', 'w').close(); ('"
    r = run_cli("run", "--steps", "select,promote,monitor", "-p", f"metric={hostile}", cwd=project, env=fp["env"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-nb: step select failed in cell"), r.stderr[-2000:]
    assert "unknown metric" in lines[0] and "select    FAILED" in r.stdout
    assert not list(project.rglob("PWNED")) and not (ROOT / "nbs" / "pipeline" / "PWNED").exists()
    failed = _pipeline_runs(client)[-1]
    assert failed.info.status == "FAILED"
    kids = _children(client, failed.info.run_id)
    assert set(kids) == {"select"} and kids["select"].info.status == "FAILED"  # later steps skipped
    assert kids["select"].data.tags["mlflow_nb.error"] == lines[0].removeprefix("mlflow-nb: ")
    assert {a.path for a in client.list_artifacts(kids["select"].info.run_id, "notebook")} == \
        {"notebook/select.ipynb", "notebook/select.html"}
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"
    assert _running(client) == []


def _kernel_processes(marker: str) -> list[int]:
    "PIDs of live processes whose environment carries `marker` (the step kernels a test's runner started)."
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit(): continue
        try: env = (p / "environ").read_bytes()
        except OSError: continue
        if marker.encode() in env and b"ipykernel" in (p / "cmdline").read_bytes(): pids.append(int(p.name))
    return pids


def _as_from_a_terminal():
    "Ctrl-C as a terminal delivers it: pytest-xdist workers ignore SIGINT, and a child would inherit that."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_step_ends_every_run_killed_and_keeps_the_champion(finished_pipeline, how):
    "SIGTERM to the runner, or Ctrl-C (SIGINT to its process group): its runs end KILLED, its kernels are gone."
    fp = finished_pipeline
    client, marker = fp["client"], f"MLFLOW_NB_TEST_{uuid.uuid4().hex}"
    before = {r.info.run_id for r in _pipeline_runs(client)}
    proc = subprocess.Popen([str(EXE), "run", *TINY], cwd=fp["project"], env=child_env({**fp["env"], marker: "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_from_a_terminal)
    deadline, parent = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:  # wait until a step's run exists and its kernel works
        parent = next((r for r in _pipeline_runs(client) if r.info.run_id not in before), None)
        if parent and any(k.info.status == "RUNNING" for k in _children(client, parent.info.run_id).values()): break
        time.sleep(0.2)
    assert proc.poll() is None and parent is not None, "the pipeline ended before a step was seen running"
    time.sleep(1.0)
    if how == "SIGTERM": os.kill(proc.pid, signal.SIGTERM)
    else: os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines() == ["mlflow-nb: interrupted: the runs this command opened were ended as KILLED"], \
        err
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    kids = _children(client, parent.info.run_id)
    statuses = {s: k.info.status for s, k in kids.items()}
    assert "KILLED" in statuses.values() and set(statuses.values()) <= {"KILLED", "FINISHED"}, statuses
    assert re.search(r"^  \w+ +KILLED", out, re.M), out
    assert _running(client) == []
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"
    assert _kernel_processes(marker) == []


def test_parameters_outside_json_are_refused_before_any_run(project):
    "-y from a file, and YAML tags that would construct objects: refused in one line before any store is opened."
    (project / "params.yaml").write_text("x: !!binary aGVsbG8=")  # (text forms, crafted names: test_bad_input.py)
    for arg, expected in (("params.yaml", "-y x: only JSON values"),
                          ("x: !!python/object/apply:os.system ['touch PWNED']", "not valid YAML")):
        r = run_cli("run", "-y", arg, cwd=project)
        assert r.returncode == 2 and expected in r.stderr, (arg, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (project / "mlflow.db").exists() and not list(project.rglob("PWNED"))  # no store opened, no run


def test_bad_pipeline_arguments_exit_2(project):
    bad = ((["run", "-p", "colour=red"], "-p colour: no step takes"),
           (["run", "-y", "[1, 2]"], "expected a mapping"),
           (["run", "-y", "x" * 5000], "expected a mapping"),
           (["run", "--notebooks", "nowhere"], "step notebooks not found"),
           (["reproduce", "f" * 32], "not found"))
    for (args, msg), (code, _, err) in zip(bad, cli_cases([args for args, _ in bad], project)):
        assert code == 2, (args, err)
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_the_readme_mlflow_project_command_as_written(tmp_path):
    "README's block `mlflow-nb init` + `mlflow run . -e pipeline ...`, as written, on a copy of the project."
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    command = next(b for b in blocks if "mlflow run . -e pipeline" in b)
    project = _new_project(tmp_path)
    for f in ("MLproject", "python_env.yaml"): shutil.copy(ROOT / f, project / f)
    bin_dir = str(Path(sys.executable).parent)
    env = child_env({"PATH": bin_dir + os.pathsep + os.environ["PATH"]})
    r = subprocess.run(["bash", "-ec", command], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    client = _client(f"sqlite:///{project}/mlflow.db")
    [parent] = _pipeline_runs(client)  # MLflow's run, adopted as the pipeline run
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.project.entryPoint") == "pipeline"
    kids = _children(client, parent.info.run_id)
    assert sorted(kids) == sorted(STEPS) and {k.info.status for k in kids.values()} == {"FINISHED"}
    assert str(client.get_model_version_by_alias("diabetes_regressor", "champion").version) == "1"
    assert sorted(p.relative_to(project) for p in project.rglob("*.db")) == [Path("mlflow.db")]  # no stray store
    assert {p.name for p in (project / "nbs" / "pipeline").iterdir()} == {".notest", *(f"{s}.ipynb" for s in STEPS)}
    assert not list(project.rglob("meta.yaml"))  # nothing under ./mlruns is a file store: only run artifacts


def _search(client, exp_name, flt=""):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], flt, max_results=5000) if exp else []


def test_a_killed_pipeline_is_cleaned_up_and_a_rerun_succeeds(project):
    "SIGKILL the pipeline runner mid-step: its runs end FAILED at the next start; the champion is untouched."
    assert cli_at(project, "train", *FAST)[0] == 0
    assert cli_at(project, "promote", "--version", "1")[0] == 0
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(uri, uri)
    exe = Path(sys.executable).parent / "mlflow-nb"
    proc = subprocess.Popen([str(exe), "run", *FAST], cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=child_env())
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the validate step is running
        if any(r.info.run_name == "validate" for r in _search(client, "development", "attributes.status = 'RUNNING'")): break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    stuck = _search(client, "development", "attributes.status = 'RUNNING'")
    assert {r.info.run_name for r in stuck} >= {"pipeline", "validate"}
    r = run_cli("run", *FAST, "--steps", "train,validate", cwd=project)
    assert r.returncode == 0, r.stderr[-2000:]
    for s in stuck:
        run = client.get_run(s.info.run_id)
        assert run.info.status == "FAILED" and run.data.tags["mlflow_nb.error"].startswith("orphaned: process")
    assert _search(client, "development", "attributes.status = 'RUNNING'") == []
    # the champion moved only through the passing promote step of the re-run (or stayed): never by the killed one
    hist = client.get_registered_model("diabetes_regressor").tags
    assert all(json.loads(v)["action"] == "promote" for k, v in hist.items() if k.startswith("mlflow_nb.promotion."))


# --- the team server: PostgreSQL + `mlflow server`, given only by MLFLOW_TRACKING_URI, with a password in it ---

def test_pipeline_on_the_team_server_by_uri_with_a_password(tmp_path, team):
    """`MLFLOW_TRACKING_URI=http://user:password@host:port mlflow-nb run`: everything lands on the server, nothing is
    written beside the project, and neither the password nor a webhook token is in anything logged or printed."""
    project = _new_project(tmp_path)
    tag = uuid.uuid4().hex[:8]
    mcfg, model_cfg = project / "configs" / "mlflow_config.yaml", project / "configs" / "model_config.yaml"
    mcfg.write_text(mcfg.read_text().replace('"development"', f'"dev_{tag}"').replace('"production"', f'"prod_{tag}"'))
    model_cfg.write_text(model_cfg.read_text().replace('"diabetes_regressor"', f'"model_{tag}"'))
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    password, token = f"pw{tag}S3cret", f"T0KEN{tag}"
    uri = team["uri"].replace("http://", f"http://ana:{password}@")
    rc, lines, err = _run_live("run", *FAST, "-o", f"monitor.webhook_url=https://hooks.example.com/T/{token}",
                               cwd=project, env={"MLFLOW_TRACKING_URI": uri})
    out = "\n".join(l for _, l in lines)
    assert rc == 0, err[-3000:]
    client = _client(uri)
    [parent] = _pipeline_runs(client, f"dev_{tag}")
    kids = _children(client, parent.info.run_id)
    assert sorted(kids) == sorted(STEPS) and {k.info.status for k in kids.values()} == {"FINISHED"}
    assert str(client.get_model_version_by_alias(f"model_{tag}", "champion").version) == "1"
    for name, k in kids.items():  # the executed notebooks went through the server's artifact proxy
        assert {a.path for a in client.list_artifacts(k.info.run_id, "notebook")} == {f"notebook/{name}.ipynb", f"notebook/{name}.html"}
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # no store, no artifacts beside it
    assert f"open {team['uri']} in a browser" in out  # the UI is the server itself; no credentials printed
    logged = _everything_logged(client, [f"dev_{tag}", f"prod_{tag}"], f"model_{tag}")
    assert "injected-parameters" in logged and "ana:***@" in logged  # the redacted forms are what was logged
    for secret in (password, token):
        assert secret not in logged and secret not in out + err, secret
    # and in an error message: the same URI, on a port where nothing listens
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0)); dead = uri.rsplit(":", 1)[0] + f":{s.getsockname()[1]}"
    r = run_cli("run", "--steps", "train", cwd=project, env={"MLFLOW_TRACKING_URI": dead,
                                                             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert password not in r.stderr + r.stdout and "ana:***@" in r.stderr


# --- the pages a person opens after the run, in a real browser (the same finished pipeline: no run of their own) ---

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        context = launch(pw, tmp_path_factory.mktemp("chromium-profile"))
        yield context
        context.close()


@pytest.fixture(scope="module")
def drift_report_page(finished_pipeline):
    "report.html from `mlflow-nb monitor` on a copy of the data with bmi and s5 shifted."
    fp = finished_pipeline
    assert fp["rc"] == 0, fp["stderr"][-3000:]
    from mlflow_nb.data import load_dataset
    full = load_dataset("sklearn:diabetes")
    full.assign(bmi=full.bmi + full.bmi.std(), s5=full.s5 * 3).to_csv(fp["project"] / "shifted.csv", index=False)
    m = run_cli("monitor", "--current", "shifted.csv", "--out", "report", cwd=fp["project"], env=fp["env"])
    assert m.returncode == 0, m.stderr[-3000:]
    return fp["project"] / "report" / "report.html"


@needs_chromium
def test_the_monitoring_report_renders_offline_with_its_plots(browser, drift_report_page):
    page = open_page(browser, drift_report_page)
    assert page.title == "monitoring models:/diabetes_regressor@champion (version 1)", page.title
    assert page.headings[0] == page.title and {"Alerts", "Distributions", "All columns"} <= set(page.headings)
    assert "2 of 10 features drifted" in page.text
    assert len(page.images) >= 2, page.images  # one histogram per drifted column: bmi and s5 at least
    assert not problems(page), "\n".join(problems(page))


@needs_chromium
@pytest.mark.parametrize("step", STEPS)
def test_a_logged_step_notebook_renders_offline(browser, finished_pipeline, tmp_path, step):
    "`notebook/<step>.html` of the first (finished) pipeline run, downloaded through the store and opened."
    client = finished_pipeline["client"]
    first = _pipeline_runs(client)[0]
    assert first.info.status == "FINISHED", finished_pipeline["stderr"][-3000:]
    run_id = _children(client, first.info.run_id)[step].info.run_id
    page = open_page(browser, Path(client.download_artifacts(run_id, f"notebook/{step}.html", str(tmp_path))))
    found = problems(page)
    if step not in page.title: found.append(f"the title does not name the step: {page.title!r}")
    if not page.headings or not page.headings[0].startswith(f"Step: {step}"):
        found.append(f"no 'Step: {step}' heading first: {page.headings}")
    if "mlflow_nb.steps" not in page.text: found.append("the code cells did not render")
    assert not found, "\n".join(found)


@needs_chromium
def test_the_checks_catch_a_page_that_leaks(browser, tmp_path):
    "The checks above can fail: a remote image, a remote script, a broken inline image and a script error."
    leaky = tmp_path / "leaky.html"
    leaky.write_text("<!doctype html><html><head><title>leaky</title>"
                     "<script src='https://cdn.example.invalid/lib.js'></script></head><body><h1>leaky</h1>"
                     "<img src='https://example.invalid/x.png'><img src='data:image/png;base64,AAAA'>"
                     "<img src='data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7'>"
                     "<script>missing_function()</script></body></html>")
    page = open_page(browser, leaky)
    assert page.title == "leaky" and page.headings == ["leaky"]
    assert sorted(page.left_page) == ["https://cdn.example.invalid/lib.js", "https://example.invalid/x.png"]
    assert len(page.broken_images) == 2 and len(page.images) == 3, page.images
    assert any("missing_function" in e for e in page.console_errors), page.console_errors
