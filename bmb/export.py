"""The trained model as plain files: safetensors weights, a JSON description, a model card.

At the end of a run the trainer (rank 0) writes ``export/`` in the run directory::

    export/model.safetensors   the evaluated (EMA) model's weights: encoder, base head, aux head
    export/model.json          what the weights are and how they were made and scored: the
                               architecture, the evaluated head, the input preprocessing, the
                               dataset (name, manifest build_id), class names and labeled counts,
                               the result under the run's protocol, the last evaluation of these
                               very weights, the steps, the run id, the whole config; and the
                               weights file's SHA-256
    export/model_card.md       the same for people, with the commands that use it

Nothing in it is pickled: :func:`load_export` reads JSON and safetensors only, checks the
weights against the recorded SHA-256 and the model description, and raises
:class:`ExportError` naming the file at fault. ``bmb-eval`` (``launch/eval.py``) evaluates an
export on any split of a dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmb.checkpoint import sha256_of
from bmb.config import Config, config_to_dict

FORMAT = "bmb-export"
VERSION = 1
WEIGHTS, META, CARD = "model.safetensors", "model.json", "model_card.md"
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
    _atomic_text(out / CARD, model_card(meta, out))
    return out


def model_card(meta: dict[str, Any], where: str | Path = "export") -> str:
    """``model_card.md``: what the export is (in folder ``where``), how it scored, how to use it."""
    r, ds, inp, arch = meta["result"], meta["dataset"], meta["input"], meta["model"]
    lines = [
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
        "```python", "from bmb.export import load_model",
        f"model, meta = load_model({str(where)!r})  # safetensors + JSON only; eval mode, on the CPU",
        "out = model(x)  # x: float (N, 3, H, W), preprocessed as the input row above says",
        f"logits = out.{meta['eval_head']}_logits", "```", "",
        "The run's full config is under `config` in `model.json`.", "",
    ]
    return "\n".join(lines)


def load_export(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model.json, weights)`` of an export directory, checked: the files exist, the JSON holds
    what bmb writes, the weights file has the recorded size and SHA-256.

    Raises:
        ExportError: naming the file and what is wrong with it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    need = ("format", "version", "weights", "model", "eval_head", "input", "class_names", "labeled_counts",
            "many_above", "few_at_most")
    missing = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise ExportError(f"{meta_path}: not a bmb export description (format {FORMAT!r} with keys "
                          f"{', '.join(need)}; missing: {', '.join(missing) or 'none'})")
    if meta["version"] != VERSION:
        raise ExportError(f"{meta_path}: export version {meta['version']!r}; this bmb reads version {VERSION}")
    w = meta["weights"]
    weights = root / str(w.get("file", WEIGHTS))
    if not weights.is_file():
        raise ExportError(f"{weights}: missing (model.json records sha256 {str(w.get('sha256'))[:16]}…)")
    digest, size = sha256_of(weights)
    if digest != w.get("sha256") or size != w.get("bytes"):
        raise ExportError(f"{weights}: does not match model.json (sha256 {digest[:16]}…, {size} bytes; recorded "
                          f"{str(w.get('sha256'))[:16]}…, {w.get('bytes')} bytes): modified or corrupt")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights}: not a readable safetensors file ({e})") from None
    return meta, state


def build_model(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The :class:`bmb.models.BMBModel` ``model.json`` describes, with ``state`` loaded (strict),
    in eval mode on the CPU."""
    from bmb.models import BMBModel

    a = meta["model"]
    try:
        model = BMBModel.build(a["encoder"], int(a["num_classes"]), width=a["width"], depth=a["depth"], stem=a["stem"])
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{WEIGHTS} does not fit the model {META} describes ({a}): {first[:300]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported model (eval mode, CPU) and its ``model.json``; see :func:`load_export`."""
    meta, state = load_export(path)
    return build_model(meta, state), meta
