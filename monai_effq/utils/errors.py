"""Errors a person can act on: one exception class for bad input, and the bundle command's one-line report.

:class:`UserInputError` marks an error in what a user gave (a file, a folder, a setting, a
calibration volume, a checkpoint) as opposed to a bug. It subclasses ``ValueError`` (and
:class:`MissingInputError` also ``FileNotFoundError``), so code that catches those keeps working.
Its message is one sentence that names the thing and says what to do.

``python -m monai.bundle run`` wraps every error of a config expression in MONAI's own
``RuntimeError: Failed to evaluate ConfigExpression``, so the last line of its traceback names an
expression, not the problem. :func:`install_bundle_error_hook` (called by :mod:`monai_effq.bundle`,
which every bundle config imports) replaces that for user-input errors: the process prints
``error: <message>`` to stderr and exits with status 1. A user-input error raised while an engine
runs is also logged by MONAI's ``StatsHandler`` (``logger.exception``) before it reaches the hook; in
that process such log lines keep their message and lose the traceback. Every other exception keeps
its traceback, and ``MONAI_EFFQ_DEBUG=1`` keeps it for user-input errors too.
"""

from __future__ import annotations

import collections
import logging
import math
import numbers
import os
import re
import sys
from types import TracebackType
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEBUG_ENV",
    "MissingExtraError",
    "MissingInputError",
    "OutputExistsError",
    "OutputWriteError",
    "UserInputError",
    "all_finite",
    "check_flag",
    "check_integer",
    "check_inference_input",
    "check_number",
    "check_spread",
    "debugging",
    "exception_chain",
    "find_user_error",
    "install_bundle_error_hook",
]

DEBUG_ENV = "MONAI_EFFQ_DEBUG"
"""Environment variable: set to ``1`` to see the full traceback of a user-input error."""


class UserInputError(ValueError):
    """Something a user gave is missing, malformed or unusable (not a bug in monai-effq).

    The message is one sentence naming the offending file, setting, layer or volume and the fix.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        entry = (type(self), str(self))
        if not _RECENT or _RECENT[-1] != entry:
            _RECENT.append(entry)


# The last user-input errors raised in this process, by class and message. A library may keep an error's
# text and drop the exception: MONAI's SaveImage tries each writer and then raises "cannot find a suitable
# writer", with their tracebacks as text, so a full disk under a mask would otherwise end in a page of them.
_RECENT: collections.deque[tuple[type[UserInputError], str]] = collections.deque(maxlen=8)


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder a user named does not exist."""


class MissingExtraError(UserInputError, ImportError):
    """An optional package a setting needs is not installed; the message names the extra to install."""


class OutputExistsError(UserInputError, FileExistsError):
    """An output a workflow would write is there already, and the user did not ask to replace it."""


class OutputWriteError(UserInputError, OSError):
    """An output could not be written where the user pointed it: the disk or quota is full, the folder
    is read-only or another user's, or a file stands where a folder would be."""


def check_integer(value: Any, name: str, low: int | None = None, high: int | None = None, *, hint: str = "") -> int:
    """A setting that must be a whole number: Python and numpy integers pass, ``bool``, ``float`` and text do not.

    Args:
        value: the setting.
        name: what it is called (in the message).
        low: smallest allowed value, or ``None``.
        high: largest allowed value, or ``None``.
        hint: text after what is wanted, e.g. ``" (0 turns the check off)"``.

    Returns:
        ``value`` as a Python ``int``.

    Raises:
        UserInputError: naming the setting, the range and the value given.
    """
    if low is not None and high is not None:
        wanted = f"an integer from {low} to {high}"
    elif low is not None:
        wanted = f"an integer of at least {low}"
    else:
        wanted = "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        text = " (a word on the command line arrives as text: write a number)" if isinstance(value, str) else ""
        raise UserInputError(f"{name} must be {wanted}{hint}, got {value!r}{text}.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise UserInputError(f"{name} must be {wanted}{hint}, got {value}.")
    return value


def check_number(
    value: Any, name: str, low: float | None = None, high: float | None = None, *, above: bool = False, hint: str = ""
) -> float:
    """A setting that must be a finite real number: Python and numpy numbers pass; ``bool``, text, NaN and inf do not.

    Args:
        value: the setting.
        name: what it is called (in the message).
        low: smallest allowed value (``above`` excludes it), or ``None``.
        high: largest allowed value, or ``None``.
        above: the value must exceed ``low`` rather than reach it (a learning rate, a penalty).
        hint: text after what is wanted, e.g. ``" such as 1e-4"`` or ``" (the paper uses 0.5)"``.

    Returns:
        ``value`` as a Python ``float``.

    Raises:
        UserInputError: naming the setting, the range and the value given.
    """
    if low is not None and high is not None:
        wanted = f"a number from {low} to {high}" if not above else f"a number above {low} and at most {high}"
    elif low == 0:
        wanted = "a positive number" if above else "a non-negative number"
    elif low is not None:
        wanted = f"a number above {low}" if above else f"a number of at least {low}"
    else:
        wanted = "a finite number" if high is None else f"a number of at most {high}"
    text = " (a word on the command line arrives as text: write a number)" if isinstance(value, str) else ""
    number = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            pass
    if not math.isfinite(number):
        raise UserInputError(f"{name} must be {wanted}{hint}, got {value!r}{text}.")
    below = low is not None and (number <= low if above else number < low)
    if below or (high is not None and number > high):
        raise UserInputError(f"{name} must be {wanted}{hint}, got {value!r}.")
    return number


def check_flag(value: Any, name: str) -> bool:
    """A setting that must be ``True`` or ``False`` (numpy booleans pass; ``"false"``, 0 and 1 do not).

    Args:
        value: the setting.
        name: what it is called (in the message).

    Returns:
        ``value`` as a Python ``bool``.

    Raises:
        UserInputError: for anything else, saying how to write a boolean on the bundle command line.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise UserInputError(
        f"{name} must be True or False, got {value!r} (on the bundle command line write --{name.split('.')[-1]} "
        "False, capitalised: 'false' arrives as text)."
    )


def all_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` hold no NaN or Inf, read from their smallest and largest value.

    ``torch.isfinite(t).all()`` writes a boolean mask as large as ``t`` and reads it back; one
    ``aminmax`` reduction took a tenth of its time (0.16 against 1.6 ms on a float32 1x32x32^3
    tensor, 2 threads). A NaN propagates to both ends, and an infinity is one of them.

    Args:
        values: any tensor (an empty one is finite).

    Returns:
        ``True`` when every value is finite.
    """
    if values.numel() == 0:
        return True
    if not values.is_floating_point():
        return bool(torch.isfinite(values).all())
    return _finite_range(values)[2]


def _finite_range(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(smallest, largest, whether all are finite)`` of a non-empty tensor, from one reduction."""
    low, high = torch.aminmax(values.detach().reshape(-1))
    return low, high, bool(torch.isfinite(low) & torch.isfinite(high))


def check_inference_input(x: torch.Tensor, what: str) -> None:
    """Refuse NaN or Inf in the input of a quantized network.

    A full-precision network turns a NaN voxel into NaN output, which its user sees. A quantized
    network rounds NaN and Inf to grid codes like any other value (torch's fake quantization as ONNX
    QuantizeLinear and both runtimes do) and returns what looks like a segmentation of an image it
    could not read. One reduction checks the input; the count (a mask as large as the input: 45 ms at
    1x4x128^3, a sixth of an int8 SegResNet's run) is made only once it has found one.

    Args:
        x: the network's input; tensors that are not floating point pass.
        what: what to call the input in the message (``"the input to model.onnx"``).

    Raises:
        UserInputError: naming ``what``, the count and the fix.
    """
    values = x.detach().as_subclass(torch.Tensor)
    if values.is_meta:  # shapes without values (a shape check runs networks so): nothing to check
        return
    if values.is_floating_point() and not all_finite(values):
        bad = int((~torch.isfinite(values)).sum())
        raise UserInputError(
            f"{what} holds {bad} NaN or Inf voxel(s), which a quantized network would round to ordinary values and "
            "segment as if they were (the full-precision network returns NaN): fix the image file or its "
            "preprocessing (e.g. a division by a zero intensity range) before inference."
        )


def check_spread(values: torch.Tensor, what: str, fix_nonfinite: str, fix_constant: str) -> None:
    """Values to calibrate on must be finite and not all equal (else the grid fitted to them is NaN or empty).

    Args:
        values: a calibration volume or a layer's calibration input.
        what: what to call them in the message (``"calibration volume case_0.nii"``).
        fix_nonfinite: what to do about NaN or Inf.
        fix_constant: what to do about a constant.

    Raises:
        UserInputError: naming ``what`` and the fix; ``fix_constant`` also for an empty tensor (a crop that
            left nothing), which torch's reduction would refuse with an error naming no volume.
    """
    values = values.detach()
    if values.numel() == 0:
        raise UserInputError(
            f"{what} holds no value (shape {tuple(values.shape)}), so there is no range to calibrate on: {fix_constant}."
        )
    low, high, finite = _finite_range(values)
    if not finite:
        bad = int((~torch.isfinite(values)).sum())
        raise UserInputError(f"{what} holds {bad} NaN or Inf value(s): {fix_nonfinite}.")
    if bool(low == high):
        raise UserInputError(
            f"{what} is one value ({float(low):g}) everywhere, so there is no range to calibrate on: {fix_constant}."
        )


def exception_chain(error: BaseException | None) -> list[BaseException]:
    """An exception and those it was raised from or while handling (``__cause__``, else ``__context__``), in turn.

    Args:
        error: the exception raised, or None.

    Returns:
        the exceptions of the chain, ``error`` first (a cycle is followed once).
    """
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


_MISSING_REFERENCE = re.compile(r"the referring item `@(?P<ref>[^`]+)` is not defined in the config content")


def find_user_error(error: BaseException | None) -> UserInputError | None:
    """The first :class:`UserInputError` in an exception's chain (``__cause__``, then ``__context__``), or one
    whose message an exception of the chain quotes.

    Args:
        error: the exception raised.

    Returns:
        the user-input error (for a quoted one, a new error of its class with its message), or ``None``
        when the chain holds none.
    """
    chain = exception_chain(error)
    found = next((link for link in chain if isinstance(link, UserInputError)), None)
    if found is not None:
        return found
    for link in chain:
        text = str(link)
        for kind, message in reversed(_RECENT):
            # as a traceback's last line shows the error, so that a message quoted in another sense is not taken
            if message and f"{kind.__name__}: {message}" in text:
                return kind(message)
    for link in chain:
        # MONAI's own message for a config that refers to an item no file defines (an overlay on a zoo bundle that
        # names it otherwise): a user's error, reported as one line
        missing = _MISSING_REFERENCE.search(str(link))
        if missing:
            ref = missing["ref"].replace("::", "#")
            if ref == "inferer#roi_size":  # the overlays' window defaults to the bundle inferer's; a SimpleInferer has none
                return UserInputError(
                    "the bundle's inferer has no roi_size, which the overlay takes as its window: pass one, "
                    "--calibration_roi \"[96,96,96]\" to quantize, --export_roi \"[96,96,96]\" to the openvino overlay "
                    "(--inferer#roi_size would give the inferer an argument it does not take)."
                )
            return UserInputError(
                f"the config refers to @{ref}, which none of its files defines: define it in one of the --config_file "
                f"files or pass --{ref} on the command line (docs/troubleshooting.md lists what the overlays read)."
            )
    return None


def debugging() -> bool:
    """Whether ``MONAI_EFFQ_DEBUG`` asks for the traceback of user-input errors (set and not ``0``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _bundle_excepthook(
    previous, exc_type: type[BaseException], error: BaseException, traceback: TracebackType | None  # noqa: ANN001
) -> None:
    if isinstance(error, KeyboardInterrupt) and not debugging():
        # Ctrl-C: the place in the solver it stopped at helps no one; what is kept, and how to go on, does
        sys.stderr.write(
            "interrupted: no output was left half-written; run the same command again to finish (a quantize run "
            f"resumes from the layers its journal kept) (set {DEBUG_ENV}=1 for the traceback)\n"
        )
        sys.stderr.flush()
        return
    found = find_user_error(error)
    if found is None or debugging():
        previous(exc_type, error, traceback)
        return
    sys.stderr.write(f"error: {found} (set {DEBUG_ENV}=1 for the traceback)\n")
    sys.stderr.flush()


def install_bundle_error_hook(force: bool = False) -> bool:
    """Report user-input errors of the ``python -m monai.bundle`` command, and Ctrl-C, as one line.

    Only that command's process is changed (``__main__`` is ``monai.bundle.__main__``), so a
    program or notebook that imports :mod:`monai_effq` keeps Python's normal behaviour. Installing
    twice is harmless. Python exits with status 1 after an uncaught exception whatever the hook
    prints. Log records made there drop the traceback of a user-input error (a log record factory,
    which outlives the logging set-up a bundle's ``logging.conf`` applies later).

    Args:
        force: install in any process (for tests).

    Returns:
        whether the hook is installed.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if not force and getattr(spec, "name", None) != "monai.bundle.__main__":
        return False
    if getattr(sys.excepthook, "_monai_effq", False):
        return True
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        _bundle_excepthook(previous, exc_type, error, traceback)

    hook._monai_effq = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    make_record = logging.getLogRecordFactory()

    def record_without_user_traceback(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        # exc_info is the (type, value, traceback) that Logger._log makes; a direct makeRecord may pass True
        exc = record.exc_info
        if isinstance(exc, tuple) and find_user_error(exc[1]) is not None and not debugging():
            record.exc_info = None
        return record

    logging.setLogRecordFactory(record_without_user_traceback)
    return True
