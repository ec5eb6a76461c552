import copy

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SlidingWindowInferer
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.transforms import AsDiscreted, Compose

from monai_effq.handlers import REFERENCE_KEY, ReferencePrediction, write_comparison


@pytest.fixture
def net():
    torch.manual_seed(0)
    return UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=0).eval()


@pytest.fixture
def batches():
    torch.manual_seed(1)
    return [{"image": torch.randn(2, 1, 16, 16, 16), "label": torch.zeros(2, 1, 16, 16, 16)} for _ in range(2)]


def _discrete() -> Compose:
    return Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=3)])


def _evaluator(network, reference, batches, **kwargs) -> SupervisedEvaluator:
    inferer = SlidingWindowInferer((8, 8, 8), sw_batch_size=2, overlap=0.25)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=batches, epoch_length=len(batches), network=network, inferer=inferer, postprocessing=_discrete(),
        key_val_metric={"fp_agreement": MeanDice(include_background=False, output_transform=from_engine(["pred", REFERENCE_KEY]))},
        **kwargs,
    )
    handler = ReferencePrediction(reference, inferer, _discrete())
    handler.attach(evaluator)
    handler.attach(evaluator)  # attaching twice is harmless
    return evaluator


def test_a_network_agrees_with_itself_exactly(net, batches):
    evaluator = _evaluator(net, copy.deepcopy(net), batches)
    evaluator.run()
    assert evaluator.state.metrics["fp_agreement"] == pytest.approx(1.0)


def test_the_agreement_is_the_dice_of_the_two_networks_labels(net, batches):
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    evaluator = _evaluator(net, other, batches)
    evaluator.run()

    inferer = SlidingWindowInferer((8, 8, 8), sw_batch_size=2, overlap=0.25)
    onehot = lambda n, x: torch.nn.functional.one_hot(inferer(x, n).argmax(1), 3).permute(0, 4, 1, 2, 3)  # noqa: E731
    with torch.no_grad():
        scores = torch.cat([compute_dice(onehot(net, b["image"]), onehot(other, b["image"]), include_background=False) for b in batches])
    expected = float(scores.nanmean())
    assert 0.0 < expected < 0.99  # the perturbed network's labels do differ
    assert evaluator.state.metrics["fp_agreement"] == pytest.approx(expected, rel=1e-5)


def test_the_comparison_table_gets_the_agreement_column_of_the_evaluators_that_measured_it(net, batches, tmp_path):
    plain = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=batches, epoch_length=len(batches), network=net, postprocessing=_discrete(),
        key_val_metric={"mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"dice": MeanDice(include_background=False, reduction="mean_batch", output_transform=from_engine(["pred", "label"]))},
    )
    compared = _evaluator(net, net, batches, additional_metrics={
        "dice": MeanDice(include_background=False, reduction="mean_batch", output_transform=from_engine(["pred", "label"])),
    })
    plain.run()
    compared.run()
    rows = write_comparison({"FP32": plain, "W4A8": compared}, ["a", "b"], tmp_path)
    assert "fp_agreement" not in rows[0] and rows[1]["fp_agreement"] == pytest.approx(1.0)
    assert (tmp_path / "evaluation.csv").read_text().splitlines()[0].endswith("fp_agreement")


def test_an_engine_without_decollated_images_is_told_what_the_handler_needs_when_it_is_attached(net, batches):
    # told at run time, the evaluator's batch-wise post-processing had already failed on one case inside a transform
    with pytest.raises(ValueError, match="decollate=True"):
        _evaluator(net, net, batches, decollate=False)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=batches, epoch_length=len(batches), network=net, decollate=False,
        postprocessing=lambda batch: {**batch, "pred": batch["pred"].argmax(1, keepdim=True)},
    )
    with pytest.raises(ValueError, match="ReferencePrediction needs the engine's output as decollated items"):
        ReferencePrediction(net).attach(evaluator)


def test_a_zoo_style_postprocessing_that_also_one_hots_the_label_serves_the_reference_unchanged(net, batches):
    # the model zoo's evaluate.json post-processes "pred" and "label" together; the reference needs no copy of it
    both = Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=3)])
    inferer = SlidingWindowInferer((8, 8, 8), sw_batch_size=2, overlap=0.25)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=batches, epoch_length=len(batches), network=net, inferer=inferer, postprocessing=both,
        key_val_metric={"fp_agreement": MeanDice(include_background=False, output_transform=from_engine(["pred", REFERENCE_KEY]))},
        additional_metrics={"dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[ReferencePrediction(copy.deepcopy(net), inferer, both)],
    )
    evaluator.run()
    assert evaluator.state.metrics["fp_agreement"] == pytest.approx(1.0)
    assert 0.0 < evaluator.state.metrics["dice"] <= 1.0  # the engine's own label was one-hot once, as without the handler


def test_the_reference_post_processing_writes_no_images(net, batches, tmp_path):
    from monai.data import MetaTensor, list_data_collate
    from monai.transforms import SaveImaged

    named = [
        list_data_collate([
            {"image": MetaTensor(image, affine=torch.eye(4), meta={"filename_or_obj": f"case{i}{j}.nii.gz"}), "label": label}
            for j, (image, label) in enumerate(zip(b["image"], b["label"]))
        ])
        for i, b in enumerate(batches)
    ]
    saving = Compose([*_discrete().transforms, SaveImaged(keys="pred", meta_keys="image_meta_dict", output_dir=str(tmp_path), separate_folder=False)])
    evaluator = _evaluator(net, copy.deepcopy(net), named)
    ReferencePrediction(copy.deepcopy(net), SlidingWindowInferer((8, 8, 8)), saving).attach(evaluator)
    evaluator.run()
    assert evaluator.state.metrics["fp_agreement"] == pytest.approx(1.0)
    assert list(tmp_path.iterdir()) == []


def test_a_reference_post_processed_otherwise_than_the_evaluators_pred_is_refused_rather_than_scored_near_zero(net, batches):
    from monai_effq.utils.errors import UserInputError

    inferer = SlidingWindowInferer((8, 8, 8), sw_batch_size=2, overlap=0.25)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=batches, epoch_length=len(batches), network=net, inferer=inferer, postprocessing=_discrete(),
        key_val_metric={"fp_agreement": MeanDice(include_background=False, output_transform=from_engine(["pred", REFERENCE_KEY]))},
    )
    ReferencePrediction(copy.deepcopy(net), inferer, None).attach(evaluator)  # the bundle's post-processing was not handed on
    with pytest.raises(UserInputError, match=r"FP reference prediction is \(3, 16, 16, 16\) logits or probabilities where the evaluator's pred is \(3, 16, 16, 16\) labels"):
        evaluator.run()
