"""MeLLo (Zhong et al., "MQuAKE: Assessing Knowledge Editing in Language Models via
Multi-Hop Questions", EMNLP 2023): answer a multi-hop question by decomposing it, and check
each hop's tentative answer against a memory of edited facts.

The edits are stored as sentences ("Hey Jude was performed by Madonna"), embedded with
all-MiniLM-L6-v2 (`methods.sentence`). `MelloEditor.answer(question)` runs the paper's loop
with the edited model's own generation and a few-shot prompt (`DEMONSTRATION`, written for
factedit):

    Question: ...
    Subquestion: <generated>
    Generated answer: <generated>
    Retrieved fact: <the stored fact nearest to the subquestion>     (inserted by MeLLo)
    Retrieved fact (does not) contradict(s) ..., so the intermediate answer is: <generated>
    ... next Subquestion, or
    Final answer: <generated>

The model is never changed and no forward pass is hooked: MeLLo acts only through `answer`,
which is what the MQuAKE multi-hop evaluation (`metrics.multihop`) calls. Scoring
CounterFact-style probabilities of a MeLLo-edited model therefore measures the unedited
model, and the lab reports MeLLo on multi-hop questions only.

Departures from the paper: the paper prompts GPT-3 / Vicuna with four demonstrations and
retrieves with Contriever; here the edited model itself (a small instruct model by default)
is prompted with two demonstrations of our own, and retrieval uses MiniLM. A fact is
retrieved only when its cosine similarity reaches `threshold`; otherwise the line says
"Retrieved fact: none." (the paper always retrieves the nearest fact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...models import EditableModel
from ...requests import EditRequest
from ...text import continuation_text, encode
from ..base import ConfigError, Editor, EditResult, MethodConfig, register_method
from ..config import check_positive
from .sentence import SentenceEmbedder

DEMONSTRATION = """\
Question: In which country was the author of "The Silent River" born?
Subquestion: Who is the author of "The Silent River"?
Generated answer: The author of "The Silent River" is Mara Lind.
Retrieved fact: The author of "The Silent River" is Tomas Vale.
Retrieved fact contradicts the generated answer, so the intermediate answer is: Tomas Vale
Subquestion: In which country was Tomas Vale born?
Generated answer: Tomas Vale was born in Sweden.
Retrieved fact: none.
Retrieved fact does not contradict the generated answer, so the intermediate answer is: Sweden
Final answer: Sweden

Question: What is the currency of the country where the headquarters of Orbis Motors is?
Subquestion: Where is the headquarters of Orbis Motors?
Generated answer: The headquarters of Orbis Motors is in Germany.
Retrieved fact: Tokyo is the capital of Japan.
Retrieved fact does not contradict the generated answer, so the intermediate answer is: Germany
Subquestion: What is the currency of Germany?
Generated answer: The currency of Germany is the euro.
Retrieved fact: The currency of Germany is the yen.
Retrieved fact contradicts the generated answer, so the intermediate answer is: the yen
Final answer: the yen
"""


@dataclass
class MelloConfig(MethodConfig):
    """MeLLo's fields.

    max_hops: subquestions before a final answer is forced.
    max_new_tokens: tokens generated per step of the loop.
    threshold: cosine similarity a stored fact needs to be retrieved.
    embedder: a sentence-transformers folder (None: the packaged all-MiniLM-L6-v2).
    """

    max_hops: int = 4
    max_new_tokens: int = 48
    threshold: float = 0.5
    embedder: str | None = None
    demonstration: str = field(default=DEMONSTRATION, repr=False)

    def __post_init__(self) -> None:
        check_positive(self, "max_hops", "max_new_tokens")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"MelloConfig.threshold={self.threshold!r}: a cosine similarity "
                              f"in [-1, 1]")


@dataclass
class MelloAnswer:
    """The final answer and the whole transcript (prompt excluded)."""

    answer: str
    transcript: str
    retrieved: list[str]


def fact_sentence(request: EditRequest) -> str:
    prompt = request.rewrite_prompt
    return prompt + continuation_text(prompt, request.target_new)


class MelloEditor(Editor):
    """MeLLo: keeps edited facts as sentences; multi-hop questions are decomposed by the
    model and each sub-answer checked against the retrieved facts (module docstring)."""

    config: MelloConfig

    def __init__(self, model: EditableModel, config: MelloConfig) -> None:
        super().__init__(model, config)
        self.embedder = SentenceEmbedder(config.embedder)
        self.facts: list[tuple[int, str]] = []  # (edit id, sentence)
        self.next_edit_id = 0

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        edit_id, self.next_edit_id = self.next_edit_id, self.next_edit_id + 1
        self.facts += [(edit_id, fact_sentence(r)) for r in requests]
        self.embedder([f for _, f in self.facts[-len(requests):]])  # embed once, now
        return EditResult(info={"edit_id": edit_id, "facts": len(self.facts)})

    def remove(self, edit_id: int) -> EditResult:
        self.facts = [f for f in self.facts if f[0] != edit_id]
        return EditResult(info={"facts": len(self.facts)})

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"mello": True, "next_edit_id": self.next_edit_id,
                    "facts": [list(f) for f in self.facts]}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        if not manifest.get("mello"):
            raise ValueError("MelloEditor: the saved state is not a MeLLo fact memory")
        self.facts = [(int(i), str(s)) for i, s in manifest["facts"]]
        self.next_edit_id = manifest["next_edit_id"]

    # -- answering ------------------------------------------------------------------------
    def retrieve(self, query: str) -> str | None:
        """The stored fact nearest to `query`, if its similarity reaches the threshold."""
        if not self.facts:
            return None
        sentences = [s for _, s in self.facts]
        sims = self.embedder(sentences) @ self.embedder([query])[0]
        best = int(sims.argmax())
        return sentences[best] if float(sims[best]) >= self.config.threshold else None

    def _continue(self, text: str, stops: Sequence[str]) -> str:
        """Greedy continuation of `text`, cut before the first of `stops`."""
        model = self.model
        ids = torch.tensor([encode(model.tokenizer, text)], device=model.device)
        with torch.inference_mode():
            out = model.model.generate(ids, max_new_tokens=self.config.max_new_tokens,
                                       do_sample=False,
                                       pad_token_id=model.tokenizer.pad_token_id)
        new = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        cut = min([new.index(s) for s in stops if s in new], default=len(new))
        return new[:cut]

    def answer(self, question: str) -> MelloAnswer:
        """Run the decompose / retrieve / check loop (module docstring) on `question`."""
        prompt = self.config.demonstration.rstrip() + f"\n\nQuestion: {question.strip()}\n"
        transcript, retrieved = "", []
        for _ in range(self.config.max_hops):
            step = self._continue(prompt + transcript, ["Retrieved fact:", "\nQuestion:"])
            transcript += step
            if "Final answer:" in step:
                return MelloAnswer(_final(transcript), transcript, retrieved)
            subquestion = _last_field(transcript, "Subquestion:")
            if subquestion is None:
                break
            fact = self.retrieve(subquestion)
            retrieved.append(fact or "none")
            transcript = transcript.rstrip("\n") + f"\nRetrieved fact: {fact or 'none'}.\n"
            step = self._continue(prompt + transcript, ["\nSubquestion:", "\nQuestion:",
                                                        "\nFinal answer:"])
            transcript += step + "\n"
            if "Final answer:" in step:
                return MelloAnswer(_final(transcript), transcript, retrieved)
        transcript += "Final answer:"
        transcript += self._continue(prompt + transcript, ["\n"])
        return MelloAnswer(_final(transcript), transcript, retrieved)


def _last_field(text: str, name: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith(name)]
    return lines[-1][len(name):].strip() if lines else None


def _final(transcript: str) -> str:
    tail = transcript.split("Final answer:")[-1]
    return tail.strip().splitlines()[0].strip() if tail.strip() else ""


register_method("mello", MelloConfig, MelloEditor,
                "multi-hop QA: decompose, answer, check against retrieved edited facts "
                "(MeLLo); acts through MelloEditor.answer only")
