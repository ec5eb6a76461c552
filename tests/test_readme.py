"""The README runs as written: every Python snippet and bundle command in it, except the blocks it marks.

A block preceded by ``<!-- not-run: <reason> -->`` is skipped (it needs a download, a GPU, its own
venv, or it is this test suite); every other fenced ``bash`` or ``python`` block runs. The bash blocks
run in README order, each from the root of a scratch copy of the repository's bundles (shipped
checkpoints, configs, docs), through the real command line (``python -m monai.bundle``, parsed by
``fire`` in this process, so each command does not pay the imports again); the only change is
:data:`SHORTER`, appended to training and fine-tuning. The Python blocks run in README order in one
namespace, from a scratch folder where ``bundles/`` is the repository's.
"""

from __future__ import annotations

import re
import runpy
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"^<!-- not-run: (?P<reason>\S.*?) -->$")
FENCE = re.compile(r"^```(?P<language>\w*)\n(?P<code>.*?)^```$", re.M | re.S)
# Appended to the commands as written, by the workflow they run: the same workflow, shorter.
SHORTER = {"train": ["--max_epochs", "1"], "finetune": ["--steps", "2"]}
# Outputs a bash block's comments name (checked to exist once the block has run).
NAMED_OUTPUT = re.compile(r"(?<![\w/])((?:models|eval|export)/[\w.*/-]+)")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    not_run: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced code blocks of the README, each with the reason of its ``not-run`` marker, if any."""
    text = README.read_text() if text is None else text
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = NOT_RUN.match(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(match["language"], match["code"], line, marker["reason"] if marker else None))
    return blocks


def shell_commands(code: str) -> list[tuple[list[str], list[str]]]:
    """The commands of a bash block (continuations joined, ``&&`` split), each with its comments."""
    commands, comments = [], []
    for line in code.replace("\\\n", " ").splitlines():
        comment = re.search(r"(?:^|\s)#(.*)$", line)  # as shlex reads it: a word that starts with #
        comments += [comment[1]] if comment else []
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append((words[:cut], comments))
            comments = []
            words = words[cut + 1 :]
    return commands


def _workflow(args: list[str]) -> str:
    """The workflow a ``monai.bundle run`` command runs: the last config file's name."""
    files = args[args.index("--config_file") + 1] if "--config_file" in args else ""
    return Path(re.findall(r"[\w./-]+\.json", files)[-1]).stem if files else ""


def run_bundle_command(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m monai.bundle <args>`` in ``cwd``, in this process."""
    if args[0] == "run":
        args = [*args, *SHORTER.get(_workflow(args), [])]
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.chdir(cwd)
        m.setattr(sys, "argv", ["python -m monai.bundle", *args])
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=False)
        except SystemExit as stop:  # fire's way of reporting a bad command line
            if stop.code not in (None, 0):
                raise AssertionError(f"python -m monai.bundle {shlex.join(args)} exited with {stop.code}") from stop


@pytest.fixture
def repository(tmp_path):
    """A scratch copy of the repository root as far as the README's commands reach: the bundles as shipped."""
    for bundle in ("brats_effq", "lits_effq"):
        src, dest = ROOT / "bundles" / bundle, tmp_path / "bundles" / bundle
        for part in ("configs", "docs"):
            shutil.copytree(src / part, dest / part)
        (dest / "models").mkdir()
        shutil.copy(src / "models" / "model.pt", dest / "models" / "model.pt")
        for name in ("LICENSE", "large_files.yml"):
            shutil.copy(src / name, dest / name)
    shutil.copytree(ROOT / "bundles" / "schema", tmp_path / "bundles" / "schema")
    return tmp_path


def test_every_code_block_is_bash_or_python_and_each_skipped_one_says_why():
    blocks = readme_blocks()
    assert {b.language for b in blocks} <= {"bash", "python"}, [str(b) for b in blocks if b.language not in ("bash", "python")]
    run = [b for b in blocks if b.not_run is None]
    assert sum(b.language == "python" for b in run) >= 4 and sum(b.language == "bash" for b in run) >= 4
    assert all(len(b.not_run) > 20 for b in blocks if b.not_run is not None)  # a reason, not a bare flag


def test_the_block_parser_sees_markers_commands_and_named_outputs():
    text = "x\n<!-- not-run: needs a GPU for this -->\n```bash\ncd a && python -m monai.bundle run \\\n    --x 1   # eval/seg/t/\n```\n"
    (block,) = readme_blocks(text)
    assert block.not_run == "needs a GPU for this" and block.line == 3
    commands = shell_commands(block.code)
    assert [words for words, _ in commands] == [["cd", "a"], ["python", "-m", "monai.bundle", "run", "--x", "1"]]
    assert [path for _, comments in commands for c in comments for path in NAMED_OUTPUT.findall(c)] == ["eval/seg/t/"]


@pytest.mark.slow
def test_every_bundle_command_of_the_readme_runs_as_written(repository, monkeypatch):
    ran = 0
    for block in readme_blocks():
        if block.language != "bash" or block.not_run is not None:
            continue
        cwd, named = repository, []
        for words, comments in shell_commands(block.code):
            named += [p for c in comments for p in NAMED_OUTPUT.findall(c)]
            if words[0] == "cd":
                cwd = (cwd / words[1]).resolve()
            elif words[:3] == ["python", "-m", "monai.bundle"]:
                try:
                    run_bundle_command(words[3:], cwd, monkeypatch)
                except Exception as error:
                    raise AssertionError(f"{block}: {shlex.join(words)} failed: {error}") from error
                ran += 1
            else:
                pytest.fail(f"{block}: `{shlex.join(words)}` is not a bundle command: mark the block not-run or teach this test")
        missing = [p for p in named if not any(cwd.glob(p.rstrip("/")))]
        assert not missing, f"{block}: its comments name outputs that the commands did not write: {missing}"
    assert ran >= 10


@pytest.mark.slow
def test_the_python_snippets_of_the_readme_run_in_order_as_one_session(tmp_path, monkeypatch):
    (tmp_path / "bundles").symlink_to(ROOT / "bundles")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for block in readme_blocks():
        if block.language != "python" or block.not_run is not None:
            continue
        code = compile(block.code, str(block), "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(code, namespace)
            except Exception as error:
                raise AssertionError(f"{block} failed: {type(error).__name__}: {error}") from error
    assert {"model_efficientq_w4a8.pt", "model_finetuned_efficientq_w4a6.pt", "model_efficientq_w4a8.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert tuple(namespace["pred"].shape) == (1, 3, 64, 64, 48)
