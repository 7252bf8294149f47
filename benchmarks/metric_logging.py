"""Buffered metric logging (MetricBuffer) against a plain mlflow.log_metric loop.

2,000 step values into one run on a fresh SQLite store, same process, both ways, N rounds;
reports medians and the ratio. Anchor: the log_metric loop. Target: >= 15x.

    python benchmarks/metric_logging.py [--values 2000] [--rounds 5]
"""
import argparse, os, statistics, tempfile, time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
import mlflow
from mlflow_nb.settings import Artifacts, MlflowConfig, TrackingServer
from mlflow_nb.tracking import MetricBuffer, setup_tracking, tracked_run


def plain(n):
    with tracked_run("plain"):
        t = time.perf_counter()
        for i in range(n): mlflow.log_metric("loss", 1 / (i + 1), step=i)
        return time.perf_counter() - t


def buffered(n):
    with tracked_run("buffered"):
        t = time.perf_counter()
        with MetricBuffer() as buf:
            for i in range(n): buf.log("loss", 1 / (i + 1), step=i)
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    setup_tracking(MlflowConfig(tracking_server=TrackingServer(uri=f"sqlite:///{tmp}/bench.db"),
                                artifacts=Artifacts(store=str(tmp / "artifacts"))))
    buffered(100); plain(100)  # warm-up: store open, first inserts
    rows = []
    for r in range(a.rounds):  # interleaved, so drift on a noisy machine hits both alike
        p, b = plain(a.values), buffered(a.values)
        rows.append((p, b))
        print(f"round {r + 1}: log_metric {p:.3f} s ({a.values / p:,.0f}/s)  MetricBuffer {b:.3f} s "
              f"({a.values / b:,.0f}/s)  ratio {p / b:.1f}x")
    p, b = statistics.median(x for x, _ in rows), statistics.median(y for _, y in rows)
    print(f"median of {a.rounds}: log_metric {p:.3f} s ({a.values / p:,.0f} values/s), "
          f"MetricBuffer {b:.3f} s ({a.values / b:,.0f} values/s), speed-up {p / b:.1f}x "
          f"(median of per-round ratios {statistics.median(x / y for x, y in rows):.1f}x)")


if __name__ == "__main__":
    main()
