"""`atop-train classifier`: supervised training of the classifier, airbench style (SGD-Nesterov, label
smoothing, a warm-up then linear decay, whitened stem, random crop + flip)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from atop_models.checkpoint import save_model
from atop_models.classifiers import CLASSIFIERS
from atop_models.data import BatchLoader, ImageArrays, LoaderConfig
from atop_models.evaluate import accuracy
from atop_models.train.common import DataConfig
from atop_models.train.options import help_field
from atop_models.train.runtime import Runtime


@dataclass(frozen=True)
class ClassifierConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    arch: str = help_field("airbench", "classifier architecture: airbench (fast CPU default) or resnet18")
    arch_kwargs: dict = help_field({}, 'extra constructor arguments, e.g. {"widths": [64, 256, 256]}')
    image_size: int = help_field(32, "pixels the classifier sees (batches are resized to it on the device)")
    epochs: int = help_field(16, "passes over the train split")
    batch_size: int = help_field(512, "images per step per process")
    lr: float = help_field(0.2, "peak SGD learning rate for batch 512 (scaled linearly with the global batch)")
    momentum: float = help_field(0.9, "Nesterov momentum")
    weight_decay: float = help_field(5e-4, "L2 on conv/linear weights only (not on BN or biases)")
    label_smoothing: float = help_field(0.2, "softens targets; helps the short schedule and calibration")
    warmup_epochs: float = help_field(1.0, "linear LR warm-up from 0, then linear decay to 0 at the end")
    whiten_init: bool = help_field(True, "initialize airbench's 2x2 stem from the data's patch statistics")
    crop_pad: int = help_field(4, "pixels of reflect padding for random-crop augmentation")
    seed: int = help_field(0, "seeds data order, init and augmentation")


def warmup_linear_decay(total_steps: int, warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class ClassifierTask:
    def __init__(
        self,
        config: ClassifierConfig,
        runtime: Runtime,
        train: ImageArrays,
        test: ImageArrays,
        steps_per_epoch: int,
        out: Path,
    ) -> None:
        self.config, self.runtime, self.test, self.out = config, runtime, test, out
        self.classes = train.classes
        torch.manual_seed(config.seed)
        self.arch_kwargs = {**config.arch_kwargs, "num_classes": len(train.classes)}
        model = CLASSIFIERS.create(config.arch, **self.arch_kwargs)
        if config.whiten_init and hasattr(model, "init_whitening"):
            model.init_whitening(train.images[:5000].float() / 255.0)
        self.model = model.to(runtime.device)
        self.trained = runtime.wrap(self.model)
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        global_batch = config.batch_size * runtime.world_size
        self.optimizer = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr * global_batch / 512,
            momentum=config.momentum,
            nesterov=True,
        )
        total = config.epochs * steps_per_epoch
        warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_linear_decay(total, warmup))
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=runtime.device.type == "cuda")

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        self.trained.train()
        with self.autocast:
            logits = self.trained(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.runtime.is_main:
            return {}
        self.model.eval()
        test_accuracy = accuracy(self.model, self.test, self.runtime.device, self.config.image_size)
        save_model(
            self.out / "classifier",
            self.model,
            kind="classifier",
            arch=self.config.arch,
            arch_kwargs=self.arch_kwargs,
            classes=self.classes,
            image_size=self.config.image_size,
            recipe={"command": "classifier", **dataclasses.asdict(self.config)},
            metrics={"epoch": epoch + 1, "test_accuracy": test_accuracy, "eval_images": len(self.test)},
        )
        return {
            "test_accuracy": test_accuracy,
            "eval_images": len(self.test),
            "lr": self.scheduler.get_last_lr()[0],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build(config: ClassifierConfig, runtime: Runtime, out: Path) -> tuple[ClassifierTask, BatchLoader]:
    train, test = config.data.load()
    loader_config = LoaderConfig(
        batch_size=config.batch_size, image_size=config.image_size, augment=True, crop_pad=config.crop_pad
    )
    loader = BatchLoader(train, loader_config, runtime.device, config.seed, runtime.rank, runtime.world_size)
    return ClassifierTask(config, runtime, train, test, len(loader), out), loader
