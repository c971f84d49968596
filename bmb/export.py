"""The trained model as plain files: safetensors weights, a JSON description, a model card.

At the end of a run the trainer (rank 0) writes ``export/`` in the run directory::

    export/model.safetensors   the evaluated (EMA) model's weights: encoder, base head, aux head
    export/model.json          what the weights are and how they were made and scored: the
                               architecture, the evaluated head, the input preprocessing, the
                               dataset (name, manifest build_id), class names and labeled counts,
                               the result under the run's protocol, the last evaluation of these
                               very weights, the steps, the run id, the whole config; and the
                               weights file's SHA-256
    export/config.json         the Hugging Face convention: the architecture, labels and input
                               preprocessing beside model.safetensors, for ``bmb.hub.from_pretrained``
                               (which needs neither model.json nor bmb's config system)
    export/README.md           the model card: YAML metadata (library_name, tags, datasets,
                               metrics, model-index) and the same for people, with the commands that use it

Nothing in it is pickled: :func:`load_export` reads JSON and safetensors only, checks the
description's keys and types, the weights against the recorded SHA-256 (a file inside the export
only), their finiteness and the model description, and raises :class:`ExportError` naming the file
and key at fault. ``bmb-eval`` (``launch/eval.py``) evaluates an export on any split of a dataset;
:mod:`bmb.hub` loads it the Hugging Face way and pushes it to the Hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bmb.checkpoint import sha256_of

if TYPE_CHECKING:  # reading an export (bmb.hub, bmb-eval) needs no config system
    from bmb.config import Config

FORMAT = "bmb-export"
VERSION = 1
WEIGHTS, META, CONFIG, CARD = "model.safetensors", "model.json", "config.json", "README.md"
FILES = (WEIGHTS, META, CONFIG, CARD)  # what an export holds (and bmb.hub.push_to_hub uploads)
HEADS = ("aux", "base")
_SCORES = ("top1", "mean_recall", "many", "medium", "few", "per_class_recall")


class ExportError(ValueError):
    """An export directory that cannot be used: a missing, unreadable or modified file, or
    weights that do not fit the model its ``model.json`` describes."""


def _tmp(path: Path) -> Path:
    """A temporary name beside ``path`` (created by ``open``: the umask's permissions)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _dataset_info(path: str) -> dict[str, Any]:
    info: dict[str, Any] = {"path": path, "name": None, "build_id": None}
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        info.update(name=manifest.get("name"), build_id=manifest.get("build_id"))
    except (OSError, ValueError, AttributeError):
        pass  # described by path only
    return info


def write_export(out_dir: str | Path, model: nn.Module, *, cfg: Config, eval_head: str, class_names: list[str],
                 labeled_counts: list[int], thresholds: tuple[int, int], result: dict[str, Any],
                 history: list[dict[str, Any]], step: int, run_id: str | None) -> Path:
    """Write ``model`` (a :class:`bmb.models.BMBModel`: the EMA model) with its description and
    card into ``out_dir``; returns ``out_dir``. The weights go first, ``model.json`` (which holds
    their hash) last but the card, each by an atomic rename."""
    from safetensors.torch import save

    from bmb.config import config_to_dict

    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_finite(tensors, f"{out / WEIGHTS} (not written)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(out / WEIGHTS)
    tmp.write_bytes(save(tensors, metadata={"format": FORMAT, "version": str(VERSION)}))
    os.replace(tmp, out / WEIGHTS)
    last = history[-1] if history and history[-1].get("step") == step else None
    m, d = cfg.model, cfg.data
    digest, size = sha256_of(out / WEIGHTS)
    meta = {
        "format": FORMAT, "version": VERSION, "name": cfg.name, "run_id": run_id, "algorithm": cfg.method.algorithm,
        "steps": step, "eval_head": eval_head,
        "weights": {"file": WEIGHTS, "sha256": digest, "bytes": size},
        "model": {"encoder": m.encoder, "width": m.width, "depth": m.depth, "stem": m.stem,
                  "num_classes": len(class_names), "feat_dim": int(model.feat_dim)},
        "input": {"image_size": d.image_size, "crop": d.crop, "load_size": d.load_size, "mean": d.mean, "std": d.std},
        "dataset": {**_dataset_info(d.dataset), "eval_split": d.eval_split, "val_split": d.val_split},
        "class_names": list(class_names), "labeled_counts": list(labeled_counts),
        "many_above": thresholds[0], "few_at_most": thresholds[1],
        "result": {"protocol": result["protocol"], "eval_protocol": cfg.train.eval_protocol,
                   "evaluations": result.get("evaluations"), **{k: result[k] for k in _SCORES}},
        "last_evaluation": None if last is None else {
            "step": last["step"], "split": d.eval_split, "head": f"ema_{eval_head}", **{k: last[k] for k in _SCORES}},
        "config": config_to_dict(cfg),
    }
    _atomic_text(out / META, json.dumps(meta, indent=2) + "\n")
    _atomic_text(out / CONFIG, json.dumps(hf_config(meta), indent=2) + "\n")
    _atomic_text(out / CARD, model_card(meta, out))
    return out


def hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` (the Hugging Face convention): everything needed to rebuild and feed the
    model, from ``model.json``'s description."""
    a, inp, names = meta["model"], meta["input"], meta["class_names"]
    return {
        "architectures": ["BMBModel"], "model_type": "bmb", "library_name": "bmb", "bmb_export_version": VERSION,
        "encoder": a["encoder"], "width": a["width"], "depth": a["depth"], "stem": a["stem"],
        "num_classes": a["num_classes"], "feat_dim": a["feat_dim"], "eval_head": meta["eval_head"],
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
        "image_size": inp["image_size"], "crop": inp["crop"], "load_size": inp["load_size"],
        "image_mean": inp["mean"], "image_std": inp["std"], "torch_dtype": "float32",
    }


def card_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The model card's YAML metadata (the Hub's fields): library, tags, dataset, metrics and the
    result as a model-index entry."""
    ds, r = meta["dataset"], meta["result"]
    dataset = str(ds.get("name") or Path(str(ds.get("path") or "dataset")).name)
    return {
        "library_name": "bmb", "pipeline_tag": "image-classification",
        "tags": list(dict.fromkeys(["image-classification", "semi-supervised-learning", "long-tailed-recognition",
                                    "bmb", str(meta["algorithm"])])),
        "datasets": [dataset], "metrics": ["accuracy", "recall"],
        "model-index": [{"name": str(meta["name"]), "results": [{
            "task": {"type": "image-classification"},
            "dataset": {"name": dataset, "type": dataset, "split": str(ds.get("eval_split"))},
            "metrics": [{"type": "accuracy", "name": "top-1", "value": round(100 * r["top1"], 2)},
                        {"type": "recall", "name": "mean recall", "value": round(100 * r["mean_recall"], 2)}],
        }]}],
    }


def model_card(meta: dict[str, Any], where: str | Path = "export") -> str:
    """``README.md``: YAML metadata, then what the export is (in folder ``where``), how it scored,
    how to use it."""
    import yaml

    r, ds, inp, arch = meta["result"], meta["dataset"], meta["input"], meta["model"]
    lines = [
        "---", yaml.safe_dump(card_metadata(meta), sort_keys=False).rstrip(), "---", "",
        f"# {meta['name']}: {meta['algorithm'].upper()} on {ds['name'] or ds['path']}", "",
        f"The exponential-moving-average model of run `{meta['run_id']}` after {meta['steps']} steps, trained "
        f"with `bmb` ({meta['algorithm']}). Predictions come from its **{meta['eval_head']} head** (the head the "
        "run evaluated); the file holds the encoder and both heads.", "",
        "| | |", "|---|---|",
        f"| encoder | {arch['encoder']} (width {arch['width']}, depth {arch['depth']}, stem {arch['stem']}), "
        f"{arch['feat_dim']}-d features |",
        f"| classes | {arch['num_classes']} |",
        f"| input | uint8 RGB, {inp['image_size']} px ({inp['crop']}: centre crop when larger), "
        f"then (x/255 - mean) / std, mean {inp['mean']}, std {inp['std']} |",
        f"| dataset | {ds['name']} at `{ds['path']}`, build_id `{ds['build_id']}` |",
        f"| weights | `{meta['weights']['file']}`, sha256 `{meta['weights']['sha256']}` |", "",
        f"## Result ({r['protocol']}, split `{ds['eval_split']}`)", "",
        f"top-1 {100 * r['top1']:.2f}, mean recall {100 * r['mean_recall']:.2f}, many {100 * r['many']:.1f}, "
        f"medium {100 * r['medium']:.1f}, few {100 * r['few']:.1f} (many: > {meta['many_above']} labeled "
        f"images, few: <= {meta['few_at_most']}).", "",
        "| class | labeled | recall |", "|---|---:|---:|",
        *[f"| {c} | {n} | {100 * v:.1f} |" for c, n, v in
          zip(meta["class_names"], meta["labeled_counts"], r["per_class_recall"])],
    ]
    last = meta["last_evaluation"]
    if last is not None:
        lines += ["", f"These weights themselves (the evaluation at step {last['step']}): top-1 "
                  f"{100 * last['top1']:.2f}, mean recall {100 * last['mean_recall']:.2f}."]
    lines += [
        "", "## Use", "", "```bash",
        f"bmb-eval {where} --dataset {ds['path']} --split {ds['eval_split']}", "```", "",
        "```python", "from bmb.hub import from_pretrained",
        f"model = from_pretrained({str(where)!r})  # config.json + safetensors; eval mode, on the CPU",
        "out = model(x)  # x: float (N, 3, H, W), preprocessed as the input row above says",
        f"logits = out.{meta['eval_head']}_logits  # the evaluated head: model.config['eval_head']", "```", "",
        "The run's full config is under `config` in `model.json`.", "",
    ]
    return "\n".join(lines)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(test: Callable[[Any], bool], n: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(test(x) for x in v) and (n is None or len(v) == n)


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


# Every key of model.json that bmb reads: (dotted key, test, what it must be).
_META_SCHEMA: list[tuple[str, Callable[[Any], bool], str]] = [
    ("version", _is_int, "an integer"),
    ("name", _is_str, "a string"), ("algorithm", _is_str, "a string"), ("steps", _is_int, "an integer"),
    ("eval_head", lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
    ("weights", lambda v: isinstance(v, dict), "an object"),
    ("weights.file", _is_str, "a file name"), ("weights.sha256", _is_str, "a hex string"),
    ("weights.bytes", _is_int, "an integer"),
    ("model", lambda v: isinstance(v, dict), "an object"),
    ("model.encoder", _is_str, "a string"), ("model.width", _optional(_is_int), "an integer or null"),
    ("model.depth", _optional(_is_int), "an integer or null"), ("model.stem", _is_str, "a string"),
    ("model.num_classes", lambda v: _is_int(v) and v > 0, "a positive integer"),
    ("model.feat_dim", _is_int, "an integer"),
    ("input", lambda v: isinstance(v, dict), "an object"),
    ("input.image_size", lambda v: _is_int(v) and v > 0, "a positive integer"), ("input.crop", _is_str, "a string"),
    ("input.load_size", _optional(_is_int), "an integer or null"),
    ("input.mean", _list_of(_is_num, 3), "3 numbers"),
    ("input.std", _list_of(lambda x: _is_num(x) and x > 0, 3), "3 positive numbers"),
    ("class_names", _list_of(_is_str), "a list of strings"),
    ("labeled_counts", _list_of(_is_int), "a list of integers"),
    ("many_above", _is_int, "an integer"), ("few_at_most", _is_int, "an integer"),
    ("dataset", _optional(lambda v: isinstance(v, dict)), "an object"),
    ("last_evaluation", _optional(lambda v: isinstance(v, dict)), "an object or null"),
    ("last_evaluation.step", _is_int, "an integer"), ("last_evaluation.split", _is_str, "a string"),
    ("last_evaluation.top1", _is_num, "a number"), ("last_evaluation.mean_recall", _is_num, "a number"),
    ("config", _optional(lambda v: isinstance(v, dict)), "an object"),
]
_OPTIONAL = ("dataset", "last_evaluation", "config")  # may be absent or null
_MISSING = object()


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def check_meta(meta: Any, where: str | Path = META) -> dict[str, Any]:
    """``meta`` if it is a bmb export description every reader can use: the format, every key
    bmb reads with its type, per-class lists of ``model.num_classes`` entries.

    Raises:
        ExportError: naming ``where`` and the first key at fault (missing or of the wrong type).
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"{where}: not a bmb export description (format {FORMAT!r}; got {got!r})")
    missing = [k for k, _, _ in _META_SCHEMA if "." not in k and k not in _OPTIONAL and k not in meta]
    if missing:
        raise ExportError(f"{where}: not a bmb export description (missing: {', '.join(missing)})")
    if meta["version"] != VERSION:
        raise ExportError(f"{where}: export version {meta['version']!r}; this bmb reads version {VERSION}")
    for key, test, what in _META_SCHEMA:
        root = key.split(".")[0]
        if root in _OPTIONAL and meta.get(root) is None:
            continue
        value = _get(meta, key)
        if value is _MISSING:
            raise ExportError(f"{where}: {key!r} is missing (it must be {what})")
        if not test(value):
            raise ExportError(f"{where}: {key!r} must be {what}, got {json.dumps(value)[:60]}")
    c = meta["model"]["num_classes"]
    for key in ("class_names", "labeled_counts"):
        if len(meta[key]) != c:
            raise ExportError(f"{where}: {key!r} has {len(meta[key])} entries for model.num_classes {c}")
    return meta


def weights_path(root: Path, file: str) -> Path:
    """``root/file`` if it is a file inside the export directory ``root``: a relative name, no
    ``..``, and (symbolic links followed) still inside ``root``.

    Raises:
        ExportError: naming the file, for anything that leads outside ``root``.
    """
    rel = Path(file)
    if not file or rel.is_absolute() or ".." in rel.parts:
        raise ExportError(f"{root / META}: weights.file {file!r} must name a file inside the export directory")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise ExportError(f"{path}: leads outside the export directory {root} (a symbolic link to "
                          f"{path.resolve()}); refused")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, every one finite (a diverged run's NaN weights are no
    model).

    Raises:
        ExportError: naming the file and, for non-finite values, the tensors that hold them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from None
    _check_finite(state, str(path))
    return state


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Raises :class:`ExportError` naming ``where`` and the tensors holding NaN or inf."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())}
    if bad:
        worst = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:5])
        raise ExportError(f"{where}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {worst}"
                          f"{' ...' if len(bad) > 5 else ''}; the run diverged, these weights are no model")


def load_export(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model.json, weights)`` of an export directory, checked: the files exist, the JSON holds
    what bmb writes (:func:`check_meta`), the weights file lies inside the directory, has the
    recorded size and SHA-256 and holds only finite values.

    Raises:
        ExportError: naming the file (and key) and what is wrong with it.
    """
    root = Path(path)
    if not root.is_dir():
        raise ExportError(f"{root}: not an export directory (a run's export/ folder holds {META} and {WEIGHTS})")
    meta_path = root / META
    if not meta_path.is_file():
        raise ExportError(f"{meta_path}: missing; it describes the weights (without it they cannot be used)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_path}: not readable JSON ({e})") from None
    check_meta(meta, meta_path)
    w = meta["weights"]
    weights = weights_path(root, w["file"])
    if not weights.is_file():
        raise ExportError(f"{weights}: missing (model.json records sha256 {w['sha256'][:16]}…)")
    digest, size = sha256_of(weights)
    if digest != w["sha256"] or size != w["bytes"]:
        raise ExportError(f"{weights}: does not match model.json (sha256 {digest[:16]}…, {size} bytes; recorded "
                          f"{w['sha256'][:16]}…, {w['bytes']} bytes): modified or corrupt")
    return meta, load_weights(weights)


def build_model(meta: dict[str, Any], state: dict[str, torch.Tensor], described_by: str = META) -> nn.Module:
    """The :class:`bmb.models.BMBModel` ``meta["model"]`` describes (``model.json``'s part, or
    ``config.json``: the same keys), with ``state`` loaded (strict), in eval mode on the CPU."""
    from bmb.models import BMBModel

    a = meta["model"]
    try:
        model = BMBModel.build(a["encoder"], int(a["num_classes"]), width=a["width"], depth=a["depth"], stem=a["stem"])
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{WEIGHTS} does not fit the model {described_by} describes ({a}): {first[:300]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported model (eval mode, CPU) and its ``model.json``; see :func:`load_export`."""
    meta, state = load_export(path)
    return build_model(meta, state), meta
