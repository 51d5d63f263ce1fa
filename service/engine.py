"""onnxruntime sessions over a model directory: provider choice, graph routing, warm-up, run.

Everything here blocks; callers run it in the engine's own threads, never on the event loop.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.cpu_quota import cpu_limit
from service.errors import ProviderError
from service.model_dir import WEIGHTS_GRAPH, Graph, ModelDirectory

log = logging.getLogger(__name__)

INPUT = "hidden_states"
MASK = "attention_mask"
OUTPUT = "output"
WEIGHTS_OUTPUT = "attention_weights"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


@dataclass(frozen=True)
class EngineOutput:
    output: np.ndarray  # (B, S, D) float32
    probs: np.ndarray | None  # (B, H, S, S) float32 when weights were asked for
    graph: str
    compute_s: float


def usable_cores() -> int:
    """CPU cores this process may run on: the cpuset, capped by the cgroup CPU quota (a pod's CPU limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cpu_limit()
    # Rounded down, as Go's automaxprocs does: a thread past the quota is throttled, a fraction left over is not.
    return cores if limit is None else max(1, min(cores, math.floor(limit)))


def choose_provider(requested: str, probe: Graph) -> tuple[str, str]:
    """("cuda" | "cpu", why). auto takes CUDA only when a session on it really initialises."""
    if requested == "cpu":
        return "cpu", "provider cpu was asked for"
    offered = ort.get_available_providers()
    if CUDA_EP not in offered:
        reason = f"onnxruntime {ort.__version__} offers no {CUDA_EP} (it offers {', '.join(offered)})"
    else:
        ort.set_default_logger_severity(4)  # the fallback is reported below in one line, not ORT's ten
        try:
            session = ort.InferenceSession(probe.model, providers=[CUDA_EP, CPU_EP])
            if session.get_providers()[0] == CUDA_EP:
                return "cuda", f"a session on {CUDA_EP} initialised"
            reason = f"{CUDA_EP} is offered but a session on it fell back to CPU (no GPU, driver or CUDA libraries)"
        except Exception as e:  # onnxruntime raises its own untyped errors here
            reason = f"a session on {CUDA_EP} failed to initialise: {e}"
        finally:
            ort.set_default_logger_severity(2)
    if requested == "cuda":
        raise ProviderError(f"--provider cuda, but no usable GPU: {reason}")
    return "cpu", f"{reason}; using CPU"


class Engine:
    """Owns one onnxruntime session per graph the chosen provider routes to, plus the weights graph."""

    def __init__(
        self,
        model: ModelDirectory,
        provider: str = "auto",
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        narrow_max_tokens: int = 0,
    ) -> None:
        self.model = model
        self.provider, self.provider_reason = choose_provider(provider, model.route("cuda", False, 1))
        self.intra_op_threads = intra_op_threads or usable_cores()
        self._providers = [CUDA_EP, CPU_EP] if self.provider == "cuda" else [CPU_EP]
        self.sessions = self._sessions(model.graphs_for(self.provider), self.intra_op_threads, allow_spinning)
        # Short requests may also run single-threaded, side by side, when several are in flight (see Batcher):
        # on few cores that beats taking turns with every core each (bench/serve_bench.py).
        narrow = self.provider == "cpu" and self.intra_op_threads > 1 and narrow_max_tokens > 0
        self.narrow_max_tokens = narrow_max_tokens if narrow else 0
        self.narrow_sessions = self._sessions(self._graphs_up_to(self.narrow_max_tokens), 1, False)

    def _sessions(self, graphs: list[Graph], threads: int, allow_spinning: bool) -> dict[str, ort.InferenceSession]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning threads burn the cores that gRPC and the other requests need; measured in bench/serve_bench.py.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # From the bytes the model directory hashed, never the path again: the file may have changed since.
        return {g.name: ort.InferenceSession(g.model, options, providers=self._providers) for g in graphs}

    def _graphs_up_to(self, max_seq: int) -> list[Graph]:
        """The output graphs that can serve sequences of length ≤ max_seq (none when max_seq is 0)."""
        names = {
            route.graph
            for routes in self.model.routing[self.provider].values()
            for low, route in zip((0, *(r.up_to for r in routes)), routes, strict=False)
            if low < max_seq
        }
        return [self.model.graphs[name] for name in sorted(names)]

    def can_run_narrow(self, tokens: int, want_probs: bool) -> bool:
        return not want_probs and 0 < tokens <= self.narrow_max_tokens

    def route(self, masked: bool, seq_len: int) -> Graph:
        return self.model.route(self.provider, masked, seq_len)

    def run(
        self,
        hidden_states: np.ndarray,
        mask: np.ndarray | None,
        want_probs: bool,
        narrow: bool = False,
        options: ort.RunOptions | None = None,
    ) -> EngineOutput:
        """Attention over (B, S, D) float32; mask (B, S) int32 or None (None or all ones: the unmasked graph).

        narrow: on the single-threaded session (only where can_run_narrow said yes). options: lets another
        thread stop the run (terminate), which then raises."""
        if mask is not None and bool(mask.all()):
            mask = None  # the unmasked graphs are the fast ones (flash kernel on CPU)
        if want_probs:
            graph = self.model.graphs[WEIGHTS_GRAPH]
            if mask is None:
                mask = np.ones(hidden_states.shape[:2], dtype=np.int32)
        else:
            graph = self.route(mask is not None, hidden_states.shape[1])
        feed = {INPUT: hidden_states} if mask is None else {INPUT: hidden_states, MASK: mask}
        outputs = [OUTPUT, WEIGHTS_OUTPUT] if want_probs else [OUTPUT]
        start = time.perf_counter()
        sessions = self.narrow_sessions if narrow else self.sessions
        results = self._run(sessions[graph.name], feed, outputs, options)
        compute_s = time.perf_counter() - start
        return EngineOutput(results[0], results[1] if want_probs else None, graph.name, compute_s)

    def _run(
        self,
        session: ort.InferenceSession,
        feed: dict[str, np.ndarray],
        outputs: list[str],
        options: ort.RunOptions | None,
    ) -> list:
        if self.provider == "cpu":
            return session.run(outputs, feed, options)
        # CUDA: bind host inputs and device outputs, one copy each way and no intermediate numpy buffers.
        binding = session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name in outputs:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()

    def warm_up(self, max_weights_seq_len: int) -> float:
        """Run every graph at the ends of its sequence ranges, so no client pays for first-run allocations."""
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        for narrow, longest in ((False, self.model.max_seq_len), (True, self.narrow_max_tokens)):
            for masked, routes in self.model.routing[self.provider].items():
                low = 1
                for route in routes:
                    for seq in sorted({low, min(route.up_to, longest)}) if low <= longest else ():
                        x = rng.standard_normal((1, seq, self.model.d_model), dtype=np.float32)
                        mask = np.ones((1, seq), dtype=np.int32)
                        mask[0, -1] = 0 if masked and seq > 1 else 1
                        self.run(x, mask if masked else None, want_probs=False, narrow=narrow)
                    low = route.up_to + 1
        for seq in sorted({1, min(max_weights_seq_len, self.model.max_seq_len)}):
            self.run(rng.standard_normal((1, seq, self.model.d_model), dtype=np.float32), None, want_probs=True)
        return time.perf_counter() - start
