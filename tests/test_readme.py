"""The README's examples, run as written against a real `python -m worker run`.

Every fenced block is marked by an HTML comment right before it:

- `<!-- example: start -->`: the command that starts `run`; the suite runs it, on a `DATA_DIR`
  of its own, and the other examples against it.
- `<!-- example: setup -->`: what a new shell runs first (in the project's directory); the
  examples after it get the environment it leaves.
- `<!-- example: run -->` (`run, exit N`): run it (sh with bash -e, python, js with node);
  it exits 0 (or N), and prints what the `<!-- example: output -->` block after it shows,
  where `...` stands for anything.
- `<!-- example: eventually -->`: the same, tried again until it prints that (30 s).
- `<!-- example: pytest -->`: files, each under a `# name.py` line, run by pytest in a new
  directory against a fresh database migrated with `alembic upgrade head`, as the README says.
- `<!-- example: skip, REASON -->`: not run, for the reason given.

The runnable examples share one `run` and run in README order: each may use what an earlier
one created, as a reader following the README would.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
from sqlalchemy import create_engine, make_url, text

from tests.conftest import ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"^\s*<!-- example: (?P<kind>[a-z]+)(?:, (?P<detail>.+?))? -->\s*$")
KINDS = ("start", "setup", "run", "eventually", "output", "pytest", "skip")
RUNNABLE = ("run", "eventually", "pytest")
CELERY_NODE = "celery-node@0.5.9"


@dataclass(frozen=True)
class Block:
    """A fenced block of the README and the marker before it."""

    line: int
    lang: str
    code: str
    kind: str | None
    detail: str


@dataclass(frozen=True)
class Example:
    """A runnable block and the output block that follows it, if any."""

    block: Block
    expected: str | None

    @property
    def name(self) -> str:
        return f"README.md:{self.block.line}-{self.block.lang}"

    @property
    def exit_status(self) -> int:
        match = re.fullmatch(r"exit (\d+)", self.block.detail)
        return int(match.group(1)) if match else 0


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README, with its marker (None when it has none)."""
    text = text if text is not None else README.read_text(encoding="utf-8")
    found = []
    for fence in FENCE.finditer(text):
        before = [line for line in text[:fence.start()].splitlines() if line.strip()]
        marker = MARKER.match(before[-1]) if before else None
        found.append(Block(
            line=text.count("\n", 0, fence.start()) + 1, lang=fence.group("lang"),
            code=textwrap.dedent(fence.group("body")),
            kind=marker.group("kind") if marker else None,
            detail=(marker.group("detail") or "") if marker else ""))
    return found


def examples() -> list[Example]:
    """The runnable examples in README order, each with the output it shows."""
    found: list[Example] = []
    listed = blocks()
    for number, block in enumerate(listed):
        if block.kind in RUNNABLE:
            after = listed[number + 1] if number + 1 < len(listed) else None
            found.append(Example(block, after.code if after and after.kind == "output"
                                 else None))
    return found


def shows(expected: str, printed: str) -> bool:
    """Whether `printed` is what `expected` shows, `...` standing for anything."""
    return doctest.OutputChecker().check_output(
        expected.strip() + "\n", printed.strip() + "\n",
        doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)


# --- the README's shape (no servers) -----------------------------------------------------


def test_every_fenced_block_is_marked_to_run_or_to_skip_with_a_reason() -> None:
    found = blocks()

    assert len(found) >= 10
    unmarked = [f"README.md:{block.line}" for block in found if block.kind is None]
    assert unmarked == [], f"mark these blocks (see {__name__}): {unmarked}"
    assert {block.kind for block in found} <= set(KINDS)
    assert all(block.detail for block in found if block.kind == "skip"), "a skip says why"
    for number, block in enumerate(found):
        if block.kind == "output":
            assert found[number - 1].kind in ("run", "eventually"), block.line
    assert [block.kind for block in found].count("start") == 1


def test_the_marker_grammar_catches_an_unmarked_or_misplaced_block() -> None:
    sample = ("<!-- example: run -->\n```sh\ntrue\n```\n\nprose\n\n```sh\nfalse\n```\n\n"
              "  <!-- example: skip, indented -->\n  ```sh\n  x\n  ```\n")

    kinds = [(block.kind, block.detail, block.code) for block in blocks(sample)]

    assert kinds == [("run", "", "true\n"), (None, "", "false\n"), ("skip", "indented", "x\n")]


def test_the_readme_opens_with_the_run_command_and_the_test_command_ci_runs() -> None:
    first, second = blocks()[:2]
    ci = (ROOT / ".ci" / "run").read_text()

    assert first.kind == "start"
    assert first.code.strip().endswith("uv run --locked python -m worker run")
    assert second.code.strip().endswith("uv run --locked pytest")
    assert second.code.strip() in ci.splitlines()


def test_every_link_of_the_readme_points_into_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)

    local = [target for target in targets if not re.match(r"[a-z]+://", target)]
    assert local, "the README links to no file of its own"
    for target in local:
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
    assert "FINDINGS" not in text and "../shared" not in text


# --- the examples, against a real `run` --------------------------------------------------


@dataclass
class Session:
    """A running `run`, and the environment of a shell set up as the README says."""

    env: dict[str, str]
    data_dir: Path
    scratch: Path


def user_path() -> str:
    """The PATH of the user who runs the suite, without this project's environments."""
    return os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if entry and not Path(entry).resolve().is_relative_to(ROOT))


def new_shell(data_dir: Path) -> dict[str, str]:
    """The environment of a new shell: no project environment, no server URL, our DATA_DIR."""
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": user_path(), "LANG": "C.UTF-8",
            "DATA_DIR": str(data_dir)}


def wait_for(log: Path, process: subprocess.Popen[bytes], words: str, timeout: float) -> str:
    """The log once it contains `words` (the process must live until then)."""
    deadline = time.monotonic() + timeout
    while True:
        said = log.read_text(errors="replace") if log.exists() else ""
        if words in said:
            return said
        assert process.poll() is None, f"`run` exited ({process.returncode}):\n{said}"
        assert time.monotonic() < deadline, f"no {words!r} in {timeout:g} s:\n{said}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """`run` started by the README's start command, and a shell set up by its setup block."""
    (start,) = [block for block in blocks() if block.kind == "start"]
    (setup,) = [block for block in blocks() if block.kind == "setup"]
    base = tmp_path_factory.mktemp("readme")
    data_dir = base / ".data"
    log = base / "run.log"
    with log.open("wb") as output:
        process = subprocess.Popen(["bash", "-c", start.code], cwd=ROOT, env=new_shell(data_dir),
                                   stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for(log, process, "Ctrl-C stops everything.", timeout=240)
        shell = subprocess.run(["bash", "-e", "-c", f"{setup.code}\nenv -0"], cwd=ROOT,
                               env=new_shell(data_dir), capture_output=True, timeout=60,
                               check=False)
        assert shell.returncode == 0, shell.stderr.decode()
        pairs = (item.split("=", 1) for item in shell.stdout.decode().split("\0") if "=" in item)
        env = dict(pairs)
        assert {"DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "COMMANDS_QUEUE"} <= set(env)
        assert Path(shutil.which("python", path=env["PATH"]) or "").is_relative_to(ROOT)
        yield Session(env, data_dir, base)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal that runs it
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    said = log.read_text(errors="replace")
    assert "Stopped." in said, said
    assert [p.pid for p in psutil.process_iter(["cmdline"])
            if str(data_dir) in " ".join(p.info["cmdline"] or [])] == [], "a server outlived run"


@pytest.fixture(scope="module")
def node_modules(session: Session) -> Path:
    """A directory where `npm install celery-node@0.5.9` was run, as the README says."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("the celery-node example needs Node.js and npm, which are not installed")
    where = session.scratch / "node"
    where.mkdir(exist_ok=True)
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", CELERY_NODE],
                   cwd=where, check=True, timeout=600, capture_output=True)
    return where


def run_example(example: Example, session: Session, request: pytest.FixtureRequest
                ) -> subprocess.CompletedProcess[str]:
    """Run the example as a reader would; its output."""
    block = example.block
    scratch = session.scratch / f"example-{block.line}"
    scratch.mkdir(exist_ok=True)
    if block.lang == "sh":
        command, cwd = ["bash", "-e", "-c", block.code], ROOT
    elif block.lang == "python":
        (scratch / "example.py").write_text(block.code)
        command, cwd = ["python", "example.py"], scratch
    elif block.lang == "js":
        where: Path = request.getfixturevalue("node_modules")
        (where / f"example-{block.line}.js").write_text(block.code)
        command, cwd = ["node", f"example-{block.line}.js"], where
    else:
        raise AssertionError(f"{example.name}: no way to run a {block.lang!r} block")
    return subprocess.run(command, cwd=cwd, env=session.env, capture_output=True, text=True,
                          timeout=120, check=False)


def run_pytest_example(example: Example, session: Session) -> subprocess.CompletedProcess[str]:
    """Write the example's files; pytest them against a fresh, migrated database."""
    where = session.scratch / f"example-{example.block.line}"
    where.mkdir(exist_ok=True)
    files = re.split(r"^# (\S+\.py)\n", example.block.code, flags=re.MULTILINE)[1:]
    assert files, f"{example.name}: no `# name.py` line"
    for name, content in zip(files[::2], files[1::2], strict=True):
        (where / name).write_text(content)
    server = make_url(session.env["DATABASE_URL"])
    database = f"readme_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    env = {**session.env,
           "DATABASE_URL": server.set(database=database).render_as_string(hide_password=False)}
    migrated = subprocess.run(["alembic", "upgrade", "head"], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=120, check=False)
    assert migrated.returncode == 0, migrated.stderr
    return subprocess.run(["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(where)],
                          cwd=where, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", examples(), ids=lambda example: example.name)
def test_a_readme_example_does_what_it_shows(
    example: Example, session: Session, request: pytest.FixtureRequest
) -> None:
    if example.block.kind == "pytest":
        done = run_pytest_example(example, session)
        assert done.returncode == 0, done.stdout + done.stderr
        return
    deadline = time.monotonic() + (30 if example.block.kind == "eventually" else 0)
    while True:
        done = run_example(example, session, request)
        printed = done.stdout
        if done.returncode == example.exit_status and (
                example.expected is None or shows(example.expected, printed)):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    assert done.returncode == example.exit_status, (
        f"{example.name} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    assert example.expected is not None
    assert shows(example.expected, printed), (
        f"{example.name} printed:\n{printed}\nthe README shows:\n{example.expected}")


def test_the_runnable_examples_cover_every_language_the_readme_shows() -> None:
    languages = {example.block.lang for example in examples()}

    assert {"sh", "python", "js"} <= languages
