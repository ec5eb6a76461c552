"""Optional extras imported where they are first used, not when monai-effq is imported.

Every ``python -m monai.bundle run`` imports the whole package. ``import onnx`` alone (ml_dtypes'
extension module) took 1.1 s of that start and pydicom's SR code dictionaries 0.3 s, on a 2-core
Xeon, in commands (training, quantization, evaluation) that never export ONNX or write DICOM.
"""

from __future__ import annotations

from typing import Any

from monai.utils import optional_import

__all__ = ["deferred_import"]


class _Deferred:
    """Stands for ``optional_import(module, name=name)[0]``, which it runs on first use.

    Attribute access, item access, ``in``, iteration, ``len`` and calls are passed on to the imported
    object (a module, a dict of codes, a function); ``isinstance`` against the stand-in itself is not.
    """

    __slots__ = ("_module", "_name", "_imported")

    def __init__(self, module: str, name: str) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_imported", None)

    def _load(self) -> tuple[Any, bool]:
        """The imported object and whether the import succeeded (``optional_import``'s pair), imported once."""
        imported = object.__getattribute__(self, "_imported")
        if imported is None:
            # a failed import gives MONAI's stand-in, whose attributes raise OptionalImportError naming it
            imported = optional_import(object.__getattribute__(self, "_module"), name=object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_imported", imported)
        return imported

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load()[0], attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._load()[0], attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._load()[0], attr)

    def __getitem__(self, key: Any) -> Any:
        return self._load()[0][key]

    def __contains__(self, key: Any) -> bool:
        return key in self._load()[0]

    def __iter__(self) -> Any:
        return iter(self._load()[0])

    def __len__(self) -> int:
        return len(self._load()[0])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()[0](*args, **kwargs)

    def __repr__(self) -> str:
        module, name = object.__getattribute__(self, "_module"), object.__getattribute__(self, "_name")
        return f"<deferred import of {module + '.' + name if name else module}>"


class _Importable:
    """Whether a deferred import succeeds: true or false as ``optional_import``'s flag, importing when first asked.

    A truthy object, not a ``bool``: test it (``if``, ``not``, ``bool()``), do not compare it with ``True``.
    """

    __slots__ = ("_deferred",)

    def __init__(self, deferred: _Deferred) -> None:
        self._deferred = deferred

    def __bool__(self) -> bool:
        return bool(self._deferred._load()[1])

    def __repr__(self) -> str:
        return repr(bool(self))


def deferred_import(module: str, name: str = "") -> tuple[Any, _Importable]:
    """:func:`monai.utils.optional_import`, run when the returned objects are first used.

    Args:
        module: the module to import, such as ``"onnx"`` or ``"pydicom.sr.codedict"``.
        name: an attribute of the module to return instead of the module itself.

    Returns:
        ``(stand-in, importable)``: an object whose attribute accesses import ``module`` (once) and read
        the real object's, and a truthy flag that is true where that import succeeds (testing it
        imports too).
        A package that is installed but fails to import (a broken or shadowed extra) gives a false
        flag, as ``optional_import`` does: the flag, not the presence of files, says the extra works.
    """
    deferred = _Deferred(module, name)
    return deferred, _Importable(deferred)
