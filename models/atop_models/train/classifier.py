"""`atop-train classifier`: supervised training of the classifier, airbench94 style: SGD-Nesterov with a
triangular lr schedule and a boosted lr for BatchNorm biases, label smoothing, a data-whitened fixed stem,
random crop + flip. The defaults are tuned for the airbench network; for resnet18 lower --lr (e.g. 0.4)
and --bias-lr-scale (e.g. 1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from atop_models.checkpoint import save_model
from atop_models.classifiers import CLASSIFIERS
from atop_models.data import BatchLoader, ImageArrays, LoaderConfig
from atop_models.evaluation.statistics import accuracy
from atop_models.runtime import Runtime
from atop_models.train import common
from atop_models.train.adversarial import AdversarialConfig
from atop_models.train.common import DataConfig, DivergenceGuard, pgd_check
from atop_models.train.options import help_field


@dataclass(frozen=True)
class ClassifierConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    arch: str = help_field("airbench", "classifier architecture: airbench (fast CPU default) or resnet18")
    arch_kwargs: dict = help_field({}, 'extra constructor arguments, e.g. {"widths": [64, 256, 256]}')
    image_size: int = help_field(32, "pixels the classifier sees (batches are resized to it on the device)")
    epochs: int = help_field(20, "passes over the train split (airbench94: ~10 for 94% with TTA on PNG CIFAR)")
    batch_size: int = help_field(512, "images per step per process (512: fastest on a 2-core CPU, measured)")
    lr: float = help_field(
        1.5,
        "peak SGD lr for a mean loss over a batch of 1024 (airbench94's 11.5 per 1024 "
        "examples, decoupled from momentum 0.85); scaled linearly with the global batch",
    )
    bias_lr_scale: float = help_field(64.0, "lr multiplier for BatchNorm biases (airbench: they move too slowly)")
    momentum: float = help_field(0.85, "Nesterov momentum")
    weight_decay: float = help_field(
        0.002,
        "fraction of every weight removed per 1024 images at peak lr (airbench94: 0.0153 x 1024 / 7850), "
        "all parameters; per step it scales with the global batch",
    )
    label_smoothing: float = help_field(0.2, "softens targets; helps the short schedule and calibration")
    lr_start: float = help_field(0.2, "lr at step 0, as a fraction of the peak (triangular schedule)")
    lr_peak_at: float = help_field(0.23, "fraction of training at which the lr peaks")
    lr_end: float = help_field(0.07, "lr at the last step, as a fraction of the peak")
    whiten_init: bool = help_field(True, "initialize airbench's 2x2 stem from the data's patch statistics")
    whiten_images: int = help_field(5000, "class-balanced train images the stem's statistics come from (airbench)")
    whiten_bias_epochs: int = help_field(3, "epochs the stem's bias trains before it is frozen (airbench: 3)")
    lookahead_every: int = help_field(
        5,
        "steps between Lookahead syncs: an EMA of all weights and BN statistics, copied back into the net "
        "(airbench94; the run ends on the EMA); 0: off",
    )
    lookahead_decay: float = help_field(
        0.95, "per-step EMA decay at the end of training, scaled by (step/total)^3 before (airbench94)"
    )
    crop_pad: int = help_field(2, "pixels of reflect padding for random-crop augmentation (airbench: 2)")
    flip: Literal["random", "alternate"] = help_field(
        "alternate", "mirror a fresh coin per view, or each image alternately by epoch (airbench: alternate)"
    )
    adv: AdversarialConfig = dataclasses.field(default_factory=AdversarialConfig)
    eval_robust_images: int = help_field(
        0,
        "test images attacked with PGD (at --eval-epsilon) after each epoch; 0: none. "
        "Long adversarial runs can lose robustness late while clean accuracy still rises (robust overfitting)",
    )
    eval_attack_steps: int = help_field(10, "steps of that check's PGD (step 2.5 epsilon / steps)")
    eval_epsilon: float = common.eval_epsilon_field()
    leak_check_images: int = common.leak_check_field()
    collapse_drop: float = common.collapse_drop_field()
    precision: Literal["auto", "fp32", "bf16"] = help_field(
        "auto",
        "the training step's forward and backward: bf16 autocast, fp32, or auto (bf16 on CUDA, fp32 on a CPU). "
        "The attacks and checks always run in fp32. Every H200 run in bf16 leaked the label in its last epoch "
        "(docs/robustness.md, the width lever): fp32 makes a GPU run comparable with the CPU's",
    )
    seed: int = help_field(0, "seeds data order, init and augmentation")


def triangle(total_steps: int, start: float, peak_at: float, end: float) -> Any:
    """LR factor: linear from `start` to 1 at `peak_at` of training, then linear to `end`."""
    peak = max(1, round(peak_at * total_steps))

    def factor(step: int) -> float:
        if step < peak:
            return start + (1.0 - start) * step / peak
        return 1.0 + (end - 1.0) * min(1.0, (step - peak) / max(1, total_steps - peak))

    return factor


def airbench_sgd(
    model: nn.Module, lr: float, bias_lr_scale: float, weight_decay: float, momentum: float, global_batch: int
) -> torch.optim.SGD:
    """airbench's SGD-Nesterov: lr and weight decay are set per 1024 images, BatchNorm biases get a boosted lr."""
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in norm_biases)]
    per_1024 = global_batch / 1024
    lr = lr * per_1024
    bias_lr = lr * bias_lr_scale
    decay = weight_decay * per_1024
    # torch's SGD decays by lr * weight_decay per step: divide, so the decay per step is the configured one.
    return torch.optim.SGD(
        [
            {"params": norm_biases, "lr": bias_lr, "weight_decay": decay / bias_lr},
            {"params": others, "lr": lr, "weight_decay": decay / lr},
        ],
        momentum=momentum,
        nesterov=True,
    )


class Lookahead:
    """airbench94's Lookahead: an exponential moving average of every float tensor of the net's state (weights
    and BatchNorm statistics), written back into the net at each sync, so the net restarts from the average."""

    def __init__(self, model: nn.Module) -> None:
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def sync(self, model: nn.Module, decay: float) -> None:
        state = model.state_dict()
        for name, average in self.average.items():
            average.lerp_(state[name], 1.0 - decay)
            state[name].copy_(average)


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
        whitened = config.whiten_init and hasattr(model, "init_whitening")
        if whitened:
            # Class-balanced: ImageFolder and archive splits come sorted by class, so their first images are
            # all of one class (e.g. sky-heavy airplanes), whose patch statistics whiten other classes badly.
            model.init_whitening(train.subset(config.whiten_images).images.float() / 255.0)
        # channels_last: ~1.4x faster convolutions on this CPU (oneDNN) and on GPUs (tensor cores).
        self.model = model.to(runtime.device, memory_format=torch.channels_last)
        self.whiten_bias = model.whiten.bias if whitened else None
        self.total_steps = config.epochs * steps_per_epoch
        self.lookahead = Lookahead(self.model) if config.lookahead_every else None
        self.trained = runtime.wrap(self.model)
        self.optimizer = airbench_sgd(
            self.model,
            config.lr,
            config.bias_lr_scale,
            config.weight_decay,
            config.momentum,
            config.batch_size * runtime.world_size,
        )
        schedule = triangle(self.total_steps, config.lr_start, config.lr_peak_at, config.lr_end)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        bf16 = config.precision == "bf16" or (config.precision == "auto" and runtime.device.type == "cuda")
        self.autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.guard = DivergenceGuard(config.collapse_drop, config.leak_check_images)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        x = self.config.adv.perturb(self.model, x, y)
        self.trained.train()
        with self.autocast:
            logits = self.trained(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.whiten_bias is not None and epoch >= self.config.whiten_bias_epochs:
            self.whiten_bias.grad = None  # frozen: SGD skips it (no step, no decay); works under DDP too
        self.optimizer.step()
        self.scheduler.step()
        self._lookahead_step()
        return {"loss": loss.item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}

    def _lookahead_step(self) -> None:
        if self.lookahead is None:
            return
        every, step = self.config.lookahead_every, self.scheduler.last_epoch  # last_epoch: steps taken
        if step % every == 0:
            # airbench94: decay**every per sync, times a cubic ramp (early syncs barely average).
            ramp = (step / self.total_steps) ** 3
            self.lookahead.sync(self.model, decay=self.config.lookahead_decay**every * ramp)
        if step >= self.total_steps:
            # The run ends on the average; a regular sync on this step (above) has blended its last steps in.
            self.lookahead.sync(self.model, decay=1.0)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.runtime.is_main:
            return {}
        config, device = self.config, self.runtime.device
        self.model.eval()
        test_accuracy = accuracy(self.model, self.test, device, config.image_size)
        metrics: dict[str, Any] = {"test_accuracy": test_accuracy, "eval_images": len(self.test)}
        if config.eval_robust_images:
            metrics |= pgd_check(
                self.model,
                self.test,
                device,
                config.image_size,
                images=config.eval_robust_images,
                epsilon=config.eval_epsilon,
                steps=config.eval_attack_steps,
                eot=1,  # the classifier alone is deterministic
            )
        metrics |= self.guard.check(self.model, config.adv, self.test, device, config.image_size, test_accuracy)
        logged = {"lr": self.scheduler.get_last_lr()[-1]}
        if "halted" in metrics:
            return metrics | logged  # its weights are not saved over the previous epoch's
        save_model(
            self.out / "classifier",
            self.model,
            kind="classifier",
            arch=self.config.arch,
            arch_kwargs=self.arch_kwargs,
            classes=self.classes,
            image_size=self.config.image_size,
            recipe={"command": "classifier", **dataclasses.asdict(self.config)},
            metrics={"epoch": epoch + 1, **metrics},
        )
        return metrics | logged

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"lookahead": self.lookahead.average} if self.lookahead else {}),
            "best_test_accuracy": self.guard.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.lookahead:
            self.lookahead.average = state["lookahead"]
        self.guard.best = state["best_test_accuracy"]


def build(config: ClassifierConfig, runtime: Runtime, out: Path) -> tuple[ClassifierTask, BatchLoader]:
    train, test = config.data.load()
    loader_config = LoaderConfig(
        batch_size=config.batch_size,
        image_size=config.image_size,
        augment=True,
        crop_pad=config.crop_pad,
        flip=config.flip,
    )
    loader = BatchLoader(train, loader_config, runtime.device, config.seed, runtime.rank, runtime.world_size)
    return ClassifierTask(config, runtime, train, test, len(loader), out), loader
