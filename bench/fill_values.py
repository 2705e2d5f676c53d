"""Fill the target-value cache of a locate-then-edit setting ahead of a benchmark run.

    python bench/fill_values.py --method d4s-alphaedit --dataset counterfact --n 1000 \
        --reverse --set d4s-alphaedit.context_prefixes=2 --set d4s-alphaedit.context_length=5

Values are the slow part of an edit with context prefixes (~5 s a request on one core) and,
where they are computed on W_0 (D4S, single mode), they do not depend on the edits before.
`LocateEditor.prepare` re-reads the cache before every batch, so this script started with
`--reverse` beside a `bench/sequential.py` run of the same setting fills the cache from the
other end and both meet in the middle: two cores, half the wall time. Value batches group
requests by row length (`linalg.values.value_batches`: a run goes from the shortest
requests of each stretch up), so the other end is the batch of the longest requests:
`--reverse` takes the batches from there down. It sets value_cache=true itself; give it the
same value options (`--set`) as the run.
"""

from __future__ import annotations

import argparse
import os

from bench_common import DATA, add_device_argument, corpus_in, method_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    add_device_argument(ap)
    ap.add_argument("--method", default="d4s")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--corpus", default=None, help="covariance corpus, as bench/sequential.py "
                    "(default: wikitext-2-raw under --data; the run reads C from its cache)")
    ap.add_argument("--n", type=int, default=1000, help="the first N records")
    ap.add_argument("--reverse", action="store_true",
                    help="start from the batch of the longest requests")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.linalg.values import value_batches
    from factedit.methods import LocateEditor, options_for
    from factedit.protocol import make_editor

    corpus = args.corpus or corpus_in(args.data)
    overrides = {**options_for(args.method, covariance_corpus=corpus), "value_cache": True,
                 **method_overrides(args.set).get(args.method, {})}
    model = fe.load_model(args.model, device=args.device)
    editor = make_editor(model, args.method, **overrides)
    if not isinstance(editor, LocateEditor) or not editor.values_independent_of_history:
        raise SystemExit(f"{args.method} with these options computes values on the edited "
                         f"model, so they cannot be computed ahead")
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    batches = value_batches(model, requests, editor.config.value_batch_size)
    for batch in tqdm(batches[::-1] if args.reverse else batches, desc="value batches"):
        editor.prepare([requests[i] for i in batch])
    print(f"{len(requests)} requests' values in {editor.value_cache().folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
