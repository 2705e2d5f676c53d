"""Generation metrics: is the edit in what the model *writes*, not only in what it scores?

The teacher-forced metrics of `metrics.edit` feed the answer in and compare probabilities;
a user sees greedy text instead. These metrics generate it, as the WILD evaluation of "The
Mirage of Model Editing" (Yang et al., 2025) does, and judge the text:

    gen_efficacy        the edit prompt's continuation contains target_new (0/1 per request)
    gen_generalization  the same on each paraphrase, averaged per request
    gen_specificity     of the neighbourhood prompts whose expected answer the UNEDITED model
                        generates (needs a baseline: `capture_baseline(..., generation=True)`),
                        the share still generated; pooled over all such prompts, and
    gen_specificity_n   its denominator (few prompts: the figure is rough)
    gen_neighborhood_acc  share of neighbourhood prompts generating their expected answer now
                        (no baseline needed; the unedited model's value says how much it knows)
    gen_bleed           share of neighbourhood prompts that now generate target_new
    gen_portability     share of portability questions answered with their expected answer
    gen_fluency         ROME's n-gram entropy of free generations from the request's
                        `metadata["generation_prompts"]` (CounterFact's ROME-format records)
    gen_text            the edit prompt's continuation itself (per request, for reading)
    gen_texts           every prompt's continuation {prompt: text} (per request)

Generation (`GenerationOptions`): greedy, `max_new_tokens` (default 50), the continuation
cut at the first stop string ("." and newline by default, WILD's choice: a fact is one
clause; "St. Petersburg" is cut to "St" by it, as in WILD), the prompt put in a `context`:
"bare" (as is), "qa" (WILD's instruction "Please answer the question:\\n\\nQ: ...\\nA:") or
"chat" (the tokenizer's chat template, the prompt as the user's turn).

Speed: distinct prompts only, sorted by token length, left-padded batches, greedy decoding
with the KV cache (unless an attachment that needs whole rows turned the cache off and
does not follow rows: the memory editors; GRACE's from-key mode and WISE follow them). Each
row stops at its first token whose text holds a stop string (a lookup table over the
vocabulary, built once per tokenizer) or EOS, and leaves the batch and the cache then:
`transformers`' `generate` keeps finished rows computing
padding until the longest row ends (with a per-row stopping criterion it took 311 s where
this loop took 166 s on the 298 prompts of 100 CounterFact requests, batch 64, one thread
on a shared machine; `bench/generation_speed.py` times it beside the teacher-forced scoring).

Judge: `judge="contains"` (default) counts a target when its normalised form occurs as
whole words in the normalised continuation; `judge="exact"` asks the whole continuation to
equal it (WILD's exact match; strict for CounterFact's sentence prompts, whose greedy
continuations go on after the answer: " French, and she also ..."); or any callable
`judge(generated, targets, request) -> bool` (an LLM judge a user has). Normalisation
(`normalize_answer`), SQuAD's plus two changes, both applied to target and text alike:
  - lowercase; punctuation replaced by a space (SQuAD deletes it; a space keeps
    "English-speaking" containing the word "english"); the articles a, an, the dropped;
    whitespace collapsed;
  - a possessive "'s" dropped, and a light plural strip per word of 4+ letters (-ies -> -y,
    -es after s/x/z/ch/sh dropped, else a final -s dropped unless the word ends in ss, us
    or is), so "sitcoms" matches the target "sitcom" (whole-word matching rejected it: the
    generated text names the same thing). Nothing else (tense, case endings) is touched:
    a stronger stemmer would merge distinct answers. `inflection=False` turns this off.
Targets: target_new plus `metadata["target_new_aliases"]`; a neighbourhood or portability
answer plus the aliases the KnowEdit reader keeps (`metadata["neighborhood_answers"]`,
`metadata["portability_answers"]`, lists parallel to the pairs).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models import EditableModel
from ..models.attach import FollowedRows, followed_rows
from ..requests import EditRequest
from ..text import encode
from .means import mean_defined
from .ngrams import ngram_entropy

CONTEXTS = ("bare", "qa", "chat")
JUDGES = ("contains", "exact")
QA_TEMPLATE = "Please answer the question:\n\nQ: {prompt}\nA:"
GEN_METRICS = ("gen_efficacy", "gen_generalization", "gen_specificity", "gen_bleed",
               "gen_portability", "gen_fluency")
# Every numeric key a generation row may carry (the aggregate keys of `aggregate_generation`).
GEN_KEYS = (*GEN_METRICS, "gen_specificity_n", "gen_neighborhood_acc")

Judge = Callable[[str, list[str], EditRequest], bool]


class GenerationOptionsError(ValueError):
    """A generation option is invalid; the message names the option and the fix."""


@dataclass(frozen=True)
class GenerationOptions:
    """How generation metrics generate and judge (see the module docstring).

    context: "bare" (the prompt as is), "qa" (WILD's QA instruction around it) or "chat"
        (the model's chat template; an error for a tokenizer without one).
    max_new_tokens: the most tokens generated per prompt (WILD: 50).
    stop: strings that end a continuation; it is cut at the first one (WILD: "." and "\\n").
    judge: "contains" (normalised target as whole words in the continuation), "exact"
        (normalised continuation equals a normalised target) or a callable
        `judge(generated, targets, request) -> bool`.
    inflection: the light plural/possessive normalisation of the built-in judges.
    fluency: also generate from `metadata["generation_prompts"]` where requests have them
        and report ROME's n-gram entropy (`gen_fluency`).
    fluency_max_new_tokens: tokens generated per generation prompt for fluency (no stop).
    batch_size: prompts per `generate` call.
    """

    context: str = "bare"
    max_new_tokens: int = 50
    stop: tuple[str, ...] = (".", "\n")
    judge: str | Judge = "contains"
    inflection: bool = True
    fluency: bool = True
    fluency_max_new_tokens: int = 100
    batch_size: int = 64

    def __post_init__(self) -> None:
        where = "GenerationOptions"
        if self.context not in CONTEXTS:
            raise GenerationOptionsError(f"{where}.context={self.context!r}: choose one of "
                                         f"{', '.join(CONTEXTS)}")
        for name in ("max_new_tokens", "fluency_max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationOptionsError(f"{where}.{name}={value!r}: give an integer >= 1")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise GenerationOptionsError(f"{where}.stop={self.stop!r}: give a list of non-empty "
                                         f"strings (or [] to stop only at max_new_tokens)")
        object.__setattr__(self, "stop", tuple(stop))
        if not callable(self.judge) and self.judge not in JUDGES:
            raise GenerationOptionsError(
                f"{where}.judge={self.judge!r}: choose one of {', '.join(JUDGES)}, or pass a "
                f"callable judge(generated, targets, request) -> bool")
        for name in ("inflection", "fluency"):
            if not isinstance(getattr(self, name), bool):
                raise GenerationOptionsError(f"{where}.{name}={getattr(self, name)!r}: give "
                                             f"true or false")

    def generation_key(self) -> dict[str, Any]:
        """The options that change what is generated (a baseline must match them)."""
        return {"context": self.context, "max_new_tokens": self.max_new_tokens,
                "stop": list(self.stop)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options; a callable judge is written as "callable:<its name>"."""
        data = dataclasses.asdict(self)
        data["stop"] = list(self.stop)
        if callable(self.judge):
            data["judge"] = "callable:" + getattr(self.judge, "__qualname__", type(self.judge).__name__)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "generation") -> GenerationOptions:
        """Options from a mapping (an experiment file's `eval.generation`); unknown keys and
        bad values raise GenerationOptionsError naming `where.<key>` and the fix."""
        if not isinstance(data, Mapping):
            raise GenerationOptionsError(f"{where}: give true, false or a mapping of options "
                                         f"({', '.join(f.name for f in dataclasses.fields(cls))})")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise GenerationOptionsError(f"{where}.{key}: unknown option{hint}; known: "
                                             f"{', '.join(names)}")
        if isinstance(data.get("judge"), str) and data["judge"].startswith("callable:"):
            raise GenerationOptionsError(f"{where}.judge={data['judge']!r}: a callable judge "
                                         f"cannot be read back from a file; pass the function")
        try:
            return cls(**dict(data))
        except GenerationOptionsError as err:
            raise GenerationOptionsError(str(err).replace("GenerationOptions", where, 1)) from None


def generation_options(value: bool | Mapping[str, Any] | GenerationOptions | None
                       ) -> GenerationOptions | None:
    """`generation=` as the API takes it: None/False off, True the defaults, a mapping or
    GenerationOptions as given."""
    if value is None or value is False:
        return None
    if value is True:
        return GenerationOptions()
    if isinstance(value, GenerationOptions):
        return value
    if isinstance(value, Mapping):
        return GenerationOptions.from_dict(value)
    raise GenerationOptionsError(f"generation={value!r}: give True, False, a dict of options or "
                                 f"a GenerationOptions")


# --------------------------------------------------------------------------- judging

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_POSSESSIVE = re.compile(r"(\w)['\u2019]s\b")


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _singular(word: str) -> str:
    if len(word) < 4:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalize_answer(text: str, inflection: bool = True) -> str:
    """SQuAD-style normal form with a light plural strip (see the module docstring)."""
    text = _POSSESSIVE.sub(r"\1", text.lower())
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    words = _ARTICLES.sub(" ", text).split()
    if inflection:
        words = [_singular(w) for w in words]
    return " ".join(words)


def matches_answer(generated: str, targets: Iterable[str], exact: bool = False,
                   inflection: bool = True) -> bool:
    """Does the normalised continuation contain (or, `exact`, equal) a normalised target?"""
    text = normalize_answer(generated, inflection)
    for target in targets:
        norm = normalize_answer(target, inflection)
        if not norm:
            continue
        if (text == norm) if exact else (f" {norm} " in f" {text} "):
            return True
    return False


def _judge_fn(options: GenerationOptions) -> Judge:
    if callable(options.judge):
        return options.judge
    exact, inflection = options.judge == "exact", options.inflection
    return lambda generated, targets, request: matches_answer(generated, targets, exact,
                                                              inflection)


def _aliases(request: EditRequest, key: str, index: int) -> list[str]:
    lists = request.metadata.get(key)
    if isinstance(lists, list) and index < len(lists) and isinstance(lists[index], list):
        return [a for a in lists[index] if isinstance(a, str)]
    return []


def _targets(first: str, aliases: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([first, *aliases]))


def new_targets(request: EditRequest) -> list[str]:
    """target_new and its aliases (`metadata["target_new_aliases"]`)."""
    aliases = request.metadata.get("target_new_aliases") or []
    return _targets(request.target_new, [a for a in aliases if isinstance(a, str)])


# --------------------------------------------------------------------------- generating

def context_ids(tokenizer: Any, prompt: str, context: str = "bare") -> list[int]:
    """Token ids of `prompt` put in `context` (see GenerationOptions.context)."""
    if context == "bare":
        return encode(tokenizer, prompt)
    if context == "qa":
        return encode(tokenizer, QA_TEMPLATE.format(prompt=prompt))
    if context == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationOptionsError("context='chat': this model's tokenizer has no chat "
                                         "template; use context='qa' or 'bare'")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, text, add_special_tokens=False)
    raise GenerationOptionsError(f"context={context!r}: choose one of {', '.join(CONTEXTS)}")


# (id(tokenizer), stop strings, vocabulary size) -> (tokenizer, table); the tokenizer is held
# so its id cannot be reused by another one while the entry lives.
_STOP_TABLES: dict[tuple[int, tuple[str, ...], int], tuple[Any, torch.Tensor]] = {}


def stop_token_table(tokenizer: Any, stop: Sequence[str], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: does the token, decoded alone, contain a stop string?

    A stop string split over two tokens is not seen here; then the row runs on to
    max_new_tokens, and the text cut (done on the decoded continuation) is still right:
    the table only decides when to stop computing.
    """
    key = (id(tokenizer), tuple(stop), vocab_size)
    hit = _STOP_TABLES.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[:n] = torch.tensor([any(s in t for s in stop) for t in texts], dtype=torch.bool)
    if len(_STOP_TABLES) >= 8:
        _STOP_TABLES.pop(next(iter(_STOP_TABLES)))
    _STOP_TABLES[key] = (tokenizer, table)
    return table


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _vocab_size(model: EditableModel) -> int:
    head = model.model.get_output_embeddings()
    size = getattr(getattr(head, "weight", None), "shape", (0,))[0]
    return max(int(size), int(getattr(model.model.config, "vocab_size", 0) or 0),
               len(model.tokenizer))


def _eos_ids(model: EditableModel) -> list[int]:
    eos = getattr(model.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def _greedy(model: EditableModel, rows: Sequence[list[int]], max_new_tokens: int,
            done_table: torch.Tensor, use_cache: bool,
            followed: FollowedRows | None = None) -> list[list[int]]:
    """Greedy new tokens of each row (left-padded together), each row leaving the batch at
    its first token marked in `done_table` (a stop string or EOS; that token is kept).

    Rows that are done are dropped from the batch and, with the KV cache, from the cache
    (`batch_select_indices`), so a batch costs the sum of its rows' lengths, not its longest
    row times its size (`generate` keeps finished rows computing padding). Without the cache
    (an attachment that must see whole rows turned it off), every step re-runs the rows.
    `followed`: the session of attachments that follow rows (`models.attach.followed_rows`):
    told which rows stay whenever rows leave, and asked after each cached step whether a
    hook's decision changed so that the whole rows must run again (then they do, once, and
    the cache starts from that pass).
    The model's own forward and `head_logits`, so attachments and Gemma's logit cap act.
    """
    device, field = model.device, model.cache_field
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    done_table = done_table.to(device)
    alive = torch.arange(len(rows), device=device)  # original index of each row still running
    new_tokens: list[list[int]] = [[] for _ in rows]
    base = model.model.base_model
    step_ids, step_pos, cache = ids, positions, None
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"use_cache": use_cache}
        if cache is not None:
            kwargs[field] = cache
        out = base(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, **kwargs)
        if cache is not None and followed is not None and followed.take_rerun():
            out = base(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True)
        token = model.head_logits(out.last_hidden_state[:, -1]).argmax(-1)  # (rows alive,)
        for row, t in zip(alive.tolist(), token.tolist()):
            new_tokens[row].append(t)
        keep = ~done_table[token]
        if not bool(keep.any()):
            break
        alive, token, mask = alive[keep], token[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        # the whole rows so far (what a step without the cache, or a re-run, reads)
        ids = torch.cat([ids[keep], token[:, None]], dim=1)
        positions = torch.cat([positions[keep], positions[keep, -1:] + 1], dim=1)
        if use_cache:
            cache = out[field]
            if not bool(keep.all()):
                cache.batch_select_indices(keep.nonzero().squeeze(1))
                if followed is not None:
                    followed.select(keep.nonzero().squeeze(1))
            step_ids, step_pos = token[:, None], positions[:, -1:]
        else:
            step_ids, step_pos = ids, positions
    return new_tokens


# Generations of at least this many batches get a progress bar.
PROGRESS_MIN_BATCHES = 8


def generate_continuations(model: EditableModel, prompts: Iterable[str], context: str = "bare",
                           max_new_tokens: int = 50, stop: Sequence[str] = (".", "\n"),
                           batch_size: int = 64, progress: bool = True) -> dict[str, str]:
    """Greedy continuation of every distinct prompt, cut at the first stop string.

    Returns {prompt: continuation} in first-seen order (the prompt itself left out, leading
    space kept, special tokens dropped). Prompts are put in `context`, sorted by token length, left-padded and
    run `batch_size` at a time; a row stops at EOS or its first token that holds a stop
    string (`stop_token_table`), and the decoded text is cut at the first stop string.
    Greedy means argmax: the model's generation_config (repetition penalty, sampling) is
    not applied. The KV cache is used unless `generation_config.use_cache` is False (set
    by attachments that must see whole rows: the memory editors) and no attachment follows
    the rows instead (GRACE's from-key mode, WISE's router: `models.attach.followed_rows`).
    """
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(prompts))
    if not unique:
        return {}
    tok = model.tokenizer
    encoded = [context_ids(tok, p, context) for p in unique]
    order = sorted(range(len(unique)), key=lambda i: len(encoded[i]))
    vocab = _vocab_size(model)
    done_table = (stop_token_table(tok, tuple(stop), vocab).clone() if stop
                  else torch.zeros(vocab, dtype=torch.bool))
    done_table[[e for e in _eos_ids(model) if e < vocab]] = True
    configured = getattr(model.model.generation_config, "use_cache", True) is not False
    out: dict[str, str] = {}
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=f"generating {len(unique)} prompts", unit="batch",
                          disable=not progress or len(starts) < PROGRESS_MIN_BATCHES):
            batch = order[start:start + batch_size]
            with followed_rows(model.model) as followed:
                # Attachments that follow rows turn `generate`'s cache off, not this one's.
                use_cache = followed is not None and (configured or followed.following)
                new = _greedy(model, [encoded[i] for i in batch], max_new_tokens,
                              done_table, use_cache, followed)
            for i, tokens in zip(batch, new):
                out[unique[i]] = cut_at_stop(tok.decode(tokens, skip_special_tokens=True), stop)
    return {p: out[p] for p in unique}  # first-seen order, whatever the batches were


# --------------------------------------------------------------------------- scoring

def _prompts_of(request: EditRequest) -> list[str]:
    return [request.rewrite_prompt, *request.paraphrases,
            *(p for p, _ in request.neighborhood), *(p for p, _ in request.portability)]


def _fluency_prompts(request: EditRequest) -> list[str]:
    prompts = request.metadata.get("generation_prompts") or []
    return list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))



def generation_rows(model: EditableModel, requests: Sequence[EditRequest],
                    options: GenerationOptions, before: Mapping[str, str] | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Per request, the generation metrics on the model as it is now (module docstring).

    `before`: {neighbourhood prompt: the unedited model's continuation} under the same
    generation options (a Baseline's `generated`); without it gen_specificity is None.
    """
    judge = _judge_fn(options)
    texts = generate_continuations(
        model, (p for r in requests for p in _prompts_of(r)), options.context,
        options.max_new_tokens, options.stop, options.batch_size, progress)
    free: dict[str, str] = {}
    if options.fluency:
        free = generate_continuations(
            model, (p for r in requests for p in _fluency_prompts(r)), "bare",
            options.fluency_max_new_tokens, (), options.batch_size, progress)
    rows = []
    for r in requests:
        new = new_targets(r)
        row: dict[str, Any] = {"case_id": r.uid}
        row["gen_efficacy"] = float(judge(texts[r.rewrite_prompt], new, r))
        row["gen_generalization"] = mean_defined(float(judge(texts[p], new, r)) for p in r.paraphrases)
        kept = known = 0
        now_right, bleed = [], []
        for i, (prompt, expected) in enumerate(r.neighborhood):
            if expected == r.target_new:
                continue
            answers = _targets(expected, _aliases(r, "neighborhood_answers", i))
            right = judge(texts[prompt], answers, r)
            now_right.append(float(right))
            bleed.append(float(judge(texts[prompt], new, r)))
            if before is not None and judge(before[prompt], answers, r):
                known += 1
                kept += right
        row["gen_specificity"] = kept / known if known else None
        row["gen_specificity_n"] = known if before is not None else None
        row["gen_neighborhood_acc"] = mean_defined(now_right)
        row["gen_bleed"] = mean_defined(bleed)
        row["gen_portability"] = mean_defined(
            float(judge(texts[p], _targets(a, _aliases(r, "portability_answers", i)), r))
            for i, (p, a) in enumerate(r.portability))
        fluency_prompts = _fluency_prompts(r) if options.fluency else []
        row["gen_fluency"] = mean_defined(ngram_entropy(p + free[p]) for p in fluency_prompts)
        row["gen_text"] = texts[r.rewrite_prompt]
        row["gen_texts"] = {p: texts[p] for p in _prompts_of(r)}
        rows.append(row)
    return rows


def aggregate_generation(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over requests of the generation rows; gen_specificity pooled over the
    neighbourhood prompts the unedited model knew, gen_specificity_n their number."""
    out: dict[str, Any] = {k: mean_defined(row.get(k) for row in rows)
                           for k in GEN_KEYS if k not in ("gen_specificity", "gen_specificity_n")}
    counts = [row.get("gen_specificity_n") for row in rows]
    if all(c is None for c in counts):
        out["gen_specificity"] = out["gen_specificity_n"] = None
    else:
        n = sum(c for c in counts if c)
        kept = sum(row["gen_specificity"] * row["gen_specificity_n"]
                   for row in rows if row.get("gen_specificity_n"))
        out["gen_specificity"] = round(kept) / n if n else None
        out["gen_specificity_n"] = n
    return {k: out[k] for k in GEN_KEYS}


def baseline_prompts(requests: Iterable[EditRequest]) -> list[str]:
    """The prompts a generation baseline records: every neighbourhood prompt."""
    return list(dict.fromkeys(p for r in requests for p, _ in r.neighborhood))
