"""Frames of evaluation episodes (``saferl eval RUN_DIR --video``): the one place that knows how
each task is drawn, and how frames become a GIF or MP4 file.

* Safety-Gymnasium and Gymnasium tasks render themselves: their env host is made with
  ``render_mode="rgb_array"`` (MuJoCo offscreen; headless, ``make_env`` sets ``MUJOCO_GL=egl``,
  which is Mesa's software EGL on a CPU-only machine).
* Torch tasks are drawn with matplotlib, one small function per family (``DRAWERS``): FunctionEnv
  (the curve f and the current x), PointHazard (arena, goal, hazard, robot arrow), SafeGBPO's
  pendulum and planar quadrotor; any other task (Brax, ...) falls back to a time-series plot of
  its observation so far.

An episode's video has **T + 1 frames**: the initial state, then the state after each of the
episode's T steps; ``max_frames`` caps that (the episode stops after ``max_frames − 1`` steps).

Env hosts import this module in both interpreters: numpy and the standard library at module
level; torch and matplotlib only for torch tasks, Pillow/imageio only in ``encode`` (main
interpreter).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SIZE = 256  # px, the side of a matplotlib frame (MuJoCo's default offscreen size too)
FOOTER = 16  # px caption strip under every frame: step, return and cost so far


class EpisodeRenderer:
    """Env 0 of an env host's vector env, stepped one episode at a time (no auto-reset, so the
    last frame shows the end of the episode), with ``frame()`` → uint8 ``[H, W, 3]``."""

    def __init__(self, vec):
        self.single = vec.envs[0] if hasattr(vec, "envs") else None  # VecEnv of single envs
        self.task = None if self.single is not None else vec.env  # TorchVecEnv's DiffEnv
        self.max_steps = vec.max_episode_steps
        self._fig = None

    def reset(self, seed: int) -> np.ndarray:
        self.t, self.history = 0, []
        if self.single is not None:
            obs = np.asarray(self.single.reset(int(seed)), np.float32)
        else:
            import torch

            self.state = self.task.initial_state(1, torch.Generator().manual_seed(int(seed)))
            obs = self.task.observe(self.state)[0].numpy().astype(np.float32)
        self.history.append(obs)
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
        """One step: obs, reward, cost, episode over (terminated or truncated)."""
        self.t += 1
        if self.single is not None:
            obs, rew, cost, term, trunc, _ = self.single.step(action)
            done = term or trunc
        else:
            import torch

            task = self.task
            a = torch.as_tensor(np.clip(action, task.act_low, task.act_high), dtype=torch.float32)[None]
            with torch.no_grad():
                self.state, rew, cost = task.step(self.state, a)
                alive = getattr(task, "alive", None)
                done = self.t >= self.max_steps or (alive is not None and not bool(alive(self.state)[0]))
                obs = task.observe(self.state)[0].numpy()
            rew, cost = float(rew[0]), float(cost[0])
        obs = np.asarray(obs, np.float32)
        self.history.append(obs)
        return obs, float(rew), float(cost), bool(done)

    def frame(self) -> np.ndarray:
        if self.single is not None:
            img = self.single.render()
            if img is None:
                raise RuntimeError("this env host's envs were not made with render_mode='rgb_array'")
            return np.ascontiguousarray(img, dtype=np.uint8)
        return self._draw()

    def _draw(self) -> np.ndarray:
        if self._fig is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            self._fig = Figure(figsize=(SIZE / 80, SIZE / 80), dpi=80)
            FigureCanvasAgg(self._fig)
        fig = self._fig
        fig.clear()
        ax = fig.add_subplot()
        task = self.task
        while getattr(type(task), "__name__", "") == "SafeguardedEnv":  # draw the wrapped task
            task = task.env
        state = self.state[0].detach().double().numpy()
        DRAWERS.get(type(task).__name__, draw_series)(ax, task, state, np.asarray(self.history))
        fig.tight_layout(pad=0.3)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# -- torch task families: (ax, task, state [d] float64, observations so far [t+1, obs_dim]) -----

def draw_function(ax, task, state, history):
    """FunctionEnv: the curve f(x) and the current x on it."""
    import torch

    xs = history[:, 0]
    lim = max(1.5 * task.init_range, float(np.abs(xs).max()) + 1.0)
    grid = torch.linspace(-lim, lim, 400)
    ax.plot(grid.numpy(), task.f(grid).numpy(), color="0.4", lw=1)
    ax.plot(xs, task.f(torch.as_tensor(xs)).numpy(), color="tab:blue", lw=0.8, alpha=0.5)
    x = float(state[0])
    ax.plot([x], [float(task.f(torch.tensor([x]))[0])], "o", color="tab:red", ms=7)
    ax.set(xlabel="x", ylabel="f(x) = reward = cost")


def draw_point_hazard(ax, task, state, history):
    """PointHazard: the arena, goal, hazard circle and the robot as an arrow along its heading."""
    from matplotlib.patches import Circle

    from saferl.envs.point_hazard import GOAL, HAZARD_RADIUS

    x, y, th, _v, hx, hy = state
    ax.add_patch(Circle((hx, hy), HAZARD_RADIUS, color="tab:red", alpha=0.4))
    ax.plot(*GOAL, "*", color="tab:green", ms=14)
    ax.plot(history[:, 0], history[:, 1], color="tab:blue", lw=0.8, alpha=0.5)
    ax.arrow(x, y, 0.35 * math.cos(th), 0.35 * math.sin(th), width=0.06, color="tab:blue")
    ax.set(xlim=(-3, 3), ylim=(-2.5, 6), aspect="equal")


def draw_pendulum(ax, task, state, history):
    """SafeGBPO pendulum: θ = 0 is upright."""
    th = state[0]
    ax.plot([0, math.sin(th)], [0, math.cos(th)], color="tab:blue", lw=4, solid_capstyle="round")
    ax.plot([0], [0], "ko", ms=5)
    ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal", title=f"θ = {th:+.2f}")


def draw_quadrotor(ax, task, state, history):
    """SafeGBPO planar quadrotor: the body (tilted by φ), its path and the reset position."""
    x, z, phi = state[0], state[1], state[2]
    x0, z0 = state[6], state[7]
    dx, dz = 0.5 * math.cos(phi), -0.5 * math.sin(phi)
    ax.plot(history[:, 0], history[:, 1], color="tab:blue", lw=0.8, alpha=0.5)
    ax.plot([x - dx, x + dx], [z - dz, z + dz], color="tab:blue", lw=4)
    ax.plot([x0], [z0], "x", color="tab:green", ms=10)
    ax.set(xlim=(x0 - 3, x0 + 3), ylim=(z0 - 3, z0 + 3), aspect="equal", xlabel="x", ylabel="z")


def draw_series(ax, task, state, history):
    """Any other task: its observation so far, one line per entry (at most 12)."""
    steps = np.arange(len(history))
    ax.plot(steps, history[:, :12], lw=0.8)
    ax.set(xlim=(0, max(getattr(task, "max_episode_steps", 1), 1)), xlabel="step", ylabel="observation")


DRAWERS = {"FunctionEnv": draw_function, "PointHazardEnv": draw_point_hazard,
           "SafeGBPOPendulum": draw_pendulum, "SafeGBPOQuadrotor": draw_quadrotor}


# -- encoding (main interpreter) -------------------------------------------------------------

def caption_frames(frames: np.ndarray, rewards: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Append a caption strip to each frame: step k, return and cost over the first k steps. It
    also keeps consecutive frames distinct, which GIF writers would otherwise merge."""
    from PIL import Image, ImageDraw

    ret, cost = np.concatenate([[0.0], np.cumsum(rewards)]), np.concatenate([[0.0], np.cumsum(costs)])
    n, h, w, _ = frames.shape
    out = np.zeros((n, h + FOOTER, w, 3), np.uint8)
    out[:, :h] = frames
    for k in range(n):
        strip = Image.new("RGB", (w, FOOTER))
        ImageDraw.Draw(strip).text((3, 2), f"t {k}  return {ret[k]:.2f}  cost {cost[k]:.2f}", fill="white")
        out[k, h:] = np.asarray(strip)
    return out


def encode(path: Path, frames: np.ndarray, fps: int = 20) -> Path:
    """Write uint8 frames [F, H, W, 3] as a GIF (Pillow) or MP4 (imageio-ffmpeg's H.264),
    chosen by the file suffix."""
    path = Path(path)
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    elif path.suffix == ".mp4":
        import imageio.v2 as imageio

        # H.264 wants even sides; pad to a multiple of 16 so imageio does not rescale
        h, w = frames.shape[1:3]
        pad = ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0))
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, pixelformat="yuv420p",
                                macro_block_size=16) as writer:
            for f in np.pad(frames, pad):
                writer.append_data(f)
    else:
        raise ValueError(f"unknown video format {path.suffix!r} (gif or mp4)")
    return path
