"""An export the Hugging Face way: :func:`from_pretrained` and :func:`push_to_hub`.

An export directory (``bmb.export``) follows the Hub's convention: ``config.json`` beside
``model.safetensors``, and the model card ``README.md`` with YAML metadata. So::

    from bmb.hub import from_pretrained
    model = from_pretrained("runs/NAME/export")   # config.json + safetensors only
    logits = getattr(model(x), model.config["eval_head"] + "_logits")

rebuilds the model from those two files alone (no ``model.json``, no bmb config), and
``push_to_hub("runs/NAME/export", "user/name")`` uploads the export (needs ``huggingface_hub``;
from the Hub, ``huggingface_hub.snapshot_download(repo_id)`` gives the directory back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from bmb.export import CONFIG, FILES, WEIGHTS, ExportError, build_model, load_export, load_weights, weights_path

_KEYS = {"encoder": str, "width": (int, type(None)), "depth": (int, type(None)), "stem": str, "num_classes": int,
         "eval_head": str, "id2label": dict}


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of an export, checked for the keys :func:`from_pretrained` needs.

    Raises:
        ExportError: naming the file and the key.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (an export written by bmb holds {CONFIG} beside {WEIGHTS})") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("model_type") != "bmb":
        raise ExportError(f"{path}: not a bmb model config (model_type 'bmb')")
    for key, typ in _KEYS.items():
        if key not in config or isinstance(config[key], bool) or not isinstance(config[key], typ):
            raise ExportError(f"{path}: {key!r} missing or of the wrong type ({json.dumps(config.get(key))[:60]})")
    if config["eval_head"] not in ("aux", "base"):
        raise ExportError(f"{path}: unknown eval_head {config['eval_head']!r} (aux or base)")
    if len(config["id2label"]) != config["num_classes"]:
        raise ExportError(f"{path}: id2label has {len(config['id2label'])} labels for num_classes "
                          f"{config['num_classes']}")
    return config


def from_pretrained(path: str | Path) -> nn.Module:
    """The model of an export directory (eval mode, on the CPU), rebuilt from ``config.json`` and
    ``model.safetensors`` only; ``model.config`` is ``config.json`` (labels: ``id2label``, the
    evaluated head: ``eval_head``, preprocessing: ``image_size``, ``image_mean``, ``image_std``).

    Raises:
        ExportError: a missing or malformed file, non-finite weights, or weights that do not fit
            the described model, naming the file.
    """
    root = Path(path)
    config = read_config(root / CONFIG)
    model = build_model({"model": config}, load_weights(weights_path(root, WEIGHTS)), CONFIG)
    model.config = config
    return model


def push_to_hub(path: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload bmb export") -> Any:
    """Upload an export directory to the Hugging Face Hub as one commit of :data:`bmb.export.FILES`
    (the repository is created if needed). The export is checked first (:func:`bmb.export.load_export`:
    nothing modified, finite weights), so a broken one is never published.

    Returns:
        what ``HfApi.create_commit`` returns (the commit's info).

    Raises:
        ImportError: ``huggingface_hub`` is not installed (says how to install it).
        ExportError: the export is not usable, naming the file.
    """
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:
        raise ImportError("push_to_hub needs the huggingface_hub package: pip install huggingface_hub") from None
    root = Path(path)
    load_export(root)
    read_config(root / CONFIG)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise ExportError(f"{root}: missing {', '.join(missing)}; re-export with this bmb")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in FILES]
    return api.create_commit(repo_id, ops, commit_message=commit_message, repo_type="model")
