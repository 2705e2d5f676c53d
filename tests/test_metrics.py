"""Metrics on a tiny random model: batched scoring equals a plain float64 forward pass."""

import math

import pytest
import torch

from factedit import EditRequest, capture_baseline, evaluate
from factedit.metrics import ngram_entropy, score_pairs
from factedit.text import continuation_ids, encode

PAIRS = [("The Eiffel Tower is located in the city of", "Rome"),
         ("The Eiffel Tower is located in the city of", "Paris"),
         ("Hi", "there friend"),
         ("A much longer prompt about the Louvre museum and its city", "Paris")]


def reference_logprob(model, prompt, answer):
    ids = encode(model.tokenizer, prompt)
    target = continuation_ids(model.tokenizer, prompt, answer)
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids + target])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target))


def test_score_pairs_matches_unbatched_forward(tiny_model):
    scores = score_pairs(tiny_model, PAIRS, batch_size=3)  # padding inside a batch
    for prompt, answer in PAIRS:
        assert scores[(prompt, answer)].logprob == pytest.approx(
            reference_logprob(tiny_model, prompt, answer), rel=1e-9, abs=1e-9)


def test_score_pairs_batch_size_invariant(tiny_model):
    a = score_pairs(tiny_model, PAIRS, batch_size=1)
    b = score_pairs(tiny_model, PAIRS, batch_size=64)
    for pair in PAIRS:
        assert a[pair].argmax == b[pair].argmax
        assert a[pair].logprob == pytest.approx(b[pair].logprob, rel=1e-9)


def test_evaluate_follows_the_counterfact_rules(tiny_model):
    req = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                      target_new="Rome", target_true="Paris",
                      paraphrases=["The Eiffel Tower stands in"],
                      neighborhood=[("The Louvre is located in the city of", "Paris")])
    scores = score_pairs(tiny_model, [
        (req.rewrite_prompt, "Rome"), (req.rewrite_prompt, "Paris"),
        ("The Eiffel Tower stands in", "Rome"), ("The Eiffel Tower stands in", "Paris"),
        ("The Louvre is located in the city of", "Paris"),
        ("The Louvre is located in the city of", "Rome")])
    baseline = capture_baseline(tiny_model, [req])
    out = evaluate(tiny_model, [req], baseline)
    nll = {k: v.mean_nll for k, v in scores.items()}
    assert out["efficacy"] == float(nll[(req.rewrite_prompt, "Rome")] <
                                    nll[(req.rewrite_prompt, "Paris")])
    assert out["generalization"] == float(nll[("The Eiffel Tower stands in", "Rome")] <
                                          nll[("The Eiffel Tower stands in", "Paris")])
    assert out["specificity"] == float(nll[("The Louvre is located in the city of", "Paris")] <
                                       nll[("The Louvre is located in the city of", "Rome")])
    assert out["efficacy_magnitude"] == pytest.approx(
        math.exp(-nll[(req.rewrite_prompt, "Rome")]) - math.exp(-nll[(req.rewrite_prompt, "Paris")]))
    assert out["locality"] == 1.0  # nothing was edited since the baseline
    assert out["n"] == 1 and out["per_request"][0]["case_id"] == req.uid


def test_metric_undefined_without_target_true_is_left_out(tiny_model):
    a = EditRequest(prompt="{} plays", subject="Messi", target_new="tennis")
    b = EditRequest(prompt="{} plays", subject="Federer", target_new="golf", target_true="tennis")
    out = evaluate(tiny_model, [a, b])
    assert out["per_request"][0]["efficacy"] is None
    assert out["efficacy"] == out["per_request"][1]["efficacy"]
    assert out["locality"] is None  # no baseline, no neighbours
    # Either order: a record without target_true after one with it raised KeyError
    # ('efficacy_magnitude') on the first 1,000 zsRE records; the magnitudes were also
    # dropped from the means whenever the first record had no target_true.
    for requests, defined in (([a, b], 1), ([b, a], 0)):
        out = evaluate(tiny_model, requests)
        assert out["efficacy_magnitude"] == out["per_request"][defined]["efficacy_magnitude"]


def test_baseline_must_cover_requests(tiny_model):
    a = EditRequest(prompt="{} plays", subject="Messi", target_new="tennis",
                    neighborhood=[("Federer plays", "tennis")])
    with pytest.raises(ValueError, match="capture_baseline"):
        evaluate(tiny_model, [a], capture_baseline(tiny_model, [
            EditRequest(prompt="{} plays", subject="Nadal", target_new="golf")]))


def test_ngram_entropy_ranks_repetition_low():
    assert ngram_entropy("the the the the the the the") < ngram_entropy(
        "Paris is the capital of France and a large city on the Seine")


def test_long_scorings_show_a_progress_bar(tiny_model, capsys):
    from factedit.metrics.scoring import PROGRESS_MIN_BATCHES

    pairs = [(f"Fact number {i} is", " true") for i in range(PROGRESS_MIN_BATCHES)]
    score_pairs(tiny_model, pairs, batch_size=1)  # one batch per pair: long enough
    assert f"scoring {len(pairs)} pairs" in capsys.readouterr().err
    score_pairs(tiny_model, pairs, batch_size=1, progress=False)
    score_pairs(tiny_model, pairs[:-1], batch_size=1)  # one batch short of a bar
    assert "scoring" not in capsys.readouterr().err
