import subprocess
import sys

import pytest
from monai.utils import OptionalImportError

from monai_effq.utils.imports import deferred_import


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """The name of a module on the path that nothing has imported yet."""
    (tmp_path / "effq_probe_module.py").write_text(
        "VALUE = 3\nNAMES = {'7150': 'Segmentation Property Categories'}\n\n\nclass Holder:\n    size = 5\n\n\n"
        "def upper(text):\n    return text.upper()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "effq_probe_module", raising=False)
    yield "effq_probe_module"
    sys.modules.pop("effq_probe_module", None)


def test_a_deferred_module_is_imported_when_it_or_its_flag_is_first_used(probe_module):
    module, importable = deferred_import(probe_module)
    assert probe_module not in sys.modules
    assert module.VALUE == 3 and importable
    assert probe_module in sys.modules


def test_the_flag_alone_imports_the_module_and_is_true_once_it_imports(probe_module):
    _, importable = deferred_import(probe_module)
    assert bool(importable) and probe_module in sys.modules


def test_a_deferred_name_reads_the_attributes_of_that_object_of_the_module(probe_module):
    holder, _ = deferred_import(probe_module, name="Holder")
    assert holder.size == 5 and "Holder" in repr(holder)


def test_a_deferred_dict_is_indexed_searched_iterated_and_a_deferred_function_called(probe_module):
    names, _ = deferred_import(probe_module, name="NAMES")
    upper, _ = deferred_import(probe_module, name="upper")
    assert names["7150"] == "Segmentation Property Categories" and "7150" in names and "4" not in names
    assert list(names) == ["7150"] and len(names) == 1
    assert upper("liver") == "LIVER"


def test_a_missing_extra_is_false_and_its_first_use_names_it():
    module, importable = deferred_import("effq_no_such_extra")
    assert not importable
    with pytest.raises(OptionalImportError, match="effq_no_such_extra"):
        module.anything


def test_an_installed_extra_that_fails_to_import_is_false_as_optional_import_says(tmp_path, monkeypatch):
    (tmp_path / "effq_broken_extra").mkdir()
    (tmp_path / "effq_broken_extra" / "__init__.py").write_text("raise ImportError('built for another Python')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, importable = deferred_import("effq_broken_extra")
    assert not importable


@pytest.mark.slow
def test_a_bundle_command_starts_without_importing_the_export_or_dicom_writing_extras():
    # in a fresh process (this one has imported them): onnx alone was 1.1 s of a 2-core CPU's 8 s start.
    # Only what ours adds: MONAI 1.4 imports onnx, ml_dtypes and onnxruntime itself (1.6 no longer does)
    code = (
        "import sys, monai.bundle;"
        "extras = ('onnx', 'ml_dtypes', 'onnxscript', 'onnxruntime', 'openvino', 'highdicom', 'pydicom.sr.codedict');"
        "before = {m for m in extras if m in sys.modules};"
        "import monai_effq.bundle;"
        "print(sorted({m for m in extras if m in sys.modules} - before))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
