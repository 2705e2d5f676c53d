"""Covariance statistics: float64 E[k k^T] equal to a direct computation; caches are checked."""

import warnings

import pytest
import torch

from factedit.linalg import covariance
from factedit.linalg.covariance import _cache_path, corpus_text
from factedit.models import Trace


@pytest.fixture
def corpus(shared_data):
    return str(shared_data / "corpus" / "wikitext-2-raw")


def direct_covariance(model, layer, corpus, n_tokens, seq_len):
    text, _ = corpus_text(model, corpus, n_tokens)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(len(ids) // seq_len, -(-n_tokens // seq_len))
    windows = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    with Trace(model.model, model.arch.mlp_out_at(layer), retain_input=True) as t, \
            torch.no_grad():
        model.model(input_ids=windows)
    k = t.input.reshape(-1, t.input.shape[-1]).double()
    return k.T @ k / k.shape[0]


def test_covariance_matches_direct_and_is_cached(tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    C = covariance(tiny_model, [1, 2], corpus, n_tokens=512, seq_len=32, batch_size=3,
                   progress=False)
    for layer in (1, 2):
        assert C[layer].dtype == torch.float64
        ref = direct_covariance(tiny_model, layer, corpus, 512, 32)
        torch.testing.assert_close(C[layer], ref, rtol=1e-10, atol=1e-12)
    again = covariance(tiny_model, [1], corpus, n_tokens=512, seq_len=32, progress=False)
    assert torch.equal(again[1], C[1])


def test_mixed_precision_is_close_to_float64_symmetric_and_cached_apart(tiny_model, corpus,
                                                                          tmp_path, monkeypatch):
    """precision="mixed" (float32 per batch, float64 across batches): within float32's
    rounding of the float64 reference, exactly symmetric, and in its own cache file."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    exact = covariance(tiny_model, [1], corpus, n_tokens=512, seq_len=32, progress=False)[1]
    mixed = covariance(tiny_model, [1], corpus, n_tokens=512, seq_len=32, progress=False,
                       precision="mixed")[1]
    assert mixed.dtype == torch.float64 and torch.equal(mixed, mixed.T)
    assert not torch.equal(mixed, exact)  # really computed apart, not read from float64's file
    torch.testing.assert_close(mixed, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))
    with pytest.raises(ValueError, match="precision"):
        covariance(tiny_model, [1], corpus, n_tokens=512, seq_len=32, precision="half")


def test_corrupt_covariance_cache_is_rebuilt_with_warning(tiny_model, corpus, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    C = covariance(tiny_model, [1], corpus, n_tokens=256, seq_len=32, progress=False)[1]
    _, corpus_id = corpus_text(tiny_model, corpus, 256)
    path = _cache_path(tiny_model, tiny_model.arch.mlp_out_at(1), corpus_id, 256, 32)
    data = bytearray(path.read_bytes())
    data[-16:] = b"\x00" * 16  # damage the tensor bytes, keep the header readable
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = covariance(tiny_model, [1], corpus, n_tokens=256, seq_len=32,
                             progress=False)[1]
    torch.testing.assert_close(rebuilt, C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is clean again
        covariance(tiny_model, [1], corpus, n_tokens=256, seq_len=32, progress=False)


def test_missing_corpus_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        covariance(tiny_model, [0], tmp_path / "nope.txt", n_tokens=64, use_cache=False,
                   progress=False)


def test_without_corpus_text_is_sampled_from_the_model_once(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    first = covariance(tiny_model, [0], None, n_tokens=256, seq_len=32, progress=False)[0]
    assert list((tmp_path / "corpus").glob("*.json"))  # the sample is cached
    second = covariance(tiny_model, [0], None, n_tokens=256, seq_len=32, use_cache=False,
                        progress=False)[0]
    torch.testing.assert_close(first, second)  # same cached text -> same statistics
