"""The compiled scoring path equals scikit-learn's `pipeline.predict` bit for bit, on random rows with gaps and unseen
categories, for every estimator it supports; the guard refuses a compiled form that differs anywhere."""
import functools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sklearn import ensemble, linear_model, tree

from mlflow_nb.compiled import TreeEnsemble, compile_pipeline
from mlflow_nb.data import build_pipeline, to_model_frame
from mlflow_nb.guard import checked_compile, compile_for_serving, first_difference, probe_batches
from mlflow_nb.schema import validate_columns

SCHEMA = [{"name": "age", "type": "double"}, {"name": "bmi", "type": "double"}, {"name": "dose", "type": "double"},
          {"name": "color", "type": "string"}, {"name": "size", "type": "string"}]
COLORS, SIZES = ["red", "green", "blue", "teal"], ["S", "M", "L"]
REGRESSORS = {
    "DecisionTreeRegressor": lambda: tree.DecisionTreeRegressor(max_depth=8, random_state=0),
    "RandomForestRegressor": lambda: ensemble.RandomForestRegressor(25, max_depth=10, random_state=0),
    "ExtraTreesRegressor": lambda: ensemble.ExtraTreesRegressor(25, max_depth=10, random_state=0),
    "LinearRegression": linear_model.LinearRegression,
    "Ridge": lambda: linear_model.Ridge(alpha=0.7),
    "Lasso": lambda: linear_model.Lasso(alpha=0.05),
    "ElasticNet": lambda: linear_model.ElasticNet(alpha=0.05, l1_ratio=0.3),
}
CLASSIFIERS = {
    "DecisionTreeClassifier": lambda: tree.DecisionTreeClassifier(max_depth=8, random_state=0),
    "RandomForestClassifier": lambda: ensemble.RandomForestClassifier(25, max_depth=10, random_state=0),
    "ExtraTreesClassifier": lambda: ensemble.ExtraTreesClassifier(25, max_depth=10, random_state=0),
}


def _training_frame(n=400, seed=0):
    "Numeric and string columns, about 10% missing in each, an integer-valued column among the doubles."
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"age": rng.normal(50, 12, n).round(1), "bmi": rng.normal(27, 4, n),
                          "dose": rng.integers(0, 5, n).astype(float),
                          "color": rng.choice(COLORS[:3], n), "size": rng.choice(SIZES, n)})
    for c in frame.columns: frame.loc[rng.random(n) < 0.1, c] = None
    frame = to_model_frame(frame)
    signal = frame["age"].fillna(50) / 10 + 3 * (frame["color"] == "red") + frame["dose"].fillna(0)
    return frame, signal + rng.normal(0, 1, n)


@functools.cache
def _fitted(name: str):
    "(fitted pipeline, compiled form) of the estimator `name` on the training frame."
    X, y = _training_frame()
    if name in CLASSIFIERS: est, y = CLASSIFIERS[name](), np.digitize(y, np.quantile(y, [0.33, 0.66])).astype(str)
    else: est = REGRESSORS[name]()
    pipeline = build_pipeline(est, X).fit(X, y)
    return pipeline, compile_pipeline(pipeline, strict=True)


NUMBER = st.one_of(st.none(), st.floats(-1e4, 1e4, allow_nan=False), st.integers(-100, 100).map(float),
                   st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 27.0, 50.0, 1e6, -1e6]))
ROW = st.fixed_dictionaries({"age": NUMBER, "bmi": NUMBER, "dose": NUMBER,
                             "color": st.one_of(st.none(), st.sampled_from(COLORS + ["", "RED"])),
                             "size": st.one_of(st.none(), st.sampled_from(SIZES + ["XL"]))})


def _bits(a) -> tuple:
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes() if a.dtype != object else a.tolist()


@pytest.mark.parametrize("name", [*REGRESSORS, *CLASSIFIERS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=40))
def test_compiled_predictions_are_the_pipelines_bit_for_bit(name, rows):
    pipeline, compiled = _fitted(name)
    cols, n, problems = validate_columns(rows, SCHEMA)
    assert not problems and n == len(rows)
    before = compiled.fallbacks
    assert _bits(compiled.predict(cols)) == _bits(pipeline.predict(pd.DataFrame(cols)))
    if name in CLASSIFIERS:
        assert _bits(compiled.predict_proba(cols)) == _bits(pipeline.predict_proba(pd.DataFrame(cols)))
    assert compiled.fallbacks == before, "the compiled path handed finite input to scikit-learn"


def test_a_feature_past_float32_goes_to_the_pipeline_and_raises_as_it_does():
    pipeline, compiled = _fitted("RandomForestRegressor")
    cols, _, _ = validate_columns([{"age": 1e300, "bmi": 20.0, "dose": 1.0, "color": "red", "size": "S"}], SCHEMA)
    with pytest.raises(ValueError): pipeline.predict(pd.DataFrame(cols))
    with pytest.raises(ValueError): compiled.predict(cols)
    assert compiled.fallbacks >= 1


def test_unsupported_pipelines_are_not_compiled_and_say_why():
    X, y = _training_frame()
    boosted = build_pipeline(ensemble.GradientBoostingRegressor(n_estimators=5), X).fit(X, y)
    assert compile_pipeline(boosted) is None
    compiled, report = checked_compile(boosted, SCHEMA)
    assert compiled is None and "GradientBoostingRegressor" in report["reason"]
    parallel = build_pipeline(ensemble.RandomForestRegressor(5, n_jobs=2), X).fit(X, y)
    assert compile_pipeline(parallel) is None  # threads add the trees in no fixed order
    assert compile_for_serving(object(), None, "models:/m/1")[0] is None


class Float64Trees(TreeEnsemble):
    "A tree walk that skips scikit-learn's float32 cast of the features."
    def leaves(self, X):
        n, p = X.shape
        node, at, flat = np.repeat(self.roots, n), np.tile(np.arange(n) * p, len(self.roots)), X.ravel(order="C")
        for _ in range(self.depth): node = self.children[2 * node + (flat[at + self.feature[node]] > self.threshold[node])]
        return node.reshape(len(self.roots), n)


@pytest.mark.parametrize("name", ["RandomForestRegressor", "Ridge", "ExtraTreesClassifier"])
def test_the_guard_passes_an_exact_replica_and_catches_one_wrong_split(name):
    pipeline, compiled = _fitted(name)
    X, _ = _training_frame()
    ok, report = checked_compile(pipeline, SCHEMA, X.head(5))
    assert ok is not None and report["compiled"] and report["checked_rows"] > 500, report
    wrong = compile_pipeline(pipeline)
    if name == "Ridge":  # one coefficient a rounding away
        wrong.model.coef = wrong.model.coef.copy(); wrong.model.coef[0] = np.nextafter(wrong.model.coef[0], np.inf)
    else:  # the plausible mistake: trees walked on the float64 features, not their float32 cast
        wrong.model = Float64Trees(**vars(wrong.model))
    diff, _, _ = first_difference(wrong, probe_batches(wrong, SCHEMA, X.head(5)), SCHEMA)
    assert diff is not None
