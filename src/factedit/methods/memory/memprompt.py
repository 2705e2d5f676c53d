"""MemPrompt (Madaan et al., "Memory-assisted prompt editing to improve GPT-3 after
deployment", EMNLP 2022): a growing memory of corrections, retrieved and prepended.

Each edit adds (question key, correction) pairs to the memory: the key is the edit prompt,
the correction the fact written out, `template.format(prompt=..., target=...)`. At query
time the nearest stored question (cosine similarity of the model's own mean-pooled hidden
states, `MemoryEditor`) is retrieved if its score reaches `threshold`, and its correction
alone is prepended to the query. Retrieval, prepending, removal and save/resume are shared
with IKE in `methods/memory/base.py`.

Departures from the paper: the memory holds fact corrections (the user feedback of the
paper's clarification setting becomes the edited fact), and retrieval uses the edited
model's hidden states instead of a separate sentence encoder (no download).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...requests import EditRequest
from ...text import continuation_text
from ..base import register_method
from .base import MemoryConfig, MemoryEditor, check_context_template


@dataclass
class MemPromptConfig(MemoryConfig):
    """MemPrompt's fields (plus retrieval_layer and threshold of MemoryConfig).

    template: the correction prepended; {prompt} is the stored edit prompt (subject filled
        in) and {target} its new answer, with the space scoring puts before an answer.
    """

    template: str = "Correction: {prompt}{target}.\n"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_context_template(self)


class MemPromptEditor(MemoryEditor):
    config: MemPromptConfig

    def context(self, best: EditRequest, ranked: Sequence[EditRequest]) -> str:
        prompt = best.rewrite_prompt
        return self.config.template.format(
            prompt=prompt, target=continuation_text(prompt, best.target_new))


register_method("memprompt", MemPromptConfig, MemPromptEditor,
                "memory of corrections, the nearest prepended at query time (MemPrompt)")
