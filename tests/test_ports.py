"""A port taken between `free_port()` and the server's bind (another process on a busy
machine) makes the test helpers and benchmarks try another port instead of failing."""

from __future__ import annotations

import socket

import gradio as gr
import httpx
import pytest
import synthetic_inputs
from synthetic_inputs import CLIENT_TIMEOUT_S, free_port, launch

from benchmarks import app_start


def test_launch_tries_another_port_when_the_offered_one_is_taken(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        offered = []

        def free_port_taken_first() -> int:
            offered.append(taken if not offered else free_port())
            return offered[-1]

        monkeypatch.setattr(synthetic_inputs, "free_port", free_port_taken_first)
        with gr.Blocks() as demo:
            gr.Markdown("port test")
        url = launch(demo)
        try:
            assert offered[0] == taken and len(offered) == 2 and url == f"http://127.0.0.1:{offered[1]}/"
            assert httpx.get(f"{url}config", timeout=CLIENT_TIMEOUT_S).status_code == 200
        finally:
            demo.close()


def test_launch_gives_up_after_its_attempts(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        asked = []
        monkeypatch.setattr(synthetic_inputs, "free_port", lambda: asked.append(taken) or taken)
        with gr.Blocks() as demo:
            gr.Markdown("port test")
        with pytest.raises(OSError):
            launch(demo, attempts=3)
        assert asked == [taken] * 3


def test_a_benchmark_start_whose_port_was_taken_is_made_again(monkeypatch, tmp_path):
    outcomes = [app_start.PortTaken("Cannot find empty port"), (0.5, 1.0, 0.5, 2)]

    def one(folder, image, timeout):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(app_start, "_one_start", one)
    assert app_start.one_start(tmp_path, tmp_path / "x.png", timeout=1) == (0.5, 1.0, 0.5, 2)
    assert outcomes == []
