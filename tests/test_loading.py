"""Model loading: caches carry a checksum and are rebuilt with a warning when corrupt."""

import json

import pytest

from factedit.models import ARCHITECTURES, UnknownArchitectureError, resolve_arch
from factedit.models.loading import _MANIFEST, _verify_cache, file_digest, resolve_source


def test_cache_checksum_mismatch_warns(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / _MANIFEST).write_text(json.dumps({
        "format": 1, "weights_file": weights.name, "weights_blake2b": file_digest(weights)}))
    assert _verify_cache(tmp_path)
    weights.write_bytes(b"weightz")  # corrupted on disk
    with pytest.warns(UserWarning, match="corrupt or stale"):
        assert not _verify_cache(tmp_path)


def test_unknown_architecture_names_the_fix():
    class Config:
        model_type = "mamba"

    with pytest.raises(UnknownArchitectureError, match="Pass arch="):
        resolve_arch(Config())
    spec = resolve_arch(Config(), {"layers": "backbone.layers", "mlp": "mixer",
                                   "mlp_in": "mixer.in_proj", "mlp_out": "mixer.out_proj",
                                   "attn_out": "mixer.out_proj", "embed": "backbone.embeddings",
                                   "final_norm": "backbone.norm_f", "lm_head": "lm_head"})
    assert spec.mlp_out_at(3) == "backbone.layers.3.mixer.out_proj"
    with pytest.raises(ValueError, match="unknown fields"):
        resolve_arch(Config(), {"layerz": "x"})


def test_table_covers_the_required_families():
    assert {"llama", "gemma3_text", "gpt2", "gptj", "gpt_neox", "qwen2", "mistral"} <= set(
        ARCHITECTURES)
    assert ARCHITECTURES["gpt2"].conv1d and not ARCHITECTURES["llama"].conv1d


def test_resolve_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_source(str(tmp_path))


@pytest.mark.slow
def test_builtin_model_loads_from_safetensors_cache(builtin_model):
    from factedit.models.loading import BUILTIN_MODELS, gguf_cache_folder

    folder = gguf_cache_folder(BUILTIN_MODELS["smollm2-135m"]())
    assert (folder / "model.safetensors").is_file() and _verify_cache(folder)
    assert builtin_model.num_layers == 30 and builtin_model.weight(0).shape == (576, 1536)


def test_device_names_resolve_or_fail_before_any_load(tmp_path, monkeypatch):
    import torch

    from factedit.models import load_model, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU.*give \"cpu\""):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device='gpu0'"):
        resolve_device("gpu0")
    # The device is checked before the model: the folder does not even exist.
    with pytest.raises(ValueError, match="device='gpu0'"):
        load_model(str(tmp_path / "no-such-model"), device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cli_passes_the_device_to_every_model_loading_command():
    from factedit.cli import build_parser

    parser = build_parser()
    for argv in (["demo"], ["edit", "--prompt", "{} x"], ["info"], ["run", "x.yaml"],
                 ["train", "mend", "--out", "o"]):
        assert parser.parse_args(argv).device == "cpu"
        assert parser.parse_args([*argv, "--device", "cuda:1"]).device == "cuda:1"
