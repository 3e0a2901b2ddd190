"""Regenerate the TensorBoard screenshots in docs/images/ (used by docs/tensorboard.md).

    python docs/screenshots.py --logdir runs/demo --out docs/images

The log dir is what ``lightning-sens demo`` writes.  ``--synthetic DIR`` first writes a fake
3-step log dir of the same layout to DIR (the Trainer's run at the root, the monitor's runs
``sensitivity/train`` and ``sensitivity/val``) and uses it: no training run needed.

Needs TensorBoard in this Python environment (run as ``sys.executable -m tensorboard.main``) and
Chromium with its WebDriver (Debian: ``apt-get install -y chromium chromium-driver``); nothing
else.  It starts TensorBoard on a free port and ``chromedriver``, speaks W3C WebDriver to it with
urllib, puts TensorBoard's settings into localStorage, opens Time Series with
``?tagFilter=...&runFilter=...#timeseries`` for each screenshot, waits until every card has
loaded, writes the PNGs atomically (temp file, then rename) and stops TensorBoard, also on error.
Charts are drawn as SVG (``forceSVG=true``): headless Chromium has no WebGL.
"""

import argparse
import base64
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WIDTH = 1400
# TensorBoard's persistent settings (localStorage "_tb_global_settings"): smoothing 0, outliers
# not ignored (they would clip 3-point curves), no auto reload, settings pane closed.
TB_SETTINGS = {"scalarSmoothing": 0, "ignoreOutliers": False, "autoReload": False}
TB_SETTINGS["timeSeriesSettingsPaneOpened"] = False
# tensorboard_<name>.png: Time Series filtered by tag and run regex, cards of card_width px (None:
# TensorBoard's default; else 335-735).  Runs are named by their directory under --logdir.
SHOTS = [  # (name, tag regex, run regex, card width)
    ("time_series", r"^sensitivity/(flagged|persistent|loss|accuracy|train_val_gap)$", "", None),
    ("fi", r"^sensitivity_fi/(pred|true)_label/log_fi_(median|q99)$", r"(^|/)(train|val)$", 520),
    ("images", r"^sensitivity_images/manhattan$", r"(^|/)val$", 735),
]
CHROME_ARGS = (  # no network here: keep Chromium from calling home
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-sync "
    "--disable-background-networking --disable-component-update --disable-dev-shm-usage "
    f"--hide-scrollbars --window-size={WIDTH},1000"
).split()
# Once the filtered cards have loaded and every chart has its lines: the window height needed.
JS_READY = """
const v = document.querySelector('metrics-filtered-view');  // the cards matching tagFilter
if (!v || !v.querySelector('card-view') || document.querySelector('mat-spinner')) return false;
for (const c of v.querySelectorAll('scalar-card')) {
  if (!c.querySelector('line-chart svg path')) return false;
}
for (const i of v.querySelectorAll('image-card img')) { if (!i.complete) return false; }
// the window height that shows every card (they scroll inside metrics-filtered-view)
return Math.ceil(v.getBoundingClientRect().top + v.scrollHeight + outerHeight - innerHeight);"""

# Image cards: show the images at their actual size (at most the card's width) and let the card
# grow to their height (Time Series gives every card a fixed height).
JS_ACTUAL_SIZE = """
const v = document.querySelector('metrics-filtered-view');
for (const b of v.querySelectorAll('image-card button[title="Toggle actual image size"]'))
  b.click();
for (const c of v.querySelectorAll('.card-space')) {
  if (!c.querySelector('image-card')) continue;
  for (const e of [c, ...c.querySelectorAll('card-view, image-card, image-card-component')])
    Object.assign(e.style, {height: 'auto', flex: 'none'});
  for (const i of c.querySelectorAll('img')) i.style.maxWidth = '100%';  // wide figures
}"""


def build_synthetic(logdir):
    """A 3-step log dir laid out like the demo's: the Trainer's run at the root, the monitor's
    runs ``sensitivity/train`` and ``sensitivity/val``."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(logdir) as w:
        for s in range(3):
            w.add_scalar("train/loss", 1.0 - 0.25 * s, s)
            w.add_scalar("val/loss", 1.1 - 0.2 * s, s)
            w.add_scalar("val/acc", 0.55 + 0.1 * s, s)
            w.add_scalar("sensitivity/train_val_gap", 0.05 + 0.04 * s, s)
    rng = np.random.default_rng(0)
    for k, split in enumerate(["train", "val"]):
        with SummaryWriter(os.path.join(logdir, "sensitivity", split)) as w:  # paths.split_run
            for s in range(3):
                w.add_scalar("sensitivity/flagged", 40 + 30 * s - 15 * k, s)
                w.add_scalar("sensitivity/persistent", 10 * s - 4 * k * s, s)
                w.add_scalar("sensitivity/loss", 0.9 - 0.2 * s + 0.1 * k, s)
                w.add_scalar("sensitivity/accuracy", 0.6 + 0.1 * s - 0.05 * k, s)
                w.add_scalar("sensitivity_fi/pred_label/log_fi_median", -3 + 0.3 * s + 0.2 * k, s)
                w.add_scalar("sensitivity_fi/true_label/log_fi_q99", 1 + 0.4 * s + 0.3 * k, s)
                w.add_image("sensitivity_images/manhattan", manhattan(rng), s)


def manhattan(rng):
    """A 450 x 700 RGB stand-in for a Manhattan plot: 10 class columns, 2 high points each."""
    import numpy as np

    img = np.ones((3, 450, 700), np.float32)
    img[:, 20:430, 40] = img[:, 430, 40:690] = 0  # axes
    for c in range(10):
        for i in range(60):
            x = 50 + 64 * c + rng.integers(50)
            y = int(max(330 - 8 * c - rng.gamma(2, 30) - 150 * (i < 2), 25))
            rgb = (0.85, 0.1, 0.1) if i < 2 else (0.2, 0.3, 0.6 + 0.3 * (c % 2))
            img[:, y - 3 : y + 3, x - 3 : x + 3] = np.array(rgb)[:, None, None]
    return img


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd):
    """Start a process in its own process group, so that stop() also ends its children; its
    output goes to a temp file (a pipe nobody reads would fill up and block it)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def stop(proc):
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass


def http(method, url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def wait_for(what, proc, check, timeout=60.0):
    """Poll check() until it returns something truthy; fail if proc died or time ran out."""
    end, error = time.monotonic() + timeout, ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"{what} exited: {proc.log.read().decode()[-2000:]}")
        try:
            result = check()
            if result:
                return result
        except OSError as e:  # not answering yet (or a script error, reported below)
            error = f" (last error: {e})"
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{error}")


class Browser:
    """A minimal W3C WebDriver client for chromedriver."""

    def __init__(self, driver_url, profile):
        self.base = driver_url
        args = [*CHROME_ARGS, f"--user-data-dir={profile}"]
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        answer = http("POST", f"{self.base}/session", {"capabilities": {"alwaysMatch": caps}})
        self.sid = answer["value"]["sessionId"]

    def cmd(self, method, path, body=None):
        return http(method, f"{self.base}/session/{self.sid}/{path}", body)["value"]

    def js(self, script):
        return self.cmd("POST", "execute/sync", {"script": script, "args": []})

    def close(self):
        http("DELETE", f"{self.base}/session/{self.sid}")


def loaded(tb_url, seen):
    """{run: tags} once TensorBoard's tag lists have not changed for 3 s (it loads the log dir in
    the background, and the page reads the tags only once). seen: the earlier answers."""
    lists = ("scalars", "images")
    seen.append([http("GET", f"{tb_url}/data/plugin/{what}/tags", timeout=10) for what in lists])
    last = seen[-7:]
    if len(last) < 7 or last.count(last[0]) < 7 or not any(last[0]):
        return None
    runs = {}
    for answer in last[0]:
        for run, tags in answer.items():
            runs.setdefault(run, set()).update(tags)
    return runs


def screenshot(browser, url, path, max_height=2400):
    """Load url in a 1400 x 600 window, grow the window until every card is on screen and has
    loaded (cards load only when visible), then save the viewport as path."""
    browser.cmd("POST", "window/rect", {"width": WIDTH, "height": 600})
    browser.cmd("POST", "url", {"url": url})
    height, what = 600, f"cards to load at {urllib.parse.unquote(url)}"
    wait_for(what, None, lambda: browser.js(JS_READY), 90)
    browser.js(JS_ACTUAL_SIZE)
    while True:
        need = wait_for(what, None, lambda: browser.js(JS_READY), 90)
        if need <= height or height >= max_height:
            break
        height = min(need, max_height)
        browser.cmd("POST", "window/rect", {"width": WIDTH, "height": height})
        time.sleep(1)
    time.sleep(1.5)  # let the charts' last transitions settle
    png = base64.b64decode(browser.cmd("GET", "screenshot"))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print("wrote", path)


def take_screenshots(logdir, out, profile):
    """Start TensorBoard and chromedriver, take SHOTS, stop both; the number of shots skipped."""
    tb = driver = browser = None
    missing = 0
    try:
        port, dport = free_port(), free_port()
        tb_cmd = [sys.executable, "-m", "tensorboard.main", "--host", "127.0.0.1"]
        tb = start([*tb_cmd, "--port", str(port), "--logdir", logdir])
        tb_url, seen = f"http://127.0.0.1:{port}", []
        tags = wait_for("TensorBoard to load the log dir", tb, lambda: loaded(tb_url, seen), 120)
        print("TensorBoard", tb_url, "runs:", ", ".join(sorted(tags)))
        driver = start([CHROMEDRIVER, f"--port={dport}"])
        d_url = f"http://127.0.0.1:{dport}"
        wait_for("chromedriver", driver, lambda: http("GET", f"{d_url}/status", timeout=5))
        browser = Browser(d_url, profile)
        browser.cmd("POST", "url", {"url": tb_url + "/"})  # localStorage needs TensorBoard's origin
        for name, tag_re, run_re, card_width in SHOTS:
            runs = [r for r, ts in tags.items() if re.search(run_re, r)]
            if not any(re.search(tag_re, t) for r in runs for t in tags[r]):
                print(f"skipped {name}: no tag matching {tag_re} in runs matching '{run_re}'")
                missing += 1
                continue
            settings = json.dumps(dict(TB_SETTINGS, timeSeriesCardMinWidth=card_width))
            browser.js(f"localStorage.setItem('_tb_global_settings', {json.dumps(settings)});")
            query = {"smoothing": "0", "forceSVG": "true", "tagFilter": tag_re}
            query.update({"runFilter": run_re} if run_re else {})
            url = f"{tb_url}/?{urllib.parse.urlencode(query)}#timeseries"
            screenshot(browser, url, os.path.join(out, f"tensorboard_{name}.png"))
    finally:
        if browser is not None:
            with contextlib.suppress(OSError):
                browser.close()
        stop(driver)
        stop(tb)
    return missing


# The monitor's own figures shown in docs/tensorboard.md, copied from the last monitored epoch.
FIGURES = ("manhattan_train", "flagged_train", "fi_maps_val", "layer_heatmap_val")


def copy_figures(logdir, out):
    """Copy the last epoch's figures (saved with ``save_figures=True``, as the demo does) to
    ``out/figure_<name>.png``; returns the names not found."""
    found = sorted(
        glob.glob(os.path.join(logdir, "**", "sensitivity", "figures", "*.png"), recursive=True)
    )
    epochs = sorted({m.group(1) for f in found if (m := re.search(r"_epoch(\d+)\.png$", f))})
    missing = []
    for name in FIGURES:
        source = [
            f for f in found if epochs and os.path.basename(f) == f"{name}_epoch{epochs[-1]}.png"
        ]
        if not source:
            missing.append(name)
            continue
        target = os.path.join(out, f"figure_{name}.png")
        shutil.copyfile(source[0], target + ".tmp")
        os.replace(target + ".tmp", target)
        print(f"wrote {target}")
    return missing


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--logdir", default="runs/demo")
    p.add_argument("--out", default="docs/images")
    p.add_argument("--synthetic", metavar="DIR", help="write a fake log dir to DIR and use it")
    args = p.parse_args()
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        sys.exit("needs Chromium and chromedriver: apt-get install -y chromium chromium-driver")
    if args.synthetic:
        build_synthetic(args.synthetic)
        args.logdir = args.synthetic
    if not os.path.isdir(args.logdir):
        sys.exit(f"no log dir {args.logdir}")
    os.makedirs(args.out, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="tb-shots-chromium-")
    try:
        missing = take_screenshots(args.logdir, args.out, profile)
        if not args.synthetic:
            missing += len(copy_figures(args.logdir, args.out))
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
