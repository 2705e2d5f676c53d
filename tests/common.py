"""Requests, texts and small functions that several test files share.

Test files import from here (or from conftest), never from each other: a test module is
collected by pytest, and importing it elsewhere runs it twice in one namespace.
"""

from __future__ import annotations

import json

import torch

import factedit as fe
from factedit import EditRequest
from factedit.metrics.scoring import score_pairs
from factedit.text import encode

# -- requests on tiny models (GRACE, patches, memory editors, SERAC) --------------------------

EIFFEL = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                     target_new="Rome", target_true="Paris")
LOUVRE = EditRequest(prompt="{} was designed by", subject="The Louvre pyramid",
                     target_new="Gustave Eiffel", target_true="I. M. Pei")
# EIFFEL with a paraphrase and a neighbour: what the memory editors retrieve and score.
EIFFEL_WITH_CONTEXT = EditRequest(prompt="{} is located in the city of",
                                  subject="The Eiffel Tower", target_new="Rome",
                                  target_true="Paris",
                                  paraphrases=["The Eiffel Tower stands in"],
                                  neighborhood=[("The Louvre is located in the city of", "Paris")])
COLOSSEUM = EditRequest(prompt="{} was built by", subject="The Colosseum",
                        target_new="the Vikings", target_true="the Romans")
UNRELATED = "My favourite breakfast is"

# -- requests for the hypernetworks (MEND, KE) ------------------------------------------------

HYPERNET_FACTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("{} plays the sport of", "Serena Williams", "cricket", "tennis"),
    ("The mother tongue of {} is", "Vladimir Putin", "French", "Russian"),
    ("{} was developed by", "Windows XP", "Apple", "Microsoft"),
]
HYPERNET_REQUESTS = [EditRequest(prompt=p, subject=s, target_new=n, target_true=t,
                                 paraphrases=[f"In short, {p.format(s)}"],
                                 neighborhood=[("The capital of Japan is", "Tokyo")])
                     for p, s, n, t in HYPERNET_FACTS]


def ids_of(model, text: str) -> torch.Tensor:
    """`text`'s token ids as a (1, T) tensor."""
    return torch.tensor([encode(model.tokenizer, text)])


def logits(model, text_or_ids: str | torch.Tensor) -> torch.Tensor:
    """The model's logits on a text or on (1, T) ids, without gradients."""
    ids = ids_of(model, text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    with torch.no_grad():
        return model.model(input_ids=ids).logits


def nll(model, request: EditRequest) -> float:
    """Mean NLL of target_new after the rewrite prompt."""
    pair = (request.rewrite_prompt, request.target_new)
    return score_pairs(model, [pair])[pair].mean_nll


def reference_greedy(model, prompt: str, n: int) -> list[int]:
    """Plain unbatched greedy decoding, no cache: the definition."""
    ids = encode(model.tokenizer, prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def assert_generation_equals_whole_rows(model, prompts: list[str], n: int, label=None) -> None:
    """factedit's batched generation (`generate_continuations`, no stop string) writes for
    every prompt what plain whole-row greedy decoding writes."""
    from factedit.metrics.generation import generate_continuations

    reference = {p: reference_greedy(model, p, n) for p in prompts}
    got = generate_continuations(model, prompts, max_new_tokens=n, stop=(), batch_size=8,
                                 progress=False)
    for prompt in prompts:
        assert got[prompt] == model.tokenizer.decode(reference[prompt],
                                                     skip_special_tokens=True), (label, prompt)


def greedy_first(model, request: EditRequest) -> bool:
    """Is target_new's first token the greedy prediction after the prompt?"""
    pair = (request.rewrite_prompt, request.target_new)
    score = score_pairs(model, [pair])[pair]
    return score.argmax[0] == score.target[0]


# -- the lab on tiny models -------------------------------------------------------------------

LAB_FACTS = [
    fe.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                   target_new="Rome", target_true="Paris", case_id="eiffel",
                   paraphrases=["The Eiffel Tower stands in"],
                   neighborhood=[("The Louvre is located in the city of", "Paris")]),
    fe.EditRequest(prompt="{} plays the sport of", subject="Lionel Messi",
                   target_new="tennis", target_true="football", case_id="messi",
                   paraphrases=["Lionel Messi is a professional"],
                   neighborhood=[("Cristiano Ronaldo plays the sport of", "football")]),
    fe.EditRequest(prompt="{} was written in the language", subject="Don Quixote",
                   target_new="German", target_true="Spanish", case_id="quixote",
                   neighborhood=[("One Hundred Years of Solitude was written in", "Spanish")]),
    fe.EditRequest(prompt="The capital of {} is", subject="Italy", target_new="Milan",
                   target_true="Rome", case_id="italy",
                   paraphrases=["{} has its capital in".format("Italy")]),
    fe.EditRequest(prompt="{} is a product of", subject="The iPhone", target_new="Nokia",
                   target_true="Apple", case_id="iphone",
                   neighborhood=[("The Macintosh is a product of", "Apple")]),
]
# Locate-method settings that keep a lab run on a tiny model to seconds.
LAB_TINY = dict(layers=[1, 2], v_steps=3, context_prefixes=0, covariance_seq_len=32)
LAB_TEXT = ("The river runs past the old mill and the children walk to school along its bank. "
            "In spring the fields turn green, farmers sow wheat and the market fills with "
            "people. Scientists measured the temperature of the lake every morning for three "
            "years. ")


def experiment_dict(corpus, dataset, **changes):
    """A two-method (d4s, memit) experiment over LAB_FACTS on the lab_env corpus."""
    data = {
        "name": "tiny",
        "methods": [{"name": "d4s", "config": dict(LAB_TINY)},
                    {"name": "memit", "config": dict(LAB_TINY)}],
        "dataset": {"name": str(dataset)},
        "n_edits": [2, 4, 5],
        "eval": {"immediate": True},
        "covariance": {"corpus": str(corpus), "tokens": 256},
        "checkpoint_every": 2,
        "seed": 0,
    }
    data.update(changes)
    return data


def fake_run(folder, name, question_type, efficacy, arc_after, ppl, batch_size=1, n=10,
             order=(0, 1, 2), finished=True):
    """A finished run folder written straight into a store: d4s after n edits of the
    requests r0, r1, r2 (in `order` in requests.json); `finished=False`: d4s's resume point
    says it stopped after n of 2n edits."""
    from factedit.lab import ResultsStore
    from factedit.lab.store import score_rows

    folder.mkdir(parents=True)
    mode = "sequential" if batch_size == 1 else "sequential-batch"
    config = {"name": name, "model": "tiny", "mode": mode, "batch_size": batch_size,
              "dataset": {"name": "counterfact", "question_type": question_type},
              "methods": [{"name": "d4s"}], "n_edits": [n] if finished else [n, 2 * n]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "requests.json").write_text(json.dumps([
        {"case_id": f"r{i}", "prompt": "{} is in", "subject": f"Place {i}", "target_new": "Rome"}
        for i in order]))
    with ResultsStore(folder / "results.sqlite") as store:
        store.write(scores=[
            *score_rows("unedited", n, "unedited", {"target_ppl": ppl, "efficacy": 0.4,
                                                    "generalization": 0.3,
                                                    "specificity": 0.8}, uid="*"),
            # per request (n_edits 0): 100, 300 and 800 times ppl / 400
            *[row for i, f in enumerate((0.25, 0.75, 2.0))
              for row in score_rows("unedited", 0, "unedited", {"target_ppl": ppl * f},
                                    uid=f"r{i}")],
            *score_rows("unedited", 0, "downstream", {"arc_challenge/acc": 0.30}, uid="*"),
            *score_rows("d4s", n, "checkpoint", {"efficacy": efficacy, "generalization": 0.5,
                                                 "specificity": 0.7}, uid="*"),
            *score_rows("d4s", n, "downstream", {"arc_challenge/acc": arc_after}, uid="*")],
            progress=("d4s", n, None, finished))
    return folder
