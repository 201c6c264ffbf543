"""``stage=demo``: the page as a real headless browser (Debian's Chromium, driven by selenium) sees it: it makes the
images ``load_pipeline`` makes for the same seed, pixel for pixel, and shows a bad request's one-line error.

The browser tests skip where /usr/bin/chromium, /usr/bin/chromedriver, gradio or selenium is missing
(``apt-get install chromium chromium-driver``; ``pip install "lightning_ldm[test]"``); CI installs them.
With LIGHTNING_LDM_DEMO_SCREENSHOT=<path> the generation test saves a screenshot of the page there."""

import base64
import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from lightning_ldm.cli import CONFIG_DIR
from lightning_ldm.diffusion.checkpoint import save_ema_export
from lightning_ldm.errors import CheckpointError, ConfigError
from lightning_ldm.pipeline import LatentDiffusionPipeline, load_pipeline

from test_pipeline import _randomised
from test_stage2 import CLASSES_ADM
from test_text_to_image import text_module

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TIMEOUT = 60


def _without(*what: str) -> str:
    """Why the browser tests cannot run here, or ''."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if "browser" in what and not path.exists():
            return f"{path} is absent (apt-get install chromium chromium-driver)"
    for module in ("gradio", "selenium"):
        if module in what and importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install \"lightning_ldm[test]\")"
    return ""


needs_gradio = pytest.mark.skipif(bool(_without("gradio")), reason=_without("gradio"))
needs_browser = pytest.mark.skipif(bool(_without("browser", "gradio", "selenium")),
                                   reason=_without("browser", "gradio", "selenium"))


def _cfg(output_root: Path, **demo):
    return OmegaConf.create({"paths": {"output_root": str(output_root)},
                             "demo": {**OmegaConf.load(CONFIG_DIR / "stage/demo.yaml").demo, **demo}})


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny class-conditional model (10 classes, 32x32 RGB) with random weights, as an EMA export."""
    model = text_module(conditioning=CLASSES_ADM)
    _randomised(model.ema.model)
    path = tmp_path_factory.mktemp("demo") / "classes/export/ldm-ema.safetensors"
    save_ema_export(model, path)
    return path


@pytest.fixture(scope="module")
def pipe(export) -> LatentDiffusionPipeline:
    return load_pipeline(export, device="cpu")


@pytest.fixture(scope="module")
def url(pipe, tmp_path_factory):
    """The page served on a free port of 127.0.0.1, its image files in a temporary folder."""
    if _without("gradio"):
        pytest.skip(_without("gradio"))
    from lightning_ldm.tasks.demo import build_app, free_port

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        app = build_app(pipe, max_images=4, max_steps=10, name="tiny")
        port = free_port("127.0.0.1")
        _, local_url, _ = app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield local_url
        finally:
            app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1280,900",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no selenium-manager download
    driver.set_script_timeout(TIMEOUT)
    yield driver
    driver.quit()


def _open(browser, url):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements("xpath", "//button[normalize-space()='Generate']"))


def _type(browser, label: str, value) -> None:
    """Replace what the input labelled ``label`` holds, as a user would: select all, type, leave the field."""
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element("css selector", f'input[aria-label="{label}"]')
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def _loaded_images(browser) -> list:
    """The gallery's images that the browser has fetched and decoded."""
    return [image for image in browser.find_elements("css selector", "#gallery img")
            if browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)]


FETCH = """const [src, done] = arguments;
fetch(src).then(r => r.ok ? r.arrayBuffer() : Promise.reject(r.status)).then(buffer => {
  let text = ''; new Uint8Array(buffer).forEach(byte => text += String.fromCharCode(byte)); done(btoa(text));
}).catch(error => done('failed: ' + error));"""


@needs_browser
def test_the_page_makes_the_images_of_the_pipeline_for_the_same_seed(pipe, url, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, url)
    assert browser.title == "tiny: conditioned on class"
    assert "A latent diffusion model, conditioned on class, making 32x32 images" in browser.page_source
    _type(browser, "Class (0 to 9)", 3)
    _type(browser, "Seed", 5)
    _type(browser, "number input for Number of images", 2)
    _type(browser, "number input for Sampler steps", 2)
    browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
    images = WebDriverWait(browser, TIMEOUT).until(lambda d: len(_loaded_images(d)) == 2 and _loaded_images(d))
    expected = pipe(n=2, classes=3, steps=2, seed=5)
    for image, want in zip(images, expected):
        src = image.get_attribute("src")
        assert src.startswith(url) and "/gradio_api/file=" in src and src.endswith(".png"), src
        payload = browser.execute_async_script(FETCH, src)  # the bytes the page itself was served
        assert not payload.startswith("failed"), payload
        got = Image.open(io.BytesIO(base64.b64decode(payload)))
        assert got.format == "PNG" and got.size == (32, 32) and got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(want))  # PNG: lossless, so pixel-exact
    assert [image.get_attribute("alt") for image in images] == ["seed 5", "seed 6"]
    assert not np.array_equal(np.asarray(expected[0]), np.asarray(expected[1]))
    if os.environ.get("LIGHTNING_LDM_DEMO_SCREENSHOT"):
        shot = Path(os.environ["LIGHTNING_LDM_DEMO_SCREENSHOT"])
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))


@needs_browser
def test_a_bad_request_shows_the_pipelines_one_line_error_in_the_page(url, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, url)
    _type(browser, "Class (0 to 9)", 12)
    _type(browser, "number input for Sampler steps", 1)
    browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
    body = lambda d: d.find_element("tag name", "body").text  # noqa: E731
    WebDriverWait(browser, TIMEOUT).until(lambda d: "outside [0, 10)" in body(d))
    assert "Traceback" not in body(browser) and not _loaded_images(browser)


@needs_gradio
def test_the_controls_are_those_the_model_takes(tmp_path):
    from lightning_ldm.tasks.demo import build_app

    unconditional = text_module(conditioning={})
    save_ema_export(unconditional, tmp_path / "ldm-ema.safetensors")
    app = build_app(load_pipeline(tmp_path / "ldm-ema.safetensors", device="cpu"), max_images=8, max_steps=50)
    labels = [getattr(block, "label", None) for block in app.blocks.values()]
    assert {"Seed", "Number of images", "Sampler steps", "Images"} <= set(labels)
    assert not {label for label in labels if label and label.startswith(("Class", "Guidance", "Prompt"))}
    steps = next(block for block in app.blocks.values() if getattr(block, "label", None) == "Sampler steps")
    assert (steps.minimum, steps.maximum, steps.value) == (1, 50, 3)  # the model's own steps by default


@needs_gradio
def test_the_demo_stops_in_one_line_without_a_model_or_for_a_model_that_needs_input_images(tmp_path, export,
                                                                                            monkeypatch):
    from lightning_ldm.tasks.demo import demo

    with pytest.raises(CheckpointError, match="no stage-2 checkpoint under .*stage=diffusion` or set demo.ckpt="):
        demo(_cfg(tmp_path))
    monkeypatch.setattr(LatentDiffusionPipeline, "image_task", property(lambda self: "super_resolution"))
    refusal = r"^stage=demo samples from noise; this model super-resolves: use stage=sample sample.images=\.\.\.$"
    with pytest.raises(ConfigError, match=refusal):
        demo(_cfg(tmp_path, ckpt=str(export), device="cpu"))


def test_without_gradio_the_demo_names_its_extra(tmp_path, monkeypatch):
    from lightning_ldm.tasks.demo import demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if never installed
    with pytest.raises(ConfigError, match=r'^stage=demo .* needs the "demo" extra: pip install "lightning_ldm\[demo\]'):
        demo(_cfg(tmp_path))
