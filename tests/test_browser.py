"""``ffn view`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by neuroglancer's own webdriver helper over selenium) opens the
viewer that ``ffn view`` builds (:func:`floodfilling.viewer.make_viewer`, in this process so
that neuroglancer's screenshot, which waits until every visible chunk and mesh has loaded, can
be asked for), for a volume's segmentation (meshes on demand) and for a layer exported with
meshes and skeletons (served from its directory). Checked on the screenshot: the 2-D panels
show the colours neuroglancer gives the objects cut by the cross-sections (and not those of
the others), the 3-D panel shows mesh pixels (and far fewer with no object selected).

The browser is found on PATH (``chromium``, ``chromedriver``) or through $FFN_CHROMIUM /
$FFN_CHROMEDRIVER. Without it these tests fail under CI=true (CI installs it: .ci/run) and are
skipped elsewhere, saying what to install."""

import os
import shutil

import h5py
import numpy as np
import pytest

pytest.importorskip("neuroglancer")


def _browser():
    """(chromium, chromedriver) paths, or a reason they are missing."""
    chromium = os.environ.get("FFN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("FFN_CHROMEDRIVER") or shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    if not chromium or not driver:
        return None, ("headless Chromium not found (Debian: apt-get install chromium chromium-driver; or set "
                      "FFN_CHROMIUM and FFN_CHROMEDRIVER)")
    return (chromium, driver), ""


@pytest.fixture(scope="module")
def browser():
    found, why = _browser()
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser test cannot run: {why}")
        pytest.skip(why)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: use the driver on PATH, no downloads
    os.environ["PATH"] = os.path.dirname(found[1]) + os.pathsep + os.environ.get("PATH", "")
    return found


def screenshot(viewer, chromium, size=(800, 600), timeout=180):
    """The viewer's screenshot once everything visible has loaded (RGB array)."""
    from floodfilling.viewer import headless_screenshot

    return headless_screenshot(viewer, chromium, size, timeout)


def quadrants(img):
    """4panel layout: xy (top left), xz (top right), 3-D (bottom left), yz (bottom right)."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    return {"xy": img[:h, :w], "xz": img[:h, w:], "3d": img[h:, :w], "yz": img[h:, w:]}


def segment_rgb(i):
    from neuroglancer.segment_colors import hex_string_from_segment_id

    hx = hex_string_from_segment_id(0, int(i))
    return np.array([int(hx[k:k + 2], 16) for k in (1, 3, 5)], float)


def has_colour(img, rgb, tol=3, min_pixels=20):
    return int((np.abs(img.astype(float) - rgb).max(-1) <= tol).sum()) >= min_pixels


def mesh_pixels(img, blend):
    """Pixels of saturated colour other than neuroglancer's yellow outlines and the objects' flat
    colours (``blend`` of them: the cross-sections drawn in the 3-D panel): shaded surfaces."""
    f = img.astype(int)
    sat = f.max(-1) - f.min(-1) > 60
    yellow = (f[..., 0] > 150) & (f[..., 1] > 150) & (f[..., 2] < 110)
    flat = np.zeros(sat.shape, bool)
    for i in BOXES:
        flat |= np.abs(f - segment_rgb(i) * blend).max(-1) <= 3
    return int((sat & ~yellow & ~flat).sum())


BOXES = {1: ((5, 10, 10), (30, 50, 40)), 2: ((30, 20, 45), (55, 60, 65)), 3: ((40, 55, 5), (58, 78, 20))}


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    seg = np.zeros((60, 80, 70), np.uint32)
    for i, (a, b) in BOXES.items():
        seg[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = i
    with h5py.File(d / "v.h5", "w") as f:
        f.create_dataset("img", data=np.zeros(seg.shape, np.uint8)).attrs["resolution_zyx_nm"] = [8, 4, 4]
        f.create_dataset("seg", data=seg).attrs["resolution_zyx_nm"] = [8, 4, 4]
    centre = [s // 2 for s in seg.shape]  # the viewer starts at the volume's centre
    cut = set(np.unique(seg[centre[0]])) | set(np.unique(seg[:, centre[1]])) | set(np.unique(seg[:, :, centre[2]]))
    return d, seg, sorted(int(i) for i in cut - {0})


def check_2d(img, cut, blend):
    """Every object cut by the cross-sections shows in its colour (``blend``: its share over a
    black image) in the 2-D panels; the others do not."""
    q = quadrants(img)
    flat = np.concatenate([q[k].reshape(-1, 3) for k in ("xy", "xz", "yz")])[None]
    for i in BOXES:
        shown = has_colour(flat, segment_rgb(i) * blend)
        assert shown == (i in cut), (i, cut, blend)


def test_volume_segmentation_in_browser(browser, vol, tmp_path):
    from floodfilling.viewer import make_viewer

    d, seg, cut = vol
    assert cut and len(cut) < len(BOXES)  # the check can tell shown from not shown
    viewer, _ = make_viewer(f"{d / 'v.h5'}:img", [f"{d / 'v.h5'}:seg"], show=None)
    img = screenshot(viewer, browser[0])
    check_2d(img, cut, blend=0.5)  # neuroglancer's default: selected objects at alpha 0.5 over the image
    with_meshes = mesh_pixels(quadrants(img)["3d"], 0.5)
    viewer0, _ = make_viewer(f"{d / 'v.h5'}:img", [f"{d / 'v.h5'}:seg"], show=0)  # no object selected: no meshes
    without = mesh_pixels(quadrants(screenshot(viewer0, browser[0]))["3d"], 0.5)
    assert with_meshes > 3000 and 10 * without < with_meshes, (with_meshes, without)  # edges: a few hundred


def test_exported_layer_in_browser(browser, vol, tmp_path):
    pytest.importorskip("igneous", reason="the meshes extra (igneous-pipeline) is not installed")
    from floodfilling.cli import main
    from floodfilling.viewer import make_viewer

    d, seg, cut = vol
    dest = tmp_path / "layer"
    assert main(["export", f"{d / 'v.h5'}:seg", str(dest), "--meshes", "--skeletons", "--skeleton-dust", "100",
                 "-q"]) == 0
    viewer, layers = make_viewer(str(dest), show=None)
    assert layers[0].url.startswith("precomputed://http://127.0.0.1:")
    img = screenshot(viewer, browser[0])
    check_2d(img, cut, blend=1.0)  # no image underneath: the objects' own colours
    assert mesh_pixels(quadrants(img)["3d"], 1.0) > 3000


def test_ffn_view_process_in_browser(browser, vol, tmp_path):
    """The command itself: ``ffn view IMAGE LAYER --show all`` in its own process (the image from
    HDF5, the segmentation an exported layer with meshes and skeletons), opened in headless
    Chromium by selenium; ready when neuroglancer's viewer and each of its panels say so."""
    pytest.importorskip("igneous", reason="the meshes extra (igneous-pipeline) is not installed")
    import io
    import subprocess
    import sys
    import time

    import selenium.webdriver
    from PIL import Image

    from floodfilling.cli import main

    d, seg, cut = vol
    dest = tmp_path / "layer"
    assert main(["export", f"{d / 'v.h5'}:seg", str(dest), "--meshes", "--skeletons", "--skeleton-dust", "100",
                 "-q"]) == 0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.path.join(repo, "python")}
    proc = subprocess.Popen([sys.executable, "-m", "floodfilling.cli", "view", f"{d / 'v.h5'}:img", str(dest),
                             "--show", "all"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = None
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        opts = selenium.webdriver.ChromeOptions()
        opts.binary_location = browser[0]
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=800,600"):
            opts.add_argument(arg)
        driver = selenium.webdriver.Chrome(options=opts)
        driver.get(url)
        ready, t0 = False, time.monotonic()
        while not ready and time.monotonic() - t0 < 120:
            time.sleep(0.5)
            ready = driver.execute_script(
                "const v = window.viewer; return !!v && v.isReady() && [...v.display.panels].length == 4 && "
                "[...v.display.panels].every(p => p.isReady());")
        assert ready, "the viewer's layers never reported loaded"
        time.sleep(1.0)  # the frame drawn after the last chunk
        img = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(30)
    # the panels lie below the top bar (layer names, coordinates): xy xz / 3-D yz
    top = 48
    h, w = (img.shape[0] - top) // 2, img.shape[1] // 2
    flat2d = np.concatenate([img[top:top + h].reshape(-1, 3), img[top + h:, w:].reshape(-1, 3)])[None]
    for i in BOXES:
        assert has_colour(flat2d, segment_rgb(i) * 0.5) == (i in cut), (i, cut)
    assert mesh_pixels(img[top + h:, :w], 0.5) > 2000
