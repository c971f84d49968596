"""Train BMB (or the FixMatch baseline).

    accelerate launch launch/train.py --config launch/configs/demo.yaml [key=value ...]
    python launch/train.py --config launch/configs/demo.yaml          # one process, same thing

Overrides use dotted keys, e.g. ``method.algorithm=fixmatch train.seed=1 name=fm-seed1``.
``--keys`` lists every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # `python launch/train.py` / `accelerate launch launch/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bmb.config import Config, ConfigError, describe, load_config


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="launch/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML preset (a diff from the defaults), e.g. launch/configs/demo.yaml")
    ap.add_argument("--keys", action="store_true", help="list every config key with its default and exit")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_args(argv)
    return args, args.overrides


def build_data(cfg: Config, rank: int, world: int, device: torch.device):
    """Training stream, evaluation sources, labeled counts, the unlabeled split's size and class
    names for this rank."""
    import pipelines
    from shards.format import ManifestError, is_url, load_manifest

    d = cfg.data
    if d.views == "loader" and d.backend != "dali":
        raise ConfigError(f"data.views=loader needs data.backend=dali (got data.backend={d.backend}): only the "
                          "DALI pipeline makes views; use data.views=trainer (the default) with this backend")
    if is_url(d.dataset):  # shards and manifest read as streams (docs/datasets.md, "Datasets at a URL")
        if d.backend != "webdataset" or d.order != "stream":
            raise ConfigError(f"data.dataset={d.dataset} is a URL, which only data.backend=webdataset with "
                              f"data.order=stream reads (got data.backend={d.backend} data.order={d.order})")
        root = d.dataset
        try:
            manifest = load_manifest(root)
        except ManifestError as e:
            raise ConfigError(f"data.dataset: {e}") from e
    else:
        root = Path(d.dataset)
        if not (root / "manifest.json").is_file():
            raise ConfigError(f"data.dataset: {root} is not a dataset directory (no manifest.json); build one "
                              "with `bmb-shards`, e.g. `bmb-shards demo --out data/demo --formats wds,arrays`")
        manifest = load_manifest(root)
    dataset, backend = root, d.backend
    labeled_counts = torch.tensor(manifest["splits"]["labeled"]["class_counts"])
    unlabeled_size = int(sum(manifest["splits"]["unlabeled"]["class_counts"]))
    names = list(manifest["class_names"])
    splits = set(manifest["splits"])
    for key, split in (("data.eval_split", d.eval_split), ("data.val_split", d.val_split)):
        if split is not None and split not in splits:
            raise ConfigError(f"{key}: the dataset has no split {split!r} (it has {sorted(splits)})")
    size = manifest["image_size"]  # [H, W], or None for full-resolution data of varying size
    if d.crop == "translate" and size is not None and list(size) != [d.image_size, d.image_size]:
        # The translate crop keeps the source size: a smaller image_size would train and
        # evaluate on crops of part of each image without a word.
        raise ConfigError(f"data.image_size={d.image_size} does not match the dataset's {size[0]}x{size[1]} "
                          f"images ({root}); the translate crop does not resize: set "
                          f"data.image_size={size[0]}, or use data.crop=rrc to resize")

    try:
        setup = pipelines.reader_setup(cfg, rank, world, device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    t = cfg.train
    per_step = [("train.labeled_batch", t.labeled_batch), ("train.unlabeled_batch", t.unlabeled_batch)]
    if cfg.method.algorithm == "bmb" and cfg.method.use_bank:
        per_step.append(("method.get_num", cfg.method.get_num))
    for key, value in per_step:  # global per-step counts, split over the ranks
        if value % world:
            raise ConfigError(f"{key}={value} is not divisible by the {world} processes (it is global: "
                              "split over the ranks)")
    stream = pipelines.build_train_stream(
        backend, dataset, labeled_batch=t.labeled_batch // world, unlabeled_batch=t.unlabeled_batch // world,
        seed=t.seed, setup=setup)
    evals = {}
    for split in dict.fromkeys([d.eval_split] + ([d.val_split] if d.val_split else [])):
        evals[split] = pipelines.build_eval_source(backend, dataset, split, batch_size=d.eval_batch, setup=setup)
    return stream, evals, labeled_counts, unlabeled_size, names, manifest.get("build_id")


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.keys:
        for key, default, help_text in describe():
            print(f"{key:28s} {default!s:18s} {help_text}")
        return 0
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from bmb.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from pipelines.host_memory import keep_freed_memory

    keep_freed_memory()  # per-step host temporaries reuse memory instead of page-faulting it in
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # gloo on CPUs (also under DeepSpeed), NCCL on GPUs
        backend = "nccl" if torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU") else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30)))
    run_dir = Path(cfg.train.out_dir) / cfg.name
    from bmb.logs import make_trackers

    try:  # started by the trainer once the run directory's checks pass
        trackers = make_trackers(cfg, run_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    accelerator = Accelerator(kwargs_handlers=handlers, log_with=trackers or None)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank

    from bmb.algorithms import AlgorithmContext, build_algorithm
    from bmb.checkpoint import CheckpointWriteError
    from bmb.dist import Collectives
    from bmb.guards import EXIT_DIVERGED, DivergedError
    from bmb.models import BMBModel, resolve_memory_format
    from bmb.rundir import RunDirError, append_history, claim
    from bmb.trainer import Trainer
    from pipelines.augment import ViewMaker
    from shards.format import DataError

    try:
        stream, evals, labeled_counts, unlabeled_size, names, build_id = build_data(
            cfg, rank, world, accelerator.device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    m = cfg.model
    model = BMBModel.build(m.encoder, len(names), init=m.init, width=m.width, depth=m.depth, stem=m.stem)
    if m.sync_bn and world > 1 and accelerator.device.type == "cuda":
        # Without it each rank normalises with its own B/world samples' statistics.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # After the SyncBatchNorm swap, so that the compiled encoder traces the modules that run.
    model.configure(resolve_memory_format(m.memory_format, accelerator.device), compile=m.compile)
    algorithm = build_algorithm(cfg.method, AlgorithmContext(
        num_classes=len(names), feat_dim=model.feat_dim, labeled_counts=labeled_counts,
        unlabeled_size=unlabeled_size,
        # On the training device, so that the bank's draws never copy across; seeded alike on
        # every rank, so that every rank makes the same enqueue/dequeue/get decisions.
        generator=torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed + 7),
        collectives=Collectives(), device=accelerator.device))
    views = ViewMaker(**ViewMaker.config_kwargs(cfg))
    trainer = Trainer(cfg, accelerator, model, algorithm, stream, views, evals, labeled_counts, names, run_dir,
                      dataset_build_id=build_id)
    code, lock = 0, None
    try:
        lock = claim(run_dir, trainer.coll, trainer.main)  # the run dir's lock (rank 0) and its checks
        trainer.fit()
    except SystemExit as stop:  # a signal: every rank stopped at the same step, after the checkpoint
        code = stop.code
    except RunDirError as e:  # refused before anything in the run directory was written
        if rank == 0:
            print(f"run dir error: {e}", file=sys.stderr)
        code = 2
    except DivergedError as e:  # every rank, before anything non-finite was checkpointed or exported
        if rank == 0:
            print(f"DivergedError: {e}", file=sys.stderr)
            append_history(run_dir, "diverged", trainer.run_id, step=trainer.step, error=str(e))
        code = EXIT_DIVERGED
    except CheckpointWriteError as e:  # e.g. a full disk; nothing half-written under a checkpoint's name
        print(f"checkpoint error (rank {rank}): {e.strerror}", file=sys.stderr)
        code = 1
    except DataError as e:  # a bad shard or image met mid-run: named, the documented data error
        print(f"data error: {e}", file=sys.stderr)
        code = 2
    finally:
        if lock is not None:
            lock.release()
    # The wrapped model goes before the process group: DDP's reducer keeps its last collective,
    # and a DDP + gloo process that left it to interpreter shutdown was seen to abort after its
    # work was done (tests/test_dist.py). end_training also closes the trackers (train.trackers).
    del trainer, model, algorithm
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return code


if __name__ == "__main__":
    sys.exit(main())
