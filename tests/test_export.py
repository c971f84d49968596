"""The export a run ends with (export/: safetensors + model.json + model card) and bmb-eval on it."""

import json
import shutil
import subprocess
import sys
import types

import pytest
import torch
import yaml

from launch import eval as bmb_eval
from launch import train
from tests.demo_data import CONFIG, TINY


@pytest.fixture(scope="module")
def finished(demo_data, tmp_path_factory):
    """``finished(algorithm)``: the run directory of a finished tiny run, trained once per module
    (BMB evaluates the aux head, FixMatch the base head)."""
    out, done = tmp_path_factory.mktemp("runs"), {}

    def get(algorithm):
        if algorithm not in done:
            assert train.main(["--config", CONFIG, *TINY, f"data.dataset={demo_data}", f"train.out_dir={out}",
                               f"name={algorithm}", f"method.algorithm={algorithm}"]) == 0
            done[algorithm] = out / algorithm
        return done[algorithm]

    return get


def final_ema_state(run_dir):
    """The training side's EMA weights: the final (step 20) checkpoint's."""
    return torch.load(run_dir / "checkpoints" / "ckpt-00000020.pt", weights_only=True)["ema"]["module"]


def evaluate(export, dataset, tmp_path, *extra):
    out = tmp_path / "eval.json"
    code = bmb_eval.main([str(export), "--dataset", str(dataset), "--split", "test", "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if code == 0 else None)


@pytest.mark.parametrize("algorithm", ["bmb", "fixmatch"])
def test_export_describes_the_evaluated_ema_model(finished, demo_data, algorithm):
    from safetensors import safe_open

    finished = finished(algorithm)
    d = finished / "export"
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "config.json", "model.json", "model.safetensors"]
    meta = json.loads((d / "model.json").read_text())
    final = json.loads((finished / "final.json").read_text())
    manifest = json.loads((demo_data / "manifest.json").read_text())
    assert meta["eval_head"] == ("aux" if final["algorithm"] == "bmb" else "base")
    assert meta["steps"] == 20 and meta["run_id"] == final["run_id"]
    assert meta["dataset"]["name"] == "demo" and meta["dataset"]["build_id"] == manifest["build_id"]
    assert meta["class_names"] == manifest["class_names"] == final["class_names"]
    assert meta["result"]["per_class_recall"] == final["per_class_recall"]
    assert meta["result"]["protocol"] == final["protocol"]
    assert meta["config"]["method"]["algorithm"] == final["algorithm"]
    # The weights are the final checkpoint's EMA model, encoder and both heads.
    ema = final_ema_state(finished)
    with safe_open(d / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(ema)
        assert {k.split(".")[0] for k in f.keys()} == {"encoder", "base_head", "aux_head"}
        for k in ema:
            assert torch.equal(f.get_tensor(k), ema[k]), k
    card = (d / "README.md").read_text()
    assert f"**{meta['eval_head']} head**" in card and "bmb-eval" in card and manifest["build_id"] in card
    # The Hugging Face convention: the card's YAML metadata, config.json beside the weights.
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "bmb" and front["datasets"] == ["demo"]
    assert {"image-classification", "semi-supervised-learning", "bmb", algorithm} <= set(front["tags"])
    assert len(front["tags"]) == len(set(front["tags"]))
    assert front["metrics"] == ["accuracy", "recall"]
    scores = front["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in scores] == [round(100 * final["top1"], 2), round(100 * final["mean_recall"], 2)]
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "bmb" and config["eval_head"] == meta["eval_head"]
    assert {k: config[k] for k in ("encoder", "width", "depth", "stem", "num_classes", "feat_dim")} == meta["model"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(manifest["class_names"])}
    assert (config["image_size"], config["image_mean"], config["image_std"]) == (
        meta["input"]["image_size"], meta["input"]["mean"], meta["input"]["std"])


@pytest.mark.parametrize("algorithm, extra", [("bmb", []), ("fixmatch", []),
                                               ("bmb", ["--backend", "webdataset", "--batch", "64"])],
                         ids=["bmb-tensor", "fixmatch-tensor", "bmb-webdataset"])
def test_bmb_eval_reproduces_the_runs_last_evaluation(finished, demo_data, tmp_path, capsys, algorithm,
                                                      extra):
    finished = finished(algorithm)
    code, got = evaluate(finished / "export", demo_data, tmp_path, *extra)
    assert code == 0
    last = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 20
    assert got["top1"] == last["top1"] and got["per_class_recall"] == last["per_class_recall"]
    assert (got["mean_recall"], got["many"], got["medium"], got["few"]) == (
        last["mean_recall"], last["many"], last["medium"], last["few"])
    out = capsys.readouterr().out
    assert "| ring-a | 40 |" in out and "mean recall" in out and "the run's own evaluation" in out


def _flip_weights(d):
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))


def _widen(d):  # the description no longer fits the weights (whose hash still matches)
    meta = json.loads((d / "model.json").read_text())
    meta["model"]["width"] = 16
    (d / "model.json").write_text(json.dumps(meta))


def test_bmb_eval_refuses_another_datasets_classes(finished, demo_data, tmp_path, capsys):
    d = tmp_path / "export"
    shutil.copytree(finished("bmb") / "export", d)
    meta = json.loads((d / "model.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (d / "model.json").write_text(json.dumps(meta))
    code, _ = evaluate(d, demo_data, tmp_path)
    assert code == 2 and "are not the model's" in capsys.readouterr().err


def _edit_meta(d, edit):
    meta = json.loads((d / "model.json").read_text())
    edit(meta)
    (d / "model.json").write_text(json.dumps(meta))


def _nan_weights(d):  # a diverged run's weights, recorded with their true hash (so only the values are wrong)
    from safetensors.torch import load_file, save_file

    from bmb.checkpoint import sha256_of

    state = load_file(d / "model.safetensors")
    state["aux_head.weight"][0, 0] = float("nan")
    save_file(state, d / "model.safetensors")
    digest, size = sha256_of(d / "model.safetensors")
    _edit_meta(d, lambda m: m["weights"].update(sha256=digest, bytes=size))


def _link_outside(d):  # model.safetensors a symbolic link to a (matching) file outside the export
    outside = d.parent / "elsewhere.safetensors"
    shutil.move(d / "model.safetensors", outside)
    (d / "model.safetensors").symlink_to(outside)


# A tampered or incomplete export is refused with an error naming the file (exit 2, no traceback).
# Issue #20: a wrong-typed or missing key of model.json is named; an unknown eval_head is refused
# naming it; a weights.file outside the export is refused; so are NaN weights.
@pytest.mark.parametrize("tamper, message", [
    (_flip_weights, "model.safetensors: does not match model.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda d: (d / "model.json").unlink(), "model.json: missing"),
    (lambda d: (d / "model.json").write_text("{not json"), "model.json: not readable JSON"),
    (_widen, "model.safetensors does not fit the model model.json describes"),
    (lambda d: (d / "model.json").write_text("[1, 2]"), "model.json: not a bmb export description"),
    (lambda d: _edit_meta(d, lambda m: m["model"].update(num_classes="10")),
     "model.json: 'model.num_classes' must be a positive integer, got \"10\""),
    (lambda d: _edit_meta(d, lambda m: m["input"].pop("mean")), "model.json: 'input.mean' is missing"),
    (lambda d: _edit_meta(d, lambda m: m.update(weights="model.safetensors")),
     "model.json: 'weights' must be an object"),
    (lambda d: _edit_meta(d, lambda m: m.update(labeled_counts=m["labeled_counts"][:-1])),
     "model.json: 'labeled_counts' has 9 entries for model.num_classes 10"),
    (lambda d: _edit_meta(d, lambda m: m.update(many_above="20")), "model.json: 'many_above' must be an integer"),
    (lambda d: _edit_meta(d, lambda m: m["input"].update(crop="zoom")), "model.json: input: crop must be one of"),
    (lambda d: _edit_meta(d, lambda m: m.update(eval_head="middle")),
     "model.json: 'eval_head' must be one of aux, base, got \"middle\""),
    (lambda d: _edit_meta(d, lambda m: m["weights"].update(file="/etc/passwd")),
     "weights.file '/etc/passwd' must name a file inside the export directory"),
    (lambda d: _edit_meta(d, lambda m: m["weights"].update(file="../export/model.safetensors")),
     "weights.file '../export/model.safetensors' must name a file inside the export directory"),
    (_link_outside, "model.safetensors: leads outside the export directory"),
    (_nan_weights, "model.safetensors: non-finite weights (NaN or inf) in 1 tensor(s): aux_head.weight (1)"),
], ids=["flipped-byte", "no-weights", "no-json", "bad-json", "wrong-architecture", "json-array", "wrong-type",
        "missing-key", "weights-a-string", "short-counts", "threshold-a-string",
        "unknown-crop", "unknown-eval-head", "absolute-weights", "dotdot-weights", "symlink-out", "nan-weights"])
def test_bmb_eval_refuses_a_tampered_or_incomplete_export(finished, demo_data, tmp_path, capsys, tamper, message):
    d = tmp_path / "export"
    shutil.copytree(finished("bmb") / "export", d)
    tamper(d)
    code, _ = evaluate(d, demo_data, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "export error: " in err and message in err, err
    assert "Traceback" not in err


_FRESH = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from bmb.hub import from_pretrained
torch.set_num_threads(1)
model = from_pretrained(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    out = model(x)
save_file({"base": out.base_logits, "aux": out.aux_logits}, sys.argv[3])
print(json.dumps({"eval_head": model.config["eval_head"], "config_imported": "bmb.config" in sys.modules,
                  "training": model.training}))
"""


def test_from_pretrained_in_a_fresh_process_gives_the_training_models_logits(finished, tmp_path):
    """config.json + model.safetensors alone (model.json removed) rebuild the run's EMA model: the
    same logits, bit for bit, as the training side's model (built from the run's config, the final
    checkpoint's EMA weights loaded) on fixed inputs; the loading process never imports bmb.config."""
    from safetensors.torch import load_file, save_file

    from bmb.config import load_config
    from bmb.models import BMBModel

    run = finished("bmb")
    d = tmp_path / "export"
    shutil.copytree(run / "export", d)
    (d / "model.json").unlink()
    cfg = load_config(str(run / "config.yaml"), [])
    ema = final_ema_state(run)
    model = BMBModel.build(cfg.model.encoder, 10, width=cfg.model.width, depth=cfg.model.depth, stem=cfg.model.stem)
    model.load_state_dict(ema)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, tmp_path / "x.safetensors")
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = model.eval()(x)
    finally:
        torch.set_num_threads(2)
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(d), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"eval_head": "aux", "config_imported": False, "training": False}
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["base"], ref.base_logits) and torch.equal(got["aux"], ref.aux_logits)
    assert not torch.equal(got["aux"], got["base"])  # two heads, told apart


def test_from_pretrained_refuses_a_broken_config(finished, tmp_path):
    from bmb.export import ExportError
    from bmb.hub import from_pretrained

    d = tmp_path / "export"
    shutil.copytree(finished("bmb") / "export", d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "eval_head": "middle"}))
    with pytest.raises(ExportError, match="config.json: unknown eval_head 'middle'"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**config, "num_classes": 9}))
    with pytest.raises(ExportError, match="config.json: id2label has 10 labels for num_classes 9"):
        from_pretrained(d)
    _nan_weights(d)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="non-finite weights"):
        from_pretrained(d)


def _fake_hub(calls):
    """A stand-in for huggingface_hub (no network): HfApi records what it is asked to do."""

    class CommitOperationAdd:
        def __init__(self, path_in_repo, path_or_fileobj):
            self.path_in_repo, self.path_or_fileobj = path_in_repo, path_or_fileobj

    class HfApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def create_commit(self, repo_id, operations, **kw):
            files = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
            calls.append(("create_commit", repo_id, files, kw))
            return "commit-info"

    return types.SimpleNamespace(HfApi=HfApi, CommitOperationAdd=CommitOperationAdd)


def test_push_to_hub_uploads_the_checked_export_in_one_commit(finished, tmp_path, monkeypatch):
    from bmb.export import ExportError
    from bmb.hub import push_to_hub

    d = finished("bmb") / "export"
    calls = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", _fake_hub(calls))
    assert push_to_hub(d, "user/demo-bmb", token="t0k", private=True) == "commit-info"
    assert calls[0] == ("init", "t0k")
    assert calls[1] == ("create_repo", "user/demo-bmb", {"private": True, "exist_ok": True, "repo_type": "model"})
    (_, repo, files, kw), = calls[2:]
    assert repo == "user/demo-bmb" and kw["repo_type"] == "model"
    assert sorted(files) == ["README.md", "config.json", "model.json", "model.safetensors"]
    assert all(files[f] == (d / f).read_bytes() for f in files)
    # A modified export is never published.
    bad, calls[:] = tmp_path / "export", []
    shutil.copytree(d, bad)
    _flip_weights(bad)
    with pytest.raises(ExportError, match="does not match model.json"):
        push_to_hub(bad, "user/demo-bmb")
    assert calls == []


def test_push_to_hub_without_huggingface_hub_says_what_to_install(finished, monkeypatch):
    from bmb.hub import push_to_hub

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        push_to_hub(finished("bmb") / "export", "user/demo-bmb")


def test_write_export_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    from bmb.config import load_config
    from bmb.export import ExportError, write_export
    from bmb.models import BMBModel

    model = BMBModel.build("small", 3, width=4)
    with torch.no_grad():
        model.aux_head.bias[1] = float("inf")
    cfg = load_config(None, ["data.dataset=nowhere", "model.encoder=small"])
    result = {"protocol": "last", "top1": 0.5, "mean_recall": 0.5, "many": 0.5, "medium": 0.5, "few": 0.5,
              "per_class_recall": [0.5] * 3}
    with pytest.raises(ExportError, match=r"model.safetensors \(not written\): non-finite weights .* aux_head.bias"):
        write_export(tmp_path / "export", model, cfg=cfg, eval_head="aux", class_names=["a", "b", "c"],
                     labeled_counts=[4, 2, 1], thresholds=(3, 1), result=result, history=[], step=5, run_id="r")
    assert not (tmp_path / "export").exists()
