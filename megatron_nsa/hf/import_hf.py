"""`megatron-nsa import-hf`: a Hugging Face ASA folder -> a Megatron `torch_dist` checkpoint.

The output is laid out as Megatron-LM saves: `latest_checkpointed_iteration.txt` ("release")
and `release/` with the checkpoint, its `asa_config.json`, and the tokenizer in `tokenizer/`.
Megatron-LM loads it with `--load OUT` (a release checkpoint: no optimizer or RNG state);
megatron-core code with `megatron_nsa.checkpoint.load_asa_checkpoint(model, OUT)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..checkpoint import ASA_CONFIG_FILE, TOKENIZER_DIR, config_from_record
from .config_map import record_from_hf
from .dist_checkpoint import TRACKER_FILE
from .errors import ConversionError
from .export import check_against_model
from .hf_folder import TOKENIZER_FILES, HFWeights, read_hf_config
from .megatron_writer import write_megatron_checkpoint
from .staging import check_output, staged_output


def import_hf(
    load: str | Path,
    out: str | Path,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    overwrite: bool = False,
) -> Path:
    """Convert the Hugging Face folder `load` into a Megatron checkpoint folder `out`, saved
    at tensor_parallel_size x pipeline_parallel_size ranks (written to a temporary sibling
    and renamed at the end; an existing `out` is replaced only with `overwrite`)."""
    check_output(out, overwrite)
    folder = Path(load)
    if not folder.is_dir():
        raise ConversionError(f"Hugging Face folder {folder} does not exist")
    config = read_hf_config(folder)
    weights = HFWeights(folder)
    check_against_model(weights.shapes(), config, f"Hugging Face folder {folder}")
    record = record_from_hf(config, tensor_parallel_size, pipeline_parallel_size)
    dtype = weights.get("model.embed_tokens.weight").dtype
    try:
        config_from_record(
            record,
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            params_dtype=dtype,
            pipeline_dtype=dtype,
        )
    except (ValueError, AssertionError) as error:
        raise ConversionError(
            f"{folder / 'config.json'} at tensor parallel size {tensor_parallel_size}, "
            f"pipeline parallel size {pipeline_parallel_size}: {error}"
        ) from None
    with staged_output(out, overwrite) as staging:
        release = staging / "release"
        release.mkdir()
        write_megatron_checkpoint(folder, release, record)
        (release / ASA_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (staging / TRACKER_FILE).write_text("release\n")
        tokenizer = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
        if tokenizer:
            (release / TOKENIZER_DIR).mkdir()
            for file in tokenizer:
                shutil.copy(file, release / TOKENIZER_DIR / file.name)
    return Path(out)

