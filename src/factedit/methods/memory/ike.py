"""IKE: in-context knowledge editing (Zheng et al., "Can We Edit Factual Knowledge by
In-Context Learning?", EMNLP 2023).

The model is edited by its prompt only: before the query come k demonstrations, then the
new fact. A demonstration shows a fact and a prompt answered under it, in three kinds:

    copy    the fact's own prompt, answered with the new target
    update  a paraphrase of the fact's prompt, answered with the new target
    retain  a neighbourhood prompt of the fact, answered with its unchanged answer

built here from the stored edits themselves (`MemoryEditor`: retrieval, prepending, removal
and save/resume are shared with MemPrompt). For a row that retrieves edits, the context is

    New Fact: {prompt_j} {target_j}\\n{demo prompt} {demo answer}\\n\\n   (k demonstrations)
    New Fact: {prompt} {target_new}\\n                                    (the best edit)

followed by the row. Demonstrations come from the next most similar stored edits (the most
similar placed last, nearest the query, as in the paper), their kind rotating copy, update,
retain (copy when the edit has no paraphrase / neighbour).

Departures from the paper: demonstrations come from the edit memory, not from a separate
training corpus (no extra data ships with factedit); retrieval uses the model's own hidden
states instead of a sentence encoder (no download); and the context is prepended only to
rows whose best score reaches `threshold` (the paper prompts every query with it;
`threshold=-1` does that), so unrelated prompts run the unedited model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...requests import EditRequest
from ...text import continuation_text
from ..base import ConfigError, register_method
from .base import MemoryConfig, MemoryEditor

DEMO_KINDS = ("copy", "update", "retain")


@dataclass
class IkeConfig(MemoryConfig):
    """IKE's fields (plus retrieval_layer and threshold of MemoryConfig).

    num_demos: demonstrations before the new fact (the paper uses 32 on GPT-J; each costs
        context length, and the memory must hold that many other edits).
    """

    num_demos: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_demos, bool) or not isinstance(self.num_demos, int) \
                or self.num_demos < 0:
            raise ConfigError(f"IkeConfig.num_demos={self.num_demos!r}: give a count >= 0")


def fact_line(request: EditRequest) -> str:
    prompt = request.rewrite_prompt
    return f"New Fact: {prompt}{continuation_text(prompt, request.target_new)}\n"


def demonstration(request: EditRequest, kind: str) -> str:
    """One demonstration of `kind` built from a stored edit (copy when the kind lacks data)."""
    prompt, answer = request.rewrite_prompt, request.target_new
    if kind == "update" and request.paraphrases:
        prompt = request.paraphrases[0]
    elif kind == "retain" and request.neighborhood:
        prompt, answer = request.neighborhood[0]
    return f"{fact_line(request)}{prompt}{continuation_text(prompt, answer)}\n\n"


class IkeEditor(MemoryEditor):
    """IKE: the retrieved fact is prepended with demonstrations (copy, update, retain)
    drawn from the stored edits most similar to it."""

    config: IkeConfig

    def context(self, best: EditRequest, ranked: Sequence[EditRequest]) -> str:
        others = [r for r in self.demo_pool(best) if r is not best][: self.config.num_demos]
        demos = [demonstration(r, DEMO_KINDS[i % 3]) for i, r in enumerate(others)]
        return "".join(reversed(demos)) + fact_line(best)

    def demo_pool(self, best: EditRequest) -> list[EditRequest]:
        """Stored requests other than `best`, most similar to it first."""
        if not self.config.num_demos or len(self.entries) < 2:
            return []
        key = next(e.key for e in self.entries if e.request is best)
        scores = [float(key @ e.key / (key.norm() * e.key.norm()).clamp_min(1e-12))
                  for e in self.entries]
        order = sorted(range(len(self.entries)), key=lambda j: -scores[j])
        return [self.entries[j].request for j in order]


register_method("ike", IkeConfig, IkeEditor,
                "in-context editing: retrieved demonstrations + the new fact prepended (IKE)")
