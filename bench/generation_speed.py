"""How long generation scoring takes beside the teacher-forced scoring of the same requests.

    OMP_NUM_THREADS=1 python bench/generation_speed.py --n 100

On the first N CounterFact records (edit prompt + paraphrase + neighbour each), times in
one process, alternating, `repeats` times each: the teacher-forced `evaluate`, the
generation scoring `evaluate(..., generation=True)` adds (`metrics.generation
.generation_rows`, default options: 50 new tokens cut at "." or newline), and, once, the
same prompts through `transformers`' `generate` with a per-row stopping criterion
(finished rows keep computing until the batch's longest row ends), the reference our own
greedy loop replaces. Prints a table and writes bench/results/generation_speed.json.

    OMP_NUM_THREADS=1 python bench/generation_speed.py --n 50 --edit grace --no-reference \
        --out bench/results/generation_speed_grace.json

`--edit METHOD`: the N requests are edited first (sequentially, the method's defaults), and
where the method's attachment follows rows (GRACE's from_key: `models.attach.followed_rows`)
the generation scoring is also timed with the rows re-run whole at every step (the cache
off, as before row following), alternating with the cached runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_common import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hf_generate_seconds(model, prompts: list[str], batch_size: int, max_new_tokens: int,
                        stop: tuple[str, ...]) -> float:
    """The prompts through `model.model.generate` (greedy, KV cache, rows done at a stop
    token kept in the batch as padding), sorted and batched as ours: the reference."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from factedit.metrics.generation import _vocab_size, context_ids, stop_token_table

    table = stop_token_table(model.tokenizer, stop, _vocab_size(model))

    class StopAtTokens(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return table[input_ids[:, -1]]

    tok = model.tokenizer
    encoded = [context_ids(tok, p) for p in dict.fromkeys(prompts)]
    encoded.sort(key=len)
    start = time.perf_counter()
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i:i + batch_size]
        width = max(len(e) for e in batch)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in batch])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in batch])
        with torch.inference_mode():
            model.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([StopAtTokens()]))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the transformers generate() reference run")
    ap.add_argument("--edit", default=None, metavar="METHOD",
                    help="edit the N requests with METHOD first (e.g. grace)")
    ap.add_argument("--out", default="bench/results/generation_speed.json")
    args = ap.parse_args(argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.metrics.generation import GenerationOptions, generation_rows

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    model = fe.load_model(args.model)
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    options = GenerationOptions()
    prompts = [p for r in requests
               for p in [r.rewrite_prompt, *r.paraphrases, *(q for q, _ in r.neighborhood)]]
    pairs = sum(2 * (1 + len(r.paraphrases)) + 2 * len(r.neighborhood) for r in requests)
    followers = []
    if args.edit:
        from factedit.models.attach import installed

        fe.edit(model, requests, method=args.edit, progress=False)
        followers = [a for a in installed(model.model) if a.rows is not None]
    fe.evaluate(model, requests[:2], progress=False, generation=True)  # warm-up
    teacher, generation, whole_rows = [], [], []
    for _ in range(args.repeats):
        if followers:  # the same scoring with every step re-running the rows whole
            trackers = [a.rows for a in followers]
            for a in followers:
                a.rows = None
            start = time.perf_counter()
            whole = generation_rows(model, requests, options, progress=False)
            whole_rows.append(time.perf_counter() - start)
            for a, tracker in zip(followers, trackers):
                a.rows = tracker
        start = time.perf_counter()
        fe.evaluate(model, requests, progress=False)
        teacher.append(time.perf_counter() - start)
        start = time.perf_counter()
        followed = generation_rows(model, requests, options, progress=False)
        generation.append(time.perf_counter() - start)
        if followers and followed != whole:
            raise SystemExit("row following changed the generation scores")
    reference = None if args.no_reference else hf_generate_seconds(
        model, prompts, options.batch_size, options.max_new_tokens, options.stop)
    tf, gen = statistics.median(teacher), statistics.median(generation)
    result = {
        "command": "OMP_NUM_THREADS=1 python bench/generation_speed.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "model": model.model_id,
        "dataset": args.dataset, "n_requests": len(requests), "threads": threads,
        "load_average_1min": os.getloadavg()[0],
        "distinct_prompts": len(set(prompts)), "teacher_forced_pairs": pairs,
        "teacher_forced_seconds": teacher, "generation_seconds": generation,
        "ratio_generation_to_teacher_forced": gen / tf,
        "edited_with": args.edit,
        "generation_whole_rows_seconds": whole_rows or None,
        "ratio_whole_rows_to_followed": (statistics.median(whole_rows) / gen
                                         if whole_rows else None),
        "hf_generate_seconds": reference,
        "ratio_hf_generate_to_ours": None if reference is None else reference / gen,
        "options": options.to_dict(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"{len(requests)} {args.dataset} requests, {len(set(prompts))} distinct prompts, "
          f"{pairs} teacher-forced pairs, {threads} thread(s), load {result['load_average_1min']:.1f}")
    print(f"{'scoring':34s} {'seconds (median)':>16s}  runs")
    print(f"{'teacher-forced evaluate':34s} {tf:16.1f}  {', '.join(f'{t:.1f}' for t in teacher)}")
    print(f"{'generation (gen_* metrics)':34s} {gen:16.1f}  "
          f"{', '.join(f'{t:.1f}' for t in generation)}")
    if whole_rows:
        print(f"{'generation, whole rows every step':34s} {statistics.median(whole_rows):16.1f}"
              f"  {', '.join(f'{t:.1f}' for t in whole_rows)}")
    if reference is not None:
        print(f"{'transformers generate() reference':34s} {reference:16.1f}  1")
    print(f"generation / teacher-forced = {gen / tf:.2f} (target <= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
