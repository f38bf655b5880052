"""Helpers of the device lane's tests (see conftest.py): bf16 support and the lane's report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPORT_ENV = "FFN_TEST_REPORT"  # JSON file the lane's report tests merge their figures into


def bf16_unsupported(device: torch.device) -> str | None:
    """Why bf16 cannot run on ``device`` (a skip reason), or None when it can."""
    from floodfilling.inference.predictor import cpu_has_bf16

    if device.type == "cpu" and not cpu_has_bf16():
        return "bf16 on this CPU lacks AVX512_BF16/AMX (the predictor refuses it)"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"bf16 is not supported by {torch.cuda.get_device_name(device)}"
    return None


def report(request, key: str, figures: dict) -> None:
    """Records ``figures`` (JSON-serialisable) for the lane's report: as a user property of
    the test (record_property; junit XML), printed (shown by pytest -s or -rP), and merged
    under ``key`` into the JSON file $FFN_TEST_REPORT when that is set."""
    request.node.user_properties.append((key, figures))
    print(f"{key}: {json.dumps(figures, sort_keys=True)}")
    path = os.environ.get(REPORT_ENV)
    if path:
        p = Path(path)
        data = json.loads(p.read_text()) if p.exists() and p.stat().st_size else {}
        data[key] = figures
        p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
