"""`atop-train pretrain` and `atop-train finetune`: the purifier's GAN training, without and with AToP.

pretrain: the purifier learns to undo RT (noise + holes): L1 on both stages to the clean image + hinge GAN
loss against an SN-PatchGAN, whose gradient reaches the generator (upstream defect 1).
finetune (AToP): the classifier is frozen; the purifier's input is RT(x_adv) and its loss gains
lambda * CE(f(G(RT(x_adv))), y). x_adv is PGD with EOT over RT draws through the WHOLE current pipeline
(default), or FGSM on the bare classifier (the paper's mode, kept to reproduce it; a transfer attack).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from atop_models.attacks import FGSM, PGD, EOTGradient
from atop_models.checkpoint import BuiltModel, load_built_model, paths
from atop_models.data import BatchLoader, ImageArrays, LoaderConfig
from atop_models.defended import load_defended
from atop_models.discriminator import DISCRIMINATORS, hinge_d_loss, hinge_g_loss
from atop_models.evaluation.statistics import accuracy, robust_accuracy
from atop_models.pipeline import DefendedClassifier, PipelineConfig, compose
from atop_models.purifiers import PURIFIERS
from atop_models.rt import RandomTransform, RTConfig
from atop_models.runtime import Runtime
from atop_models.train.common import DataConfig
from atop_models.train.options import help_field


@dataclass(frozen=True)
class PurifierTrainConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rt: RTConfig = dataclasses.field(default_factory=RTConfig)
    image_size: int = help_field(32, "pixels; must be divisible by the RT grid and by 8 (the purifier's strides)")
    output: Literal["full", "composite"] = help_field(
        "full",
        "what the classifier sees: the whole purifier output, or only its holes pasted into the RT'd image",
    )
    epochs: int = help_field(10, "passes over the train split")
    batch_size: int = help_field(64, "images per step per process (upstream: 8 at 256 px)")
    lr: float = help_field(1e-4, "Adam learning rate of generator and discriminator (paper)")
    beta1: float = help_field(0.5, "Adam beta1 (paper; GAN training prefers short momentum)")
    beta2: float = help_field(0.999, "Adam beta2 (paper)")
    l1_coarse_weight: float = help_field(1.0, "weight of L1(coarse, x) on the [-1,1] scale (paper: 1)")
    l1_refine_weight: float = help_field(1.0, "weight of L1(refined, x) on the [-1,1] scale (paper: 1)")
    gan_weight: float = help_field(
        0.1,
        "weight of the generator's hinge GAN loss (paper: 1, but upstream's GAN term never reached G; at 1 the "
        "refinement stage stalls when trained from scratch: test L1 0.243 vs 0.114 at 0.1 after 160 steps)",
    )
    classifier: str = help_field("", "classifier checkpoint; pretrain: optional, to report pipeline accuracy")
    disc_cnum: int = help_field(64, "discriminator base width (pretrain, or finetune with --discriminator new)")
    disc_layers: int = help_field(4, "discriminator stride-2 layers (DeepFillv2: 6 at 256 px; 4 at 32 px)")
    seed: int = help_field(0, "seeds data order, init, RT draws and attacks")


@dataclass(frozen=True)
class PretrainConfig(PurifierTrainConfig):
    lr: float = help_field(1e-3, "Adam learning rate (paper: 1e-4 from Places2 weights; we start from scratch)")
    arch: str = help_field("deepfillv2", "purifier architecture: deepfillv2, or unet (skip connections, one stage)")
    cnum: int = help_field(32, "deepfillv2's width (DeepFillv2: 48; 32 is ~2x cheaper at 32 px)")
    dilations: tuple[int, ...] = help_field((2, 4, 8, 16), "deepfillv2's dilation of each bottleneck convolution")
    arch_kwargs: dict = help_field({}, 'other constructor arguments, e.g. {"width": 32} for unet')


@dataclass(frozen=True)
class FinetuneConfig(PurifierTrainConfig):
    purifier: str = help_field("", "pretrained purifier checkpoint to fine-tune (required)")
    discriminator: str = help_field(
        "",
        "discriminator checkpoint; default: the one beside --purifier; 'new': a freshly initialized one "
        "(the shipped purifiers in models/zoo come without their discriminators, to keep the zoo small)",
    )
    ce_weight: float = help_field(0.05, "lambda: weight of CE(f(G(RT(x_adv))), y) (paper: 0.05)")
    ce_warmup_epochs: int = help_field(2, "epochs of plain GAN + L1 training on clean inputs first (upstream: 2)")
    attack: Literal["pgd-pipeline", "fgsm-classifier"] = help_field(
        "pgd-pipeline",
        "how x_adv is made: PGD-EOT through the whole pipeline, or FGSM on the bare classifier",
    )
    epsilon: float = help_field(8 / 255, "l_inf radius of x_adv on the [0,1] scale")
    attack_steps: int = help_field(10, "PGD steps per batch (pgd-pipeline)")
    attack_step_size: float = help_field(2 / 255, "PGD step size on the [0,1] scale")
    attack_eot: int = help_field(1, "RT draws averaged per PGD gradient (fresh draws every step as well)")
    eval_robust_images: int = help_field(64, "test images attacked (PGD-EOT through the pipeline) after each epoch")


def l1_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 2.0 * (prediction - target).abs().mean()  # x2: the [-1,1] scale that upstream's loss weights assume


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class PretrainTask:
    """The purifier's GAN training on RT'd clean images; with a classifier, the pipeline's accuracy is reported."""

    def __init__(
        self,
        config: PurifierTrainConfig,
        runtime: Runtime,
        test: ImageArrays,
        out: Path,
        generator: BuiltModel,
        discriminator: BuiltModel,
        classifier: BuiltModel | None,
        lineage: dict[str, Any],
    ) -> None:
        self.config, self.runtime, self.test, self.out, self.lineage = config, runtime, test, out, lineage
        device = runtime.device
        self.generator, self.discriminator = generator, discriminator
        self.G, self.D = generator.model.to(device), discriminator.model.to(device)
        self.G_train, self.D_train = runtime.wrap(self.G), runtime.wrap(self.D)
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=config.lr, betas=betas)
        self.rt = RandomTransform(config.rt)
        self.classifier: nn.Module | None = None
        self.pipeline: DefendedClassifier | None = None
        self.classes: list[str] | None = None
        if classifier is not None:
            self.classifier = _frozen(classifier.model.to(device))
            self.classes = classifier.record["classes"]
            self.pipeline = DefendedClassifier(self.rt, self.G, self.classifier, PipelineConfig(config.output))

    # -- one step ----------------------------------------------------------------------------------------
    def purifier_input(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        """The images the purifier learns to restore this step: the clean ones."""
        return x

    def add_classification_term(
        self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's loss with a term on what the classifier sees, and that term's metrics: none here."""
        return loss, {}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]:
        x_in = self.purifier_input(x, y, epoch)
        self.G_train.train()
        self.D_train.train()
        x_rt, mask = self.rt(x_in)
        coarse, refined = self.G_train(x_rt, mask)
        out = compose(x_rt, mask, refined, self.config.output)

        # Discriminator: real = clean image, fake = purifier output, one batch so DDP syncs once.
        scores = self.D_train(torch.cat([x, out.detach()]), torch.cat([mask, mask]))
        d_loss = hinge_d_loss(*scores.chunk(2))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        # Generator: the GAN term is NOT detached, so its gradient reaches G; D is held fixed for it.
        self.D.requires_grad_(False)
        g_gan = hinge_g_loss(self.D(out, mask))
        self.D.requires_grad_(True)
        l1_coarse, l1_refine = l1_loss(coarse, x), l1_loss(refined, x)
        loss = self.config.gan_weight * g_gan
        loss = loss + self.config.l1_coarse_weight * l1_coarse + self.config.l1_refine_weight * l1_refine
        loss, ce_metrics = self.add_classification_term(loss, out, y, epoch)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        losses = {"d_loss": d_loss, "g_gan": g_gan, "l1_coarse": l1_coarse, "l1_refine": l1_refine}
        return {k: v.item() for k, v in losses.items()} | ce_metrics | {"g_loss": loss.item()}

    # -- evaluation and artifacts -------------------------------------------------------------------------
    @torch.no_grad()
    def _reconstruction(self) -> tuple[float, torch.Tensor]:
        loader_config = LoaderConfig(batch_size=250, image_size=self.config.image_size, shuffle=False, drop_last=False)
        total, grid = 0.0, None
        for x, _ in BatchLoader(self.test, loader_config, self.runtime.device):
            x_rt, mask = self.rt(x)
            out = compose(x_rt, mask, self.G(x_rt, mask)[1], self.config.output)
            total += float((out - x).abs().mean()) * len(x)
            if grid is None:
                grid = torch.cat([x[:8], x_rt[:8], out[:8]])
        assert grid is not None
        return total / len(self.test), grid

    def evaluate(self) -> dict[str, Any]:
        """Test metrics after an epoch (rank 0); writes samples.png."""
        self.G.eval()
        l1, grid = self._reconstruction()
        save_image(grid, self.out / "samples.png", nrow=8)  # rows: clean, after RT, purified
        metrics: dict[str, Any] = {"test_l1": l1, "eval_images": len(self.test)}
        if self.pipeline is not None:
            size = self.config.image_size
            metrics["pipeline_accuracy"] = accuracy(self.pipeline, self.test, self.runtime.device, size)
        return metrics

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.runtime.is_main:
            return {}
        metrics = self.evaluate()
        self._save(epoch, metrics)
        return metrics

    def _save(self, epoch: int, metrics: dict[str, Any]) -> None:
        common = {
            "image_size": self.config.image_size,
            "recipe": {"command": type(self.config).__name__, **dataclasses.asdict(self.config)},
            "metrics": {"epoch": epoch + 1, **metrics},
            "lineage": self.lineage,
        }
        extra = {
            "rt": self.config.rt.to_dict(),
            "pipeline": dataclasses.asdict(PipelineConfig(self.config.output)),
        }
        if self.classes is not None:
            extra["classes"] = self.classes
        self.generator.save(self.out / "purifier", "purifier", **common, **extra)
        self.discriminator.save(self.out / "discriminator", "discriminator", **common)

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


class FinetuneTask(PretrainTask):
    """AToP: pretraining's losses plus lambda * CE(f(G(RT(x_adv))), y) through the frozen classifier, once the
    warm-up epochs are over; x_adv is made against the current purifier."""

    config: FinetuneConfig
    classifier: nn.Module
    pipeline: DefendedClassifier

    def __init__(
        self,
        config: FinetuneConfig,
        runtime: Runtime,
        test: ImageArrays,
        out: Path,
        generator: BuiltModel,
        discriminator: BuiltModel,
        classifier: BuiltModel,
        lineage: dict[str, Any],
    ) -> None:
        super().__init__(config, runtime, test, out, generator, discriminator, classifier, lineage)
        # Built once: the attacks hold the pipeline, whose purifier trains in place.
        self.check_attack = PGD(
            EOTGradient(self.pipeline, config.attack_eot), config.epsilon, config.attack_step_size, config.attack_steps
        )
        if config.attack == "fgsm-classifier":
            self.train_attack: PGD = FGSM(EOTGradient(self.classifier), config.epsilon)
        else:
            self.train_attack = self.check_attack

    def ce_active(self, epoch: int) -> bool:
        return epoch >= self.config.ce_warmup_epochs

    def purifier_input(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        """x_adv once the CE term is on (clean images during the warm-up). The attack sees the purifier in eval
        mode: the function that is served, whatever mode the last step or evaluation left it in."""
        if not self.ce_active(epoch):
            return x
        self.G.eval()
        return self.train_attack(x, y)

    def add_classification_term(
        self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.ce_active(epoch):
            return loss, {}
        logits = self.classifier(out)
        ce = F.cross_entropy(logits, y)
        metrics = {"ce_adv": ce.item(), "accuracy_adv": (logits.argmax(1) == y).float().mean().item()}
        return loss + self.config.ce_weight * ce, metrics

    def evaluate(self) -> dict[str, Any]:
        metrics = super().evaluate()
        if self.config.eval_robust_images:
            metrics |= self._robust_accuracy()
        return metrics

    def _robust_accuracy(self) -> dict[str, Any]:
        """A quick adaptive check: PGD-EOT through the whole pipeline on a few test images."""
        config = self.config
        subset = self.test.subset(config.eval_robust_images)
        device = self.runtime.device
        robust = robust_accuracy(self.pipeline, self.check_attack, subset, device, config.image_size)
        name = f"robust_accuracy_pgd{config.attack_steps}_eot{config.attack_eot}"
        return {name: robust, "robust_images": len(subset)}


def _check_classifier(classifier: BuiltModel, config: PurifierTrainConfig, classes: list[str]) -> None:
    if classifier.record["image_size"] != config.image_size:
        raise SystemExit(
            f"classifier {classifier.path} was trained at {classifier.record['image_size']} px, "
            f"the pipeline runs at {config.image_size}"
        )
    if classifier.record["classes"] != classes:
        raise SystemExit(f"classifier {classifier.path} was trained on other classes than {config.data.source}")


def _new_discriminator(config: PurifierTrainConfig) -> BuiltModel:
    d_kwargs = {"cnum": config.disc_cnum, "layers": config.disc_layers}
    return BuiltModel(DISCRIMINATORS.create("sn_patchgan", **d_kwargs), "sn_patchgan", d_kwargs)


def _finetune_discriminator(config: FinetuneConfig) -> BuiltModel:
    """--discriminator new, a given checkpoint, or (default) the one that pretraining saved beside --purifier."""
    if config.discriminator == "new":
        return _new_discriminator(config)
    path = config.discriminator or paths(config.purifier)[0].with_name("discriminator")
    try:
        return load_built_model(path, "discriminator")
    except FileNotFoundError as missing:
        raise SystemExit(
            f"{missing} (a shipped purifier comes without its discriminator): "
            "pass --discriminator PATH, or --discriminator new to start a fresh one"
        ) from missing


def _loader(config: PurifierTrainConfig, runtime: Runtime, train: ImageArrays) -> BatchLoader:
    loader_config = LoaderConfig(batch_size=config.batch_size, image_size=config.image_size)
    return BatchLoader(train, loader_config, runtime.device, config.seed, runtime.rank, runtime.world_size)


def build_pretrain(config: PretrainConfig, runtime: Runtime, out: Path) -> tuple[PretrainTask, BatchLoader]:
    train, test = config.data.load()
    loader = _loader(config, runtime, train)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    classifier, lineage = None, {}
    if config.classifier:
        classifier = load_built_model(config.classifier, "classifier")
        _check_classifier(classifier, config, train.classes)
        lineage["classifier"] = {"path": config.classifier, "sha256": classifier.record["weights_sha256"]}
    g_kwargs = {"cnum": config.cnum, "dilations": list(config.dilations)} if config.arch == "deepfillv2" else {}
    g_kwargs |= config.arch_kwargs
    generator = BuiltModel(PURIFIERS.create(config.arch, **g_kwargs), config.arch, g_kwargs)
    discriminator = _new_discriminator(config)
    return PretrainTask(config, runtime, test, out, generator, discriminator, classifier, lineage), loader


def build_finetune(config: FinetuneConfig, runtime: Runtime, out: Path) -> tuple[FinetuneTask, BatchLoader]:
    train, test = config.data.load()
    loader = _loader(config, runtime, train)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    if not config.purifier or not config.classifier:
        raise SystemExit("finetune needs --purifier (a pretrained purifier) and --classifier")
    # load_defended checks that the pair belongs together; the task builds its own pipeline around the purifier it
    # trains, with the trainer's --rt-* and --output.
    defended = load_defended(config.classifier, config.purifier)
    _check_classifier(defended.classifier, config, train.classes)
    lineage = {
        "classifier": {"path": config.classifier, "sha256": defended.classifier.record["weights_sha256"]},
        "discriminator": config.discriminator or "beside --purifier",
        # The starting purifier's own lineage rides along, so a chain of fine-tuning stages stays traceable
        # down to the pretrained purifier.
        "pretrained_purifier": {
            "path": config.purifier,
            "sha256": defended.purifier.record["weights_sha256"],
            "lineage": defended.purifier.record.get("lineage", {}),
        },
    }
    discriminator = _finetune_discriminator(config)
    task = FinetuneTask(config, runtime, test, out, defended.purifier, discriminator, defended.classifier, lineage)
    return task, loader
