"""`factedit export gguf`: an (edited) model as one GGUF file for llama.cpp (docs/patches.md).

    factedit export gguf MODEL_DIR --out model.gguf --type q8_0
    factedit export gguf smollm2-135m --patch edit.safetensors --out model.gguf --type q4_0

The tokenizer and metadata come from the base model's own GGUF file: for a folder written by
`factedit patch apply` the base it names, else give `--like BASE` (a built-in alias or .gguf).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .patch import PROVENANCE_FILE


def register(sub: argparse._SubParsersAction) -> None:
    """Add `factedit export gguf`."""
    p = sub.add_parser("export", help="write an (edited) model in another format: gguf")
    formats = p.add_subparsers(dest="export_format", required=True)
    g = formats.add_parser("gguf", help="a GGUF file (llama.cpp) at f32, f16, bf16, q8_0, "
                           "q4_0 or q4_1")
    g.add_argument("source", help="a model folder (e.g. from `factedit patch apply`), or the "
                   "base model when --patch is given")
    g.add_argument("--patch", action="append", metavar="PATCH", default=[],
                   help="patch file applied to SOURCE first (repeatable, in order)")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.add_argument("--type", default="f16", dest="gguf_type",
                   help="tensor type of the 2-D weights: f32, f16 (default), bf16, q8_0, "
                        "q4_0, q4_1")
    g.add_argument("--like", metavar="BASE", help="GGUF model whose tokenizer and metadata to "
                   "copy (default: SOURCE itself, or the base a patched folder names)")
    g.add_argument("--force", action="store_true", help="replace an existing --out file")
    g.set_defaults(func=cmd_export_gguf)


def _base_name(args: argparse.Namespace) -> str:
    from factedit.patch.gguf import GGUFExportError

    if args.like:
        return args.like
    source = Path(args.source)
    if source.is_dir():
        provenance = source / PROVENANCE_FILE
        if provenance.is_file():
            base = json.loads(provenance.read_text()).get("base")
            if base:
                return base
        raise GGUFExportError(f"{source} does not say which GGUF model it comes from (no "
                              f"{PROVENANCE_FILE}): give --like BASE, e.g. --like smollm2-135m")
    return args.source


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """`factedit export gguf`: write a model folder, or a base model with patches applied, as one GGUF file of the chosen type."""
    import factedit as fe
    from factedit.patch import Patch, PatchError
    from factedit.patch.gguf import GGUF_TYPES, GGUFExportError, export_gguf, gguf_source

    if args.gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--type {args.gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    out = Path(args.out)
    if out.is_dir():
        raise GGUFExportError(f"--out {out} is a folder: give a file name such as {out}/model.gguf")
    if out.exists() and not args.force:
        raise GGUFExportError(f"--out {out} exists: choose another name, or pass --force")
    base_gguf = gguf_source(_base_name(args))
    patches = [Patch.load(p) for p in args.patch]
    for patch, path in zip(patches, args.patch):
        if patch.needs_factedit:
            raise PatchError(f"{path} holds {patch.method}'s editor state (hooks at run time), "
                             f"which a GGUF file cannot carry: export a weight edit instead")
    model = fe.load_model(args.source, dtype=patches[0].base_dtype if patches else None)
    for patch, path in zip(patches, args.patch):
        try:
            patch.apply(model)
        except ValueError as err:
            raise type(err)(f"{path}: {err}") from None
    metadata = {"source": args.source, "patches": [{"id": p.id, "file": f, "method": p.method}
                                                   for p, f in zip(patches, args.patch)]}
    report = export_gguf(model, out, args.gguf_type, base_gguf=base_gguf, metadata=metadata)
    print(f"wrote {out} ({args.gguf_type}, {report['bytes'] / 2**20:.1f} MiB, "
          f"{len(report['tensors'])} tensors; tokenizer and metadata from {base_gguf.name})")
    return 0
