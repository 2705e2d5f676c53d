"""Every registered method through the same checks, on a tiny random float64 model (PEFT's
test matrix): edit then restore is exact, save then resume gives the same weights and
outputs and continues like the unbroken run, the same seed gives the same edit, weights stay
finite, and batch and remove are either supported (and checked) or refused with the
documented error.

The parameters come from `list_methods()`, so a newly registered method is covered without
editing this file; one that cannot pass a check goes into EXEMPT with the reason (a test
checks the table names only real methods and checks); a bug it found is a strict xfail in
BUGS. Settings that keep a tiny edit fast live in OPTIONS; a method with a registry trainer
(MethodSpec.trainer: mend, ke, serac) is trained once per module through it, with the fewest
steps (TRAIN_OPTIONS), and edits with the trained folder. The families' own files keep their
deeper tests.

Per method the checks share one set of runs (built on first use, cached for the module):
  A: edit r0, r1 one after another; save; restore.
  B: a second fresh model, the same two edits (same seed); then r2; then remove(1).
  C: a third fresh model resumed from A's save; then r2.
  D: a fourth fresh model, r0 and r2 only (what B must equal after remove(1)).
  E: a fifth fresh model, r0 and r1 in one batch; restore.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from common import HYPERNET_REQUESTS, LAB_TEXT, UNRELATED, logits
from conftest import make_tiny_model, tiny_tokenizer

from factedit.methods import get_method, list_methods
from factedit.protocol import EditHandle, edit, edit_success

REQUESTS = HYPERNET_REQUESTS[:3]  # r0, r1, r2: each with a paraphrase and a neighbour
LAYERS = 2

# Per-method settings for a tiny model: few optimisation steps, few layers. Options the
# locate family shares (the covariance corpus is written per module, see `artefacts`).
LOCATE = dict(layers=[0, 1], v_steps=3, context_prefixes=0, covariance_tokens=512,
              covariance_seq_len=32)
OPTIONS: dict[str, dict] = {
    "rome": dict(LOCATE, layers=[1]),
    "memit": LOCATE,
    "pmet": LOCATE,
    "d4s": LOCATE,
    # A random model's C has no eigenvalue below the default 1e-2 of its largest: with
    # 0.5 the null space is wide enough that the edit is not projected away.
    "alphaedit": dict(LOCATE, nullspace_threshold=0.5),
    "d4s-alphaedit": dict(LOCATE, nullspace_threshold=0.5),
    "ft-l": dict(layers=[1], steps=3, lr=1e-2),
    "ft-m": dict(layers=[1], steps=3, lr=1e-2),
    "kn": dict(ig_steps=3, update_scale=20.0),
    "grace": dict(layer=1, eps=1e-3, steps=5, lr=0.5),
    "t-patcher": dict(layers=[1], steps=5, lr=0.1),
    "calinet": dict(layers=[1], steps=5, lr=0.1),
    # Retrieval by a random model's states: a strict threshold keeps it to the stored prompt.
    "ike": dict(threshold=0.99999, retrieval_layer=1),
    "memprompt": dict(threshold=0.99999, retrieval_layer=1),
    "mello": dict(max_hops=1, max_new_tokens=4),
    # Methods with a registry trainer (mend, ke, serac) get the trained folder too (`options`).
}
# Settings of each registry trainer (MethodSpec.trainer.config_cls): the fewest steps the
# library allows, a small network. A trainable method not named here trains with defaults.
HYPERNET_TRAIN = {"steps": 1, "batch_size": 1, "lr": 1e-3, "checkpoint_every": 1,
                  "validate_every": 1}
TRAIN_OPTIONS: dict[str, dict] = {
    "mend": dict(layers=[0, 1], rank=4, train=HYPERNET_TRAIN),
    "ke": dict(layers=[0, 1], hidden=4, train=HYPERNET_TRAIN),
    "serac": dict(steps=1),
}

CHECKS = ("restore", "seed", "resume", "finite", "effect", "batch", "remove")
# (method, check) -> why the method cannot pass it. Keep it as short as the truth allows.
EXEMPT: dict[tuple[str, str], str] = {
    # MeLLo never changes the model nor hooks a forward pass: it acts only through
    # MelloEditor.answer (methods/memory/mello.py), so no logit can show its edit.
    ("mello", "effect"): "acts only through answer(), not through the forward pass",
}
# (method, check) -> a bug the matrix found, run as a strict xfail so that the fix shows.
BUGS: dict[tuple[str, str], str] = {}


# -- the runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """A covariance corpus, caches and lazily trained mend/ke/serac artefacts in one folder."""
    root = tmp_path_factory.mktemp("matrix")
    corpus = root / "corpus.txt"
    corpus.write_text(LAB_TEXT * 12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_CACHE", str(root / "cache"))
        yield Artefacts(root, corpus)


class Artefacts:
    """Per-module files the methods need; each trained on first use only."""

    def __init__(self, root: Path, corpus: Path) -> None:
        self.root, self.corpus = root, corpus
        self.tokenizer = tiny_tokenizer()
        self.runs: dict[str, Runs] = {}

    def model(self):
        return make_tiny_model(self.tokenizer, layers=LAYERS)

    def trained(self, method: str) -> dict:
        """{output field: folder} of the method's registry trainer, trained on first use."""
        trainer = get_method(method).trainer
        if trainer is None:
            return {}
        folder = self.root / f"trained-{method}"
        if not folder.exists():
            config = trainer.config_cls(**TRAIN_OPTIONS.get(method, {}))
            trainer.run(self.model() if trainer.needs_model else None, HYPERNET_REQUESTS,
                        HYPERNET_REQUESTS[:1], folder, config, resume=False, progress=False,
                        edit_success=edit_success)
        return {trainer.output_field: str(folder)}

    def options(self, method: str) -> dict:
        options = dict(OPTIONS.get(method, {}), **self.trained(method))
        if "covariance_tokens" in options:
            options["covariance_corpus"] = str(self.corpus)
        return options

    def __getitem__(self, method: str) -> Runs:
        if method not in self.runs:
            self.runs[method] = Runs(self, method)
        return self.runs[method]


class Snapshot:
    """Every parameter, the logits on the probe texts and the number of installed hooks."""

    PROBES = [t for r in REQUESTS for t in (r.rewrite_prompt, r.paraphrases[0],
                                            r.neighborhood[0][0])] + [UNRELATED]

    def __init__(self, model) -> None:
        self.params = {n: p.detach().clone() for n, p in model.model.named_parameters()}
        self.logits = [logits(model, text) for text in self.PROBES]
        self.hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                         for m in model.model.modules())

    def assert_equal(self, other: Snapshot, what: str) -> None:
        """Bit-identical parameters and logits."""
        for name, value in self.params.items():
            assert torch.equal(value, other.params[name]), f"{what}: parameter {name} differs"
        for text, a, b in zip(self.PROBES, self.logits, other.logits):
            assert torch.equal(a, b), f"{what}: logits on {text!r} differ"

    def assert_close(self, other: Snapshot, what: str, rtol: float, atol: float) -> None:
        for name, value in self.params.items():
            torch.testing.assert_close(value, other.params[name], rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"{what}: parameter {n}: {m}")
        for text, a, b in zip(self.PROBES, self.logits, other.logits):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                       msg=lambda m, t=text: f"{what}: logits on {t!r}: {m}")


class Runs:
    """The runs A-E of one method (module docstring), each computed on first use."""

    def __init__(self, artefacts: Artefacts, method: str) -> None:
        self.artefacts, self.method = artefacts, method
        self.options = artefacts.options(method)
        self.folder = artefacts.root / f"saved-{method}"

    def edit(self, model, requests, **kwargs) -> EditHandle:
        return edit(model, list(requests), method=self.method, progress=False,
                    **{**self.options, **kwargs})

    @functools.cached_property
    def a(self) -> dict:
        model = self.artefacts.model()
        unedited = Snapshot(model)
        handle = self.edit(model, REQUESTS[:2], mode="sequential")
        edited = Snapshot(model)
        handle.save(self.folder)
        handle.restore()
        return {"unedited": unedited, "edited": edited, "restored": Snapshot(model),
                "attachment": handle.attachment}

    @functools.cached_property
    def b(self) -> dict:
        model = self.artefacts.model()
        handle = self.edit(model, REQUESTS[:2], mode="sequential")
        out = {"edited": Snapshot(model)}
        handle.edit(REQUESTS[2:3], mode="sequential", progress=False)
        out["continued"] = Snapshot(model)
        out["handle"] = handle
        return out

    @functools.cached_property
    def c(self) -> dict:
        self.a  # noqa: B018  (A writes the saved folder)
        model = self.artefacts.model()
        handle = EditHandle.resume(model, self.folder)
        out = {"resumed": Snapshot(model)}
        handle.edit(REQUESTS[2:3], mode="sequential", progress=False)
        out["continued"] = Snapshot(model)
        return out

    @functools.cached_property
    def d(self) -> Snapshot:
        model = self.artefacts.model()
        self.edit(model, [REQUESTS[0], REQUESTS[2]], mode="sequential")
        return Snapshot(model)


def supports(method: str, feature: str) -> bool:
    """What the registry says: MethodSpec.supports_batch / supports_remove."""
    return getattr(get_method(method), f"supports_{feature}")


def check(method: str, name: str) -> None:
    """Skip an exempt (method, check) with its reason."""
    reason = EXEMPT.get((method, name))
    if reason:
        pytest.skip(f"exempt: {reason}")


METHODS = list_methods()


def methods_for(name: str) -> list:
    """The parametrisation of check `name`: every method, known bugs as strict xfails."""
    return [pytest.param(m, marks=pytest.mark.xfail(reason=BUGS[m, name], strict=True))
            if (m, name) in BUGS else m for m in METHODS]


# -- the checks -------------------------------------------------------------------------------

def test_exemptions_name_registered_methods_and_known_checks():
    """The exemption table cannot outlive a method or a check, nor hide a whole method."""
    for table, entries in (("EXEMPT", EXEMPT), ("BUGS", BUGS)):
        for method, name in entries:
            assert method in METHODS, f"{table} names {method!r}, which is not registered"
            assert name in CHECKS, f"{table} names check {name!r}; checks are {CHECKS}"
    assert not set(EXEMPT) & set(BUGS)
    assert set(OPTIONS) | set(TRAIN_OPTIONS) <= set(METHODS)
    for method in METHODS:
        assert sum((method, c) in EXEMPT for c in CHECKS) <= 2, f"{method}: too many exemptions"


@pytest.mark.parametrize("method", methods_for("restore"))
def test_restore_is_exact(artefacts, method):
    """After two edits, restore() gives back every parameter and every logit to the bit and
    removes the editor's hooks."""
    check(method, "restore")
    a = artefacts[method].a
    a["unedited"].assert_equal(a["restored"], f"{method} restored")
    assert a["attachment"] is None
    assert a["restored"].hooks == a["unedited"].hooks, "hooks left installed after restore()"


@pytest.mark.parametrize("method", methods_for("finite"))
def test_edit_changes_the_outputs_and_stays_finite(artefacts, method):
    """The edits are visible in the logits on the edited prompt, and nothing is NaN/inf."""
    a = artefacts[method].a
    if (method, "finite") not in EXEMPT:
        for name, value in a["edited"].params.items():
            assert torch.isfinite(value).all(), f"{method}: {name} has NaN/inf"
        assert all(torch.isfinite(x).all() for x in a["edited"].logits)
    check(method, "effect")
    assert not torch.equal(a["edited"].logits[0], a["unedited"].logits[0]), \
        f"{method}: the logits on {REQUESTS[0].rewrite_prompt!r} did not change"


@pytest.mark.parametrize("method", methods_for("seed"))
def test_the_same_seed_gives_the_same_edit(artefacts, method):
    """Two fresh models, the same requests and options: bit-identical results."""
    check(method, "seed")
    runs = artefacts[method]
    runs.a["edited"].assert_equal(runs.b["edited"], f"{method} edited twice")


@pytest.mark.parametrize("method", methods_for("resume"))
def test_save_then_resume_gives_the_same_model_and_continues_alike(artefacts, method):
    """EditHandle.resume on a fresh model gives A's edited weights and outputs to the bit;
    the next edit then lands where it lands on the model that was never saved (B)."""
    check(method, "resume")
    runs = artefacts[method]
    runs.a["edited"].assert_equal(runs.c["resumed"], f"{method} resumed")
    runs.b["continued"].assert_close(runs.c["continued"], f"{method} continued after resume",
                                     rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", methods_for("batch"))
def test_batch_is_supported_and_restorable_or_refused(artefacts, method):
    """A method that batches edits two requests in one step (one record, the outputs change,
    restore exact); one that does not says so before any work."""
    check(method, "batch")
    runs = artefacts[method]
    model = artefacts.model()
    unedited = Snapshot(model)
    if not supports(method, "batch"):
        with pytest.raises(ValueError, match="edits one request at a time"):
            runs.edit(model, REQUESTS[:2], mode="batch")
        Snapshot(model).assert_equal(unedited, f"{method} after a refused batch")
        return
    handle = runs.edit(model, REQUESTS[:2], mode="batch")
    assert [r.request_ids for r in handle.records] == [[r.uid for r in REQUESTS[:2]]]
    batched = Snapshot(model)
    assert all(torch.isfinite(v).all() for v in batched.params.values())
    if (method, "effect") not in EXEMPT:
        assert not torch.equal(batched.logits[0], unedited.logits[0])
    handle.restore()
    Snapshot(model).assert_equal(unedited, f"{method} batch restored")


@pytest.mark.parametrize("method", methods_for("remove"))
def test_remove_equals_never_editing_or_is_refused(artefacts, method):
    """Edits r0, r1, r2 then remove(1): the model equals the one edited with r0 and r2 only
    (float tolerance); a method without an edit history refuses with NotImplementedError."""
    check(method, "remove")
    runs = artefacts[method]
    handle = runs.b["handle"]
    if not supports(method, "remove"):
        with pytest.raises(NotImplementedError, match="cannot be removed"):
            handle.remove(1)
        return
    handle.remove(1)
    assert handle.records[1].removed
    if get_method(method).remove_exact:
        runs.d.assert_close(Snapshot(handle.model), f"{method} with r1 removed",
                            rtol=1e-7, atol=1e-9)
        return
    # An editor whose later edits were made beside the earlier ones (T-Patcher, CaliNET)
    # removes only an edit's own parts: the others still act, and with every edit removed
    # nothing of them is left.
    remaining = Snapshot(handle.model)
    unedited = runs.a["unedited"]
    assert any(not torch.equal(a, b) for a, b in zip(remaining.logits, unedited.logits)), \
        f"{method}: removing r1 took out r0 and r2 as well"
    handle.remove(0)
    handle.remove(2)
    Snapshot(handle.model).assert_equal(unedited, f"{method} with every edit removed")
