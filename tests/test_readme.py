"""The README is how users reach the project: every command it shows must still parse, every file it names must
exist, and its install and test commands must be the ones CI runs. Every command is run as written, on a fresh clone,
by test_readme_commands.py (marked `readme`: .ci/run runs it after the suite)."""
import re, shlex

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _sh_blocks(text: str) -> list[str]:
    "The ```sh blocks of `text`, with backslash continuations joined."
    return [b.replace("\\\n", " ") for b in re.findall(r"```sh\n(.*?)```", text, re.S)]


def _commands(block: str) -> list[list[str]]:
    "Each simple command of a shell block (split at &&, ;, | and newlines; comments, `&` and env assignments off)."
    out = []
    for line in block.splitlines():
        for part in re.split(r"&&|;|\|\||(?<!\|)\|(?!\|)", line.split(" #")[0]):
            words = shlex.split(part.replace(" &", " ").strip(), comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]): words = words[1:]  # VAR=value prefixes
            if words: out.append(words)
    return out


NAMES = r"(?:init|train|select|promote|rollback|history|run|sweep|predict|reproduce|serve|monitor|cleanup)"


def _mlflow_nb_commands(bare: bool = False) -> list[list[str]]:
    "`mlflow-nb ...` in the sh blocks, and the inline `command --flags` spans of the text (`command` too if bare)."
    blocks = [c for b in _sh_blocks(README) for c in _commands(b) if c[0] == "mlflow-nb"]
    spans = re.findall(rf"`({NAMES}(?: [^`|\[]*)?)`", README)
    return blocks + [["mlflow-nb", *shlex.split(c)] for c in spans if bare or " " in c]


def test_the_readme_shows_every_command():
    from mlflow_nb.cli import COMMANDS
    shown = {c[1] for c in _mlflow_nb_commands(bare=True) if len(c) > 1}
    assert set(COMMANDS) - shown == set(), f"commands the README never shows: {sorted(set(COMMANDS) - shown)}"


@pytest.mark.parametrize("words", _mlflow_nb_commands(), ids=lambda w: " ".join(w)[:70])
def test_every_mlflow_nb_command_in_the_readme_parses(words):
    "argparse checks every flag, its type, its choices and the exclusive groups; nothing runs."
    from mlflow_nb.cli import build_parser
    assert len(words) > 1, words
    try: args = build_parser().parse_args(words[1:])
    except SystemExit as e: pytest.fail(f"README command does not parse (exit {e.code}): {' '.join(words)}")
    assert args.command == words[1]


def test_files_the_readme_names_exist():
    named = set(re.findall(r"`((?:nbs|tests|configs|benchmarks|examples|\.ci)/[\w./-]+)`", README))
    named |= {w for b in _sh_blocks(README) for c in _commands(b) for w in c if re.match(r"^(nbs|tests|configs|examples)/\S+$", w)}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert named and not missing, f"the README names files that do not exist: {missing}"


def test_library_notebooks_listed_are_the_notebooks():
    listed = set(re.findall(r"`(\d\d[a-z]?_\w+)`", README.split("## Editing the notebooks")[1].split("##")[0]))
    actual = {p.stem for p in (ROOT / "nbs").glob("[0-9][0-9]*.ipynb")}
    assert listed == actual, f"missing from the README: {sorted(actual - listed)}; not notebooks: {sorted(listed - actual)}"


def test_install_and_test_commands_are_what_ci_runs():
    quick = next(c for b in _sh_blocks(README) for c in [b] if "pip install" in b)
    installs = [" ".join(c) for c in _commands(quick) if c[:2] == ["pip", "install"]]
    ci_installs = [l.split(" #")[0] for l in CI.splitlines() if l.startswith("pip install")]
    for cmd in installs:  # CI adds -q and an optional index URL; the packages are the same
        pkgs = [w for w in shlex.split(cmd)[2:] if not w.startswith("-")]
        assert any(all(p in shlex.split(ci) for p in pkgs) for ci in ci_installs), (cmd, ci_installs)
    assert len(installs) == len(ci_installs) == 2, (installs, ci_installs)  # torch first, then the project
    test_cmd = next(b.strip() for b in _sh_blocks(README) if "pytest" in b)
    lines = [l.strip() for l in CI.splitlines()]
    ran = lines[next(i for i, l in enumerate(lines) if l.startswith('echo "== tests')) + 1]
    assert ran == f"{test_cmd} || exit", (test_cmd, ran)  # as written; a failure on either side stops CI
    assert lines[-1] == "pytest -m readme -n 0 tests/test_readme_commands.py", lines[-1]  # then the README's commands


def test_the_docs_home_page_is_the_readme():
    "nbs/index.ipynb (nbdev's home page) says what README.md says, its links made relative to nbs/."
    import json
    cells = json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"]
    text = "\n\n".join("".join(c["source"]) for c in cells)
    assert text.strip() == README.strip().replace("](nbs/tutorial.ipynb)", "](tutorial.ipynb)")
