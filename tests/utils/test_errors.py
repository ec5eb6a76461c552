import logging
import sys
import traceback

import numpy as np
import pytest
import torch

from monai_effq.utils.errors import (
    DEBUG_ENV,
    MissingInputError,
    UserInputError,
    all_finite,
    check_integer,
    check_number,
    check_spread,
    find_user_error,
    install_bundle_error_hook,
)


def _wrapped(error: BaseException) -> RuntimeError:
    """An error as MONAI's config evaluation re-raises it."""
    try:
        try:
            raise error
        except BaseException as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: $monai_effq.bundle.datalist(...)") from e
    except RuntimeError as outer:
        return outer


def test_user_errors_stay_value_and_file_errors_for_existing_callers():
    assert issubclass(UserInputError, ValueError)
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(MissingInputError, UserInputError)


def test_the_user_error_is_found_under_monai_s_wrapper():
    inner = UserInputError("weight_bits must be an integer from 2 to 8, got 9.")
    assert find_user_error(_wrapped(inner)) is inner
    assert find_user_error(_wrapped(KeyError("x"))) is None


def test_a_user_error_that_a_library_kept_only_as_text_is_found_by_its_message():
    # MONAI's SaveImage keeps each writer's traceback as text and raises "cannot find a suitable writer"
    try:
        raise MissingInputError("image /data/ct.nii.gz does not exist: correct the datalist or --dataset_dir.")
    except MissingInputError:
        text = traceback.format_exc()
    found = find_user_error(_wrapped(RuntimeError(f"SaveImage cannot find a suitable writer for x.\n{text}")))
    assert type(found) is MissingInputError and str(found).startswith("image /data/ct.nii.gz does not exist")
    assert find_user_error(_wrapped(RuntimeError("SaveImage cannot find a suitable writer for x.\nKeyError"))) is None
    # the message quoted in another sense, not as the error: not taken for it
    UserInputError("x")
    assert find_user_error(_wrapped(KeyError("index x out of range"))) is None


def test_the_hook_is_not_installed_in_a_process_that_merely_imports_the_package(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert install_bundle_error_hook() is False
    assert sys.excepthook is sys.__excepthook__


@pytest.fixture
def hook(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args[1]))
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    make_record = logging.getLogRecordFactory()
    assert install_bundle_error_hook(force=True) and install_bundle_error_hook(force=True)
    yield seen
    logging.setLogRecordFactory(make_record)


def test_the_hook_prints_one_line_for_a_user_error_and_passes_anything_else_on(hook, capsys):
    error = _wrapped(UserInputError("dataset folder /x does not exist or is not a folder."))
    sys.excepthook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err.splitlines() == [
        f"error: dataset folder /x does not exist or is not a folder. (set {DEBUG_ENV}=1 for the traceback)"
    ]
    bug = _wrapped(KeyError("x"))
    sys.excepthook(type(bug), bug, bug.__traceback__)
    assert hook == [bug] and capsys.readouterr().err == ""


def test_ctrl_c_is_one_line_saying_how_to_resume(hook, capsys):
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as stop:
        sys.excepthook(type(stop), stop, stop.__traceback__)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("interrupted: no output was left half-written; run the same command again") and hook == []


def test_the_debug_variable_keeps_the_full_traceback(hook, monkeypatch, capsys):
    monkeypatch.setenv(DEBUG_ENV, "1")
    error = _wrapped(UserInputError("weight_bits must be an integer from 2 to 8, got 9."))
    sys.excepthook(type(error), error, error.__traceback__)
    assert hook == [error] and capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_nan_or_infinity_anywhere_like_isfinite(dtype, bad):
    values = torch.linspace(-3, 3, 7 * 11 * 5, dtype=dtype).reshape(7, 11, 5)
    assert all_finite(values)
    for index in [(0, 0, 0), (3, 5, 2), (6, 10, 4)]:
        spoiled = values.clone()
        spoiled[index] = bad
        assert not all_finite(spoiled) and not bool(torch.isfinite(spoiled).all())


def test_all_finite_takes_empty_and_integer_tensors_as_finite():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.arange(10))


def test_an_empty_calibration_volume_is_named_not_left_to_torch_s_reduction_error():
    with pytest.raises(UserInputError, match=r"calibration volume ct\.nii holds no value \(shape \(1, 0, 0, 0\)\), so there is no range to calibrate on: check the file\."):
        check_spread(torch.empty(1, 0, 0, 0), "calibration volume ct.nii", "fix it", "check the file")


def _logged(error: BaseException, caplog) -> logging.LogRecord:
    """The record of ``error`` logged as MONAI's ``StatsHandler`` logs an engine's exception."""
    # a logger of this test's own: a StatsHandler that another test made stops its named logger propagating
    # to the root, where caplog listens, and a bundle's logging.conf disables the loggers that exist
    logger = logging.getLogger(f"{__name__}.stats_handler")
    logger.disabled = False
    try:
        raise error
    except BaseException as e:
        logger.exception(f"Exception: {e}")
    return caplog.records[-1]


def test_log_lines_of_a_user_error_keep_the_message_and_lose_the_traceback(hook, caplog):
    user = _logged(UserInputError("cannot read image file(s) ['bad.mha']; re-export or remove them."), caplog)
    assert user.exc_info is None and user.getMessage() == "Exception: cannot read image file(s) ['bad.mha']; re-export or remove them."
    assert _logged(_wrapped(UserInputError("x.")), caplog).exc_info is None  # found in the chain, as the hook finds it
    assert _logged(KeyError("x"), caplog).exc_info is not None  # a bug keeps its traceback
    made = logging.getLogger(__name__).makeRecord(__name__, logging.ERROR, __file__, 1, "no error", (), True)
    assert made.exc_info is True  # a record made by hand, exc_info not yet looked up, is left as it is


def test_the_debug_variable_keeps_the_traceback_in_log_lines_too(hook, monkeypatch, caplog):
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert _logged(_wrapped(UserInputError("weight_bits must be an integer.")), caplog).exc_info is not None


def test_a_reference_no_config_file_defines_is_a_users_error_naming_it_in_the_hash_form_they_type():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"dataset": {"_target_": "Dataset"}, "images": "$@dataset#data"})
    with pytest.raises(ValueError) as raised:
        parser.get_parsed_content("images")
    found = find_user_error(raised.value)
    assert isinstance(found, UserInputError) and str(found).startswith(
        "the config refers to @dataset#data, which none of its files defines: define it in one of the --config_file files "
        "or pass --dataset#data on the command line"
    )


def test_an_inferer_without_a_window_names_the_overlays_window_settings_not_one_the_inferer_would_refuse():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"inferer": {"_target_": "SimpleInferer"}, "roi": "$@inferer#roi_size"})
    with pytest.raises(ValueError) as raised:
        parser.get_parsed_content("roi")
    # "pass --inferer#roi_size" gave SimpleInferer an argument it does not take: a traceback
    assert str(find_user_error(raised.value)).startswith(
        "the bundle's inferer has no roi_size, which the overlay takes as its window: pass one, --calibration_roi "
        '"[96,96,96]" to quantize, --export_roi "[96,96,96]" to the openvino overlay'
    )


@pytest.mark.parametrize(
    "value,kwargs,message",
    [
        (True, {}, "x must be a finite number, got True"),
        ("0.5", {}, r"x must be a finite number, got '0.5' \(a word on the command line arrives as text"),
        (float("nan"), {"low": 0, "high": 1}, "x must be a number from 0 to 1, got nan"),
        (float("inf"), {"low": 0}, "x must be a non-negative number, got inf"),
        (10**400, {}, "x must be a finite number, got 1000"),
        (0.0, {"low": 0, "above": True, "hint": " such as 1e-4"}, "x must be a positive number such as 1e-4, got 0.0"),
        (-0.5, {"low": 0}, "x must be a non-negative number, got -0.5"),
        (1.5, {"low": 0, "high": 1}, "x must be a number from 0 to 1, got 1.5"),
        (2, {"low": 2, "above": True}, "x must be a number above 2, got 2"),
        (9, {"high": 8}, "x must be a number of at most 8, got 9"),
    ],
)
def test_check_number_refuses_what_is_not_a_finite_number_in_range_naming_setting_range_and_value(value, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        check_number(value, "x", **kwargs)


def test_check_number_returns_python_floats_for_numpy_numbers_and_ints_at_the_bounds():
    assert check_number(np.float32(0.25), "x", 0, 1) == 0.25 and type(check_number(np.float32(0.25), "x")) is float
    assert check_number(0, "x", 0) == 0.0 and check_number(1, "x", 0, 1) == 1.0
    assert check_number(np.int64(3), "x", 0, above=True) == 3.0


def test_check_integer_puts_the_hint_after_what_it_wants():
    with pytest.raises(UserInputError, match=r"n must be an integer of at least 1 \(a count\), got 0\."):
        check_integer(0, "n", low=1, hint=" (a count)")
