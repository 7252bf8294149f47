"""Every command in README.md, run as written with bash on a fresh clone of the repository, in README order.

One shell session, as a user would type it: each command's exports, activated venv and folder carry over to the
next. Servers (the commands that never return: `mlflow-nb serve`, `mlflow server ... &`, `mlflow ui`, `jupyter lab`,
`dask scheduler`, `dask worker`) start in the background in a process group of their own, are probed until they
answer, serve the commands that follow, and are stopped by process group at the end (or when a later server needs
their port, as a user presses Ctrl-C in that terminal first). Afterwards the clone holds only what the README says
the commands write, and the source tree it was cloned from is as it was.

Expensive (a venv install, every server, the sweeps): marked `readme`, deselected by default, run by .ci/run as a
step of its own. What cannot run literally is in SUBSTITUTIONS and NOT_RUN below, each with its reason; RETRIED
names the one command that is run again until it passes. The shell's environment is a new user's (no store variables,
no PYTHONPATH: the README's install line makes the venv every later command uses) plus three settings that change no
command: JUPYTER_CONFIG_DIR (JupyterLab may run as root, as CI does, and opens no browser), JUPYTER_RUNTIME_DIR (its
connection files stay out of the user's home) and, where CI names the CPU wheels' index in TORCH_INDEX_URL, that
index as PIP_EXTRA_INDEX_URL. Where PostgreSQL's initdb is missing, the commands that need the team's PostgreSQL
are skipped, every other one runs, and the test reports the skip."""
import json, os, re, shutil, signal, socket, subprocess, time, urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, child_env

pytestmark = pytest.mark.readme

# (text in the README, what runs instead, why): the only changes made to a command before it runs
SUBSTITUTIONS = [
    ("10.0.0.5", "127.0.0.1", "the multi-machine block names a team host; here every machine of the team is this one"),
]
# commands that are checked, not run
NOT_RUN = {
    "nbdev-test && pytest": "the test command: it is what runs this test's neighbours (.ci/run runs it just before "
                            "this test; running it here would recurse)",
}
# commands that report "not yet" until a server has done its periodic work: retried until they pass (seconds, why)
RETRIED = {
    "mlflow-nb monitor --current serving": (180, "the service writes its prediction log every serve.log_window_seconds "
                                                 "(60 s), and the README says so; a user runs it again later"),
}
# a server's port and how to tell it answers: (command prefix, port, probe)
SERVERS = [
    ("mlflow-nb serve", 8080, "http /ready"),
    ("mlflow server", 5000, "http /health"),
    ("mlflow ui", 5000, "http /"),
    ("jupyter lab", 8888, "jupyter"),
    ("dask scheduler", 8786, "tcp"),
    ("dask worker", None, "dask workers"),
]
TEAM_PATHS = [Path("/srv/pg"), Path("/srv/mlflow-artifacts")]  # the PostgreSQL recipe's folders, outside the clone
READY_SECONDS = 240  # the longest a server may take to answer (a cold import of MLflow on two busy cores)


def sh_commands(readme: str) -> list[str]:
    "The commands of the README's ```sh blocks, in order: one per line, backslash continuations joined."
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def without_comment(command: str) -> str:
    "`command` without a trailing ` # comment` (outside quotes: README comments follow two or more spaces)."
    return re.split(r"\s{2,}#\s", command)[0].strip()


def written_places(readme: str) -> list[str]:
    "The files and folders the README's 'What the commands write' line names."
    line = next(l for l in readme.splitlines() if l.startswith("What the commands write"))
    return re.findall(r"`([^`]+)`", line)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read(200_000).decode(errors="replace")


class Session:
    "One shell session in the clone: environment and folder carried from command to command; servers in the background."

    def __init__(self, clone: Path, work: Path, env: dict):
        self.clone, self.work, self.env, self.cwd = clone, work, env, clone
        self.servers: list[dict] = []  # {'command', 'proc', 'port', 'log'}
        self.started = 0  # servers started so far (each logs to its own file)
        self.transcript: list[str] = []

    def note(self, line: str) -> None:
        "A line of the transcript (seconds and command), printed as it happens (shown with -s, and on failure)."
        self.transcript.append(line); print(line, flush=True)

    def run(self, command: str, timeout: float = 900, retry_for: float = 0) -> subprocess.CompletedProcess:
        "`once` until it passes, for at most `retry_for` seconds (at least once)."
        deadline = time.monotonic() + retry_for
        while True:
            p = self.once(command, timeout, last=time.monotonic() > deadline)
            if p.returncode == 0: return p
            time.sleep(10)

    def once(self, command: str, timeout: float = 900, last: bool = True) -> subprocess.CompletedProcess:
        "Run `command` with bash as written; keep the environment and folder it leaves. Fails naming it on exit != 0."
        env_file, cwd_file = self.work / "env.bin", self.work / "cwd.txt"
        script = f"{command}\n__rc=$?; env -0 > {env_file}; pwd > {cwd_file}; exit $__rc\n"
        start = time.monotonic()
        try:
            p = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                               timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"README command ran over {timeout:.0f} s: {command}\n{(e.stderr or b'')[-3000:]}")
        self.note(f"{time.monotonic() - start:6.1f} s  {command}" + ("" if p.returncode == 0 else "  (failed)"))
        if p.returncode != 0 and not last: return p
        if p.returncode != 0:
            pytest.fail(f"README command failed (exit {p.returncode}): {command}\n--- stdout\n{p.stdout[-3000:]}"
                        f"\n--- stderr\n{p.stderr[-3000:]}", pytrace=False)
        raw = env_file.read_bytes().split(b"\0")
        self.env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
        for k in ("_", "SHLVL", "OLDPWD"): self.env.pop(k, None)
        self.cwd = Path(cwd_file.read_text().strip())
        return p

    def start(self, command: str, port: int | None, probe: str) -> None:
        "Start a server as written (its `&` is the background this gives it), in its own process group; wait until it answers."
        if port is not None:
            for s in [s for s in self.servers if s["port"] == port]: self.stop(s)  # Ctrl-C in that terminal first
            assert _port_free(port), f"port {port} is taken by something this test did not start: {command}"
        log = self.work / f"server-{self.started}.log"; self.started += 1
        proc = subprocess.Popen(["bash", "-c", without_comment(command).rstrip("& ")], cwd=self.cwd, env=self.env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        server = {"command": command, "proc": proc, "port": port, "log": log}
        self.servers.append(server)
        start, deadline, last = time.monotonic(), time.monotonic() + READY_SECONDS, ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"README server exited ({proc.returncode}): {command}\n{log.read_text()[-3000:]}",
                            pytrace=False)
            try:
                if self._answers(probe, port, command, log): break
            except (OSError, ValueError) as e: last = repr(e)
            time.sleep(1)
        else:
            pytest.fail(f"README server did not answer in {READY_SECONDS} s: {command}\n{last}\n"
                        f"{log.read_text()[-3000:]}", pytrace=False)
        self.note(f"{time.monotonic() - start:6.1f} s  {command}   (answering)")

    def _answers(self, probe: str, port: int | None, command: str, log: Path) -> bool:
        if probe.startswith("http"):
            status, body = _get(f"http://127.0.0.1:{port}{probe.split()[1]}")
            return status == 200 and (probe != "http /" or "MLflow" in body)
        if probe == "jupyter":  # JupyterLab's page, and the notebook through its contents API (with the printed token)
            text = log.read_text()
            found = re.search(r"http://(?:localhost|127\.0\.0\.1):(\d+)/lab\?token=(\w+)", text)
            root = re.search(r"Serving notebooks from local directory: (.+)", text)
            if not (found and root): return False
            url, token = f"http://127.0.0.1:{found[1]}", found[2]
            notebook = (self.cwd / re.search(r"jupyter lab (\S+\.ipynb)", command)[1]).relative_to(root[1].strip())
            status, body = _get(f"{url}/lab?token={token}")
            assert status == 200 and "JupyterLab" in body, body[:500]
            status, body = _get(f"{url}/api/contents/{notebook}?content=0&token={token}")
            return status == 200 and json.loads(body)["type"] == "notebook"
        if probe == "tcp": return not _port_free(port)
        if probe == "dask workers":  # the scheduler has every worker the command started
            from distributed import Client
            address = re.search(r"dask worker (\S+)", command).group(1)
            wanted = int(re.search(r"--nworkers (\d+)", command).group(1))
            with Client(address, timeout=10) as c: c.wait_for_workers(wanted, timeout=60)
            return True
        raise ValueError(probe)

    def stop(self, server: dict) -> None:
        "Stop a server's whole process group (SIGTERM: Ctrl-C's graceful end; SIGKILL after 30 s)."
        pid = server["proc"].pid
        try: os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: server["proc"].wait(timeout=30)
        except subprocess.TimeoutExpired: pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try: os.killpg(pid, 0); time.sleep(0.2)
            except ProcessLookupError: break
        else:
            try: os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        self.servers.remove(server)

    def stop_all(self) -> None:
        for s in reversed(list(self.servers)): self.stop(s)


def _server(command: str):
    "(port, probe) when `command` starts a server, else None."
    bare = without_comment(command)
    for prefix, port, probe in SERVERS:
        if bare.startswith(prefix):
            given = re.search(r"--port (\d+)", bare)
            return (int(given[1]) if given and port else port), probe
    assert not bare.endswith("&"), f"a background command this test does not know how to probe: {command}"
    return None


def _source_state(root: Path) -> dict:
    "What git sees in the source tree, ignored files included, with each listed file's size and mtime."
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    state = {}
    for line in out.splitlines():
        p = root / line[3:]
        state[line] = (p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
    return state


def _team_recipe_cleanup(created: list[Path]) -> None:
    "Stop the README's PostgreSQL (its data folder /srv/pg) and remove the folders the recipe made."
    if (Path("/srv/pg") / "postmaster.pid").exists():
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(as_postgres + ["pg_ctl", "-D", "/srv/pg", "-m", "fast", "-w", "stop"], capture_output=True)
    for p in created: shutil.rmtree(p, ignore_errors=True)


def _check_output(command: str, out: str) -> None:
    "What a command's output must show, beyond exit status 0."
    if command.startswith("curl"):  # the scoring service answered with one prediction
        predictions = json.loads(out)["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], float), out


@pytest.fixture
def clone(tmp_path):
    "A fresh clone of the repository at HEAD (a clean tree: nothing untracked or ignored)."
    target = tmp_path / "mlflow_nb"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(target)], check=True)
    return target


def test_every_readme_command_runs_as_written_on_a_fresh_clone(clone, tmp_path):
    readme = (clone / "README.md").read_text()
    commands = sh_commands(readme)
    for old, new, _ in SUBSTITUTIONS: assert any(old in c for c in commands), f"substitution not needed: {old}"
    ci = [l.strip() for l in (clone / ".ci" / "run").read_text().splitlines()]
    for command in NOT_RUN:  # the test command: .ci/run runs it as written (its `|| exit` makes set -e stop there)
        assert command in commands and f"{command} || exit" in ci, command

    source_before = _source_state(ROOT)
    work = tmp_path / "work"; work.mkdir()
    jupyter_config = work / "jupyter"; jupyter_config.mkdir()
    # JupyterLab refuses to run as root (CI runs as root) and opens a browser: allowed and off in its config
    # folder, so that `jupyter lab nbs/tutorial.ipynb` itself runs as written
    (jupyter_config / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"allow_root": os.geteuid() == 0, "open_browser": False}}))
    # a new user's shell: no store variables, no PYTHONPATH, no test-cluster addresses; the README's own install
    # line makes the venv (.venv in the clone) that every later command uses
    env = {k: v for k, v in child_env().items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DASK_SCHEDULER_ADDRESS") and not k.startswith("MLFLOW_NB_")
           and not k.startswith("PYTEST")}
    env["JUPYTER_CONFIG_DIR"] = str(jupyter_config)
    env["JUPYTER_RUNTIME_DIR"] = str(work / "jupyter-runtime")  # its connection files: not into the user's home
    if os.environ.get("TORCH_INDEX_URL"):  # where CI names the CPU wheels' index (.ci/run's torch line), pip looks
        env["PIP_EXTRA_INDEX_URL"] = os.environ["TORCH_INDEX_URL"]  # there too: torch==2.13.0 resolves to its +cpu build
    session = Session(clone, work, env)
    team_ok = shutil.which("initdb") is not None
    created = [p for p in TEAM_PATHS if not p.exists()]
    if team_ok and len(created) < len(TEAM_PATHS):
        pytest.fail(f"{[str(p) for p in TEAM_PATHS if p.exists()]} exist: the README's PostgreSQL recipe would "
                    "reuse them, and they are not this test's to remove")
    skipped = []
    try:
        for command in commands:
            if command in NOT_RUN: continue
            if not team_ok and re.search(r":5432|:5000|runuser|/srv/pg", command):
                skipped.append(command); continue
            for old, new, _ in SUBSTITUTIONS: command = command.replace(old, new)
            server = _server(command)
            if server: session.start(command, *server); continue
            _check_output(command, session.run(command, retry_for=RETRIED.get(without_comment(command), (0,))[0]).stdout)
        session.stop_all()
    finally:
        session.stop_all()
        if team_ok: _team_recipe_cleanup(created)

    allowed = written_places(readme)
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    outside = [l for l in status if not any(l[3:] == a or l[3:].startswith(a.rstrip("/") + "/") for a in allowed)]
    assert not outside, f"the README's commands wrote files the README does not name ({allowed}): {outside[:30]}"
    assert _source_state(ROOT) == source_before, "the README's commands wrote into the source tree they were cloned from"
    if skipped:
        pytest.skip(f"every other README command ran; {len(skipped)} need PostgreSQL, whose initdb is not installed: "
                    f"{skipped}")
