"""Load time, memory and seconds per ROME edit of one model, with before/after answers.

    python bench/model_costs.py --model gemma3-270m --corpus ../shared/data/corpus/wikitext-2-raw \
        --out bench/results/gemma3-270m/model_costs.json

Loads the model once (a cached model: the dequantized safetensors; the first load of a GGUF
also dequantizes it), then applies three single ROME edits one after another on the unedited
model (restored between them), each timed end to end (`fe.edit`), with the greedy answer
before and after. Covariance statistics come from the cache when a run with the same corpus
and token count made them (`factedit demo --model ... --corpus ...` does, with 20,000 tokens);
otherwise the first edit computes them and its time includes that. Peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

REQUESTS = [  # facts both built-in models answer correctly before the edit
    ("{} is headquartered in the country of", "Toyota", "Italy", "Japan"),
    ("{} is developed by", "iPhone", "Microsoft", "Apple"),
    ("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--corpus", required=True, help="covariance text file or folder")
    parser.add_argument("--covariance-tokens", type=int, default=20_000)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    start = time.time()
    import factedit as fe
    from factedit import EditRequest

    import_seconds = time.time() - start
    start = time.time()
    model = fe.load_model(args.model)
    result = {"model": args.model, "import_seconds": round(import_seconds, 1),
              "load_seconds": round(time.time() - start, 1),
              "rss_after_load_mb": round(rss_mb()),
              "parameters": sum(p.numel() for p in model.model.parameters()),
              "covariance_tokens": args.covariance_tokens, "edits": []}
    for prompt, subject, new, true in REQUESTS:
        request = EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=true)
        before = model.generate(request.rewrite_prompt, max_new_tokens=4)
        start = time.time()
        handle = fe.edit(model, [request], method="rome", progress=False,
                         covariance_corpus=args.corpus,
                         covariance_tokens=args.covariance_tokens)
        seconds = time.time() - start
        after = model.generate(request.rewrite_prompt, max_new_tokens=4)
        handle.restore()
        result["edits"].append({"prompt": request.rewrite_prompt, "target_new": new,
                                "before": before, "after": after,
                                "edit_seconds": round(seconds, 1),
                                "layers": handle.editor.layers})
        print(result["edits"][-1], flush=True)
    result["rss_peak_mb"] = round(rss_mb())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
