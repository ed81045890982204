"""README's screenshot: a web export folder's page in headless Chromium, one sampled story, saved as a PNG.

moemla export runs/demo/moe-mla-rope /tmp/demoweb --format web
python benchmarks/web_screenshot.py /tmp/demoweb docs/web-page.png
"""

from __future__ import annotations

import argparse
import urllib.parse

from moemla.web.browser import browser, serving, why_no_browser


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder written by `moemla export RUN OUT --format web`")
    p.add_argument("png", help="where to write the screenshot")
    p.add_argument("--prompt", default="Once upon a time, there was a little dog")
    p.add_argument("--max", type=int, default=120, help="new tokens")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    if why_no_browser():
        raise SystemExit(why_no_browser())
    query = urllib.parse.urlencode({"prompt": args.prompt, "max": args.max, "seed": args.seed})
    with serving(args.folder) as url, browser() as b:
        run = b.open(f"{url}?{query}", screenshot=args.png)
    if run.state != "done" or run.console_errors:
        raise SystemExit(f"the page failed: {run.status} {run.console_errors}")
    print(f"{args.png}: {run.status}, {run.result['decode_tokens_per_s']:.1f} tokens/s")


if __name__ == "__main__":
    main()
