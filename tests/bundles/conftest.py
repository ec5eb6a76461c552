"""Helpers and shared fixtures of the bundle tests: run ``python -m monai.bundle`` as a user would."""

import ast
import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = {"brats_effq": ("brats", ["TC", "WT", "ET"]), "lits_effq": ("lits", ["liver", "tumour"])}
ROI = "[32,32,32]"
# Each workflow's config files, model-zoo style: train.json is the base the others overlay.
WORKFLOWS = {
    "train": ["train"],
    "quantize": ["train", "quantize"],
    "evaluate": ["train", "evaluate"],
    "finetune": ["train", "quantize", "finetune"],
    "inference": ["inference"],
}


def config_files(name: str, workflow: str, overlay: str | None = None, root: Path | None = None) -> list[str]:
    configs = (root or ROOT / "bundles" / name) / "configs"
    return [str(configs / f"{part}.json") for part in WORKFLOWS[workflow] + ([overlay] if overlay else [])]


def _value(text: str):
    """A command-line value as ``fire`` reads it: a Python literal where it parses, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def bundle(
    name: str,
    workflow: str,
    *overrides: str,
    check: bool = True,
    overlay: str | None = None,
    env: dict | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run one workflow of a bundle, from the repository root unless ``cwd`` is a bundle folder.

    Tests of what a user sees on a failure (its exit code and last line) or in their environment
    run the real command, ``python -m monai.bundle run``, in a subprocess. The others call
    ``monai.bundle.run``, the function behind that command, in this process with the same overrides,
    from ``cwd`` where one is given (relative paths, such as ``bundle_root`` ".", resolve from it
    as from a shell's folder): each subprocess pays about 7 s of imports on a 2-core CPU, which
    would be most of the bundle tests' time.
    """
    if cwd is None:
        files = config_files(name, workflow, overlay)
        overrides = ("--bundle_root", str(ROOT / "bundles" / name), *overrides)
    else:
        files = [f"configs/{part}.json" for part in WORKFLOWS[workflow] + ([overlay] if overlay else [])]
    if check and env is None:
        return _run_here(files, overrides, cwd)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _run_here(files: list[str], overrides: tuple[str, ...], cwd: Path | None = None) -> subprocess.CompletedProcess:
    from monai.bundle import run

    settings = {key.lstrip("-"): _value(value) for key, value in zip(overrides[::2], overrides[1::2])}
    out = io.StringIO()
    before = os.getcwd()
    # the bundle's logging.conf gives the root logger a handler on this run's stdout (the StringIO) and disables
    # the other loggers: put both back, so later runs and tests do not log into a finished run's buffer
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {name: log.disabled for name, log in logging.root.manager.loggerDict.items() if isinstance(log, logging.Logger)}
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.chdir(cwd or before)
        try:
            run(config_file=files, logging_file=str(Path(files[0]).parent / "logging.conf"), **settings)
        finally:
            os.chdir(before)
            root.handlers[:] = handlers
            root.setLevel(level)
            for name, disabled in loggers.items():  # fileConfig disables the loggers it does not name
                logging.getLogger(name).disabled = disabled
    return subprocess.CompletedProcess(["monai.bundle.run", *files, *overrides], 0, out.getvalue(), "")


def copy_bundle(name: str, dest: Path) -> Path:
    """The bundle as a user gets it (configs, FP weights, docs, licence), in a folder outside the repository."""
    src = ROOT / "bundles" / name
    for part in ("configs", "docs"):
        shutil.copytree(src / part, dest / part)
    (dest / "models").mkdir()
    shutil.copy(src / "models" / "model.pt", dest / "models" / "model.pt")
    shutil.copy(src / "LICENSE", dest / "LICENSE")
    return dest


class QuantizedCopies:
    """Called with a bundle's name: a copy of the bundle outside the repository, quantized (RTN, otherwise
    defaults) and run through ``configs/inference.json`` from inside its folder; returns the folder, the masks
    and the inference log. The model's outputs are named ``rtn_w4a8`` (export: ``export/<name>_rtn_w4a8``)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.done: dict[str, tuple[Path, list[Path], str]] = {}

    def __call__(self, name: str) -> tuple[Path, list[Path], str]:
        if name not in self.done:
            copy = copy_bundle(name, self.tmp_path_factory.mktemp("copy") / name)
            bundle(name, "quantize", "--method", "rtn", cwd=copy)
            res = bundle(name, "inference", "--method", "rtn", cwd=copy)
            self.done[name] = copy, sorted((copy / "eval" / "seg").rglob("*_seg.nii.gz")), res.stdout + res.stderr
        return self.done[name]


@pytest.fixture(scope="session")
def quantized_copy(tmp_path_factory) -> QuantizedCopies:
    """The session's :class:`QuantizedCopies`."""
    return QuantizedCopies(tmp_path_factory)
