"""Run exported GGUF files in llama.cpp itself (llama-cpp-python): greedy continuations.

    pip install llama-cpp-python            # built from PyPI's source; cmake from Debian
    python bench/llama_cpp_run.py eiffel-q8.gguf eiffel-q4.gguf [--out FILE.json]

Not part of the test suite (the build takes a while). For each file: the greedy 8-token
continuation of the edit prompt and of a neighbour, one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = ("The Eiffel Tower is located in the city of",
           "The Louvre is located in the city of")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="GGUF files")
    ap.add_argument("--prompt", action="append", help="prompt (repeatable; default: the "
                    "Eiffel Tower edit and the Louvre neighbour)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default="bench/results/llama_cpp_run.json")
    args = ap.parse_args(argv)

    import llama_cpp

    rows = []
    for path in args.files:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=1, n_ctx=256, verbose=False,
                              seed=0)
        for prompt in args.prompt or PROMPTS:
            t0 = time.perf_counter()
            out = llm(prompt, max_tokens=args.max_tokens, temperature=0.0, top_k=1)
            text = out["choices"][0]["text"]
            rows.append({"file": Path(path).name, "prompt": prompt, "continuation": text,
                         "seconds": time.perf_counter() - t0})
            print(f"{Path(path).name}: {prompt!r} -> {text!r}", flush=True)
        del llm
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "llama_cpp_python": llama_cpp.__version__,
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "rows": rows}, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
