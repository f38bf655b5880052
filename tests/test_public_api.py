"""The public API of ``floodfilling`` (its ``__init__``): every name resolves to the function or
class it documents, has a docstring, and importing the package does not import torch."""

import subprocess
import sys

import floodfilling


def test_every_public_name_resolves_and_is_documented():
    from floodfilling.config import InferenceConfig, RefineConfig
    from floodfilling.distributed.run import segment_blocks
    from floodfilling.evaluation import evaluate
    from floodfilling.inference.refine import refine_array
    from floodfilling.inference.segment import segment, segment_array
    from floodfilling.training.options import TrainOptions
    from floodfilling.training.train import train

    want = {"segment": segment, "segment_array": segment_array, "segment_blocks": segment_blocks,
            "refine": refine_array, "evaluate": evaluate, "train": train, "InferenceConfig": InferenceConfig,
            "RefineConfig": RefineConfig, "TrainOptions": TrainOptions}
    assert set(floodfilling.__all__) == set(want) | {"__version__"}
    for name, obj in want.items():
        assert getattr(floodfilling, name) is obj, name
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        assert f":func:`{name}`" in floodfilling.__doc__ or f":class:`{name}`" in floodfilling.__doc__
    assert set(want) <= set(dir(floodfilling))


def test_unknown_name_and_light_import():
    try:
        floodfilling.nope  # noqa: B018
    except AttributeError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("no AttributeError")
    code = "import sys, floodfilling; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
