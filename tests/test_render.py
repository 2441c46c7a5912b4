"""Rendering examples for curators: images from arrays (checked by decoding the PNG), text and fields,
the task's own ``render``, ``examples show`` and the pictures in the HTML report."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import influence_store as ist
import influence_store.cli.commands  # noqa: F401  (attaches the built-in commands)
from influence_store.cli.main import cli
from influence_store.render import StoredRenderer, render_example, to_rendering


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_a_2d_array_becomes_a_grayscale_png_with_the_same_pixels():
    pixels = np.arange(64, dtype=float).reshape(8, 8) / 63
    image = decode(to_rendering(pixels).png)
    step = image.shape[0] // 8
    assert image.shape == (8 * step, 8 * step) and step >= 12  # scaled up by a whole factor
    assert np.abs(image[::step, ::step] / 255 - pixels).max() <= 0.5 / 255 + 1e-9


def test_channels_first_tensors_and_0_255_values_keep_their_colours():
    rgb = torch.zeros(3, 32, 32)
    rgb[0, :16] = 255  # top half red, bottom half blue
    rgb[2, 16:] = 255
    image = decode(to_rendering(rgb).png)
    step = image.shape[0] // 32
    assert image.shape[2] == 3
    assert tuple(image[0, 0]) == (255, 0, 0) and tuple(image[-1, -1]) == (0, 0, 255)
    assert step * 32 == image.shape[0]


def test_payload_fields_text_and_square_pixels():
    tokens = to_rendering({"tokens": ["a", "fine", "film"], "label": "pos"})
    assert tokens.png is None and tokens.text == "tokens: a fine film" and tokens.fields == {"label": "pos"}
    digit = to_rendering({"id": "d1", "pixels": list(np.linspace(0, 1, 64)), "label": 3})
    assert digit.png is not None and digit.fields == {"id": "d1", "label": "3"}
    assert to_rendering("just text").text == "just text"
    # numbers that are not a picture stay numbers
    assert to_rendering({"x": [0.1, 0.2, 0.3], "y": 1}).png is None
    assert to_rendering([[1.0, 2.0], [3.0, 4.0]]).png is None


def test_a_task_render_wins_over_the_payload():
    x = torch.rand(5, 4)
    task = ist.Task(torch.nn.Linear(4, 1), lambda m, b: m(b[0]).squeeze(-1), [(x[i], 0.0) for i in range(5)],
                    [(x[0], 0.0)], render=lambda e: f"features {e[0].shape[0]}")
    assert render_example(task, task.train[0]).text == "features 4"
    task.render = None
    assert render_example(task, task.train[0]).png is None  # a (tensor, label) pair renders as its JSON


def test_examples_show_writes_the_digit_and_the_report_shows_each_proposal_picture(digits_store, tmp_path):
    store, run_id = digits_store
    runner = CliRunner()
    result = runner.invoke(cli, ["propose", str(run_id), "--rule", "self-influence", "--top", "3"])
    assert result.exit_code == 0, result.output
    proposals = store.proposals()
    key = proposals[0]["key"]
    out = tmp_path / "digit.png"
    result = runner.invoke(cli, ["examples", "show", key, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"run {run_id} (" in result.output and "train #" in result.output
    pixels = np.asarray(store.examples_by_key(key)[0]["payload"]["pixels"]).reshape(8, 8)
    image = decode(out.read_bytes())
    assert np.abs(image[::image.shape[0] // 8, ::image.shape[1] // 8] / 255 - pixels).max() < 0.01
    # the task's own render (the example reshapes its pixels) draws the same picture
    example = store.examples_by_key(key)[0]
    assert StoredRenderer(use_task=True).render(example, store.run(run_id)).png == out.read_bytes()

    missing = runner.invoke(cli, ["examples", "show", "no-such-key"])
    assert missing.exit_code == 1 and "no example with key 'no-such-key'" in missing.output

    report = tmp_path / "report.html"
    assert runner.invoke(cli, ["report", str(run_id), "-o", str(report)]).exit_code == 0
    table = report.read_text().split("<table id='proposals'>")[1].split("</table>")[0]
    assert re.findall(r"<img class='example' alt='example ([^']+)'", table) == [p["key"] for p in proposals]


def test_allennlp_instances_render_their_tokens():
    pytest.importorskip("allennlp")
    from allennlp.data import Instance, Token
    from allennlp.data.fields import LabelField, TextField

    from influence_store.plugins.allennlp_tasks import AllenNLPExample, render_instance

    instance = Instance({"tokens": TextField([Token("a"), Token("fine"), Token("film")]), "label": LabelField("pos")})
    rendering = to_rendering(render_instance(AllenNLPExample("k", instance)))
    assert rendering.text == "tokens: a fine film" and rendering.fields == {"label": "pos"}
