"""``saferl eval RUN_DIR --video``: tiny real runs, rendered and decoded again (issue #7).

An episode's video has T + 1 frames (the initial state and one per step), at most --max-frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from saferl.actors.env_host import make_vec_env
from saferl.cli import main
from saferl.cluster.session import train
from saferl.config import load_config
from saferl.envs.diff import TorchVecEnv
from saferl.envs.render import SIZE, EpisodeRenderer
from tests.conftest import needs_sg


def gif_frames(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def render(capsys, run: Path, *extra: str) -> list[Path]:
    capsys.readouterr()
    assert main(["eval", str(run), "--video", "--episodes", "1", *extra]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    for p in paths:
        assert p.parent == run / "videos" and p.stat().st_size > 0
    return paths


def test_function_env_video_gif_and_mp4(ray_session, run_root, capsys):
    run = train(load_config("ppo_lag/FunctionEnv-v0", ["total_env_steps=400", "steps_per_iteration=200",
                                                        "resources.envs_per_host=2", f"run_root={run_root}"]))
    [gif] = render(capsys, run)
    assert gif.name == "eval_ep0.gif"
    frames = gif_frames(gif)
    assert frames.shape[0] == 100 + 1  # T = 100 steps, plus the initial frame
    assert frames.std() > 10 and np.abs(np.diff(frames.astype(int), axis=0)).sum() > 0

    [mp4] = render(capsys, run, "--format", "mp4", "--max-frames", "30")
    import imageio.v2 as imageio

    with imageio.get_reader(mp4, format="FFMPEG") as reader:
        decoded = np.stack(list(reader.iter_data()))  # (its len() is inf: no list(reader))
    assert mp4.name == "eval_ep0.mp4" and decoded.shape[0] == 30 and decoded.std() > 10


@needs_sg()
def test_safety_gymnasium_video(ray_session, run_root, capsys):
    run = train(load_config("ppo_lag/SafetyPointGoal1-v0", [
        "total_env_steps=100", "steps_per_iteration=100", "resources.num_env_hosts=1",
        "resources.envs_per_host=1", "algo_params.minibatch_size=50", "algo_params.epochs=1",
        f"run_root={run_root}"]))
    [gif] = render(capsys, run, "--max-frames", "20")
    frames = gif_frames(gif)
    assert frames.shape[0] == 20 and frames.shape[1:] == (256 + 16, 256, 3)  # MuJoCo frame + caption
    assert frames[:, :256].std() > 10 and np.abs(np.diff(frames[:, :256].astype(int), axis=0)).sum() > 0


class Drift:
    """A torch task without a drawing of its own: the generic observation plot."""
    obs_dim, act_dim, max_episode_steps, act_low, act_high = 3, 1, 5, -1.0, 1.0

    def initial_state(self, n, generator):
        return torch.zeros(n, 3)

    def observe(self, state):
        return state

    def step(self, state, action):
        return state + action * torch.tensor([1.0, -0.5, 0.2]), state[:, 0], state[:, 1].abs()


@pytest.mark.parametrize("task", ["PointHazard-D1-v0", "SafeGBPOPendulum-v0", "SafeGBPOQuadrotor-v0", "drift"])
def test_torch_task_drawings(task):
    """Every torch drawing (and the fallback) gives same-size frames that change with the state;
    an episode is T + 1 frames."""
    vec = TorchVecEnv(Drift(), 1) if task == "drift" else make_vec_env(task, 1)
    env = EpisodeRenderer(vec)
    env.reset(0)
    frames, done = [env.frame()], False
    while not done and len(frames) < 4:
        *_, done = env.step(np.ones(vec.act_dim, np.float32))
        frames.append(env.frame())
    frames = np.stack(frames)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (SIZE, SIZE, 3) and frames.std() > 10
    assert (frames[1:] != frames[:-1]).any(axis=(1, 2, 3)).all()
    if task == "drift":
        while not done:
            *_, done = env.step(np.ones(1, np.float32))
        assert env.t == Drift.max_episode_steps


def test_video_without_checkpoint_is_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("algo: ppo_lag\ntask: FunctionEnv-v0\n")
    assert main(["eval", str(run), "--video"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"run error: {run} has no checkpoint to render"
    assert not (run / "videos").exists()
