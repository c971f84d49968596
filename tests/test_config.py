"""Config: YAML diffs, overrides, validation errors that name the key, dump round-trip."""

import pytest

from bmb.config import ConfigError, describe, dump_config, load_config

DS = ["data.dataset=some/dir"]  # the one key without a usable default


def test_defaults_yaml_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("method:\n  alpha: 2.0\ntrain:\n  epochs: 10\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nmethod:\n  put_power: 1\n")
    cfg = load_config(child, DS + ["train.epochs=3", "method.algorithm=fixmatch", "data.mean=[0.1,0.2,0.3]"])
    assert cfg.method.alpha == 2.0 and cfg.method.put_power == 1.0 and isinstance(cfg.method.put_power, float)
    assert cfg.train.epochs == 3 and cfg.method.algorithm == "fixmatch"
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert cfg.method.threshold == 0.95  # untouched default


@pytest.mark.parametrize("override, match", [
    (["method.betaa=3"], "unknown config key method.betaa"),
    (["nosuch.x=1"], "unknown config key nosuch"),
    (["train.epochs=ten"], "train.epochs: expected an integer"),
    (["train.epochs=0"], "train.epochs: must be >= 1"),
    (["method.threshold=1.5"], "method.threshold: must be <= 1.0"),
    (["method.alpha=-1"], "method.alpha: must be >= 0.0"),
    (["method.algorithm=mixmatch"], "method.algorithm: must be one of bmb, fixmatch"),
    (["method.use_bank=maybe"], "method.use_bank: expected true/false"),
    (["method.get_num=300", "method.get_replacement=false"], r"method.get_num \(300\) must be <= method.bank_size"),
    (["data.std=[1,0,1]"], "data.std"),
    (["train.eval_protocol=best_val"], "data.val_split"),
    (["epochs"], "key=value"),
    (["data.dataset="], "data.dataset is not set"),
    # issue 20: a run name that is not one path component; seeds and integers out of range
    (["name="], "name: '' is not a run name"),
    (["name=."], "name: '.' is not a run name"),
    (["name=.."], "name: '..' is not a run name"),
    (["name=a/b"], "name: 'a/b' is not a run name"),
    (["name=../escape"], "name: '../escape' is not a run name"),
    (["train.seed=100000000000000000000"], "train.seed: 100000000000000000000 is out of range"),
    (["train.seed=1e20"], "train.seed: expected an integer"),
    (["train.seed=2147483648"], "train.seed: must be <= 2147483647"),
    (["train.seed=-1"], "train.seed: must be >= 0"),
    (["train.max_steps=9223372036854775808"], "train.max_steps: 9223372036854775808 is out of range"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, DS + override)


def test_edge_values_still_accepted():
    cfg = load_config(None, DS + ["name=run.v2", "train.seed=2147483647", "train.max_steps=9223372036854775807"])
    assert cfg.name == "run.v2" and cfg.train.seed == 2**31 - 1 and cfg.train.max_steps == 2**63 - 1


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  alpah: 1\n")
    with pytest.raises(ConfigError, match="method.alpah"):
        load_config(bad, DS)


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, DS + ["method.alpha=0.5", "name=x", "model.encoder=small"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_every_key_documented():
    rows = describe()
    assert len(rows) > 40
    assert all(help_text for _, _, help_text in rows)


def test_dotless_scientific_numbers_are_floats(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; a float key takes it as the number it plainly is."""
    cfg = load_config(None, ["data.dataset=x", "optim.lr=1e-3", "method.lambda_mb=2E-1", "optim.weight_decay=5e-4"])
    assert (cfg.optim.lr, cfg.method.lambda_mb, cfg.optim.weight_decay) == (0.001, 0.2, 0.0005)
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  dataset: x\noptim:\n  lr: 3e-4\n")
    assert load_config(f).optim.lr == 0.0003
    for bad in ("optim.lr=1e", "optim.lr=e-3", "train.epochs=1e3"):  # not numbers / not an integer key
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, ["data.dataset=x", bad])


# issue 20: a key given twice in a YAML file is refused, naming the key and the file.
def test_duplicate_yaml_keys_are_an_error_naming_key_and_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  seed: 1\n  epochs: 3\n  seed: 2\n")
    with pytest.raises(ConfigError, match=f"{path}: key 'seed' is given twice in one mapping \\(again on line 4\\)"):
        load_config(path, DS)
    path.write_text("train: {seed: 1}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        load_config(path, DS)
    path.write_text("train:\n  <<: {seed: 1, epochs: 3}\n  seed: 2\n")  # a merge key's value may be overridden
    assert load_config(path, DS).train.seed == 2
