"""The built-in demo model: a small LongCat-Flash (with its MTP layer) trained on public-domain English.

`default_model_path()` is what `LLM()` / `longcat-serve` load when no model is given; it goes through the same
loader as any checkpoint. The training recipe is `python -m longcat_service.demo.train`; DATA.md records the data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from longcat_service import envs

logger = logging.getLogger(__name__)

DEMO_CHECKPOINT_DIR = Path(__file__).with_name("checkpoint")
DEMO_NOTICE = (
    "serving the built-in demo model: a LongCat-Flash of a few million parameters trained briefly on the King James Bible and "
    "a small dialogue corpus. Expect short, loosely coherent, often archaic English, not answers; pass --model "
    "<checkpoint dir> for a real model."
)


def default_model_path() -> Path:
    """The packaged trained demo checkpoint, or the random tiny one (`longcat_service.demo_model`) when
    LONGCAT_DEMO_MODEL=random (the engine tests, written around its never-ending random text) or when the package
    lacks the trained one."""
    from longcat_service.demo_model import ensure_demo_model

    if envs.LONGCAT_DEMO_MODEL == "random":  # any value but trained / random: ValueError naming the variable
        return ensure_demo_model()
    if (DEMO_CHECKPOINT_DIR / "model.safetensors").is_file():
        return DEMO_CHECKPOINT_DIR
    logger.warning("the trained demo checkpoint is missing from %s: using random tiny weights", DEMO_CHECKPOINT_DIR)
    return ensure_demo_model()
