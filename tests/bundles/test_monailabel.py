"""MONAI Label serves a quantized bundle: ``monailabel start_server`` on 127.0.0.1, ``POST /infer`` over HTTP.

MONAI Label needs packages that clash with this project's pins (numpy<2, pydicom<3, a torchvision
built for its torch), so it lives in a venv of its own: ``scripts/setup_monailabel.sh`` makes
``.venv-monailabel`` and ``.ci/run`` runs it; ``MONAILABEL_PYTHON`` may name another interpreter.
The test is skipped when neither exists. ``scripts/test.sh`` makes that venv beside the suite and names
in ``MONAI_EFFQ_MONAILABEL_SETUP`` the file the set-up's exit status lands in: the test waits for it,
and fails with the set-up's log where the set-up failed.
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_effq.bundle import demo_dataset
from monai_effq.overlays import overlay_path
from tests.overlays.conftest import spleen_style

from ..ranks import free_port
from .conftest import ROOT, copy_bundle

# the export of the quantized copy (conftest.quantized_copy: RTN, 4-bit weights, 8-bit activations)
SERVED = "lits_effq_rtn_w4a8"
# the export of a bundle laid out like the model zoo's, quantized with the quantize overlay (defaults)
ZOO_SERVED = "zoo_unet_efficientq_w4a8"
PYTHON = Path(os.environ.get("MONAILABEL_PYTHON", ROOT / ".venv-monailabel" / "bin" / "python"))
# where scripts/test.sh's MONAI Label set-up, running beside the suite, writes its exit status
SETUP_STATUS = os.environ.get("MONAI_EFFQ_MONAILABEL_SETUP")
SETUP_LOG = ROOT / ".venv-monailabel.log"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.waits_for_setup,
    pytest.mark.skipif(
        not PYTHON.is_file() and not SETUP_STATUS, reason="no MONAI Label venv: bash scripts/setup_monailabel.sh makes one"
    ),
]


def wait_for_setup(status: str | None, log: Path, timeout: float = 1800) -> None:
    """Wait until the set-up running beside the suite has written its exit status to ``status``; fail unless it is 0.

    Args:
        status: the status file (``None``: no set-up runs beside the suite, nothing to wait for).
        log: the set-up's log, whose end a failure shows.
        timeout: seconds to wait at most.
    """
    if status is None:
        return
    path, deadline = Path(status), time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            pytest.fail(f"MONAI Label's set-up (scripts/setup_monailabel.sh) did not end in {timeout:.0f} s; its log: {log}")
        time.sleep(1)
    code = path.read_text().strip()
    if code != "0":
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else "(no log)"
        pytest.fail(f"MONAI Label's set-up (scripts/setup_monailabel.sh) failed with exit status {code}; the end of {log}:\n{tail}")


def _wait_for(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"monailabel exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"monailabel did not answer {url} in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, quantized_copy):
    """MONAI Label serving the export of a quantized copy of lits_effq (whose inference workflow already ran),
    the FP bundle, which it can also train, and the export of a model-zoo-style bundle quantized by the overlay."""
    work = tmp_path_factory.mktemp("monailabel")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BUNDLE_DOWNLOAD_SRC": "github"}
    apps = work / "apps"
    # the app's copy and the zoo-style quantize run beside the quantized copy: one set-up, not three in a row
    zoo = spleen_style(work / "zoo_unet", demo_dataset(work / "demo", "lits"))
    quantize = [sys.executable, "-m", "monai.bundle", "run", "quantize", "--config_file", str(["configs/inference.json", str(overlay_path("quantize"))])]
    steps = [subprocess.Popen(quantize, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=zoo, env=env)]
    try:
        copy, images, _ = quantized_copy("lits_effq")
        # MONAI Label's own steps need its venv, which scripts/test.sh may still be making beside the suite:
        # the steps above, which do not, ran first
        wait_for_setup(SETUP_STATUS, SETUP_LOG)
        steps.append(
            subprocess.Popen([str(PYTHON), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        )  # fmt: skip
        for step in steps:
            out, _ = step.communicate(timeout=600)
            assert step.returncode == 0, f"{step.args} exited with {step.returncode}:\n{out.decode(errors='replace')[-4000:]}"
    finally:
        for step in steps:
            if step.poll() is None:
                step.kill()
    app = apps / "monaibundle"
    shutil.copytree(copy / "export" / SERVED, app / "model" / SERVED)
    copy_bundle("lits_effq", app / "model" / "lits_effq")  # the FP bundle, for MONAI Label training
    shutil.copytree(zoo / "export" / ZOO_SERVED, app / "model" / ZOO_SERVED)
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for mask in images:  # the cases the inference workflow segmented, with their labels for training
        name = mask.name.replace("_seg.nii.gz", "")
        source = next((copy / "data" / "demo").glob(f"{name}.nii*"))
        shutil.copy(source, studies / source.name)
        label = next((copy / "data" / "demo").glob(f"{name.replace('volume', 'segmentation')}.nii*"))
        shutil.copy(label, studies / "labels" / "final" / source.name)

    port = free_port()
    log = work / "server.log"
    cmd = [
        str(PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
        "--conf", "models", f"{SERVED},lits_effq,{ZOO_SERVED}", "--conf", "sam2", "false",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        _wait_for(f"http://127.0.0.1:{port}/info/", server, log)
        yield f"http://127.0.0.1:{port}", copy, images, app
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _infer(url: str, model: str, image_id: str, dest: Path) -> np.ndarray:
    request = urllib.request.Request(f"{url}/infer/{model}?image={image_id}&output=image", method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200
        dest.write_bytes(response.read())
    return np.asarray(nib.load(str(dest)).dataobj)


def test_monailabel_serves_the_quantized_network_with_the_masks_of_the_bundle_inference_workflow(served, tmp_path):
    url, copy, masks, _ = served
    assert masks
    for mask in masks:
        image_id = mask.name.replace("_seg.nii.gz", "")
        served_mask = _infer(url, SERVED, image_id, tmp_path / f"{image_id}_served.nii")
        bundle_mask = np.asarray(nib.load(str(mask)).dataobj)
        assert served_mask.shape == bundle_mask.shape
        assert np.array_equal(served_mask, bundle_mask), f"{image_id}: {(served_mask != bundle_mask).sum()} voxels differ"
        assert set(np.unique(served_mask)) <= {0, 1, 2} and (served_mask > 0).any()


def test_monailabel_serves_a_zoo_style_bundle_quantized_by_the_overlay_as_the_exported_bundle_runs_it(served, tmp_path):
    url, _, _, app = served
    studies = sorted(p for p in (app.parent.parent / "studies").glob("*.nii*"))
    assert studies
    exported = app / "model" / ZOO_SERVED
    run = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--datalist", str([str(p) for p in studies]), "--output_dir", str(tmp_path / "bundle"),
    ]  # fmt: skip
    subprocess.run(run, check=True, capture_output=True, cwd=exported, timeout=600)
    for study in studies:
        image_id = study.name.split(".nii")[0]
        served_mask = _infer(url, ZOO_SERVED, image_id, tmp_path / f"{image_id}_served.nii")
        bundle_mask = np.asarray(nib.load(str(next((tmp_path / "bundle").rglob(f"{image_id}_*.nii.gz")))).dataobj)
        assert served_mask.shape == bundle_mask.shape
        assert np.array_equal(served_mask, bundle_mask), f"{image_id}: {(served_mask != bundle_mask).sum()} voxels differ"
        assert set(np.unique(served_mask)) <= {0, 1, 2} and (served_mask > 0).any()


def test_monailabel_lists_the_quantized_model_with_the_bundle_labels(served):
    import json

    url, _, _, _ = served
    with urllib.request.urlopen(f"{url}/info/", timeout=30) as response:
        info = json.loads(response.read())
    model = info["models"][SERVED]
    assert model["labels"] == {"liver": 1, "tumor": 2}
    assert "rtn_w4a8" in model["description"]


def test_monailabel_trains_the_fp_bundle_with_its_train_config_and_writes_no_demo_data(served):
    import hashlib
    import json

    url, _, _, app = served
    bundle_dir = app / "model" / "lits_effq"
    before = hashlib.md5((bundle_dir / "models" / "model.pt").read_bytes()).hexdigest()
    body = json.dumps({"max_epochs": 1, "device": "cpu", "val_split": 0.0, "pretrained": True}).encode()
    request = urllib.request.Request(
        f"{url}/train/lits_effq?run_sync=true", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200
    # train.json's CheckpointSaver wrote the trained weights where MONAI Label's infer task reads them
    assert hashlib.md5((bundle_dir / "models" / "model.pt").read_bytes()).hexdigest() != before
    assert not (bundle_dir / "data").exists()  # MONAI Label gave the data: the demo was never generated
