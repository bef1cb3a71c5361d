"""The on-policy critics' minibatch steps in a second process (``parallel_critics: process``).

A second thread (``onpolicy_base.CriticLane``) overlaps only what torch runs without the GIL: at
PPO's minibatch of 64 most of a step is operator dispatch, which holds it, so the two threads take
turns. A process has its own interpreter. It holds its own copy of the learner (built from the same
class, params and spec) and, per update, receives the critics' state, then each minibatch's rows
(as numpy arrays: no shared-memory handles, which torch's own pickling would make per tensor), runs the learner's own
``critic_update`` on them in order, and at ``drain`` returns the losses, the refusals and the
critics' state, which the learner loads. Same code, same inputs, one torch thread on each side:
the same floats as the serial loop.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

import torch

_STATE, _STEP, _DRAIN, _STOP = b"S", b"M", b"D", b"X"


def critic_state(learner) -> dict:
    return {"v_r": learner.v_r.state_dict(), "v_c": learner.v_c.state_dict(), "v_opt": learner.v_opt.state_dict()}


def load_critic_state(learner, state: dict) -> None:
    learner.v_r.load_state_dict(state["v_r"])
    learner.v_c.load_state_dict(state["v_c"])
    learner.v_opt.load_state_dict(state["v_opt"])


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _serve(conn: Connection) -> None:
    """The child: build the learner (the first message), then answer the parent's messages in
    order; a closed connection (the learner's process ended) ends it."""
    torch.set_num_threads(1)
    learner = pickle.loads(conn.recv_bytes())()
    losses: list[float] = []
    refused = 0
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        kind, body = msg[:1], msg[1:]
        if kind == _STEP:
            loss, ok = learner.critic_update(*(torch.from_numpy(a) for a in pickle.loads(body)))
            losses.append(float(loss))
            refused += not ok
        elif kind == _STATE:
            load_critic_state(learner, _from_bytes(body))
            losses, refused = [], 0
        elif kind == _DRAIN:
            conn.send_bytes(pickle.dumps((losses, refused, _to_bytes(critic_state(learner)))))
            losses, refused = [], 0
        else:
            return


class CriticProcess:
    """The learner's critic process; ``lane()`` gives the per-update object with ``CriticLane``'s
    interface. Started on first use; it ends with ``close``, or when the learner's process ends
(its connection closes)."""

    def __init__(self, make):
        """``make()`` builds the learner in the child (picklable: a class and its arguments). The
        child is a fresh interpreter (``python -m``): a fork of a Ray worker would copy its threads'
        locks, and multiprocessing's spawn would re-run the parent's main module."""
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send_bytes(pickle.dumps(make))
        # Messages go out from a writer thread, so that ``submit`` never blocks on a full pipe
        # (the TRPO family hands over the whole critic fit before its policy step).
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write, daemon=True, name="saferl-critics-writer")
        self.writer.start()

    def _write(self) -> None:
        while (msg := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(msg)
            except OSError:  # the child is gone: drain reports it
                return

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, msg: bytes) -> None:
        self.outbox.put(msg)

    def lane(self, learner) -> ProcessLane:
        self.send(_STATE + _to_bytes(critic_state(learner)))
        return ProcessLane(self, learner)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(_STOP)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.outbox.put(None)


class ProcessLane:
    """``CriticLane``'s interface over the critic process: ``submit`` sends the rows, ``drain``
    waits for the steps and loads the critics' state they reached into the learner."""

    def __init__(self, process: CriticProcess, learner):
        self.process, self.learner = process, learner

    def submit(self, *tensors: torch.Tensor) -> None:
        """The arguments of one ``critic_update`` step (CPU tensors; sent as numpy arrays)."""
        self.process.send(_STEP + pickle.dumps(tuple(t.numpy() for t in tensors), protocol=5))

    def drain(self) -> tuple[list, int]:
        conn, proc = self.process.conn, self.process.proc
        try:
            self.process.send(_DRAIN)
            losses, refused, state = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as err:
            raise RuntimeError(f"the critic process (pid {proc.pid}) ended: exit code {proc.poll()}") from err
        load_critic_state(self.learner, _from_bytes(state))
        return losses, refused

    def __enter__(self) -> ProcessLane:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # an update that failed mid-way: bring the child back in step
            with contextlib.suppress(RuntimeError):  # or it is gone: the next lane starts another
                self.drain()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
