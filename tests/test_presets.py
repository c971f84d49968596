"""Shipped presets: every file loads, resolves to the paper's hyperparameters, and holds no dead keys.

``PAPER`` transcribes the hyperparameter table of docs/method.md (the project's design notes, kept
beside the repository in ``../shared/docs``); when that file is present a test re-reads its table so
the two cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from bmb.config import Config, ConfigError, describe, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"
METHOD_MD = ROOT.parent / "shared" / "docs" / "method.md"

# Every runnable preset: all YAML files except the shared bases (which have no dataset).
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if "base" not in p.relative_to(CONFIGS).parts)
SETTINGS = sorted(p for p in PRESETS if p.parent == CONFIGS and p.name != "demo.yaml")


def _id(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


# docs/method.md, "Hyperparameters": tau, alpha, beta, gamma, lambda_mb, bank size, get number.
PAPER = {
    "cifar10_lt_g100": (0.95, 1.5, 3, 0.75, 0.25, 128, 64),
    "cifar10_lt_g150": (0.95, 1.5, 3, 0.75, 0.25, 128, 64),  # the gamma=100 values (paper: "both")
    "cifar100_lt_g10": (0.95, 1.5, 3, 1.25, 1.25, 256, 128),
    "imagenet127_1p_32": (0.95, 2, 1, 0.75, 0.5, 256, 128),
    "imagenet127_1p_64": (0.95, 1.75, 1, 1, 0.5, 256, 128),
    "imagenet127_10p_32": (0.95, 1.5, 1, 1, 0.75, 256, 128),
    "imagenet127_10p_64": (0.95, 1.5, 1, 1.25, 1, 256, 128),
    "imagenet_lt_20": (0.7, 0.75, 3, 0.5, 1.25, 1024, 256),
    "imagenet_lt_50": (0.7, 0.75, 3, 0.75, 0.75, 1024, 256),
    # The authors' SGD scripts (docs/fidelity.md names each) draw get_num per GPU on 8 GPUs; ours
    # is global (split over the ranks, like the batches): their total, 8 x theirs.
    "imagenet_lt_20_sgd": (0.7, 0.75, 3, 1.0, 0.75, 2048, 8 * 256),
    "imagenet_lt_50_sgd": (0.7, 1.0, 3, 0.75, 0.5, 2048, 8 * 512),
    "imagenet127_1p_64_sgd": (0.7, 1.5, 3, 1.0, 0.5, 2048, 8 * 512),
    "imagenet127_10p_64_sgd": (0.7, 1.5, 3, 1.0, 0.5, 1024, 8 * 256),
    # Paper appendix A, "Mismatched ImageNet" (not in method.md's table); bank as ImageNet127.
    "mismatch_gu1": (0.7, 1, 3, 0.5, 0.75, 256, 128),
    "mismatch_gu20": (0.7, 1, 3, 0.5, 0.75, 256, 128),
    "mismatch_gu100": (0.7, 1, 3, 0.5, 0.75, 256, 128),
}
# method.md's row label for each preset whose numbers come from its table.
METHOD_MD_ROWS = {
    "CIFAR10-LT γ=100": "cifar10_lt_g100",
    "CIFAR100-LT γ=10": "cifar100_lt_g10",
    "ImageNet127 1% 32px": "imagenet127_1p_32",
    "ImageNet127 1% 64px": "imagenet127_1p_64",
    "ImageNet127 10% 32px": "imagenet127_10p_32",
    "ImageNet127 10% 64px": "imagenet127_10p_64",
    "ImageNet-LT 20%": "imagenet_lt_20",
    "ImageNet-LT 50%": "imagenet_lt_50",
}


def _load(path: Path) -> Config:
    return load_config(path)


def test_every_setting_of_the_issue_is_shipped():
    assert {p.stem for p in SETTINGS} == set(PAPER)
    fixmatch = {p.stem for p in (CONFIGS / "fixmatch").glob("*.yaml")}
    assert fixmatch == set(PAPER), "every setting needs a fixmatch counterpart"


@pytest.mark.parametrize("path", PRESETS, ids=_id)
def test_preset_loads_and_resolves(path: Path):
    cfg = _load(path)  # unknown keys, bad types and cross-field errors raise ConfigError
    assert cfg.name != "run", f"{_id(path)} sets no run name"
    assert cfg.data.dataset


def test_run_names_are_unique():
    names = {}
    for p in PRESETS:
        name = _load(p).name
        assert name not in names, f"{_id(p)} and {names.get(name)} share the run name {name!r}"
        names[name] = _id(p)


@pytest.mark.parametrize("stem", sorted(PAPER))
def test_hyperparameters_match_the_paper(stem: str):
    cfg = _load(CONFIGS / f"{stem}.yaml")
    m = cfg.method
    got = (m.threshold, m.alpha, m.put_power, m.get_power, m.lambda_mb, m.bank_size, m.get_num)
    assert got == pytest.approx(PAPER[stem]), stem
    # The authors' ImageNet127 SGD scripts pass --loss_u_weight 2.0.
    authors_127_sgd = stem.startswith("imagenet127") and stem.endswith("_sgd")
    assert m.algorithm == "bmb" and m.lambda_u == (2.0 if authors_127_sgd else 1.0)
    assert m.num_strong == 2 and m.get_replacement
    # The authors' SGD scripts never pass --tcp_strong: weak-view bank; the Adam presets: strong.
    assert m.adaptive_weights and m.use_bank and not m.anneal_weights
    assert m.bank_view == ("weak" if stem.endswith("_sgd") else "strong")
    # Warm-up fill: only the SGD scripts without --tcp_refresh_after_warm keep a warm-up bank.
    assert m.refresh_after_warmup == (stem not in ("imagenet_lt_50_sgd", "imagenet127_1p_64_sgd",
                                                   "imagenet127_10p_64_sgd"))
    # Their views, RandAugment(3, 4) and initialisation everywhere; no Cutout at 224 px.
    assert (cfg.model.init, cfg.data.rand_augment) == ("authors", "authors")
    full_res = stem.startswith(("imagenet_lt", "mismatch"))
    assert cfg.data.cutout == ("none" if full_res else "fixed")
    assert cfg.data.view_rule == ("authors_imagenet" if full_res else "square")
    t = cfg.train
    assert t.eval_every == t.checkpoint_every == t.iters_per_epoch  # once per epoch
    if stem.endswith("_sgd"):  # steps per epoch: one pass over the labeled set at 512 (ImageNet-LT)
        assert t.ema_decay == 0.0
        assert t.iters_per_epoch == {"imagenet_lt_20_sgd": 46, "imagenet_lt_50_sgd": 114}.get(stem, 250)
    else:
        assert t.ema_decay == 0.999 and t.iters_per_epoch == 500


@pytest.mark.parametrize("stem", sorted(PAPER))
def test_recipe_per_family(stem: str):
    cfg = _load(CONFIGS / f"{stem}.yaml")
    o, t, d, mo = cfg.optim, cfg.train, cfg.data, cfg.model
    sgd = stem.endswith("_sgd")
    if sgd:  # the authors' SGD scripts: plain momentum, coupled wd 5e-4, cosine per epoch, no EMA
        assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.2, 0.9, False, 5e-4)
        assert (o.schedule, o.schedule_unit, t.epochs, cfg.method.warmup_epochs) == ("cosine", "epoch", 200, 10)
        assert t.labeled_batch == t.unlabeled_batch == 8 * 64
    else:  # the paper's Adam with the authors' decoupled decay 0.02 (their WeightEMA)
        assert (o.name, o.lr, o.schedule, o.weight_decay) == ("adamw", 0.002, "constant", 0.02)
        assert t.labeled_batch == t.unlabeled_batch == 64
    if stem.startswith("mismatch"):  # the authors' full-resolution 1000-class data, 224 px pipeline
        assert (mo.encoder, mo.stem, d.backend, d.image_size, d.load_size) == (
            "resnet50", "imagenet", "webdataset", 224, 256)
        assert t.eval_protocol == "last20" and d.val_split is None and (t.epochs, cfg.method.warmup_epochs) == (500, 20)
    elif stem.startswith("imagenet_lt"):
        assert (mo.encoder, mo.stem) == ("resnet50", "imagenet")
        assert (d.backend, d.image_size, d.load_size, d.val_split) == ("webdataset", 224, 256, "val")
        assert t.eval_protocol == "best_val" and cfg.method.warmup_epochs == 10
        assert stem.endswith("_sgd") or t.epochs == 300
        pct = int(stem.split("_")[2])
        # docs/method.md: 20% subset >20 / 4<n<=20 / <=4; 50% subset >50 / 10<n<=50 / <=10.
        assert (t.many_above, t.few_at_most) == {20: (20, 4), 50: (50, 10)}[pct]
        assert d.dataset == f"data/imagenet-lt-{pct}"
    else:
        assert t.eval_protocol == "last20" and (sgd or (t.epochs == 500 and cfg.method.warmup_epochs == 20))
        assert d.backend == ("webdataset" if sgd else "tensor") and d.crop == "translate" and d.val_split is None
        assert t.many_above is None and t.few_at_most is None
    if stem.startswith("cifar"):
        assert (mo.encoder, mo.width, mo.depth, d.image_size) == ("wrn", 2, 28, 32)
    if stem.startswith("imagenet127") and sgd:  # --model resnet on 112 px crops of the full-res JPEGs
        assert (mo.encoder, mo.stem, d.image_size, d.load_size) == ("resnet50", "imagenet", 112, 112)
        assert d.dataset == "data/imagenet127-full-" + stem.split("_")[1]
    elif stem.startswith("imagenet127"):
        assert (mo.encoder, mo.stem) == ("resnet50", "small")
        assert d.image_size == int(stem.split("_")[-1])
        assert d.dataset == "data/" + stem.replace("_", "-")


def test_cifar_datasets_and_mismatch_only_differ_in_data():
    assert _load(CONFIGS / "cifar10_lt_g100.yaml").data.dataset == "data/cifar10-lt-100"
    c150 = _load(CONFIGS / "cifar10_lt_g150.yaml")
    assert c150.data.dataset == "data/cifar10-lt-150"
    assert _load(CONFIGS / "cifar100_lt_g10.yaml").data.dataset == "data/cifar100-lt-10"
    mm = [_load(CONFIGS / f"mismatch_gu{g}.yaml") for g in (1, 20, 100)]
    assert [c.data.dataset for c in mm] == [f"data/imagenet-mismatch-gu{g}" for g in (1, 20, 100)]
    for c in mm[1:]:
        assert c.method == mm[0].method and c.train == mm[0].train and c.model == mm[0].model


@pytest.mark.parametrize("stem", sorted(PAPER))
def test_fixmatch_counterpart_differs_only_in_algorithm(stem: str):
    bmb, fm = _load(CONFIGS / f"{stem}.yaml"), _load(CONFIGS / "fixmatch" / f"{stem}.yaml")
    assert fm.method.algorithm == "fixmatch"
    assert fm.name == bmb.name.removesuffix("-bmb") + "-fixmatch"
    fm.method.algorithm, fm.name = bmb.method.algorithm, bmb.name
    assert fm == bmb


@pytest.mark.parametrize(
    "path, key, value",
    [
        ("ablation/cifar100_lt_g10_memory_only.yaml", "adaptive_weights", False),
        ("ablation/cifar100_lt_g10_weights_only.yaml", "use_bank", False),
        ("ablation/cifar100_lt_g10_weak_bank.yaml", "bank_view", "weak"),
        ("ablation/demo_memory_only.yaml", "adaptive_weights", False),
        ("ablation/demo_fixmatch.yaml", "algorithm", "fixmatch"),
    ],
)
def test_ablation_switches_one_key(path: str, key: str, value):
    cfg = _load(CONFIGS / path)
    base = _load(CONFIGS / ("demo.yaml" if "demo" in path else "cifar100_lt_g10.yaml"))
    assert getattr(cfg.method, key) == value != getattr(base.method, key)
    setattr(cfg.method, key, getattr(base.method, key))
    cfg.name = base.name
    assert cfg == base


def test_settings_are_small_diffs_from_one_default():
    """Every setting inherits (directly or through a family base) from base/default.yaml."""
    for path in SETTINGS:
        chain, p = [], path
        while True:
            data = yaml.safe_load(p.read_text())
            if "_base_" not in data:
                break
            bases = [data["_base_"]] if isinstance(data["_base_"], str) else data["_base_"]
            for mixin in bases[1:]:  # recipes mixed in after the setting (base/authors_sgd.yaml)
                assert (p.parent / mixin).resolve().parent == (CONFIGS / "base").resolve(), _id(path)
            p = (p.parent / bases[0]).resolve()
            chain.append(p)
        assert chain and chain[-1] == (CONFIGS / "base" / "default.yaml").resolve(), _id(path)
        own = yaml.safe_load(path.read_text())
        n_leaves = sum(
            len(v) if isinstance(v, dict) else 1 for k, v in own.items() if k != "_base_"
        )
        assert n_leaves <= 16, (
            f"{_id(path)} sets {n_leaves} keys: move shared ones into a base file"
        )


def test_unknown_key_in_a_preset_is_rejected(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {CONFIGS / 'cifar10_lt_g100.yaml'}\nmethod:\n  bn_wd: false\n")
    with pytest.raises(ConfigError, match="method.bn_wd"):
        load_config(bad)


@pytest.mark.skipif(not METHOD_MD.is_file(), reason="../shared/docs/method.md not present")
def test_table_transcribed_from_method_md():
    rows = {}
    for line in METHOD_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in METHOD_MD_ROWS:
            bank, get = (int(x) for x in cells[6].split("/"))
            rows[METHOD_MD_ROWS[cells[0]]] = (*(float(c) for c in cells[1:6]), bank, get)
    assert set(rows) == set(METHOD_MD_ROWS.values())
    for stem, values in rows.items():
        assert PAPER[stem] == pytest.approx(values), stem


# ------------------------------------------------------------------ every config key is read
def _attribute_reads(sources: list[Path]) -> set[tuple[str, str]]:
    """``(section, key)`` pairs read as attributes: ``cfg.train.seed``, ``t = cfg.train; t.seed``.

    Top-level keys are reported with section ``""`` (``cfg.name``). ``Config.validate`` is skipped:
    a key that is only validated is still a key no code uses.
    """
    sections = {k.split(".")[0] for k, _, _ in describe() if "." in k}
    reads: set[tuple[str, str]] = set()
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "validate":
                node.body = []
        aliases: dict[str, str] = {}  # local name -> section
        # A parameter annotated with a section's dataclass (``method: MethodConfig``) is that section.
        section_types = {f"{s.capitalize()}Config": s for s in sections}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args + node.args.kwonlyargs:
                    ann = arg.annotation
                    name = ann.id if isinstance(ann, ast.Name) else getattr(ann, "value", None)
                    if isinstance(name, str) and name in section_types:
                        aliases[arg.arg] = section_types[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                pairs = []
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += list(zip(target.elts, node.value.elts))
                    else:
                        pairs.append((target, node.value))
                for tgt, val in pairs:
                    if (
                        isinstance(tgt, ast.Name)
                        and isinstance(val, ast.Attribute)
                        and val.attr in sections
                    ):
                        aliases[tgt.id] = val.attr
                    elif isinstance(tgt, ast.Name) and isinstance(val, ast.Name) and val.id in aliases:
                        aliases[tgt.id] = aliases[val.id]  # m = method
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if isinstance(owner, ast.Attribute) and owner.attr in sections:
                reads.add((owner.attr, node.attr))
            elif isinstance(owner, ast.Name) and owner.id in aliases:
                reads.add((aliases[owner.id], node.attr))
            if (isinstance(owner, ast.Name) and owner.id == "cfg") or (
                isinstance(owner, ast.Attribute) and owner.attr == "cfg"
            ):
                reads.add(("", node.attr))
    return reads


def test_every_config_key_is_read_by_the_code():
    sources = [p for d in ("bmb", "launch", "pipelines") for p in (ROOT / d).rglob("*.py")]
    reads = _attribute_reads(sources)
    unread = []
    for key, _, _ in describe():
        section, _, leaf = key.rpartition(".")
        if (section, leaf) not in reads:
            unread.append(key)
    assert not unread, f"config keys that no code in bmb/, launch/, pipelines/ reads: {unread}"


def test_dead_key_detector_finds_a_dead_key(tmp_path: Path):
    """The detector above is not vacuous: a key read only in validate() counts as unread."""
    src = tmp_path / "mod.py"
    src.write_text(
        "def validate(self):\n    return self.train.seed\n\n"
        "def f(cfg):\n    t = cfg.train\n    return t.epochs, cfg.method.alpha, cfg.name\n"
        "def g(method: MethodConfig, n: int):\n    m, c = method, n\n    return m.put_power, n.real\n"
    )
    reads = _attribute_reads([src])
    assert ("train", "epochs") in reads and ("method", "alpha") in reads and ("", "name") in reads
    assert ("method", "put_power") in reads and ("", "real") not in reads
    assert ("train", "seed") not in reads


def test_every_preset_key_is_a_config_key():
    """Leaf keys as written in the files (the loader merges them; check the raw YAML too)."""
    valid = {k for k, _, _ in describe()}
    for path in list(PRESETS) + sorted((CONFIGS / "base").glob("*.yaml")):
        data = read_yaml(path)

        def leaves(d: dict, prefix: str = "") -> list[str]:
            out = []
            for k, v in d.items():
                out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
            return out

        extra = sorted(set(leaves(data)) - valid)
        assert not extra, f"{_id(path)}: keys no config field holds: {extra}"
        assert not re.search(r"\t", path.read_text()), f"{_id(path)}: tab in YAML"


# ------------------------------------------------------------------ docs/fidelity.md's preset table
FIDELITY_MD = ROOT / "docs" / "fidelity.md"


def _fidelity_rows() -> tuple[list[str], dict[str, list[str]]]:
    """The ledger's preset tables (a header row starting ``| preset | follows |``, each listing every
    preset): their config-key columns, and per preset file its cells in that order, tables joined."""
    keys: list[str] = []
    cells_of: dict[str, dict[str, str]] = {}
    table: list[str] = []
    for line in FIDELITY_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["preset", "follows"]:
            table = [c.strip("`") for c in cells[2:]]
            keys += table
        elif table and len(cells) == len(table) + 2 and cells[0].startswith("`") and cells[0].endswith(".yaml`"):
            cells_of.setdefault(cells[0].strip("`"), {}).update(zip(table, cells[2:]))
    rows = {name: [got.get(k, "<missing>") for k in keys] for name, got in cells_of.items()}
    return keys, rows


def _cell(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_fidelity_ledger_names_every_setting_and_matches_the_resolved_presets():
    keys, rows = _fidelity_rows()
    assert keys, "docs/fidelity.md has no preset table"
    assert set(rows) == {p.name for p in SETTINGS} | {"demo.yaml"}
    for name, cells in rows.items():
        cfg = _load(CONFIGS / name)
        for key, cell in zip(keys, cells):
            section, leaf = key.split(".")
            got = _cell(getattr(getattr(cfg, section), leaf))
            assert got == cell, f"docs/fidelity.md says {key}={cell} for {name}; the preset resolves to {got}"


def test_fidelity_check_is_not_vacuous():
    keys, rows = _fidelity_rows()
    assert {"optim.name", "optim.weight_decay", "train.iters_per_epoch", "train.ema_decay"} <= set(keys)
    assert {"data.view_rule", "data.rand_augment", "method.bank_view", "method.refresh_after_warmup",
            "model.init", "train.eval_protocol"} <= set(keys)
    assert dict(zip(keys, rows["imagenet_lt_50_sgd.yaml"]))["method.refresh_after_warmup"] == "false"
    cfg = _load(CONFIGS / "imagenet_lt_20_sgd.yaml")
    row = dict(zip(keys, rows["imagenet_lt_20_sgd.yaml"]))
    assert row["train.iters_per_epoch"] == "46" == _cell(cfg.train.iters_per_epoch)
    assert row["optim.weight_decay"] != _cell(0.0)


# ------------------------------------------------------------------ the _sgd presets vs the authors' scripts
# Every flag of the script each _sgd preset follows (wujianP/ImbalancedSSL, BMB/scripts/..., the paths in
# docs/fidelity.md), transcribed; paths, logging and the seed left out. ``None``: a switch that is passed.
_SGD_COMMON = {
    "--tcp_distribution_type": "pd_select", "--tcp_sync_input": None, "--tcp_sample_fun_type": "poly_inv",
    "--tcp_balance_power": "3", "--tcp_put_type": "inpool", "--tcp_remove_type": "inpool",
    "--ada_weight_type": "pd_select", "--sample_fun_type": "poly_inv", "--gpu": "0,1,2,3,4,5,6,7",
    "--model": "resnet", "--dist_eval": None, "--find_unused_parameters": None, "--disable_ema_model": None,
    "--tau": "0.7", "--epochs": "200", "--warmup_epochs": "10", "--labeled_batch_size": "64",
    "--unlabeled_batch_size": "64", "--val_batch_size": "128", "--lr": "0.2", "--lr_scheduler_type": "cos",
    "--optim_type": "sgd", "--weight_decay": "5e-4", "--pd_distribution_estimate_nepoch": "999",
}
_SGD_I127 = {**_SGD_COMMON, "--tcp_sample_power": "1.0", "--tcp_loss_weight": "0.5", "--sample_power": "1.5",
             "--dataset": "imagenet127", "--num_workers": "8", "--val-iteration": "250", "--loss_u_weight": "2.0"}
SCRIPTS = {
    "imagenet_lt_20_sgd": {**_SGD_COMMON, "--tcp_refresh_after_warm": None, "--tcp_pool_size": "2048",
                           "--tcp_get_num": "256", "--tcp_sample_power": "1", "--tcp_loss_weight": "0.75",
                           "--sample_power": "0.75", "--dataset": "imagenet", "--labeled_ratio": "20",
                           "--num_workers": "6", "--val-iteration": "46"},
    "imagenet_lt_50_sgd": {**_SGD_COMMON, "--tcp_pool_size": "2048", "--tcp_get_num": "512",
                           "--tcp_sample_power": "0.75", "--tcp_loss_weight": "0.5", "--sample_power": "1",
                           "--dataset": "imagenet", "--labeled_ratio": "50", "--num_workers": "8",
                           "--val-iteration": "114"},
    "imagenet127_10p_64_sgd": {**_SGD_I127, "--tcp_pool_size": "1024", "--tcp_get_num": "256",
                               "--labeled_ratio": "10"},
    "imagenet127_1p_64_sgd": {**_SGD_I127, "--tcp_pool_size": "2048", "--tcp_get_num": "512",
                              "--labeled_ratio": "1"},
}
# Flags with no config key of ours; each is a row of docs/fidelity.md (or changes nothing we compute).
LEDGERED_FLAGS = {
    "--tcp_distribution_type",  # N-hat from the confident aux predictions: ours (row 8)
    "--tcp_sync_input",  # one bank for all ranks (row 15)
    "--tcp_sample_fun_type", "--sample_fun_type", "--ada_weight_type",  # the paper's formulas: ours
    "--tcp_put_type", "--tcp_remove_type",  # the in-pool put/remove (rows 10, 11)
    "--dist_eval", "--find_unused_parameters", "--val_batch_size", "--pd_distribution_estimate_nepoch",
    "--num_workers",  # loader processes: speed only (the 20 % script has 6, ours 8)
    "--labeled_ratio", "--dataset",  # the data set: data.dataset, built by bmb-shards
}


def _script_checks(cfg: Config, world: int = 8) -> dict:
    """Flag -> (what the preset resolves it to, as the script writes it)."""
    m, o, t, mo = cfg.method, cfg.optim, cfg.train, cfg.model
    return {
        "--tcp_refresh_after_warm": m.refresh_after_warmup, "--tcp_strong": m.bank_view == "strong",
        "--tcp_pool_size": m.bank_size, "--tcp_balance_power": m.put_power, "--tcp_sample_power": m.get_power,
        "--tcp_loss_weight": m.lambda_mb, "--sample_power": m.alpha, "--tau": m.threshold,
        "--warmup_epochs": m.warmup_epochs, "--loss_u_weight": m.lambda_u,
        "--gpu": world, "--model": (mo.encoder, mo.stem), "--disable_ema_model": t.ema_decay == 0,
        "--epochs": t.epochs, "--val-iteration": t.iters_per_epoch, "--labeled_batch_size": t.labeled_batch,
        "--unlabeled_batch_size": t.unlabeled_batch, "--lr": o.lr,
        "--lr_scheduler_type": (o.schedule, o.schedule_unit), "--optim_type": (o.name, o.nesterov),
        "--weight_decay": o.weight_decay,
    }


def _as_written(flag: str, value: str | None, world: int = 8):
    """A script's flag value in the units of :func:`_script_checks`."""
    if flag == "--gpu":
        return len(value.split(","))
    if flag == "--model":
        return ("resnet50", "imagenet")  # torchvision ResNet-50: the 7x7 stride-2 stem and max-pool
    if flag == "--lr_scheduler_type":
        return ("cosine", "epoch")  # CosineAnnealingLR(T_max=epochs), stepped once per epoch
    if flag == "--optim_type":
        return ("sgd", False)  # SGD(momentum=0.9), never Nesterov
    if flag in ("--labeled_batch_size", "--unlabeled_batch_size"):
        return int(value) * world  # per GPU; ours are global
    if value is None:
        return True
    return float(value)


@pytest.mark.parametrize("stem", sorted(SCRIPTS))
def test_sgd_presets_equal_their_scripts_flag_by_flag(stem: str):
    cfg = _load(CONFIGS / f"{stem}.yaml")
    checks, flags = _script_checks(cfg), SCRIPTS[stem]
    for flag, value in flags.items():
        if flag in LEDGERED_FLAGS:
            continue
        if flag == "--tcp_get_num":  # per GPU in their scripts; ours per rank or global (the cluster change)
            assert cfg.method.get_num in (int(value), 8 * int(value)), stem
            continue
        assert flag in checks, f"{flag} of {stem}'s script has no check and no ledger entry"
        got = checks[flag]
        want = _as_written(flag, value)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), (stem, flag, got, want)
    # Switches they do not pass are false for them: the defaults of their argparse.
    for flag in ("--tcp_refresh_after_warm", "--tcp_strong"):
        if flag not in flags:
            assert checks[flag] is False, (stem, flag)
    if "--loss_u_weight" not in flags:
        assert cfg.method.lambda_u == 1.0
    if stem.startswith("imagenet127"):  # --crop_size not passed: their default 112
        assert cfg.data.image_size == 112


AUTHORS_REPO = Path("/work/.mirror/wujianP+ImbalancedSSL/repo")
SCRIPT_PATHS = {
    "imagenet_lt_20_sgd": "BMB/scripts/imagenetLT/20per/ours/best/"
                          "19-adaW0.75-Tcp-s2048-g256-bp3-sp1-wt0.75-warm10-refresh--seed2.sh",
    "imagenet_lt_50_sgd": "BMB/scripts/imagenetLT/50per/adaweight+tcp/best/"
                          "00-adaW1-Tcp-s2048-g512-bp3-sp0.75-wt0.5-seed1.sh",
    "imagenet127_10p_64_sgd": "BMB/scripts/imagenet127/adaweight+tcp/tcp_new_ad/"
                              "00-adaW-select-poly-pow1.5_uweight2.0_tcp1024_g256_bp3_sp1.0_wt0.5.sh",
    "imagenet127_1p_64_sgd": "BMB/scripts/imagenet127/adaweight+tcp/tcp_new_ad/"
                             "00-adaW-select-poly-pow1.5_uweight2.0_tcp2048_g512_bp3_sp1.0_wt0.5_inet1per.sh",
}


@pytest.mark.skipif(not AUTHORS_REPO.is_dir(), reason="no local mirror of the authors' repository")
@pytest.mark.parametrize("stem", sorted(SCRIPTS))
def test_script_transcription_matches_the_authors_file(stem: str):
    import shlex
    import subprocess

    text = subprocess.run(["git", f"--git-dir={AUTHORS_REPO}", "show", f"HEAD:{SCRIPT_PATHS[stem]}"],
                          capture_output=True, text=True, check=True).stdout
    tokens = shlex.split(text[text.index("ABCfix.py") + len("ABCfix.py"):].replace("\\\n", " "))
    flags, i = {}, 0
    while i < len(tokens):
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            flags[tokens[i]], i = tokens[i + 1], i + 2
        else:
            flags[tokens[i]], i = None, i + 1
    skip = {"--out", "--data_path", "--annotation_file_path", "--seed", "--writer_log_iter_freq",
            "--writer_log_class_stride", "--train_log_iter_freq"}
    assert {k: v for k, v in flags.items() if k not in skip} == SCRIPTS[stem]
