"""The model card: `eval.json` beside a checkpoint's `config.json` (torch-free).

The evaluation (`synthmri eval`) writes it; the registry reads it, so `/v1/models`
shows a model's measured quality and a request without `sampler`/`steps` uses the
recommendation. A card whose checkpoint sha256 is not the checkpoint's own is stale
(the weights changed after the evaluation) and is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "eval.json"
CARD_FORMAT_VERSION = 1


def read_card(directory: str | Path, sha256: str | None = None) -> dict[str, Any] | None:
    """The card of a checkpoint directory, or None when absent, unreadable or stale.

    A usable card has `recommended.sampler` (a known sampler) and `recommended.steps` (≥ 1).
    """
    from synthmri.contract import SAMPLERS

    path = Path(directory) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("format_version") != CARD_FORMAT_VERSION:
        return None
    rec = card.get("recommended")
    if not isinstance(rec, dict) or rec.get("sampler") not in SAMPLERS:
        return None
    steps = rec.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        return None
    if sha256 is not None and card.get("checkpoint_sha256") != sha256:
        return None
    return card


def recommendation(card: dict[str, Any] | None) -> tuple[str, int] | None:
    """(sampler, steps) a card recommends."""
    if card is None:
        return None
    return str(card["recommended"]["sampler"]), int(card["recommended"]["steps"])
