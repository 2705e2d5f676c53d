"""The headline on the real model: sequential D4S edits of CounterFact, model intact."""

import dataclasses

import pytest

import factedit as fe

pytestmark = pytest.mark.slow

N_EDITS = 16  # one value batch (value_batch_size 16): the values cost one optimisation


def test_sixteen_sequential_d4s_edits_keep_efficacy(builtin_model, shared_data):
    """16 CounterFact facts edited one after another with D4S on SmolLM2-135M: after the
    whole sequence at least 15 of 16 still flip (efficacy > 0.9; 1.0 measured), and each
    edited layer's mean |W| (the paper's L1) stays within 2.5% of W_0 (0.10% to 1.31%
    measured, layers 4 to 8; the bound was 5% at 50 edits). Sequential MEMIT/ROME grow
    instead.

    This replaced a 50-edit run (171 s on two idle cores, the suite's slowest test): values
    on W_0 come from one batch of 16 instead of four, and the final scoring reads only what
    is asserted (efficacy), so paraphrases and neighbours are dropped from the requests
    before editing (D4S edits from the rewrite prompt alone, so the edits are the same).
    bench/sequential.py measures sequences of 100 to 3,000 edits.
    """
    from factedit.data import load_dataset

    requests = [dataclasses.replace(r, paraphrases=[], neighborhood=[])
                for r in load_dataset("counterfact-rome", limit=N_EDITS, data_dir=shared_data)]
    # Target values on the bare prompt only (no context prefixes) cut the optimisation to a
    # third; bench/sequential.py runs the defaults.
    report = fe.run_sequence(
        builtin_model, requests, "d4s", immediate=False, unedited=False, progress=False,
        covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"),
        covariance_tokens=20_000, context_prefixes=0, condition_every=N_EDITS)
    try:
        final = report.final
        assert final["efficacy"] > 0.9, final
        for name, original in report.handle.originals.items():
            before = float(original.double().abs().mean())
            after = report.checkpoints[-1].weight_stats[name]["mean_abs"]
            assert abs(after - before) / before < 0.025, (name, before, after)
        assert len(report.handle.records) == N_EDITS
    finally:
        report.handle.restore()
