"""Checkpoint I/O in the official layout: round trips, shards, and errors that name the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperowl import CheckpointError, Owl3ForCausalLM, Owl3Processor
from hyperowl.hub import CHECKPOINT_FILES, checkpoint_dir
from hyperowl.model.checkpoint import INIT_FUNCTIONS
from tests.tiny import random_model, tiny_config


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mplugowl3" and config["hyper_layers"] == [2, 4]
    assert config["vision_config"]["image_size"] == 32 and "fused_hyper_attention" not in config
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "language_model.model.layers.1.self_attn.v_kv_proj.weight" in names
    assert "language_model.model.layers.1.self_attn.gate_proj.0.bias" in names
    assert "vision2text_model.weight" in names and "vision_model.post_layernorm.weight" in names
    loaded = Owl3ForCausalLM.from_pretrained(tmp_path)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    ids = torch.randint(0, 100, (1, 12))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_loading_skips_initialisation_and_restores_it(tmp_path):
    random_model().save_pretrained(tmp_path)
    inits = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "config.json").read_text())
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read .*broken/model.safetensors"):
        Owl3ForCausalLM.from_pretrained(tmp_path / "broken")
    Owl3ForCausalLM.from_pretrained(tmp_path)
    assert {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS} == inits
    # a fresh process: initialising meta tensors would import torch._dynamo (seconds of start-up)
    check = (
        "import sys; from hyperowl import Owl3ForCausalLM; "
        f"Owl3ForCausalLM.from_pretrained({str(tmp_path)!r}); assert 'torch._dynamo' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_hub_repository_ids(tmp_path, monkeypatch, tiny_checkpoint):
    import huggingface_hub

    random_model().save_pretrained(tmp_path / "snapshot")
    fetched = []

    def snapshot_download(repo_id, allow_patterns):
        fetched.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert checkpoint_dir(tmp_path / "snapshot") == tmp_path / "snapshot" and not fetched
    model = Owl3ForCausalLM.from_pretrained("mPLUG/mPLUG-Owl3-7B-241101")
    assert fetched == [("mPLUG/mPLUG-Owl3-7B-241101", CHECKPOINT_FILES)] and "*.bin" not in CHECKPOINT_FILES
    assert model.config.hyper_layers == [2, 4]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(tiny_checkpoint))
    assert Owl3Processor.from_pretrained("owner/tiny").tokenizer.name_or_path == str(tiny_checkpoint)

    def offline(repo_id, allow_patterns):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError: no network\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"owner/missing is not a local directory, .*Hub failed \(Got: ConnectError: no network\)"):
        Owl3ForCausalLM.from_pretrained("owner/missing")
    with pytest.raises(CheckpointError, match="does not exist"):
        Owl3ForCausalLM.from_pretrained(tmp_path / "a" / "b")


def test_sharded_checkpoint_loads(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    loaded = Owl3ForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_fused_variant_is_chosen_from_tensor_names(tmp_path):
    model = random_model(tiny_config(fused_hyper_attention=True))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["fused_hyper_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Owl3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.fused_hyper_attention is True
    assert not hasattr(loaded.language_model.model.layers[1].self_attn, "gate_proj")


def test_official_extras_are_tolerated(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["vision_model.head.probe"] = torch.zeros(1, 1, 32)
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(state, tmp_path / "model.safetensors")
    Owl3ForCausalLM.from_pretrained(tmp_path)


def edit_state(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update({"language_model.model.layers.0.self_attn.extra.weight": torch.zeros(2)}), "unknown tensors (1): ['language_model.model.layers.0.self_attn.extra.weight']"),
        (lambda s: s.pop("vision2text_model.bias"), "missing tensors (1): ['vision2text_model.bias']"),
        (lambda s: s.update({"vision2text_model.bias": torch.zeros(3)}), "wrong shapes (1): ['vision2text_model.bias: checkpoint [3] vs model [64]']"),
    ],
    ids=["unknown", "missing", "shape"],
)
def test_mismatched_tensors_are_named(tmp_path, edit, message):
    random_model().save_pretrained(tmp_path)
    edit_state(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        Owl3ForCausalLM.from_pretrained(tmp_path)
    assert message in str(err.value)


def test_corrupt_files_are_named(tmp_path):
    random_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors .*complete safetensors file"):
        Owl3ForCausalLM.from_pretrained(tmp_path)
    weights.unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json is not a safetensors index"):
        Owl3ForCausalLM.from_pretrained(tmp_path)


def test_config_and_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist|no config.json"):
        Owl3ForCausalLM.from_pretrained(tmp_path / "nope")
    random_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llava'"):
        Owl3ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hyper_layers": [9]}))
    with pytest.raises(CheckpointError, match=r"hyper_layers \[9\] outside"):
        Owl3ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files"):
        Owl3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.safetensors")
        Owl3ForCausalLM.from_pretrained(tmp_path, dtype="int8")
