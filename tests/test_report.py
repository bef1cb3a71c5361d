"""``saferl report``: the HTML/CSV report of small real runs (two seeds of PPO-Lag and one of
TRPO-Lag on FunctionEnv, one of them evaluated with ``saferl eval --save``, one with a video),
its numbers against metrics.csv, and the page rendered in headless Chromium (DevTools protocol:
images decoded, no console error, a screenshot that is not blank)."""
from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from saferl.cli import main
from saferl.config import ConfigError, load_config
from saferl.tools import report

QUICK = ["total_env_steps=3000", "steps_per_iteration=500", "resources.envs_per_host=5", "logging.tensorboard=false"]
RUNS = [("ppo_lag", 0), ("ppo_lag", 1), ("trpo_lag", 0)]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    from saferl.cluster.session import train

    root = tmp_path_factory.mktemp("report") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        dirs = [train(load_config(f"{algo}/FunctionEnv-v0", QUICK + [f"seed={seed}", f"run_root={root}",
                                                                      f"name={algo}-s{seed}"]))
                for algo, seed in RUNS]
        assert main(["eval", str(dirs[0]), "--episodes", "2", "--save"]) == 0
    from PIL import Image

    (dirs[1] / "videos").mkdir()
    frames = [Image.new("RGB", (48, 32), (40 * k, 90, 200)) for k in range(3)]
    frames[0].save(dirs[1] / "videos" / "eval_ep0.gif", save_all=True, append_images=frames[1:], duration=100)
    return dirs


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out


def final_cells(run_dirs: list[Path]) -> tuple[str, str]:
    """The final return and cost cells computed here from metrics.csv: per run the mean of the last
    ceil(10%) logged points with episodes, then mean ± sample std over the runs."""
    rets, costs = [], []
    for d in run_dirs:
        m = pd.read_csv(d / "metrics.csv").drop_duplicates("iteration", keep="last").dropna(subset=["episode/return"])
        k = max(1, math.ceil(0.1 * len(m)))
        rets.append(m["episode/return"].iloc[-k:].mean())
        costs.append(m["episode/cost"].iloc[-k:].mean())

    def cell(v):
        return f"{statistics.fmean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
    return cell(rets), cell(costs)


def test_report_sections_figures_and_numbers(runs, built):
    page = built.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert re.findall(r"<h2[^>]*>([^<]*)", page) == ["Summary", "Evaluation", "FunctionEnv-v0"]
    assert re.findall(r"<h3[^>]*>([^<]*)", page) == ["ppo_lag/FunctionEnv-v0", "trpo_lag/FunctionEnv-v0"]
    columns = [set(pd.read_csv(d / "metrics.csv").columns) for d in runs]
    assert all({"lagrange_multiplier", "time/env_steps_per_s"} <= c for c in columns)
    # per group: return/cost, multipliers, throughput; one comparison for the task's two groups
    assert page.count('<img class="figure"') == 2 * 3 + 1
    assert page.count('<img class="video"') == 1 and "eval_ep0.gif" in page and "<video" not in page
    assert page.count("data:image/png;base64,") == 7 and page.count("data:image/gif;base64,") == 1

    summary = pd.read_csv(built.parent / "report_summary.csv")
    assert list(summary["group"]) == ["ppo_lag/FunctionEnv-v0", "trpo_lag/FunctionEnv-v0"]
    assert list(summary["seeds"].astype(str)) == ["0 1", "0"] and list(summary["env_steps"]) == [3000, 3000]
    for group, dirs in (("ppo_lag", runs[:2]), ("trpo_lag", runs[2:])):
        ret, cost = final_cells(dirs)
        row = re.search(rf"<tr><td>{group}/FunctionEnv-v0</td>(.*?)</tr>", page).group(1)
        assert f"<td>{ret}</td><td>{cost}</td>" in row, (row, ret, cost)
        assert f"{summary.set_index('algo').loc[group, 'return_mean']:.2f}" == ret.split(" ")[0]

    ev = json.loads((runs[0] / "eval.json").read_text())
    assert ev["episodes"] == 2 and len(ev["returns"]) == 2
    assert f"<td>{ev['return_mean']:.2f} ± {ev['return_std']:.2f}</td>" in page
    assert summary.loc[0, "eval_return_mean"] == pytest.approx(ev["return_mean"])

    curves = pd.read_csv(built.parent / "report_curves.csv")
    expected = sum(pd.read_csv(d / "metrics.csv")[c].notna().sum() for d in runs
                   for c in ("episode/return", "episode/cost", "lagrange_multiplier", "time/env_steps_per_s"))
    assert len(curves) == expected
    assert set(curves["metric"]) == {"episode/return", "episode/cost", "lagrange_multiplier", "time/env_steps_per_s"}


def test_other_configs_form_their_own_group(runs, tmp_path):
    copy = tmp_path / "ppo_lag-limit3"
    shutil.copytree(runs[1], copy)
    cfg = copy / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^cost_limit:.*$", "cost_limit: 3.0", cfg.read_text()))
    paths = report.build_report([runs[0], runs[1], copy], tmp_path / "out" / "r.html")
    summary = pd.read_csv(paths["summary"])
    assert sorted(summary["variant"]) == ["cost_limit=3.0", "cost_limit=null"]
    assert sorted(summary["runs"]) == [1, 2]


def test_mp4_is_embedded_as_video(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "eval_ep0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    run = SimpleNamespace(path=tmp_path, videos=[tmp_path / "videos" / "eval_ep0.mp4"])
    assert '<video controls src="data:video/mp4;base64,' in report.videos_html([run])
    assert report.videos_html([SimpleNamespace(path=tmp_path, videos=[])]) == ""


def test_not_a_run_dir_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"^report error: {re.escape(str(tmp_path))} is not a run directory"):
        report.build_report([tmp_path], tmp_path / "r.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing is not a run directory" in err
    assert not (tmp_path / "r.html").exists()



def test_cgpo_trust_region_and_duals_are_plotted_under_the_names_cgpo_logs(tmp_path):
    """The multiplier figure reads the columns a CGPO update logs now: δ̂ and the sub-problem's
    duals, not the case code, the ratio test or the predicted changes."""
    import numpy as np
    import torch

    from saferl.learners.base import EnvSpec
    from saferl.learners.cgpo import CGPO
    from saferl.learners.networks import flat_params

    spec = EnvSpec(obs_dim=1, act_dim=1, act_low=[-1], act_high=[1], max_episode_steps=100)
    learner = CGPO(CGPO.Params(hidden=[4], critic_hidden=[4], horizon=2, critic_iterations=1), spec,
                   cost_limit=8.0, device=torch.device("cpu"), seed=0)
    n, rng = flat_params(learner.policy).numel(), np.random.default_rng(0)
    logged = learner.policy_step({"g": rng.normal(size=n), "q": rng.normal(size=n), "j_r": 1.0, "j_c": 9.0,
                                  "l_r": 1.0, "l_c": 9.0})
    pd.DataFrame([{"iteration": 0, "env_steps": 100, **logged}]).to_csv(tmp_path / "metrics.csv", index=False)
    plotted = {c for c in report.read_series(tmp_path / "metrics.csv") if report.is_multiplier(c)}
    assert plotted == {"cgpo/radius", "cgpo/dual_lambda", "cgpo/dual_nu"}, sorted(logged)

# ---- the page in headless Chromium, through the DevTools protocol --------------------------

def chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images,
                     i => ({cls: i.className, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
  headings: Array.from(document.querySelectorAll('h2, h3'), h => h.textContent),
  tables: document.querySelectorAll('table').length})"""


async def devtools(ws_url: str, url: str) -> tuple[dict, bytes, list[dict]]:
    """Open ``url`` in the page target; its state, a full-page PNG screenshot and every event."""
    import aiohttp

    events, ids = [], iter(range(1, 1000))
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        async def call(method: str, **params):
            n = next(ids)
            await ws.send_json({"id": n, "method": method, "params": params})
            while True:
                msg = await asyncio.wait_for(ws.receive_json(), 30)
                if msg.get("id") == n:
                    assert "error" not in msg, msg
                    return msg["result"]
                events.append(msg)

        for domain in ("Page", "Runtime", "Log"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            events.append(await asyncio.wait_for(ws.receive_json(), 30))
        value = (await call("Runtime.evaluate", expression=PAGE_STATE, returnByValue=True))["result"]["value"]
        state = json.loads(value)
        size = (await call("Page.getLayoutMetrics"))["cssContentSize"]
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    return state, base64.b64decode(shot["data"]), events


def browse(html: Path, profile: Path) -> tuple[dict, bytes, list[dict]]:
    proc = subprocess.Popen([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        return asyncio.run(devtools(page["webSocketDebuggerUrl"], html.resolve().as_uri()))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.skipif(chromium() is None, reason="Chromium missing: deploy/setup.sh installs it (apt-get) when it can")
def test_report_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    state, png, events = browse(built, tmp_path / "profile")
    errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    assert state["headings"] == ["Summary", "Evaluation", "FunctionEnv-v0", "ppo_lag/FunctionEnv-v0",
                                 "trpo_lag/FunctionEnv-v0"]
    assert state["tables"] == 3  # summary, evaluation, and the evaluated group's
    assert [i["cls"] for i in state["images"]].count("figure") == 7
    assert [i["cls"] for i in state["images"]].count("video") == 1
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in state["images"]), state["images"]
    shot = built.parent / "report_screenshot.png"
    shot.write_bytes(png)
    img = Image.open(shot).convert("L")
    assert img.width >= 1000 and img.height > 2000, img.size  # the whole page: seven figures tall
    dark = sum(img.histogram()[:200]) / (img.width * img.height)
    assert dark > 0.02, f"the screenshot is almost blank ({dark:.1%} non-white pixels)"
