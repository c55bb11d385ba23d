"""The evaluation loop: every (defense, attack, norm, epsilon) row on the same test images, batch by batch.

Progress is appended to <out>/progress.jsonl after every batch, so an interrupted evaluation resumes where it
stopped, and a finished one takes new rows (another attack, defense or epsilon) beside its old ones. Each
batch's attack is seeded from (seed, row, batch): rerunning a row reproduces it. Each record carries
fingerprints of the weights its defense was built from and of its batch's images: resuming with other
checkpoints, another data set or another --batch-size stops with an error instead of mixing two models' or two
image sets' figures in one row.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from atop_models.attacks import Norm
from atop_models.checkpoint import read_config
from atop_models.data import BatchLoader, ImageArrays, LoaderConfig
from atop_models.evaluation import defenses, named_attacks
from atop_models.evaluation.statistics import encode_mask, wilson95


@dataclass(frozen=True)
class Row:
    defense: str
    attack: named_attacks.AttackSpec
    norm: Norm
    epsilon: float

    @property
    def randomized(self) -> bool:
        return self.defense != "undefended"  # every other defense draws RT

    @property
    def key(self) -> str:
        return f"{self.defense}|{self.attack.name}|{self.attack.steps}|{self.attack.eot}|{self.norm}|{self.epsilon:.6g}"


@dataclass(frozen=True)
class EvalConfig:
    checkpoints: defenses.Checkpoints
    defenses: tuple[str, ...] = ("undefended", "rt", "rt+pretrained", "rt+atop")
    attacks: tuple[str, ...] = ("pgd-eot",)
    norms: tuple[Norm, ...] = ("linf",)
    linf_epsilons: tuple[float, ...] = (8 / 255,)
    l2_epsilons: tuple[float, ...] = (0.5,)
    pgd_steps: int = 200  # Lee & Kim 2023's PGD-EOT
    apgd_steps: int = 100  # AutoAttack's rand version (upstream ran 10)
    eot: int = 20  # RT draws averaged per gradient
    batch_size: int = 64
    seed: int = 0
    grid_images: int = 8  # images in each defense's example grid
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the report (data, command)

    def rows(self) -> list[Row]:
        specs = [named_attacks.parse(a, self.pgd_steps, self.apgd_steps, self.eot) for a in self.attacks]
        epsilons = {"linf": self.linf_epsilons, "l2": self.l2_epsilons}
        return [Row(d, s, n, e) for d in self.defenses for s in specs for n in self.norms for e in epsilons[n]]


def _fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def _models_fingerprint(defense: str, checkpoints: defenses.Checkpoints) -> str:
    weights = [read_config(path)["weights_sha256"] for path in defenses.sources(defense, checkpoints)]
    return _fingerprint(*(sha.encode() for sha in weights))


def _check_resumable(record: dict, stamp: dict[str, str], progress: Path, row: Row, batch: int) -> None:
    """Stop when a kept record was measured on other weights or images than this run would use. Records written
    before fingerprints were kept have none and are taken as they are."""
    for key, what in (("models", "checkpoints"), ("images", "images (another data set, or another --batch-size)")):
        if record.get(key, stamp[key]) != stamp[key]:
            raise SystemExit(
                f"{progress}: {row.key}, batch {batch}, was measured on other {what} than this run's; "
                "give another --out (or remove that file to start over)"
            )


def _check_budget(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm, epsilon: float, row: Row) -> None:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    if (size > epsilon * (1 + 1e-4) + 1e-6).any() or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"{row.key}: the attack left the {norm} ball of {epsilon:.4g} or [0,1]")


def example_stem(defense: str) -> str:
    """File name, without suffix, of a defense's example grid (.png) and of the batch it is drawn from."""
    return "examples_" + defense.replace("+", "_").replace("@", "_")


def example_batch_file(out: Path, defense: str) -> Path:
    """Where a defense's first attacked batch (clean and adversarial images) is kept for its grid."""
    return out / f"{example_stem(defense)}.safetensors"


def _attack_batch(
    config: EvalConfig,
    row: Row,
    defense: torch.nn.Module,
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One batch of one row, seeded from (seed, row, batch): its progress record and its adversarial images."""
    torch.manual_seed(config.seed * 1_000_003 + zlib.crc32(row.key.encode()) + batch)
    with torch.no_grad():
        clean_ok = defense(x).argmax(1) == y
    x_adv = named_attacks.run(
        row.attack, defense, classifier, x, y, row.norm, row.epsilon, row.randomized, config.seed + batch
    )
    _check_budget(x, x_adv, row.norm, row.epsilon, row)
    with torch.no_grad():
        adv_ok = defense(x_adv).argmax(1) == y
    record = {
        "row": row.key,
        "batch": batch,
        "n": len(y),
        "clean": int(clean_ok.sum()),
        "robust": int((clean_ok & adv_ok).sum()),
        "robust_mask": encode_mask((clean_ok & adv_ok).tolist()),
    }
    return record, x_adv


def evaluate(
    config: EvalConfig, data: ImageArrays, out: Path, device: torch.device
) -> tuple[list[dict], dict[str, tuple]]:
    """Run every row (resuming), return (result rows, the built defenses by name). Each defense's first attacked
    batch is kept in example_batch_file(out, defense) for its image grid."""
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "progress.jsonl"
    done: dict[tuple[str, int], dict] = {}
    if progress.exists():
        for line in progress.read_text().splitlines():
            record = json.loads(line)
            done[(record["row"], record["batch"])] = record
    size = data.images.shape[-1]
    loader = BatchLoader(data, LoaderConfig(config.batch_size, size, shuffle=False, drop_last=False), device)
    built: dict[str, tuple] = {}
    models: dict[str, str] = {}  # each built defense's weights fingerprint
    results = []
    rows = config.rows()
    for row in tqdm(rows, desc="rows", unit="row"):
        if row.defense not in built:
            built[row.defense] = defenses.build(row.defense, config.checkpoints, device)
            models[row.defense] = _models_fingerprint(row.defense, config.checkpoints)
        defense, classifier = built[row.defense]
        clean = robust = n = 0
        masks: list[str] = []
        for batch, (x, y) in enumerate(tqdm(loader, desc=row.key, leave=False, unit="batch")):
            images = _fingerprint(x.cpu().numpy().tobytes(), y.cpu().numpy().tobytes())
            stamp = {"models": models[row.defense], "images": images}
            record = done.get((row.key, batch))
            if record is not None:
                _check_resumable(record, stamp, progress, row, batch)
            else:
                record, x_adv = _attack_batch(config, row, defense, classifier, x, y, batch)
                record |= stamp
                with open(progress, "a") as f:
                    f.write(json.dumps(record) + "\n")
                grid = example_batch_file(out, row.defense)
                if batch == 0 and row.attack.adaptive and not grid.exists():
                    # On disk, not in memory: a resumed evaluation still draws the grids of rows finished before.
                    keep = {"x": x[: config.grid_images], "x_adv": x_adv[: config.grid_images]}
                    save_file({k: v.detach().cpu().contiguous() for k, v in keep.items()}, grid)
            clean, robust, n = clean + record["clean"], robust + record["robust"], n + record["n"]
            masks.append(record.get("robust_mask", ""))  # absent in progress files written before masks were kept
        results.append(
            {
                "defense": row.defense,
                "attack": row.attack.label,
                "attack_name": row.attack.name,
                "adaptive": row.attack.adaptive,
                "steps": row.attack.steps,
                "eot": row.attack.eot if row.randomized else 1,
                "norm": row.norm,
                "epsilon": row.epsilon,
                "n": n,
                "clean_accuracy": clean / n,
                "robust_accuracy": robust / n,
                "ci95": wilson95(robust, n),
                # Per image, in order: 1 = robust. Lets rows be combined (report.worst_case) and re-analysed.
                "robust_mask": "".join(masks) if all(masks) else None,
            }
        )
    return results, built
