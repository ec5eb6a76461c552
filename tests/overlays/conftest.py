"""Bundles laid out like the MONAI model zoo's, built from the demo data and the shipped FP networks.

``spleen_style``: ``inference.json`` as the zoo's spleen_ct_segmentation writes it (a separate
``checkpointloader`` called by ``initialize``), plus a ``train.json``/``evaluate.json`` pair whose
``validate#handlers`` load the checkpoint; it carries the lits_effq UNet and its LiTS transforms.
``handlers_style``: ``inference.json`` as brats_mri_segmentation writes it (the ``CheckpointLoader``
first in ``handlers``, run id ``evaluating``, four MRI files per case); it carries the brats_effq
SegResNet. Neither bundle knows monai-effq: the overlays must bring it.
"""

import json
import shutil
from pathlib import Path

import pytest

from monai_effq.bundle import demo_dataset

ROOT = Path(__file__).resolve().parents[2]

LITS_PREPROCESSING = [
    {"_target_": "LoadImaged", "keys": "@keys", "reader": "NibabelReader"},
    {"_target_": "EnsureChannelFirstd", "keys": "@keys"},
    {"_target_": "Orientationd", "keys": "@keys", "axcodes": "RAS"},
    {"_target_": "CropForegroundd", "keys": "@keys", "source_key": "image", "select_fn": "$lambda x: x > -500", "allow_smaller": True},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -21, "a_max": 189, "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"_target_": "EnsureTyped", "keys": "@keys"},
]
LITS_NETWORK = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}
DATALOADER = {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0}
# the zoo's inference evaluator (amp is a no-op on CPU)
EVALUATOR = {
    "_target_": "SupervisedEvaluator",
    "device": "@device",
    "val_data_loader": "@dataloader",
    "network": "@network",
    "inferer": "@inferer",
    "postprocessing": "@postprocessing",
    "val_handlers": "@handlers",
    "amp": True,
}
INFERER = {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 48], "sw_batch_size": 1, "overlap": 0.25}


def _steps(keys: str | list[str]) -> list[dict]:
    return json.loads(json.dumps(LITS_PREPROCESSING).replace('"@keys"', json.dumps(keys)))


def _write(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=4))


def _metadata(root: Path, source: str) -> None:
    """A zoo bundle's metadata.json (MONAI Label reads the labels from it): the shipped bundle's, renamed."""
    meta = json.loads((ROOT / "bundles" / source / "configs" / "metadata.json").read_text())
    _write(root / "configs" / "metadata.json", {**meta, "name": f"{root.name} (a model-zoo-style test bundle)"})


def spleen_style(root: Path, data: Path) -> Path:
    """A zoo bundle in spleen_ct_segmentation's form, on the LiTS demo cases in ``data``."""
    common = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": str(data),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": LITS_NETWORK,
        "network": "$@network_def.to(@device)",
    }
    inference = {
        **common,
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/volume-*.nii')))[8:]",
        "preprocessing": {"_target_": "Compose", "transforms": _steps("image")},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": DATALOADER,
        "inferer": INFERER,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_dtype": "$numpy.uint8", "separate_folder": True, "print_log": False},
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": EVALUATOR,
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }
    cases = "$[{'image': i, 'label': l} for i, l in zip(sorted(glob.glob(@dataset_dir + '/volume-*.nii')), sorted(glob.glob(@dataset_dir + '/segmentation-*.nii')))][8:]"
    train = {
        **common,
        "ckpt_dir": "$@bundle_root + '/models'",
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": _steps(["image", "label"])},
            "dataset": {"_target_": "CacheDataset", "data": cases, "transform": "@validate#preprocessing", "cache_rate": 1.0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
            "inferer": INFERER,
            "postprocessing": {"_target_": "Compose", "transforms": []},
            "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False, "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@validate#inferer",
                "postprocessing": "@validate#postprocessing",
                "key_val_metric": "@validate#key_metric",
                "val_handlers": "@validate#handlers",
            },
        },
    }
    evaluate = {  # the zoo's evaluate.json: one-hot Dice after inverting, the checkpoint loaded by a handler
        "validate#dataset#cache_rate": 0,
        "validate#postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Invertd", "keys": ["pred", "label"], "transform": "@validate#preprocessing", "orig_keys": "image", "nearest_interp": [False, True], "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": 3},
            ],
        },
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": ["val_mean_dice"], "metric_details": ["val_mean_dice"], "summary_ops": "*"},
        ],
        "run": ["$@validate#evaluator.run()"],
    }
    for name, config in (("inference", inference), ("train", train), ("evaluate", evaluate)):
        _write(root / "configs" / f"{name}.json", config)
    _metadata(root, "lits_effq")
    (root / "models").mkdir(parents=True)
    shutil.copy(ROOT / "bundles" / "lits_effq" / "models" / "model.pt", root / "models" / "model.pt")
    return root


def handlers_style(root: Path, data: Path) -> Path:
    """A zoo bundle in brats_mri_segmentation's form, on the BraTS demo cases in ``data``."""
    modalities = ("flair", "t1", "t1ce", "t2")  # the brats_effq network's channel order
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": str(data),
        "test_datalist": f"$[{{'image': [f'{{d}}/{{os.path.basename(d)}}_{{m}}.nii.gz' for m in {list(modalities)}]}} for d in sorted(glob.glob(@dataset_dir + '/BraTS20_Training_*'))][8:]",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "network_def": {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8, "in_channels": 4, "out_channels": 3},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "ensure_channel_first": True},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
        "dataloader": DATALOADER,
        "inferer": INFERER,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg", "output_dtype": "uint8", "resample": False, "squeeze_end_dims": True, "print_log": False},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": EVALUATOR,
        "evaluating": ["$@evaluator.run()"],
    }
    _write(root / "configs" / "inference.json", inference)
    _metadata(root, "brats_effq")
    (root / "models").mkdir(parents=True)
    shutil.copy(ROOT / "bundles" / "brats_effq" / "models" / "model.pt", root / "models" / "model.pt")
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """The LiTS and BraTS demo cases (generated, nothing downloaded)."""
    root = tmp_path_factory.mktemp("zoo_data")
    return {name: Path(demo_dataset(root / name, name)) for name in ("lits", "brats")}
