"""``yaie dashboard --replay``, in a real browser, on a recording of a small simulation: the same
views as live (a hue per request, shared blocks, the radix tree, the requests) move with the
slider."""

from __future__ import annotations

import re
from pathlib import Path

from dashboard_helpers import (
    cell_states,
    cells,
    chromium,
    map_counts,
    open_page,
    screenshot,
    wait_for_map,
    yaie_process,
)
from server_helpers import free_port

from yaie.cli import main
from yaie.ui.dashboard import STATES, request_colour
from yaie.ui.dashboard_recording import Recording


def _record(tmp_path: Path) -> Path:
    trace, out = tmp_path / "trace.jsonl", tmp_path / "run"
    generate = ["trace", "generate", str(trace), "-n", "40", "--rate", "8", "--input-len", "400"]
    generate += ["--output-len", "60", "--prefix-groups", "2", "--prefix-len", "256", "--seed", "3"]
    assert main(generate) == 0
    simulate = ["simulate", str(trace), "--out", str(out), "--record-kv", "--num-blocks", "300"]
    assert main([*simulate, "--sample-interval", "0.05", "--no-plots"]) == 0
    return out


# The sample the status line shows ("12/95 sample": the 13th of 96, as the slider counts).
SAMPLE_JS = "+/(\\d+)\\/\\d+\\s*sample/.exec(document.querySelector('#kv-status').innerText)[1]"


def _move_to(page, index: int, frame: dict) -> None:
    number = page.locator("#kv-slider input[type=number]")
    number.fill(str(index))
    number.press("Enter")
    counts = wait_for_map(
        page, lambda c: all(c[s] == frame[s] for s in STATES), f"the map of sample {index}"
    )
    page.wait_for_function(f"n => {SAMPLE_JS} == n", arg=index)
    assert counts["blocks"] == 300


def _hues(page) -> dict[str, str]:
    """The owned cells' fill per owner; each owned cell is one block with its owner in the hover."""
    out = {}
    for fill, title in cells(page, "owned"):
        owner = re.search(r"^owners: (\S+)$", title, re.MULTILINE).group(1)
        assert out.setdefault(owner, fill) == fill == request_colour(owner), title
    return out


def _radix(page) -> str:
    return page.locator("#kv-radix .kv-radix").inner_text()


def test_the_slider_moves_hues_shared_blocks_and_the_radix_tree(tmp_path: Path) -> None:
    out = _record(tmp_path)
    rec = Recording.load(out)
    frames = rec.frames_of(0)
    running = [{r["id"] for r in rec.snapshot(i)["running"]} for i in range(len(frames))]
    busiest = max(range(len(frames) - 10), key=lambda i: (len(running[i]), frames[i]["shared"]))
    # Another busy moment, with other requests running.
    other = max(
        (i for i in range(len(frames)) if len(running[i]) >= 2),
        key=lambda i: len(running[i] - running[busiest]),
    )
    assert frames[busiest]["shared"] > 0 and len(running[busiest]) >= 3  # prompts reuse a prefix
    assert running[other] - running[busiest]

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["dashboard", "--replay", out.name, "--port", str(port), "--interval", "0.2"]
    with yaie_process(args, url, cwd=out.parent), chromium() as browser:
        page = open_page(browser, url)
        assert map_counts(page)["free"] == 300 and set(cell_states(page)) == {"free"}  # time 0

        _move_to(page, busiest, frames[busiest])
        hues = _hues(page)
        assert len(set(hues.values())) >= 3 and set(hues) <= running[busiest]
        rows = page.locator('#kv-requests tr[data-status="running"]')
        assert rows.count() == len(running[busiest])
        swatches = page.eval_on_selector_all(
            '#kv-requests tr[data-status="running"] .kv-swatch',
            "s => s.map(e => e.style.background)",
        )
        assert len(set(swatches)) == len(running[busiest])
        shared = cells(page, "shared")  # violet, darker with more holders; two at least
        assert shared and all(f.startswith("hsl(270,") for f, _ in shared)
        assert all(int(re.search(r"refcount (\d+)", t).group(1)) >= 2 for _, t in shared)
        tree = _radix(page)
        assert re.search(r"[1-9][\d,]* cached blocks in [1-9]\d* nodes", tree)
        assert page.locator("#kv-radix li").count() > 1 and "hits" in tree
        assert page.locator('#kv-radix li:not([data-locked="0"])').count() > 0  # in use
        screenshot(page, "dashboard_replay.png")

        page.click("#kv-play")
        page.wait_for_function(
            f"n => {SAMPLE_JS} > n",
            arg=busiest + 3,
        )
        assert page.locator("#kv-play").inner_text() == "Pause"
        page.click("#kv-play")
        page.wait_for_function("document.querySelector('#kv-play').innerText === 'Play'")

        _move_to(page, other, frames[other])
        assert set(_hues(page)) - set(hues) and _radix(page) != tree
