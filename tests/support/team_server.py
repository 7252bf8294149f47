"""Team-scale stores for the tests and CI: PostgreSQL 15 plus an `mlflow server` on loopback.

    python tests/team_server.py start DIR   # prints the tracking URI; state and logs in DIR
    python tests/team_server.py stop DIR    # stops both (by the PIDs recorded in DIR)

PostgreSQL refuses to run as root, so its commands run as the `postgres` user (runuser) when we are root.
Everything listens on 127.0.0.1 on free ports; the data lives in DIR.
"""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

# MLflow 3 starts a job runner with seven Huey consumer processes beside every server (GenAI online scoring);
# the tracking server of this project runs no server-side jobs
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _pg_bin(name):
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists(): return str(d / name)
    found = shutil.which(name)
    if not found: raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return found


def _as_postgres(cmd):
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.geteuid() == 0 else cmd


def available() -> bool:
    try: _pg_bin("initdb"); _pg_bin("pg_ctl"); return True
    except RuntimeError: return False


def start(folder) -> dict:
    "Start PostgreSQL and an MLflow server on it; returns {'uri', 'pg_port', 'mlflow_pid', ...}."
    d = Path(folder).resolve(); d.mkdir(parents=True, exist_ok=True)
    # PostgreSQL's own folder lives where the postgres user can reach it (pytest's and mktemp's folders are 0700)
    pg = Path(tempfile.mkdtemp(prefix="mlflow_nb_pg_")); pg.chmod(0o755)
    pgdata, sock = pg / "data", pg / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(pg, "postgres"); shutil.chown(sock, "postgres")
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres", "-E", "UTF8"]),
                   check=True, capture_output=True)
    pg_port = _free_port()
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(pg / "postgres.log"), "-w", "-o",
                                 f"-p {pg_port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "mlflow"]),
                   check=True, capture_output=True)
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = open(d / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri",
                             f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow", "--artifacts-destination",
                             str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV},
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    import urllib.request
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None: raise RuntimeError((d / "mlflow-server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200: break
        except OSError: time.sleep(0.5)
    else:
        raise RuntimeError("mlflow server did not become healthy")
    state = {"uri": uri, "pg_port": pg_port, "pgdata": str(pgdata), "pg_dir": str(pg), "mlflow_pid": proc.pid, "port": port, "dir": str(d)}
    (d / "state.json").write_text(json.dumps(state))
    return state


def stop_mlflow(state: dict) -> None:
    "Stop the MLflow server (its whole process group: uvicorn and its worker)."
    try: os.killpg(state["mlflow_pid"], signal.SIGTERM)
    except ProcessLookupError: return
    for _ in range(100):
        try: os.kill(state["mlflow_pid"], 0); time.sleep(0.1)
        except ProcessLookupError: return
    try: os.killpg(state["mlflow_pid"], signal.SIGKILL)
    except ProcessLookupError: pass


def restart_mlflow(state: dict) -> dict:
    "Start the MLflow server again on the same port and database (after stop_mlflow)."
    d = Path(state["dir"])
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"postgresql+psycopg2://postgres@127.0.0.1:{state['pg_port']}/{state.get('db', 'mlflow')}",
                             "--artifacts-destination",
                             str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(state["port"]), "--workers", "1"],
                            stdout=open(d / "mlflow-server.log", "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, **SERVER_ENV}, start_new_session=True)
    import urllib.request
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"{state['uri']}/health", timeout=2): break
        except OSError: time.sleep(0.5)
    state = {**state, "mlflow_pid": proc.pid}
    (d / "state.json").write_text(json.dumps(state))
    return state


def start_private_mlflow(state: dict,  # the running team stores (start's result)
                         folder,  # the private server's log and artifacts
                        ) -> dict:
    """Another MLflow server on the same PostgreSQL, on a database of its own: for tests that stop their server,
    so that tests running beside them keep theirs. Stop it with stop_mlflow."""
    d = Path(folder).resolve(); d.mkdir(parents=True, exist_ok=True)
    db = f"mlflow_{os.getpid()}_{time.time_ns()}"
    subprocess.run(_as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(state["pg_port"]), "-U", "postgres",
                                 db]), check=True, capture_output=True)
    own = {**state, "db": db, "dir": str(d), "port": _free_port()}
    own["uri"] = f"http://127.0.0.1:{own['port']}"
    own = restart_mlflow(own)
    with urllib.request.urlopen(f"{own['uri']}/health", timeout=5): pass  # (raises if it never came up)
    return own


def stop(folder) -> None:
    "Stop the MLflow server and PostgreSQL started in `folder`."
    d = Path(folder).resolve()
    f = d / "state.json"
    if not f.exists(): return
    state = json.loads(f.read_text())
    stop_mlflow(state)
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", state["pgdata"], "-m", "fast", "-w", "stop"]), capture_output=True)
    shutil.rmtree(state.get("pg_dir", ""), ignore_errors=True)
    f.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"): raise SystemExit(__doc__)
    if sys.argv[1] == "start": print(start(sys.argv[2])["uri"])
    else: stop(sys.argv[2])
