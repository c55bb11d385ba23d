"""`atop-train pipeline`: train the defended pipeline's classifier (and, optionally, its purifier) on what the
server runs: RT -> purifier -> classifier, with adversarial examples made through that whole pipeline.

AToP (`atop-train finetune`) freezes the classifier and trains the purifier. Here the classifier learns the
purifier's output (its blur and its inpainted holes, which a classifier trained on clean images never saw)
and, with `--adv-kind`, adversarial examples made through the whole randomized pipeline: adversarial training
of the defended model itself. `--train-purifier` also trains the purifier on the classification loss, held to
the clean image by L1 so that it stays a purifier. Writes `<out>/classifier` and `<out>/purifier` (whose record
carries the RT trained with): a pair that atop-export and atop-eval take as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from atop_models.data import BatchLoader, ImageArrays, LoaderConfig
from atop_models.defended import LoadedDefense, load_defended
from atop_models.evaluation.statistics import accuracy
from atop_models.pipeline import PipelineConfig, compose
from atop_models.rt import RTConfig
from atop_models.runtime import Runtime
from atop_models.train import common
from atop_models.train.adversarial import AdversarialConfig
from atop_models.train.classifier import airbench_sgd, triangle
from atop_models.train.common import DataConfig, DivergenceGuard, pgd_check
from atop_models.train.options import help_field
from atop_models.train.purifier import l1_loss


@dataclass(frozen=True)
class PipelineTrainConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rt: RTConfig = dataclasses.field(default_factory=RTConfig)
    output: Literal["full", "composite"] = help_field(
        "full", "what the classifier sees: the whole purifier output, or only its holes pasted into the RT'd image"
    )
    classifier: str = help_field("", "starting classifier checkpoint (required)")
    purifier: str = help_field("", "starting purifier checkpoint (required); --rt-* replace its RT settings")
    train_purifier: bool = help_field(False, "also train the purifier (CE + L1 to the clean image); else frozen")
    purifier_lr: float = help_field(1e-4, "Adam lr of the purifier when trained (the paper's fine-tuning lr)")
    l1_weight: float = help_field(
        1.0, "weight of L1(coarse, x) + L1(refined, x) on the [-1,1] scale, x clean (trained purifier only)"
    )
    epochs: int = help_field(2, "passes over the train split")
    batch_size: int = help_field(128, "images per step per process (smaller than from scratch: more steps)")
    lr: float = help_field(
        0.5, "peak SGD lr of the classifier per 1024 images (airbench convention; a third of its from-scratch 1.5)"
    )
    bias_lr_scale: float = help_field(64.0, "lr multiplier for BatchNorm biases (airbench)")
    momentum: float = help_field(0.85, "Nesterov momentum (airbench)")
    weight_decay: float = help_field(0.002, "fraction of every weight removed per 1024 images at peak lr (airbench)")
    label_smoothing: float = help_field(0.1, "softens targets (helps adversarial training a little)")
    lr_start: float = help_field(0.2, "lr at step 0, as a fraction of the peak (triangular schedule)")
    lr_peak_at: float = help_field(0.15, "fraction of training at which the lr peaks")
    lr_end: float = help_field(0.0, "lr at the last step, as a fraction of the peak")
    crop_pad: int = help_field(2, "pixels of reflect padding for random-crop augmentation (airbench: 2)")
    adv: AdversarialConfig = dataclasses.field(default_factory=lambda: AdversarialConfig(kind="n-fgsm"))
    eval_robust_images: int = help_field(64, "test images attacked (PGD-EOT through the pipeline) after each epoch")
    eval_attack_steps: int = help_field(10, "steps of that check's PGD (step 2.5 epsilon / steps)")
    eval_attack_eot: int = help_field(2, "RT draws per gradient in that check")
    eval_epsilon: float = common.eval_epsilon_field()
    leak_check_images: int = common.leak_check_field()
    collapse_drop: float = common.collapse_drop_field()
    seed: int = help_field(0, "seeds data order, RT draws and attacks")


class PipelineTask:
    def __init__(
        self,
        config: PipelineTrainConfig,
        runtime: Runtime,
        defended: LoadedDefense,
        test: ImageArrays,
        steps_per_epoch: int,
        out: Path,
    ) -> None:
        self.config, self.runtime, self.test, self.out = config, runtime, test, out
        self.classifier_in, self.purifier_in = defended.classifier, defended.purifier
        device = runtime.device
        # Moved in place: the pipeline holds these very modules.
        self.classifier = defended.classifier.model.to(device, memory_format=torch.channels_last)
        self.purifier = defended.purifier.model.to(device).requires_grad_(config.train_purifier)
        self.pipeline = defended.pipeline
        self.classifier_train = runtime.wrap(self.classifier)
        self.purifier_train = runtime.wrap(self.purifier) if config.train_purifier else self.purifier
        self.optimizer = airbench_sgd(
            self.classifier,
            config.lr,
            config.bias_lr_scale,
            config.weight_decay,
            config.momentum,
            config.batch_size * runtime.world_size,
        )
        self.purifier_optimizer = (
            torch.optim.Adam(self.purifier.parameters(), lr=config.purifier_lr, betas=(0.5, 0.999))
            if config.train_purifier
            else None
        )
        schedule = triangle(config.epochs * steps_per_epoch, config.lr_start, config.lr_peak_at, config.lr_end)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.guard = DivergenceGuard(config.collapse_drop, config.leak_check_images)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        config = self.config
        x_in = config.adv.perturb(self.pipeline, x, y)
        self.classifier_train.train()
        self.purifier.train(config.train_purifier)
        x_rt, mask = self.pipeline.rt(x_in)
        metrics: dict[str, float] = {}
        with torch.set_grad_enabled(config.train_purifier):
            coarse, refined = self.purifier_train(x_rt, mask)
            seen = compose(x_rt, mask, refined, config.output)
        logits = self.classifier_train(seen.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        metrics["ce"] = loss.item()
        if self.purifier_optimizer is not None:
            l1 = l1_loss(coarse, x) + l1_loss(refined, x)
            loss = loss + config.l1_weight * l1
            metrics["l1"] = l1.item()
            self.purifier_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.purifier_optimizer is not None:
            self.purifier_optimizer.step()
        self.scheduler.step()
        return metrics | {"accuracy": (logits.argmax(1) == y).float().mean().item()}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.runtime.is_main:
            return {}
        config, device = self.config, self.runtime.device
        self.pipeline.eval()
        size = self.classifier_in.record["image_size"]
        clean = accuracy(self.pipeline, self.test, device, size)
        metrics: dict[str, Any] = {"pipeline_accuracy": clean, "eval_images": len(self.test)}
        if config.eval_robust_images:
            metrics |= pgd_check(
                self.pipeline,
                self.test,
                device,
                size,
                images=config.eval_robust_images,
                epsilon=config.eval_epsilon,
                steps=config.eval_attack_steps,
                eot=config.eval_attack_eot,
            )
        metrics |= self.guard.check(self.pipeline, config.adv, self.test, device, size, clean)
        if "halted" not in metrics:  # a diverged epoch's pair is not saved over the previous epoch's
            self._save(epoch, metrics)
        return metrics | {"lr": self.scheduler.get_last_lr()[-1]}

    def _save(self, epoch: int, metrics: dict[str, Any]) -> None:
        recipe = {"command": "pipeline", **dataclasses.asdict(self.config)}
        lineage = {
            "classifier": {"path": self.classifier_in.path, "sha256": self.classifier_in.record["weights_sha256"]},
            "purifier": {
                "path": self.purifier_in.path,
                "sha256": self.purifier_in.record["weights_sha256"],
                "lineage": self.purifier_in.record.get("lineage", {}),
            },
        }
        common = {
            "image_size": self.classifier_in.record["image_size"],
            "classes": self.classifier_in.record["classes"],
            "recipe": recipe,
            "metrics": {"epoch": epoch + 1, **metrics},
            "lineage": lineage,
        }
        purifier_extra = {
            "rt": self.config.rt.to_dict(),
            "pipeline": dataclasses.asdict(PipelineConfig(self.config.output)),
        }
        self.classifier_in.save(self.out / "classifier", "classifier", **common)
        self.purifier_in.save(self.out / "purifier", "purifier", **common, **purifier_extra)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "classifier": self.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_pipeline_accuracy": self.guard.best,
        }
        if self.purifier_optimizer is not None:
            state |= {
                "purifier": self.purifier.state_dict(),
                "purifier_optimizer": self.purifier_optimizer.state_dict(),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.best = state["best_pipeline_accuracy"]
        if self.purifier_optimizer is not None:
            self.purifier.load_state_dict(state["purifier"])
            self.purifier_optimizer.load_state_dict(state["purifier_optimizer"])


def build(config: PipelineTrainConfig, runtime: Runtime, out: Path) -> tuple[PipelineTask, BatchLoader]:
    if not config.classifier or not config.purifier:
        raise SystemExit("pipeline needs --classifier and --purifier (the checkpoints to start from)")
    # --rt-* and --output replace the purifier's recorded settings; training draws RT once per image.
    defended = load_defended(config.classifier, config.purifier, rt=config.rt, output=config.output, draws=1)
    train, test = config.data.load()
    if train.classes != defended.classes:
        raise SystemExit(f"classifier {config.classifier} was trained on other classes than {config.data.source}")
    loader_config = LoaderConfig(
        batch_size=config.batch_size,
        image_size=defended.image_size,
        augment=True,
        crop_pad=config.crop_pad,
        flip="random",
    )
    loader = BatchLoader(train, loader_config, runtime.device, config.seed, runtime.rank, runtime.world_size)
    return PipelineTask(config, runtime, defended, test, len(loader), out), loader
