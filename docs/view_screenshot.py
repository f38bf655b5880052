"""The README's screenshot of ``ffn view``: the bundled demo's segmentation, exported with meshes
and skeletons, over its image, in headless Chromium (needs floodfilling[viewer,meshes], selenium,
Debian's chromium and chromium-driver)::

    ffn demo --out ffn-demo
    python docs/view_screenshot.py ffn-demo docs/view_demo.png
"""

from __future__ import annotations

import os
import shutil
import sys

from floodfilling.cli import main
from floodfilling.demo import demo_crop_path
from floodfilling.viewer import headless_screenshot, make_viewer
from floodfilling.viz import write_png


def screenshot(demo_dir: str, png: str, size=(1000, 700)) -> None:
    layer = os.path.join(demo_dir, "precomputed_seg")
    if not os.path.isdir(layer):
        assert main(["export", f"{demo_dir}/demo_segmentation.h5:seg", layer, "--meshes", "--skeletons", "-q"]) == 0
    viewer, _ = make_viewer(f"{demo_crop_path()}:raw", [layer], show=None)
    chromium = os.environ.get("FFN_CHROMIUM") or shutil.which("chromium")
    write_png(png, headless_screenshot(viewer, chromium, size, timeout=300))


if __name__ == "__main__":
    screenshot(sys.argv[1], sys.argv[2])
