"""Refresh the screenshots of the main pages, ``docs/ui/*.png``:

    python -m tally.service.ui.screenshots [OUT_DIR]

against the demo (``tally.service.ui.demo``: the talk's model and its
store) with an hour of metrics served by a real metrics endpoint, in
headless Chromium (Debian's ``chromium``, driven by Playwright).
"""
import asyncio
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from tally.service.metrics import serve_metrics
from tally.service.ui import demo
from tally.service.ui.metrics import MetricsHistory
from tally.service.ui.server import UiServer, ui_in_background

PAGES = {"search": "/?q=user",
         "view": "/view/user_history?key=7&a=1&b=2",
         "freshness": "/view/user_history?key=7#freshness",
         "distribution": "/view/user_taste?feature=avg_length&n=300#distribution",
         "service": "/service/recommend?user=7&article=3",
         "lineage": "/lineage"}


def chromium():
    """The system Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def metrics_endpoint(metrics):
    """Serve ``metrics`` on a free loopback port in a thread; returns 'host:port'."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.new_event_loop()
    loop.create_task(serve_metrics(metrics, "127.0.0.1", port))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"127.0.0.1:{port}"


def shoot(out_dir):
    from playwright.sync_api import sync_playwright
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        built = demo.build(os.path.join(tmp, "registry.db"), os.path.join(tmp, "store"))
        history = MetricsHistory(None, interval=3600)
        history.address = metrics_endpoint(demo.service_hour(history, built["versions"]))
        server = UiServer(os.path.join(tmp, "registry.db"), os.path.join(tmp, "store"),
                          history, port=0)
        with ui_in_background(server), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium())
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for name, path in PAGES.items():
                page.goto(server.url.rstrip("/") + path)
                page.screenshot(path=str(out_dir / f"{name}.png"), full_page="#" not in path)
                print(out_dir / f"{name}.png")
            browser.close()


if __name__ == "__main__":
    if chromium() is None:
        sys.exit("no chromium: apt-get install chromium")
    shoot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ui"))
