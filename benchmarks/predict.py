"""Batch scoring: `mlflow-nb predict` against `mlflow models predict` and `mlflow.pyfunc.spark_udf` on PySpark.

Same model (the default config's RandomForestRegressor(100, max_depth=10) with its preprocessing, trained on the
demo data and registered), same input (a CSV of N rows x the 10 demo features: demo rows resampled with a little
noise, 6 decimals), same 2 cores, each side a fresh process timed end to end (start-up included: the Dask
cluster, the JVM) with its peak memory (RSS summed over the process and all its children, sampled every 0.1 s):
  (a) `mlflow-nb predict --workers 2` (the local default: a LocalCluster of 2 threads in the CLI's own process)
      -> Parquet parts; also `--processes --workers 2` (2 single-threaded worker processes, the old default),
  (b) `mlflow models predict -t csv --env-manager local` (MLflow's CLI: one process, pandas) -> JSON,
  (c) `mlflow.pyfunc.spark_udf` on `local[2]` (MLflow's documented scale-out path) -> Parquet.
Targets: (a) faster than (b) and (c) at 2 M rows; (a)'s peak memory at 10 M rows under 1.5x its peak at 2 M.
Each side is warmed up once on a 100,000-row file (page cache, compiled bytecode); rounds are interleaved.

PySpark lives in a benchmark-only environment that reuses the project's venv for everything else:

    python -m venv /work/benchenv/spark
    echo "$PWD/.venv/lib/python3.11/site-packages" > /work/benchenv/spark/lib/python3.11/site-packages/project.pth
    /work/benchenv/spark/bin/pip install pyspark      # Java 17 must be on PATH

    flock /tmp/mlflow_nb_bench.lock python benchmarks/predict.py [--rows 2000000] [--big-rows 10000000] [--rounds 3]
"""
from __future__ import annotations
import argparse, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BIN, median, ratio, temp_project, write_results

SPARK_PYTHON = Path(os.environ.get("MLFLOW_NB_SPARK_PYTHON", "/work/benchenv/spark/bin/python"))
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
SPARK_JOB = """
import sys, mlflow
from pyspark.sql import SparkSession
from pyspark.sql.types import DoubleType, StructField, StructType
src, out, uri, cols = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
spark = (SparkSession.builder.master("local[2]").config("spark.driver.memory", "2g")
         .config("spark.ui.enabled", "false").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
df = spark.read.csv(src, header=True, schema=StructType([StructField(c, DoubleType()) for c in cols]))
udf = mlflow.pyfunc.spark_udf(spark, uri, result_type="double", env_manager="local")
df.withColumn("prediction", udf(*cols)).write.mode("overwrite").parquet(out)
spark.stop()
"""


def make_input(path: Path, rows: int, seed: int = 0) -> None:
    "`rows` demo rows resampled with noise, written as CSV in chunks (bounded memory)."
    import numpy as np
    from mlflow_nb.data import load_dataset
    base = load_dataset("sklearn:diabetes")[FEATURES].to_numpy()
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write(",".join(FEATURES) + "\n")
        for start in range(0, rows, 500_000):
            n = min(500_000, rows - start)
            block = base[rng.integers(0, len(base), n)] + rng.normal(scale=0.005, size=(n, len(FEATURES)))
            np.savetxt(f, block, fmt="%.6f", delimiter=",")


def _tree_cpu(root, seen: dict) -> None:
    "Record in `seen` the CPU seconds (user + system) each process of the tree has used so far."
    import psutil
    for p in [root, *root.children(recursive=True)]:
        try: t = p.cpu_times(); seen[p.pid] = t.user + t.system
        except psutil.Error: pass


def measured(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, float]:
    """(seconds, peak RSS in MiB, CPU seconds) of running `cmd` and its process tree; fails loudly when it fails.
    CPU seconds: what the kernel accounted to the waited-for tree (getrusage), or, when more, the sum of each
    process's last sampled times (a child nobody waits for); on a shared machine they tell work from waiting."""
    import psutil, resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, root, cpu = 0, psutil.Process(proc.pid), {}
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True); reader.start()
    while proc.poll() is None:
        try: peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error: pass
        _tree_cpu(root, cpu)
        time.sleep(0.1)
    secs = time.perf_counter() - t0
    reader.join()
    if proc.returncode != 0: raise SystemExit(f"{cmd[0]} failed: {''.join(err)[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    waited = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return secs, peak / 2**20, max(waited, sum(cpu.values()))


def sides(folder: Path, src: Path, uri: str, env: dict) -> dict:
    "{side: (command, output path)} for one input file."
    out = folder / f"out-{time.time_ns()}"
    return {
        "mlflow_nb": ([str(BIN / "mlflow-nb"), "predict", "--input", str(src), "--output", f"{out}-nb", "--model",
                       "diabetes_regressor/1", "--workers", "2", "--quiet", "--config", str(folder / "configs")], f"{out}-nb"),
        "mlflow_nb_processes": ([str(BIN / "mlflow-nb"), "predict", "--input", str(src), "--output", f"{out}-nbp",
                                 "--model", "diabetes_regressor/1", "--workers", "2", "--processes", "--quiet",
                                 "--config", str(folder / "configs")], f"{out}-nbp"),
        "mlflow_models_predict": ([str(BIN / "mlflow"), "models", "predict", "-m", "models:/diabetes_regressor/1", "-i", str(src),
                                   "-o", f"{out}-mlflow.json", "-t", "csv", "--env-manager", "local"], f"{out}-mlflow.json"),
        "spark_udf": ([str(SPARK_PYTHON), "-c", SPARK_JOB, str(src), f"{out}-spark", "models:/diabetes_regressor/1",
                       ",".join(FEATURES)], f"{out}-spark"),
    }


def run_side(name: str, folder: Path, src: Path, uri: str, env: dict) -> tuple[float, float, float]:
    cmd, out = sides(folder, src, uri, env)[name]
    try: return measured(cmd, env, folder)
    finally:
        p = Path(out)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def train(folder: Path) -> str:
    "Train and register the default model in the project's store; its URI."
    from mlflow_nb.config import load_config
    from mlflow_nb.tracking import setup_tracking
    from mlflow_nb.train import train_model
    cfg = load_config(folder / "configs", env={})
    setup_tracking(cfg)
    train_model(None, cfg, plots=False)
    return cfg.tracking_uri


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--big-rows", type=int, default=10_000_000, help="rows of the memory-bound check (0: skip)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-spark", action="store_true", help="skip the PySpark side")
    args = ap.parse_args()
    names = ["mlflow_nb", "mlflow_nb_processes", "mlflow_models_predict"] + ([] if args.no_spark else ["spark_udf"])
    if "spark_udf" in names and not SPARK_PYTHON.exists(): raise SystemExit(f"{SPARK_PYTHON}: build it (see the docstring)")
    with temp_project() as (folder, _):
        uri = train(folder)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
        small, src = folder / "warm.csv", folder / "rows.csv"
        make_input(small, 100_000); make_input(src, args.rows)
        for n in names: run_side(n, folder, small, uri, env)  # warm-up
        times, peaks, cpus = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
        for r in range(args.rounds):
            for n in names:
                s, m, c = run_side(n, folder, src, uri, env)
                times[n].append(s); peaks[n].append(m); cpus[n].append(c)
                print(f"round {r + 1}: {n:<22} {s:7.1f} s  cpu {c:7.1f} s  peak {m:7.0f} MiB  load {os.getloadavg()[0]:.1f}",
                      flush=True)
        res = {"rows": args.rows, "rounds": args.rounds, "seconds": times, "peak_mib": peaks, "cpu_s": cpus,
               "median_s": {n: median(v) for n, v in times.items()},
               "median_cpu_s": {n: median(v) for n, v in cpus.items()}}
        res["speedup_vs"] = {n: ratio(res["median_s"][n], res["median_s"]["mlflow_nb"]) for n in names if n != "mlflow_nb"}
        res["rows_per_s"] = {n: args.rows / res["median_s"][n] for n in names}
        if args.big_rows:
            src.unlink(); big = folder / "big.csv"; make_input(big, args.big_rows)
            s, m, _ = run_side("mlflow_nb", folder, big, uri, env)
            res["big"] = {"rows": args.big_rows, "seconds": s, "peak_mib": m,
                          "peak_ratio_vs_small": m / median(peaks["mlflow_nb"])}
            print(f"{args.big_rows} rows: mlflow_nb {s:.1f} s, peak {m:.0f} MiB "
                  f"({res['big']['peak_ratio_vs_small']:.2f}x the peak at {args.rows}; target < 1.5x)")
    for n, x in res["speedup_vs"].items(): print(f"mlflow-nb predict vs {n}: {x:.2f}x faster (target > 1)")
    write_results("predict", res)


if __name__ == "__main__":
    main()
