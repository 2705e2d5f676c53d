"""`factedit patch`: apply, revert, diff and inspect patch files (docs/patches.md).

    factedit patch apply BASE PATCH... --out DIR [--force]   a plain HF folder, patches in order
    factedit patch revert EDITED PATCH --out DIR [--force]   back to the patch's base
    factedit patch diff BASE EDITED --out PATCH [--rank-tol 1e-6] [--dtype float32]
    factedit patch inspect PATCH [--json]

BASE / EDITED: anything `--model` takes (a built-in alias such as smollm2-135m, a HF folder,
a hub id, a .gguf file). Every check (files, digests, the base fingerprint, shapes, dtypes)
runs before anything is written; an output folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "factedit-patches.json"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `factedit patch` with its four actions."""
    p = sub.add_parser("patch", help="patch files: apply to a base model, revert, diff two "
                       "models, inspect (docs/patches.md)")
    actions = p.add_subparsers(dest="patch_command", required=True)

    a = actions.add_parser("apply", help="apply patches in order and write a plain HF folder")
    a.add_argument("base", help="the base model: built-in alias, HF folder, hub id, .gguf")
    a.add_argument("patches", nargs="+", metavar="PATCH", help="patch files, applied in order")
    a.add_argument("--out", required=True, help="folder to write (a plain HF model folder)")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    a.set_defaults(func=cmd_apply)

    r = actions.add_parser("revert", help="take a patch out of an edited model folder")
    r.add_argument("edited", help="the patched model (HF folder or anything --model takes)")
    r.add_argument("patch", help="the patch file to take out")
    r.add_argument("--out", required=True, help="folder to write (a plain HF model folder)")
    r.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    r.set_defaults(func=cmd_revert)

    d = actions.add_parser("diff", help="a patch from two models (base and edited)")
    d.add_argument("base", help="the base model")
    d.add_argument("edited", help="the edited model (same architecture and shapes)")
    d.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    d.add_argument("--rank-tol", type=float, default=1e-6, help="singular values below this "
                   "times the largest count as zero (default 1e-6)")
    d.add_argument("--dtype", default="float32", help="stored dtype of the deltas: float32 "
                   "(default), float16, bfloat16, float64 or weight (the weight's own)")
    d.add_argument("--force", action="store_true", help="replace an existing --out file")
    d.set_defaults(func=cmd_diff)

    i = actions.add_parser("inspect", help="what a patch changes, for which base, which facts")
    i.add_argument("patch", help="patch file")
    i.add_argument("--json", action="store_true", help="print the full description as JSON")
    i.set_defaults(func=cmd_inspect)


def _load_patches(paths: list[str]) -> list[Any]:
    from factedit.patch import Patch

    return [Patch.load(p) for p in paths]


def _refuse_editor_state(patches: list[Any], paths: list[str]) -> None:
    from factedit.patch import PatchError

    for patch, path in zip(patches, paths):
        if patch.needs_factedit:
            raise PatchError(
                f"{path} holds {patch.method}'s editor state, which acts through hooks at run "
                f"time: a plain HF folder cannot carry it. Apply it in Python with "
                f"Patch.load({path!r}).apply(model), or edit with a weight method (rome, memit, "
                f"alphaedit, d4s, ...) to get a patch that `patch apply --out` can write")


def _write_folder(model: Any, out: str, force: bool, provenance: dict[str, Any]) -> None:
    from factedit.models.atomic import atomic_folder

    with atomic_folder(out, force=force, what="--out") as tmp:
        model.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))


def _provenance(folder: str) -> dict[str, Any]:
    path = Path(folder) / PROVENANCE_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {"base": None, "patches": []}


def _entry(patch: Any, path: str) -> dict[str, Any]:
    return {"id": patch.id, "file": str(path), "method": patch.method,
            "request_ids": patch.meta["request_ids"]}


def cmd_apply(args: argparse.Namespace) -> int:
    """`factedit patch apply`: the base model with the patches applied in order, written as a plain HF folder."""
    import factedit as fe
    from factedit.models.atomic import check_destination

    check_destination(args.out, force=args.force, what="--out")
    patches = _load_patches(args.patches)
    _refuse_editor_state(patches, args.patches)
    model = fe.load_model(args.base, dtype=patches[0].base_dtype)
    # Each patch is checked against the model as the patches before it left it: a patch
    # made after another one's edit needs that one applied first.
    for patch, path in zip(patches, args.patches):
        try:
            patch.apply(model)
        except ValueError as err:
            raise type(err)(f"{path}: {err}") from None
    prior = _provenance(args.base) if Path(args.base).is_dir() else {"base": args.base,
                                                                      "patches": []}
    provenance = {"base": prior["base"] or args.base,
                  "patches": prior["patches"] + [_entry(p, f) for p, f in zip(patches, args.patches)]}
    _write_folder(model, args.out, args.force, provenance)
    for patch, path in zip(patches, args.patches):
        print(f"applied {path} ({patch.method}, {len(patch.meta['weights'])} weights, "
              f"{len(patch.meta['request_ids'])} requests)")
    print(f"wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained"
          f"({str(args.out)!r})")
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    """`factedit patch revert`: an edited folder with the patch taken out again, checked against the patch's fingerprint."""
    import factedit as fe
    from factedit.models.atomic import check_destination

    check_destination(args.out, force=args.force, what="--out")
    patch = _load_patches([args.patch])[0]
    _refuse_editor_state([patch], [args.patch])
    model = fe.load_model(args.edited, dtype=patch.base_dtype)
    patch.revert(model)
    prior = _provenance(args.edited)
    provenance = {"base": prior.get("base"),
                  "patches": [e for e in prior.get("patches", []) if e.get("id") != patch.id],
                  "reverted": [*prior.get("reverted", []), _entry(patch, args.patch)]}
    _write_folder(model, args.out, args.force, provenance)
    print(f"reverted {args.patch} ({patch.method}); wrote {args.out}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """`factedit patch diff`: the patch that turns one model folder into another."""
    import factedit as fe
    from factedit.patch import Patch, PatchError

    out = Path(args.out)
    if out.is_dir():
        raise PatchError(f"--out {out} is a folder: give a file name such as {out}/edit.safetensors")
    if out.exists() and not args.force:
        raise PatchError(f"--out {out} exists: choose another name, or pass --force to replace it")
    base, edited = fe.load_model(args.base), fe.load_model(args.edited)
    patch = Patch.diff(base, edited, rank_tol=args.rank_tol, dtype=args.dtype)
    patch.save(out)
    _print_summary(patch.describe(), out)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """`factedit patch inspect`: what a patch changes, for which base, which facts, and its sizes."""
    from factedit.patch import Patch

    described = Patch.load(args.patch).describe()
    if args.json:
        print(json.dumps(described, indent=1))
        return 0
    _print_summary(described, Path(args.patch))
    return 0


def _print_summary(d: dict[str, Any], path: Path) -> None:
    size = path.stat().st_size if path.is_file() else d["sizes"]["tensor_bytes"]
    print(f"{path}: factedit patch v{d['format_version']} ({d['kind']}), id {d['id']}, "
          f"{size / 1024:.1f} KiB (the dense deltas would be "
          f"{d['sizes']['dense_delta_bytes'] / 1024:.1f} KiB)")
    print(f"  method {d['method']}, {d['edits']} edits, made with factedit "
          f"{d['factedit_version']} on {d['created']}")
    print(f"  base: {d['base']['model_id']} ({d['base']['model_type']}, config sha256 "
          f"{d['base']['config_sha256'][:12]})")
    if d["needs_factedit"]:
        print("  needs factedit to apply (editor state acting through hooks: "
              f"{', '.join(d['editor_tensors']) or 'JSON only'})")
    for name, w in d["weights"].items():
        rank = f"rank {w['rank']}" if w["form"] == "lowrank" else "dense"
        print(f"  {name} {w['shape']}: {rank}, {w['stored_dtype']}, {w['bytes'] / 1024:.1f} KiB, "
              f"|dW| {w['delta_fro']:.3g}, relative error {w['relative_error']:.1e}")
    for r in d["requests"][:10]:
        print(f"  fact {r['id']}: {r['prompt'].format(r['subject'])} -> {r['target_new']}"
              + (f" (was {r['target_true']})" if r.get("target_true") else ""))
    if len(d["requests"]) > 10:
        print(f"  ... and {len(d['requests']) - 10} more facts")
    if d["scores"]:
        print("  scores at creation: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in d["scores"].items() if v is not None))
