"""Run configuration: nested dataclasses, YAML files, ``key=value`` overrides.

A YAML file holds a *diff* from the defaults below (optionally from another file named by a
top-level ``_base_:`` key, resolved relative to the file). Command-line overrides use dotted keys,
``method.alpha=2`` or ``train.epochs=10``; values are parsed as YAML and type-checked.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
The resolved config is written into every run directory (``dump_config``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


# Experiment trackers train.trackers may name (Accelerate's names; see bmb/logs.py).
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")


# YAML 1.1 (PyYAML) reads `1e-3` and `2E5` as strings: its floats need a dot. A float key takes
# them as the numbers they plainly are.
_DOTLESS_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _f(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, choices: tuple | None = None) -> Any:
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    encoder: str = _f("wrn", "encoder: wrn (WRN-28-k), resnet50, small (CPU demo)",
                      choices=("wrn", "resnet50", "small"))
    width: int | None = _f(None, "wrn: widen factor k (default 2); small: base channels (default 32)", ge=1)
    depth: int = _f(28, "wrn depth (6n+4)", ge=10)
    stem: str = _f("small", "resnet50 stem: small (3x3 s1, 32/64 px) or imagenet (7x7 s2 + max-pool, 224 px)",
                   choices=("small", "imagenet"))
    init: str = _f("ours", "initialisation: ours (PyTorch's default heads; resnet50's last BN of each block at "
                            "gamma 0) or authors (their model/*withABC.py: xavier_normal_ heads, zero bias, every BN "
                            "gamma 1)", choices=("ours", "authors"))
    sync_bn: bool = _f(False, "multi-GPU: batch-norm statistics over all ranks' batches (SyncBatchNorm; CUDA only)")
    memory_format: str = _f("auto", "layout of the weights and of the step's input batch: channels_last (NHWC: "
                                    "the layout cuDNN's tensor-core convolutions use natively, so no transposes "
                                    "around each conv under bf16/tf32), contiguous (NCHW), or auto = channels_last "
                                    "on CUDA, contiguous on the CPU (there the CPU step stays exactly what it "
                                    "was); speed only, the same maths up to rounding",
                            choices=("auto", "channels_last", "contiguous"))
    compile: bool = _f(False, "torch.compile the encoder (training mode only: evaluation, the heads and BMB's "
                              "no-grad step stay eager, so BMB's CUDA graphs still work). Fuses batch-norm, "
                              "activation and residual kernels; the first step waits for the compilation "
                              "(seconds to minutes); needs a C++ compiler on the CPU and Triton on a GPU")


@dataclass
class MethodConfig:
    algorithm: str = _f("bmb", "bmb, or fixmatch (the baseline: base head only)", choices=("bmb", "fixmatch"))
    threshold: float = _f(0.95, "confidence threshold tau", gt=0.0, le=1.0)
    alpha: float = _f(1.5, "adaptive-weight spread alpha (w_k = (min N / N_k)^alpha)", ge=0.0)
    adaptive_weights: bool = _f(True, "ablation: adaptive weights on the aux head's losses")
    anneal_weights: bool = _f(False, "authors' option: w' = 1 - (t/T)(1 - w)")
    put_power: float = _f(3.0, "beta: bank enqueue balance power", ge=0.0)
    get_power: float = _f(0.75, "gamma: bank get (reversed sampling) power", ge=0.0)
    lambda_u: float = _f(1.0, "weight of the unlabeled losses", ge=0.0)
    lambda_mb: float = _f(0.25, "weight of the memory-bank loss", ge=0.0)
    use_bank: bool = _f(True, "ablation: the balanced memory bank and its loss")
    bank_size: int = _f(128, "bank capacity", ge=1)
    get_num: int = _f(64, "items drawn from the bank per step (global, like the batches: split over the ranks, "
                          "so a multiple of the number of processes)", ge=1)
    get_replacement: bool = _f(True, "draw the bank's items with replacement, as the authors' code (the "
                                     "paper's gamma values were tuned that way); false: without")
    bank_check_every: int = _f(100, "distributed: compare a bank checksum across ranks every N updates (0: off)", ge=0)
    cuda_graphs: bool = _f(True, "CUDA: replay BMB's per-step no-grad work (N-hat, targets, weights, the "
                                 "bank's draw and enqueue) as CUDA graphs (same results, fewer kernel "
                                 "launches; off: eager)")
    bank_view: str = _f("strong", "which view's features enter the bank: strong (the authors' --tcp_strong) or weak "
                                  "(their SGD scripts, which never pass it)", choices=("strong", "weak"))
    refresh_after_warmup: bool = _f(True, "true: the bank starts empty when warm-up ends (nothing enqueued during "
                                          "warm-up: the authors' --tcp_refresh_after_warm); false: the bank is filled "
                                          "during warm-up (its loss off) and kept, as their scripts without that flag")
    estimate: str = _f("mean", "N-hat estimator: running mean since warm-up, or ema", choices=("mean", "ema"))
    num_strong: int = _f(2, "strong views per unlabeled sample", ge=1)
    warmup_epochs: int = _f(20, "epochs with the unlabeled terms off", ge=0)


@dataclass
class OptimConfig:
    name: str = _f("adamw", "optimiser: adamw (decoupled weight decay: the authors' recipe), adam (L2 added "
                            "to the gradient), sgd", choices=("adamw", "adam", "sgd"))
    lr: float = _f(0.002, "learning rate", gt=0.0)
    momentum: float = _f(0.9, "sgd momentum", ge=0.0, lt=1.0)
    nesterov: bool = _f(False, "sgd nesterov (the authors' SGD scripts use plain momentum)")
    weight_decay: float = _f(0.02, "weight decay (adamw: each step multiplies the weights by 1 - lr x this, as "
                                   "the authors' WeightEMA does with 0.02)", ge=0.0)
    schedule: str = _f("constant", "lr schedule", choices=("constant", "cosine"))
    schedule_unit: str = _f("step", "the cosine moves every step, or once per epoch (the authors' SGD scripts: "
                                    "CosineAnnealingLR stepped per epoch)", choices=("step", "epoch"))
    warmup_steps: int = _f(0, "linear lr warm-up steps", ge=0)


@dataclass
class DataConfig:
    dataset: str = _f("", "dataset directory built by `bmb-shards` (e.g. `bmb-shards demo --out data/demo`), "
                          "or its http(s)://, pipe: or gs:// URL with data.backend=webdataset data.order=stream")
    backend: str = _f("tensor", "input backend", choices=("tensor", "webdataset", "ffcv", "dali"))
    image_size: int = _f(32, "training resolution", ge=8)
    crop: str = _f("translate", "weak crop: translate (32/64 px) or rrc (random-resized-crop, 224 px)",
                   choices=("translate", "rrc"))
    load_size: int = _f(256, "full-res datasets: square size the readers deliver before the crop", ge=8)
    views: str = _f("trainer", "who makes the weak/strong views: trainer (ViewMaker, FixMatch-exact; every preset) or "
                    "loader (data.backend=dali only: the DALI pipeline emits normalised views on the device; its "
                    "RandAugment differs, see docs/fidelity.md)", choices=("trainer", "loader"))
    rand_augment: str = _f("fixmatch", "strong-view RandAugment: fixmatch (2 of 14 ops, magnitude drawn per op, after "
                           "the crop) or authors (the BMB authors' RandAugment(3, 4) of ildoonet/pytorch-"
                           "randaugment: 3 of 16 ops at magnitude 4, before the crop; docs/fidelity.md)",
                           choices=("fixmatch", "authors"))
    cutout: str = _f("random", "strong-view Cutout: random (FixMatch: gray square, side up to half the image), "
                     "fixed (the authors' CutoutDefault: half the side, mean colour; their 32/64 px views) or "
                     "none (their 224 px views)", choices=("random", "fixed", "none"))
    view_rule: str = _f("square", "full-resolution views: square (the readers deliver a load_size centre square, "
                        "weak view = data.crop) or authors_imagenet (the authors' ImageNet views: shorter side "
                        "resized to load_size with the aspect ratio kept, an independent random image_size crop "
                        "per view, flip; evaluation: the centre crop)", choices=("square", "authors_imagenet"))
    mean: list[float] = _f([0.5, 0.5, 0.5], "per-channel normalisation mean (0-1 scale)")
    std: list[float] = _f([0.25, 0.25, 0.25], "per-channel normalisation std (0-1 scale)")
    eval_split: str = _f("test", "split reported as the result")
    val_split: str | None = _f(None, "split used to pick the best checkpoint (ImageNet-LT: val)")
    eval_batch: int = _f(256, "evaluation batch size", ge=1)
    workers: int = _f(2, "reader worker processes (webdataset, ffcv, dali)", ge=0)
    order: str = _f("index", "webdataset: index (seek per sample, exact resume, same batches as tensor) or "
                    "stream (shards split by global worker id, read front to back: for network storage)",
                    choices=("index", "stream"))
    shuffle_buffer: int = _f(1000, "webdataset order=stream: per-worker shuffle buffer (samples)", ge=1)
    on_corrupt: str = _f("error", "an undecodable image in the shards: error (stop, naming shard and key) or "
                         "skip (webdataset: replaced by a valid sample of the batch, logged, counted as "
                         "corrupt_skipped in train.jsonl/metrics.jsonl; refused by ffcv/dali; tensor: no decoding)",
                         choices=("error", "skip"))
    max_pixels: int = _f(1 << 26, "largest image (height x width) decoded; larger: data error naming shard, key", ge=1)


@dataclass
class TrainConfig:
    epochs: int = _f(500, "epochs", ge=1)
    iters_per_epoch: int = _f(500, "steps per epoch", ge=1)
    max_steps: int | None = _f(None, "stop after this many steps (default: epochs x iters_per_epoch)", ge=1)
    labeled_batch: int = _f(64, "labeled batch (global; split over ranks)", ge=1)
    unlabeled_batch: int = _f(64, "unlabeled batch (global; split over ranks)", ge=1)
    ema_decay: float = _f(0.999, "EMA decay of the evaluated model (0: no EMA, the trained model itself is "
                                 "evaluated, as the authors' --disable_ema_model)", ge=0.0, lt=1.0)
    eval_every: int = _f(500, "steps between evaluations", ge=1)
    eval_protocol: str = _f("last20", "result: last20 (mean of the last 20 evaluations), best_val (best-val "
                            "checkpoint, then its test metrics), or best_test (the evaluation with the best top-1 on "
                            "the reported split itself: how the authors selected their ImageNet-LT numbers; "
                            "optimistic, for reproducing them only)", choices=("last20", "best_val", "best_test"))
    many_above: int | None = _f(None, "many-shot: labeled count > this (default: top third of classes)", ge=0)
    few_at_most: int | None = _f(None, "few-shot: labeled count <= this (default: bottom third)", ge=0)
    seed: int = _f(0, "seed of model init, augmentation, sampling and the bank (0 to 2^31-1: every consumer, "
                      "torch and DALI, takes it with the offsets added per rank and stream)", ge=0, le=2**31 - 1)
    out_dir: str = _f("runs", "parent folder of run directories")
    checkpoint_every: int = _f(500, "steps between checkpoints", ge=1)
    keep_checkpoints: int = _f(2, "checkpoints kept", ge=1)
    resume: str = _f("auto", "auto (newest complete checkpoint in the run dir), none, or a checkpoint path")
    allow_config_change: bool = _f(False, "resume even though hyperparameters differ from the checkpoint's "
                                          "(the new values apply; the change is recorded in history.jsonl)")
    allow_dataset_change: bool = _f(False, "resume even though the dataset at data.dataset was rebuilt (its "
                                           "manifest's build_id differs from the checkpoint's; recorded in "
                                           "history.jsonl)")
    log_every: int = _f(50, "steps between scalar logs", ge=1)
    progress: bool = _f(True, "show a progress bar")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)", ge=1)
    trackers: list[str] = _f(["tensorboard"], "experiment trackers (through Accelerate) for the train/eval "
                             "scalars, any of: tensorboard (in the run dir's tb/), wandb, mlflow, aim; [] for "
                             "none (train.jsonl and metrics.jsonl are always written)")


@dataclass
class Config:
    name: str = _f("run", "run name; the run directory is out_dir/name")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the network"})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "the algorithm"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})

    def validate(self) -> None:
        """Cross-field checks (single fields are checked when built)."""
        if self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            raise ConfigError(f"name: {self.name!r} is not a run name: the run directory is train.out_dir/name, so "
                              "name must be one non-empty path component (no '/', not '.' or '..')")
        if not self.data.dataset:
            raise ConfigError("data.dataset is not set: give a dataset directory built by `bmb-shards`, "
                              "e.g. `bmb-shards demo --out data/demo --formats wds,arrays`")
        m = self.method
        if m.get_num > m.bank_size and not m.get_replacement:
            raise ConfigError(f"method.get_num ({m.get_num}) must be <= method.bank_size ({m.bank_size}) with "
                              "method.get_replacement=false (a draw without replacement)")
        t = self.train
        if t.many_above is not None and t.few_at_most is not None and t.few_at_most >= t.many_above:
            raise ConfigError(f"train.few_at_most ({t.few_at_most}) must be < train.many_above ({t.many_above})")
        if t.eval_protocol == "best_val" and not self.data.val_split:
            raise ConfigError("train.eval_protocol=best_val needs data.val_split")
        d = self.data
        if d.view_rule == "authors_imagenet" and d.backend not in ("webdataset", "ffcv", "dali"):
            raise ConfigError(f"data.view_rule=authors_imagenet: the reader cuts the views, which the webdataset, "
                              f"ffcv and dali backends do; not data.backend={d.backend}")
        if d.view_rule == "authors_imagenet" and d.crop == "rrc":
            raise ConfigError("data.crop=rrc contradicts data.view_rule=authors_imagenet (its weak view is a "
                              "random crop of the shorter-side-resized image): leave data.crop unset")
        if d.views == "loader" and (d.rand_augment != "fixmatch" or d.cutout == "fixed"
                                    or d.view_rule != "square"):
            raise ConfigError("data.views=loader (the DALI pipeline's views) makes FixMatch's RandAugment and "
                              "Cutout on square crops only: use data.views=trainer with data.rand_augment="
                              f"{d.rand_augment}, data.cutout={d.cutout}, data.view_rule={d.view_rule}")
        for key in ("mean", "std"):
            v = getattr(self.data, key)
            if len(v) != 3:
                raise ConfigError(f"data.{key} must have 3 values (R, G, B), got {v!r}")
        if any(s <= 0 for s in self.data.std):
            raise ConfigError(f"data.std must be > 0, got {self.data.std!r}")
        unknown = [n for n in t.trackers if n not in TRACKERS]
        if unknown or len(set(t.trackers)) != len(t.trackers):
            raise ConfigError(f"train.trackers: each of {', '.join(TRACKERS)} at most once; got {t.trackers!r}")

    @property
    def total_steps(self) -> int:
        return self.train.max_steps or self.train.epochs * self.train.iters_per_epoch


# ---------------------------------------------------------------------------- building
def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {value} is out of range (a 64-bit integer)")
    elif tp is float:
        if isinstance(value, str) and _DOTLESS_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        value = [_check_value(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        b = meta.get(bound)
        if b is not None and isinstance(value, (int, float)) and not ok(value, b):
            raise ConfigError(f"{key}: must be {word} {b}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (valid keys under "
                          f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def _merge(base: dict, diff: dict) -> dict:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict, with its ``_base_`` chain merged in."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: key {e.key!r} is given twice in one mapping (again on line {e.line}); YAML "
                          "would silently keep the last: remove one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    bases = data.pop("_base_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(path.parent / base, _seen + (path,)))
    return _merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["method.alpha=2", "name=x"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def build_config(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (with its ``_base_`` chain) <- ``key=value`` overrides, validated."""
    data = read_yaml(path) if path else {}
    return build_config(_merge(data, parse_overrides(overrides or [])))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}`` (the dotted keys of the command line)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, help)`` for every leaf key (used by ``--help``)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows
