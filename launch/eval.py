"""Evaluate an exported model (a run's ``export/`` folder) on any split of a dataset.

    bmb-eval runs/NAME/export --dataset data/demo --split test [--backend tensor|webdataset] [--batch N]

Reads ``model.json`` and ``model.safetensors`` only (no pickle; ``model.json``'s keys and types
are checked, the weights must lie inside the export, match the SHA-256 in ``model.json`` and be
finite: anything else is a named error, exit 2), evaluates the head the run evaluated, with the
run's input preprocessing, and prints top-1, mean recall, many/medium/few and the per-class recall table.
Exit status 0; 2 for an unusable export or dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/eval.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bmb-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="an export folder (runs/NAME/export)")
    ap.add_argument("--dataset", type=Path, required=True, help="dataset directory built by bmb-shards")
    ap.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ap.add_argument("--backend", choices=("tensor", "webdataset"), default=None,
                    help="input backend (default: tensor when the dataset has arrays, else webdataset)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the run's data.eval_batch)")
    ap.add_argument("--head", choices=("aux", "base"), default=None,
                    help="head to evaluate (default: the one the run evaluated)")
    ap.add_argument("--workers", type=int, default=0, help="webdataset reader processes (default 0)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bmb.evaluate import confusion_matrices, format_table
    from bmb.export import ExportError, load_model
    from bmb.metrics import group_recall, mean_recall, shot_groups
    from pipelines import build_eval_source
    from pipelines.augment import ViewMaker
    from pipelines.shard_index import load_manifest

    try:
        model, meta = load_model(args.export)
    except ExportError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    names, inp = meta["class_names"], meta["input"]
    try:
        views = ViewMaker(image_size=inp["image_size"], crop=inp["crop"], mean=inp["mean"], std=inp["std"])
    except ValueError as e:
        print(f"export error: {args.export / 'model.json'}: input: {e}", file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.dataset)
        if args.split not in manifest["splits"]:
            raise ValueError(f"no split {args.split!r} (it has {sorted(manifest['splits'])})")
        if list(manifest.get("class_names", [])) != list(names):
            raise ValueError(f"its classes ({len(manifest.get('class_names', []))}: "
                             f"{', '.join(map(str, manifest.get('class_names', [])[:5]))} ...) are not the model's "
                             f"({len(names)}: {', '.join(names[:5])} ...), in the same order")
    except ValueError as e:
        print(f"dataset error: {args.dataset}: {e}", file=sys.stderr)
        return 2
    data_cfg = (meta.get("config") or {}).get("data")
    run_batch = data_cfg.get("eval_batch") if isinstance(data_cfg, dict) else None
    backend = args.backend or ("tensor" if "arrays" in manifest.get("formats", []) else "webdataset")
    batch = args.batch or (run_batch if isinstance(run_batch, int) and run_batch > 0 else 256)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options: dict = {}
    if backend == "webdataset":
        options["num_workers"] = args.workers
        if inp["crop"] == "rrc":
            options["load_size"] = inp["load_size"]
    try:
        source = build_eval_source(backend, args.dataset, args.split, batch_size=batch, device=device, **options)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"dataset error: {args.dataset} ({backend}): {e}", file=sys.stderr)
        return 2
    head = args.head or meta["eval_head"]
    model.to(device)
    cm = confusion_matrices(source, lambda images: views.eval(images.to(device)), {"model": model},
                            {"eval": ("model", head)}, len(names))["eval"]
    recall = cm.per_class_recall()
    groups = group_recall(recall, shot_groups(meta["labeled_counts"], meta["many_above"], meta["few_at_most"]))
    result = {"top1": cm.top1(), "mean_recall": mean_recall(recall), "per_class_recall": [float(v) for v in recall],
              **groups, "split": args.split, "head": head, "samples": int(cm.matrix.sum()),
              "dataset": str(args.dataset), "build_id": manifest.get("build_id"), "export": str(args.export)}
    print(format_table({**result, "name": meta["name"], "algorithm": meta["algorithm"], "steps": meta["steps"],
                        "protocol": f"{head} head on {args.split} ({result['samples']} images)",
                        "class_names": names, "labeled_counts": meta["labeled_counts"],
                        "many_above": meta["many_above"], "few_at_most": meta["few_at_most"]}))
    last, ds = meta.get("last_evaluation"), meta.get("dataset") or {}
    if (last and args.split == last["split"] and head == meta["eval_head"]
            and manifest.get("build_id") == ds.get("build_id")):
        print(f"the run's own evaluation of these weights (step {last['step']}, {last['split']}): "
              f"top-1 {100 * last['top1']:.2f}  mean recall {100 * last['mean_recall']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
