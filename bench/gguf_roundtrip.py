"""An f32 GGUF export reads back as the model: every tensor, after transformers' processing.

    python bench/gguf_roundtrip.py --model gemma3-270m     # ~10 min on one busy core

Exports the (unedited) model with `export_gguf` at f32, reads every tensor back with gguf's
reader, applies transformers' tensor processor for the architecture (llama: the q/k
permutation; gemma3: norm weights - 1) and prints the largest difference from the loaded
model's weights (0.0 expected) and any tensor of the base file without a model parameter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    import factedit as fe
    from factedit.patch.gguf import _hf_names, export_gguf, gguf_source

    torch.set_num_threads(1)
    model = fe.load_model(args.model)
    base = gguf_source(args.model)
    arch = str(GGUFReader(str(base)).fields["general.architecture"].contents())
    names = _hf_names(model, arch)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.model.config.to_dict())
    state = model.model.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f32.gguf"
        export_gguf(model, path, "f32", base_gguf=base)
        tensors = GGUFReader(str(path)).tensors
        worst, unmapped = 0.0, []
        for t in tensors:
            hf = names.get(t.name)
            if hf is None:
                unmapped.append(t.name)
                continue
            w = processor.process(np.array(t.data), t.name).weights
            diff = np.abs(w.reshape(state[hf].shape) - state[hf].float().numpy()).max()
            worst = max(worst, float(diff))
    print(f"{args.model} ({arch}): {len(tensors)} tensors, unmapped {unmapped}, "
          f"largest difference {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
