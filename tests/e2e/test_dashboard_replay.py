"""``yaie dashboard --replay``, in a real browser, on a recording of a small simulation."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dashboard_helpers import (
    cell_states,
    chromium,
    free_port,
    map_counts,
    open_page,
    screenshot,
    wait_for_map,
    yaie_process,
)

from yaie.cli import main
from yaie.ui.dashboard import CODES


def _record(tmp_path: Path) -> Path:
    trace, out = tmp_path / "trace.jsonl", tmp_path / "run"
    generate = ["trace", "generate", str(trace), "-n", "40", "--rate", "8", "--input-len", "400"]
    generate += ["--output-len", "60", "--prefix-groups", "2", "--prefix-len", "256", "--seed", "3"]
    assert main(generate) == 0
    simulate = ["simulate", str(trace), "--out", str(out), "--record-kv", "--num-blocks", "300"]
    assert main([*simulate, "--sample-interval", "0.05", "--no-plots"]) == 0
    return out


def _sample(page) -> int:
    """The sample the status line shows ("12/95 sample": the 13th of 96, as the slider counts)."""
    return int(re.search(r"(\d+)/\d+\s*sample", page.locator("#kv-status").inner_text()).group(1))


def test_the_slider_moves_the_block_map_through_the_recording(tmp_path: Path) -> None:
    out = _record(tmp_path)
    frames = [json.loads(line) for line in (out / "kv_trace.jsonl").read_text().splitlines()[1:]]
    busiest = max(range(len(frames) - 10), key=lambda i: (frames[i]["shared"], frames[i]["owned"]))
    frame = frames[busiest]
    assert frame["shared"] > 0 and frame["owned"] > 0  # the system prompts are reused

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["dashboard", "--replay", str(out), "--port", str(port), "--interval", "0.2"]
    with yaie_process(args, url), chromium() as browser:
        page = open_page(browser, url)
        assert map_counts(page)["free"] == 300 and set(cell_states(page)) == {"free"}  # time 0

        number = page.locator("#kv-slider input[type=number]")
        number.fill(str(busiest))
        number.press("Enter")
        counts = wait_for_map(page, lambda c: c["free"] == frame["free"], "the map to move")
        assert {s: counts[s] for s in CODES.values()} == {s: frame[s] for s in CODES.values()}
        assert cell_states(page) == [CODES[c] for c in frame["map"]]
        assert _sample(page) == busiest
        screenshot(page, "dashboard_replay.png")

        page.click("#kv-play")
        page.wait_for_function(
            "n => /(\\d+)\\/\\d+\\s*sample/.exec(document.querySelector('#kv-status').innerText)[1] > n",
            arg=busiest + 3,
        )
        assert page.locator("#kv-play").inner_text() == "Pause"
        page.click("#kv-play")
        page.wait_for_function("document.querySelector('#kv-play').innerText === 'Play'")
