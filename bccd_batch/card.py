"""The model's card on disk (`model.json` beside `model.safetensors`): reading and checking it, and the
weights' digest. No torch: a run's parent process reads the card while only its workers import torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .cells import CLASSES

CARD_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"


class ModelError(Exception):
    """A model card or weights file that cannot be used; the message says why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(model_dir: Path) -> dict[str, Any]:
    card_path = Path(model_dir) / CARD_NAME
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no model card at {card_path}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model card {card_path} is not valid JSON: {e}") from None
    for key in ("architecture", "classes", "weights", "thresholds"):
        if key not in card:
            raise ModelError(f"model card {card_path} lacks '{key}'")
    if tuple(card["classes"]) != CLASSES:
        raise ModelError(f"model card classes {card['classes']} differ from {list(CLASSES)}")
    return card
