"""`make demo`: which token does "it" attend to? Real MiniLM weights, through our own service, into reports/explain/.

    python -m scripts.explain_demo [--models models] [--out reports/explain] [--layers 3,5]

For each layer: export its self-attention from the installed all-MiniLM-L6-v2 (models/minilm-lN; kept when it is
already an export of that layer of the same checkpoint), serve it on a free loopback port, and explain "it" in the
sentence with the control sentence beside it (`attnserve-client explain ... --follow animal --compare ...`):
layerN.txt (the printed report), layerN.png (the heatmap of the head giving "animal" the most), layerN.html (the
page). explain.md sums up the heads where "animal" wins side by side; NOTICE carries the weights' attribution.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from attnserve_client import AttentionClient
from attnserve_client.explain.checkpoints import installed_checkpoint, known_by_sha256
from attnserve_client.explain.explain import Checkpoint, ExplainOptions, Explanation, explain
from attnserve_client.explain.render import render_html, render_png, render_text
from model.export import is_model_dir, read_config
from model.export import main as export_main
from tests.server_process import ServerProcess, start_server

SENTENCE = "The animal didn't cross the street because it was too tired."
CONTROL = "The animal didn't cross the street because it was too wide."
TOKEN, FOLLOW = "it", "animal"


def _layers(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def ensure_export(checkpoint: Checkpoint, layer: int, out: Path) -> None:
    """Export the layer unless `out` already holds that layer of this very checkpoint."""
    if is_model_dir(out):
        source = read_config(out).get("weights", {})
        if source.get("layer") == layer and source.get("sha256") == checkpoint.encoder.sha256:
            print(f"demo: {out} is layer {layer} of {checkpoint.name} already")
            return
    argv = ["--checkpoint", str(checkpoint.encoder.checkpoint_dir), "--layer", str(layer), "--out", str(out)]
    # BERT has 512 positions; the graph form matters little for a demo, so no calibration.
    if export_main([*argv, "--max-seq-len", "512", "--no-calibrate"]) != 0:
        raise SystemExit(f"demo: exporting layer {layer} failed")


def explain_layer(server: ServerProcess, checkpoint: Checkpoint, layer: int, out: Path) -> Explanation:
    options = ExplainOptions(SENTENCE, TOKEN, follow=FOLLOW, compare=CONTROL, layer=layer, matrices=True)
    with AttentionClient(server.address, timeout_s=60) as client:
        e = explain(client, options, checkpoint)
    text = render_text(e)
    (out / f"layer{layer}.txt").write_text(text + "\n")
    render_png(e, out / f"layer{layer}.png")
    render_html(e, out / f"layer{layer}.html")
    print(f"\n$ attnserve-client explain {SENTENCE!r} --token {TOKEN} --follow {FOLLOW} --compare {CONTROL!r}")
    print(text)
    return e


def summary(explanations: list[Explanation]) -> str:
    """The heads where the followed token wins in the sentence, with what the control does to them."""
    lines = [
        f'# "{TOKEN}" → "{FOLLOW}" in all-MiniLM-L6-v2, through attnserve',
        "",
        f"- sentence A: {SENTENCE}",
        f"- sentence B (control, where {TOKEN!r} is the street): {CONTROL}",
        "",
        f'Every head of the layers explained where "{FOLLOW}" gets the largest weight of "{TOKEN}" in A, and',
        f'the same head in B. The last column is the weight every token of A gives "{FOLLOW}", on average: a head',
        "that sends everything there says little about what it refers to.",
        "",
        f"| layer | head | A: weight on {FOLLOW} | B: weight on {FOLLOW} | change | B: top token | "
        f"A: every token → {FOLLOW} |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in explanations:
        a, b = e.sentences
        for head in range(a.rows.shape[0]):
            if not a.target_wins(head):
                continue
            assert a.matrix is not None
            everyone = a.matrix[head][:, list(a.targets)].sum(axis=1).mean()
            lines.append(
                f"| {e.layer} | {head} | {100 * a.on_target(head):.1f}% | {100 * b.on_target(head):.1f}% | "
                f"{100 * (b.on_target(head) - a.on_target(head)):+.1f} | {b.sentence.tokens[b.top(head)]} | "
                f"{100 * everyone:.1f}% |"
            )
    lines += ["", "Per layer: `layerN.txt` (the printed report), `layerN.png`, `layerN.html`.", ""]
    lines += ["## Weights", "", explanations[0].attribution, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.explain_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="where models/minilm-lN go")
    parser.add_argument("--out", type=Path, default=Path("reports/explain"))
    parser.add_argument("--layers", type=_layers, default=[3, 5], help="comma-separated, e.g. 3,5")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    checkpoint = Checkpoint.load(installed_checkpoint())
    args.out.mkdir(parents=True, exist_ok=True)
    for layer in args.layers:
        ensure_export(checkpoint, layer, args.models / f"minilm-l{layer}")
    explanations = []
    for layer in args.layers:
        server = start_server(args.models / f"minilm-l{layer}", "--warmup", "false")
        try:
            print(f"demo: serving layer {layer} on {server.address}")
            explanations.append(explain_layer(server, checkpoint, layer, args.out))
        finally:
            server.stop()
    (args.out / "explain.md").write_text(summary(explanations))
    known = known_by_sha256(checkpoint.encoder.sha256)
    if known is not None:
        note = "The reports, pictures and pages in this directory were computed with these weights."
        (args.out / "NOTICE").write_text(f"{note}\n\n{known.attribution}\n")
    print(f"\n{summary(explanations)}")
    print(f"demo: wrote {args.out}/ in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
