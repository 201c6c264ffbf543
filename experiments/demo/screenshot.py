"""A screenshot of ``stage=demo`` for a trained run, taken in headless Chromium after one Generate:

    python experiments/demo/screenshot.py <stage-2 run dir> <out.png> [number of images] [seed]
"""

import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lightning_ldm import load_pipeline
from lightning_ldm.tasks.demo import build_app, free_port

run, shot = Path(sys.argv[1]), Path(sys.argv[2])
count, seed = (int(sys.argv[3]) if len(sys.argv) > 3 else 8), (int(sys.argv[4]) if len(sys.argv) > 4 else 0)
app = build_app(load_pipeline(run, device="cpu"), max_images=16, max_steps=100, name=run.name)
_, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port("127.0.0.1"), prevent_thread_lock=True,
                       quiet=True)
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1280,900", f"--user-data-dir={tempfile.mkdtemp()}"):
    options.add_argument(argument)
browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements("xpath", "//button[normalize-space()='Generate']"))
    for label, value in (("Seed", seed), ("number input for Number of images", count)):
        field = browser.find_element("css selector", f'input[aria-label="{label}"]')
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value), Keys.TAB)
    browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
    loaded = "return [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth).length"
    WebDriverWait(browser, 300).until(lambda d: d.execute_script(loaded) == count)
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    print(f"{shot}: {count} images from seed {seed}, {url}")
finally:
    browser.quit()
    app.close()
