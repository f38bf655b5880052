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
import threading

from floodfilling.cli import main
from floodfilling.demo import demo_crop_path
from floodfilling.viewer import make_viewer
from floodfilling.viz import write_png


def screenshot(demo_dir: str, png: str, size=(1000, 700)) -> None:
    layer = os.path.join(demo_dir, "precomputed_seg")
    if not os.path.isdir(layer):
        assert main(["export", f"{demo_dir}/demo_segmentation.h5:seg", layer, "--meshes", "--skeletons", "-q"]) == 0
    viewer, _ = make_viewer(f"{demo_crop_path()}:raw", [layer], show=None)
    import neuroglancer.webdriver

    os.environ.setdefault("SE_OFFLINE", "true")
    chromium = os.environ.get("FFN_CHROMIUM") or shutil.which("chromium")
    wd = neuroglancer.webdriver.Webdriver(viewer, headless=True, browser_binary_path=chromium, docker=True,
                                          print_logs=False)
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(viewer.screenshot(size=list(size))), daemon=True)
        t.start()
        t.join(300)
        if not out:
            raise SystemExit("no screenshot within 300 s")
        write_png(png, out[0].screenshot.image_pixels[..., :3])
    finally:
        wd.driver.quit()


if __name__ == "__main__":
    screenshot(sys.argv[1], sys.argv[2])
