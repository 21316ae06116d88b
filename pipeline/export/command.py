"""`pipeline export --checkpoint DIR --format hf --out DIR`."""

from __future__ import annotations

import os
import shutil
import uuid

from pipeline.export import ExportError

FORMATS = ("hf",)


def export_command(checkpoint: str, fmt: str, out: str) -> str:
    from pipeline import storage
    from pipeline.train import checkpoint as ckpt

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: the formats are {', '.join(FORMATS)}")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"--out {out} exists and is not an empty directory; remove it or choose another")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ExportError("the Hugging Face export needs transformers: pip install -e '.[hf]'") from None
    if not storage.exists(checkpoint):
        raise ckpt.CheckpointError(f"{checkpoint}: no such checkpoint directory")
    from pipeline.kinds import build_saved

    (config_path,) = ckpt.find_trained(checkpoint, (ckpt.MODEL_CONFIG,))
    kind, cfg, model = build_saved(config_path)
    state = ckpt.consolidated_state(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{checkpoint} does not fit the model its {ckpt.MODEL_CONFIG} describes (written by another "
                          f"version?): missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.eval()

    staging = f"{out}.tmp-{uuid.uuid4().hex[:8]}"  # renamed into place only when whole
    os.makedirs(staging)
    try:
        how = kind.export_hf(model, cfg, config_path.rsplit("/", 1)[0], staging)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"exported the {kind.name} of {checkpoint} to {out}\nload it with {how.format(out=out)}"
