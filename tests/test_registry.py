"""Registry under concurrency: two promotions racing leave one holder and one consistent history."""
import multiprocessing as mp, os

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS


def _config(project):
    from mlflow_nb.config import load_config
    return load_config(project / "configs", ["model.params.n_estimators=10"], env={})


def _promote_worker(project, version, barrier, results):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow_nb.config import Promotion
    from mlflow_nb.registry import PromotionRefused, promote
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


@pytest.mark.parametrize("attempt", range(2))
def test_two_promotions_racing_leave_a_consistent_history(project, attempt):
    from mlflow_nb.config import Promotion
    from mlflow_nb.registry import holder, promote, promotion_history
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    cfg = _config(project)
    setup_tracking(cfg)
    name = cfg.model.estimator.name
    # three versions, each better than the last on rmse (deeper forests on this data)
    results = [train_model(None, cfg_with(project, depth), plots=False)
               for depth in (1, 3, 8)]
    assert [r.version for r in results] == ["1", "2", "3"]
    promote(name, "1", Promotion(), "rmse")
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_promote_worker, args=(project, v, barrier, q)) for v in ("2", "3")]
    for p in procs: p.start()
    outcomes = dict(q.get(timeout=120) for _ in procs)
    for p in procs: p.join(60)
    assert not any(o.startswith("error") for o in outcomes.values()), outcomes
    assert "promoted" in outcomes.values()
    final = str(holder(name, "champion").version)
    assert final in ("2", "3")
    hist = promotion_history(name)
    promos = hist[hist.action == "promote"]
    # one chain: each promotion's previous holder is the version promoted just before it
    assert promos.iloc[0].version == "1" and promos.iloc[0].previous is None
    for before, after in zip(promos.itertuples(), promos.iloc[1:].itertuples()):
        assert after.previous == before.version, hist
    assert promos.iloc[-1].version == final
    assert len(promos) == 1 + list(outcomes.values()).count("promoted")


def cfg_with(project, depth):
    from mlflow_nb.config import load_config
    return load_config(project / "configs", ["model.params.n_estimators=10", f"model.params.max_depth={depth}"], env={})
