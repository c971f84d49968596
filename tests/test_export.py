"""The export a run ends with (export/: safetensors + model.json + model card) and bmb-eval on it."""

import json
import shutil

import pytest
import torch

from launch import eval as bmb_eval
from launch import train
from tests.test_train import CONFIG, TINY, demo_data  # noqa: F401  (the module's dataset fixture)


@pytest.fixture(scope="module")
def finished(demo_data, tmp_path_factory):  # noqa: F811
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


def evaluate(export, dataset, tmp_path, *extra):
    out = tmp_path / "eval.json"
    code = bmb_eval.main([str(export), "--dataset", str(dataset), "--split", "test", "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if code == 0 else None)


@pytest.mark.parametrize("algorithm", ["bmb", "fixmatch"])
def test_export_describes_the_evaluated_ema_model(finished, demo_data, algorithm):  # noqa: F811
    from safetensors import safe_open

    finished = finished(algorithm)
    d = finished / "export"
    assert sorted(p.name for p in d.iterdir()) == ["model.json", "model.safetensors", "model_card.md"]
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
    ema = torch.load(finished / "checkpoints" / "ckpt-00000020.pt", weights_only=True)["ema"]["module"]
    with safe_open(d / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(ema)
        assert {k.split(".")[0] for k in f.keys()} == {"encoder", "base_head", "aux_head"}
        for k in ema:
            assert torch.equal(f.get_tensor(k), ema[k]), k
    card = (d / "model_card.md").read_text()
    assert f"**{meta['eval_head']} head**" in card and "bmb-eval" in card and manifest["build_id"] in card


@pytest.mark.parametrize("algorithm, extra", [("bmb", []), ("fixmatch", []),
                                               ("bmb", ["--backend", "webdataset", "--batch", "64"])],
                         ids=["bmb-tensor", "fixmatch-tensor", "bmb-webdataset"])
def test_bmb_eval_reproduces_the_runs_last_evaluation(finished, demo_data, tmp_path, capsys, algorithm,  # noqa: F811
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


@pytest.mark.parametrize("tamper, message", [
    (_flip_weights, "model.safetensors: does not match model.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda d: (d / "model.json").unlink(), "model.json: missing"),
    (lambda d: (d / "model.json").write_text("{not json"), "model.json: not readable JSON"),
    (_widen, "model.safetensors does not fit the model model.json describes"),
], ids=["flipped-byte", "no-weights", "no-json", "bad-json", "wrong-architecture"])
def test_bmb_eval_refuses_a_tampered_or_incomplete_export(finished, demo_data, tmp_path, capsys, tamper,  # noqa: F811
                                                          message):
    d = tmp_path / "export"
    shutil.copytree(finished("bmb") / "export", d)
    tamper(d)
    code, _ = evaluate(d, demo_data, tmp_path)
    assert code == 2
    assert message in capsys.readouterr().err


def test_bmb_eval_refuses_another_datasets_classes(finished, demo_data, tmp_path, capsys):  # noqa: F811
    d = tmp_path / "export"
    shutil.copytree(finished("bmb") / "export", d)
    meta = json.loads((d / "model.json").read_text())
    meta["class_names"] = meta["class_names"][::-1]
    (d / "model.json").write_text(json.dumps(meta))
    code, _ = evaluate(d, demo_data, tmp_path)
    assert code == 2 and "are not the model's" in capsys.readouterr().err
