"""SERAC with the packaged all-MiniLM-L6-v2 scope classifier, on a tiny random model: the
scope decides by meaning (paraphrase in, unrelated out), out of scope is bit-identical,
in scope reads the edit as context, and the trained classifier round-trips."""

from __future__ import annotations

import pytest
import torch
from common import COLOSSEUM, UNRELATED, ids_of, logits
from common import EIFFEL_WITH_CONTEXT as EIFFEL
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.methods import ConfigError, SeracConfig
from factedit.methods.memory.serac import load_scope_classifier, train_scope
from factedit.protocol import edit

PARAPHRASE = "In which city can you find the Eiffel Tower? It is in"


def test_scope_is_decided_by_meaning_and_unmatched_rows_are_untouched(tokenizer):
    model = make_tiny_model(tokenizer, layers=2)
    unrelated = ids_of(model, UNRELATED)
    before = logits(model, unrelated)
    handle = edit(model, [EIFFEL, COLOSSEUM], method="serac", mode="sequential",
                  progress=False)
    editor = handle.editor
    assert editor.threshold == 0.75
    paraphrase = ids_of(model, PARAPHRASE)
    assert [e.request for e in editor.retrieve(paraphrase, torch.ones_like(paraphrase))[0]] \
        == [EIFFEL]
    assert editor.retrieve(unrelated, torch.ones_like(unrelated)) == [[]]
    assert torch.equal(logits(model, unrelated), before)
    # in scope: the model reads "New fact: ... Rome." before the query
    ranked = editor.retrieve(paraphrase, torch.ones_like(paraphrase))[0]
    context = torch.tensor([editor.context_ids(ranked)])
    assert tokenizer.decode(context[0]).startswith("New fact: The Eiffel Tower is located in "
                                                   "the city of Rome.")
    with handle.disabled():
        reference = logits(model, torch.cat([context, paraphrase], 1))[:, context.shape[1]:]
    assert torch.allclose(logits(model, paraphrase), reference, atol=1e-10)
    handle.remove(0)
    assert editor.retrieve(paraphrase, torch.ones_like(paraphrase)) == [[]]


def test_trained_scope_classifier_round_trips(tmp_path):
    requests = [EditRequest(prompt=p, subject=s, target_new="x", paraphrases=[para],
                            neighborhood=[(n, "y")])
                for p, s, para, n in [
                    ("{} is located in", "The Eiffel Tower", "Where is the Eiffel Tower? In",
                     "The Louvre is located in"),
                    ("{} plays", "Serena Williams", "Serena Williams is a player of",
                     "Roger Federer plays"),
                    ("{} speaks", "Vladimir Putin", "The language of Vladimir Putin is",
                     "Angela Merkel speaks")]]
    manifest = train_scope(requests, requests, tmp_path / "scope", steps=20)
    assert -1.0 <= manifest["threshold"] <= 1.0 and manifest["train_pairs"] == 6
    projection, threshold = load_scope_classifier(tmp_path / "scope", 384)
    assert projection.shape == (384, 384) and threshold == manifest["threshold"]
    assert not torch.equal(projection, torch.eye(384))  # it trained
    with pytest.raises(ValueError, match="same embedder"):
        load_scope_classifier(tmp_path / "scope", 768)
    with pytest.raises(FileNotFoundError, match="factedit train serac"):
        load_scope_classifier(tmp_path / "nothing", 384)


def test_bad_serac_configs_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="template"):
        SeracConfig(template="{question}")
    with pytest.raises(ConfigError, match="threshold"):
        SeracConfig(threshold=2.0)
    from factedit.methods.memory.sentence import SentenceEmbedder

    with pytest.raises(FileNotFoundError, match="embedder"):
        SentenceEmbedder(tmp_path)
