"""Registry under concurrency: promotions racing from several processes leave one holder and one consistent
history, on SQLite and against an `mlflow server` on PostgreSQL; selection refuses untrusted models."""
import multiprocessing as mp, os, shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, run_cli

RACERS = 4


def _config(project, *overrides):
    from mlflow_nb.config import load_config
    return load_config(project / "configs", ["model.params.n_estimators=10", *overrides], env={})


def _promote_worker(project, version, barrier, results):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow_nb.settings import Promotion
    from mlflow_nb.promotion import PromotionRefused, promote
    from mlflow_nb.tracking import setup_tracking
    cfg = _config(project)
    setup_tracking(cfg)
    barrier.wait()
    try:
        promote(cfg.model.estimator.name, version, Promotion(), "rmse", reason=f"race {version}")
        results.put((version, "promoted"))
    except PromotionRefused as e:
        results.put((version, f"refused: {e}"))
    except BaseException as e:
        results.put((version, f"error: {e!r}"))


@pytest.fixture(params=["sqlite", "server"])
def store_project(request, tmp_path):
    "(project, model name): a project on a fresh SQLite store, or on the team server."
    if request.param == "server":
        project, _, _, model = request.getfixturevalue("tproject")
        return project, model
    shutil.copytree(CONFIGS, tmp_path / "configs")
    return tmp_path, "diabetes_regressor"


def test_promotions_racing_leave_one_consistent_history(store_project):
    from mlflow_nb.settings import Promotion
    from mlflow_nb.core import LOCK_PREFIX
    from mlflow_nb.promotion import promote, promotion_history
    from mlflow_nb.registry import holder
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    project, name = store_project
    cfg = _config(project)
    tr = setup_tracking(cfg)
    results = [train_model(None, _config(project, f"model.params.max_depth={d}"), plots=False) for d in (1, 2, 3, 5, 8)]
    assert [r.version for r in results] == ["1", "2", "3", "4", "5"]
    promote(name, "1", Promotion(), "rmse")
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_promote_worker, args=(project, v, barrier, q)) for v in ("2", "3", "4", "5")]
    for p in procs: p.start()
    outcomes = dict(q.get(timeout=240) for _ in procs)
    for p in procs: p.join(60)
    assert not any(o.startswith("error") for o in outcomes.values()), outcomes
    assert "promoted" in outcomes.values()
    final = str(holder(name, "champion").version)
    hist = promotion_history(name)
    promos = hist[hist.action == "promote"]
    # one chain: each promotion names as previous holder the version promoted just before it
    assert promos.iloc[0].version == "1" and promos.iloc[0].previous is None
    for before, after in zip(promos.itertuples(), promos.iloc[1:].itertuples()):
        assert after.previous == before.version, hist
    assert promos.iloc[-1].version == final
    assert len(promos) == 1 + list(outcomes.values()).count("promoted")
    # every refusal was judged against the champion of its turn, never against a stale one
    assert all(o == "promoted" or "gate beat-champion" in o for o in outcomes.values()), outcomes
    # and the lock is released
    client = MlflowClient(tr.tracking_uri, tr.registry_uri)
    assert client.search_registered_models(f"name LIKE '{LOCK_PREFIX}%'") == []
    # rollback follows the chain back to the version the champion replaced
    if len(promos) > 1:
        r = run_cli("rollback", cwd=project)
        assert r.returncode == 0, r.stderr
        assert str(holder(name, "champion").version) == promos.iloc[-1].previous


def test_selection_refuses_a_model_whose_loading_would_run_code(project):
    "A best run whose model is pickled is not loaded by select_best_model (the trust check refuses it)."
    import mlflow
    from mlflow_nb.registry import UntrustedModel, select_best_model
    from mlflow_nb.tracking import setup_tracking, tracked_run
    from mlflow_nb.core import TAG_KIND
    from sklearn.linear_model import LinearRegression
    cfg = _config(project)
    setup_tracking(cfg)
    with tracked_run("pickled", tags={TAG_KIND: "train"}):
        mlflow.log_metric("rmse", 1.0)
        mlflow.sklearn.log_model(LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0]), name="model",
                                 serialization_format="cloudpickle", pip_requirements=["scikit-learn"])
    with pytest.raises(UntrustedModel, match="refusing to load a model whose flavors are"):
        select_best_model("development", "rmse")


def test_registry_commands_against_the_server_by_config(tproject):
    "train, promote (passing and refused), history: the same commands, the store given as the server's URI."
    project, uri, _, model = tproject
    fast = ["-o", "model.params.n_estimators=20"]
    assert run_cli("train", *fast, cwd=project).returncode == 0
    assert run_cli("promote", "--version", "1", cwd=project).returncode == 0
    assert run_cli("train", *fast, "-o", "model.params.max_depth=3", cwd=project).returncode == 0
    r = run_cli("promote", "--version", "2", "-o", "promotion.min_delta=1000", cwd=project)
    assert r.returncode == 2 and "gate beat-champion" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    client = MlflowClient(uri, uri)
    assert str(client.get_model_version_by_alias(model, "champion").version) == "1"  # the refusal changed nothing
    r = run_cli("history", cwd=project)
    assert r.returncode == 0 and "promote" in r.stdout, r.stderr
