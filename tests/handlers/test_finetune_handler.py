import json
import logging

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet

from monai_effq import EfficientQConfig, load_quantized
from monai_effq.handlers import FinetuneHandler, QuantizationReportHandler
from monai_effq.ptq import QuantizedLayer
from monai_effq.qat import prepare_finetune


def _net():
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)


def _trainer(trainable, batches, steps, optimizer=None):
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=steps,
        train_data_loader=batches,
        network=trainable.network,
        optimizer=optimizer or torch.optim.Adam(trainable.parameters(), lr=1e-3),
        loss_function=lambda logits, label: torch.nn.functional.cross_entropy(logits, label[:, 0]),
        decollate=False,
    )


def test_a_supervised_trainer_fine_tunes_and_the_handler_freezes_and_reports(tmp_path):
    batches = [{"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) > 0.7).long()} for _ in range(2)]
    trainable = prepare_finetune(_net(), batches, EfficientQConfig(weight_bits=4, act_bits=6, power_of_two=True))
    trainer = _trainer(trainable, batches, 5)  # more steps than batches: the loader is cycled
    handler = FinetuneHandler(trainable, save_path=tmp_path / "qat.pt", settings={"lr": 1e-3})
    handler.attach(trainer)
    handler.attach(trainer)  # attaching twice is harmless
    QuantizationReportHandler(tmp_path / "eval").attach(trainer)
    trainer.run()
    result = trainer.state.quantization
    assert any(isinstance(m, QuantizedLayer) for m in result.network.modules())
    report = json.loads((tmp_path / "eval" / "quantization_report.json").read_text())
    assert report["method"] == "fp+qat" and report["extra"]["finetune"]["steps"] == 5
    assert report["extra"]["finetune"]["lr"] == 1e-3
    assert (tmp_path / "eval" / "quantization_report_finetune_loss.png").stat().st_size > 1000
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "qat.pt", _net())(x), result.network(x))


@pytest.mark.parametrize("check_batches", [0, 1])
def test_a_training_loss_that_turns_nan_stops_the_trainer_before_a_nan_network_is_written(tmp_path, check_batches):
    batches = [{"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) > 0.7).long()} for _ in range(2)]
    trainable = prepare_finetune(_net(), batches, EfficientQConfig(weight_bits=4, act_bits=6, power_of_two=True))
    trainer = _trainer(trainable, batches, 4)

    def diverging(logits, label):  # NaN on the trainer's second iteration (the held-out check scores with it too)
        training = trainer.state.iteration == 2 and torch.is_grad_enabled()
        return torch.nn.functional.cross_entropy(logits, label[:, 0]) * (float("nan") if training else 1.0)

    trainer.loss_function = diverging
    FinetuneHandler(trainable, save_path=tmp_path / "qat.pt", check_batches=check_batches).attach(trainer)
    with pytest.raises(ValueError, match="the fine-tuning loss is nan at step 1: lower the learning rate"):
        trainer.run()
    assert not (tmp_path / "qat.pt").exists()


def test_the_handler_needs_a_trainable_network():
    with pytest.raises(TypeError, match="prepare_finetune"):
        FinetuneHandler(_net())


def test_a_trainer_that_trains_another_network_is_refused_when_it_starts():
    batches = [{"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) > 0.7).long()}]
    trainable = prepare_finetune(_net(), batches, EfficientQConfig(weight_bits=4, act_bits=6))
    other = prepare_finetune(_net(), batches, EfficientQConfig(weight_bits=4, act_bits=6))
    trainer = _trainer(other, batches, 1)
    FinetuneHandler(trainable).attach(trainer)
    with pytest.raises(RuntimeError, match="the trainer's network is not the TrainableNetwork's: pass trainable.network"):
        trainer.run()


def test_the_handler_keeps_the_start_when_training_made_it_worse(tmp_path, caplog):
    torch.manual_seed(1)
    x = torch.randn(4, 1, 16, 16, 16)
    label = (x > 0.5).long()  # a task the FP network learns in a few steps
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(x), label[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [{"image": x[i : i + 2], "label": label[i : i + 2]} for i in (0, 2)]
    trainable = prepare_finetune(net.eval(), batches, EfficientQConfig(weight_bits=4, act_bits=8))
    start = trainable.freeze().network
    trainer = _trainer(trainable, batches, 4, torch.optim.SGD(trainable.parameters(), lr=50.0))  # absurd: wrecks the weights
    FinetuneHandler(trainable, save_path=tmp_path / "qat.pt", validation_data=batches).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="monai_effq"):
        trainer.run()
    check = trainer.state.quantization.report.extra["finetune"]["check"]
    assert check["kept"] == "start" and check["end"]["mean_dice"] < check["start"]["mean_dice"]
    assert len(trainable.learning_rates) == 4 and "learning rate: 50" in " ".join(check["causes"])
    assert any("made the network worse" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        assert torch.equal(trainer.state.quantization.network(x), start(x))


def test_the_handler_scores_whole_held_out_volumes_through_an_inferer():
    from monai.inferers import SlidingWindowInferer

    batches = [{"image": torch.randn(2, 1, 16, 16, 16), "label": (torch.rand(2, 1, 16, 16, 16) > 0.7).long()}]
    volume = {"image": torch.randn(1, 1, 21, 21, 21), "label": (torch.rand(1, 1, 21, 21, 21) > 0.7).long()}  # odd: no plain pass
    trainable = prepare_finetune(_net(), batches, EfficientQConfig(weight_bits=4, act_bits=6))
    trainer = _trainer(trainable, batches, 2)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=1)
    FinetuneHandler(trainable, validation_data=[volume], inferer=inferer).attach(trainer)
    trainer.run()
    check = trainer.state.quantization.report.extra["finetune"]["check"]
    assert check["windows"] == 1 and check["kept"] in ("start", "end") and len(check["start"]["dice"]) == 1
