"""Small helpers shared by every layer of monai-effq."""

from monai_effq.utils.errors import MissingInputError, OutputExistsError, UserInputError
from monai_effq.utils.fingerprint import fingerprint_json, fingerprint_state, fingerprint_tensors
from monai_effq.utils.io import atomic_write, atomic_write_text

__all__ = [
    "MissingInputError",
    "OutputExistsError",
    "UserInputError",
    "atomic_write",
    "atomic_write_text",
    "fingerprint_json",
    "fingerprint_state",
    "fingerprint_tensors",
]
