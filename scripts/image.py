"""Build the attnserve image with podman, on a machine without Docker and, if need be, without a registry.

    python3 scripts/image.py engine                 # the podman command line this machine needs (make print-engine)
    python3 scripts/image.py build [--tag T]        # build the cpu image unless T is current (make image)

Standard library only: `make image` runs it before any venv exists.

- The engine: podman, with runc and cgroupfs where cgroups are v1 or hybrid (crun refuses those), and
  deploy/image/containers.conf (no default ulimits) through CONTAINERS_CONF.
- The base: the Dockerfile's PYTHON_IMAGE when it is here or can be pulled; else a stand-in built once from Debian's
  own packages with debootstrap (python3 3.11 on bookworm) and kept as a local image.
- The host's pip settings (config files and PIP_* variables, merged) and what they name on disk (CA bundle,
  constraints, local indexes, find-links) are mounted read-only under /mnt for the build: RUN steps see them, no
  layer holds them, and mount points inside an existing empty folder leave nothing behind.
- Current: the image carries a label with the sha256 of everything the build reads (the build context, the
  Dockerfile, the build arguments, the base's image id); when it matches, nothing is built.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import fcntl
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CONTAINERS_CONF = ROOT / "deploy" / "image" / "containers.conf"
LABEL = "org.attnserve.inputs"
DEFAULT_TAG = "attnserve:cpu"
STAND_IN = "localhost/bookworm-python:3.11"
# debootstrap --include: what the official python image's role needs (venv, TLS roots); minbase has the rest.
STAND_IN_PACKAGES = "python3,python3-venv,ca-certificates"
STAND_IN_SUITE = "bookworm"  # the official base's Debian release
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's ca-certificates bundle
# One build at a time per machine (checkouts share podman's storage and the stand-in base).
LOCK = Path("/var/tmp/attnserve-image.lock")
MOUNT_ROOT = "/mnt"  # empty in every Debian and Ubuntu base: mounts under it leave no mount points in a layer
PIP_CONFIG_IN_BUILD = f"{MOUNT_ROOT}/pip.conf"
# pip options that name files or folders on the host; they are mounted and rewritten. Others that only make sense
# on the host are dropped.
PATH_OPTIONS = {"cert", "client-cert", "constraint", "requirement"}
URL_OPTIONS = {"index-url", "extra-index-url", "find-links"}
HOST_ONLY_OPTIONS = {"cache-dir", "log", "src", "target", "prefix", "root", "user", "config-file", "require-virtualenv"}


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


# The engine.


def engine() -> list[str]:
    """argv prefix for podman on this machine: `env CONTAINERS_CONF=... podman [--runtime runc] [--cgroup-manager]`."""
    flags: list[str] = []
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()  # cgroup v2 only; v1 and hybrid lack it
    if not unified:
        flags += ["--runtime", "runc"]  # crun: "cgroups in hybrid mode not supported"
    if not unified or not Path("/run/systemd/system").is_dir():
        flags += ["--cgroup-manager", "cgroupfs"]  # no systemd to ask for cgroups
    return ["env", f"CONTAINERS_CONF={CONTAINERS_CONF}", "podman", *flags]


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None) -> str:
    """Run podman; its stdout (stripped) when captured. Raises CalledProcessError with stderr on failure."""
    done = subprocess.run(
        [*engine(), *args],
        capture_output=capture,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return (done.stdout or "").strip()


def image_exists(name: str) -> bool:
    return subprocess.run([*engine(), "image", "exists", name], capture_output=True).returncode == 0


def image_field(name: str, template: str) -> str:
    return podman("image", "inspect", "--format", template, name)


# The base image.


def dockerfile_arg(name: str) -> str:
    """The default of a global ARG of the Dockerfile."""
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"image: Dockerfile has no `ARG {name}=...`")
    return match.group(1).strip("\"'")


def qualified(image: str) -> str:
    """docker.io/library/python:... for python:...: podman has no short-name registry configured by default."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


def apt_mirror() -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources), else deb.debian.org."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*"))]
    for text in (f.read_text() for f in files if f.is_file()):
        for match in re.finditer(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.MULTILINE):
            if re.search(r"/debian/?$", match.group(1)):  # not debian-security, not a third-party repository
                return match.group(1).rstrip("/")
    return DEBIAN_MIRROR


def stand_in_recipe() -> str:
    return f"debootstrap --variant=minbase --include={STAND_IN_PACKAGES} {STAND_IN_SUITE}"


def build_stand_in() -> None:
    """Debian's python3 from Debian's packages, imported as STAND_IN (about a minute; once per machine)."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("image: debootstrap is missing (make system-deps installs it)")
    mirror = apt_mirror()
    log(f"building the stand-in base {STAND_IN}: {stand_in_recipe()} from {mirror}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="attnserve-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        argv = ["debootstrap", "--variant=minbase", f"--include={STAND_IN_PACKAGES}", STAND_IN_SUITE, str(rootfs)]
        done = subprocess.run([*argv, mirror], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"image: debootstrap failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        # The downloaded .debs and package lists are build leftovers (about 60 MB), as the official image drops them.
        for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [*engine(), "import", "--change", f"LABEL {LABEL}.base={stand_in_recipe()}", "-", STAND_IN],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise SystemExit(f"image: podman import failed: {imported.stderr[-2000:]}")
    log(f"stand-in base ready in {time.monotonic() - started:.0f} s")


def ensure_base() -> str:
    """The image to build FROM: the official base if here or pullable, else the stand-in (built when missing)."""
    official = qualified(dockerfile_arg("PYTHON_IMAGE"))
    if image_exists(official):
        return official
    try:
        pulled = subprocess.run([*engine(), "pull", "-q", official], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pulled = subprocess.CompletedProcess([], 1, "", "timed out after 600 s")
    if pulled.returncode == 0:
        return official
    reason = (pulled.stderr.strip().splitlines() or ["no output"])[-1]
    log(f"cannot pull {official} ({reason[:200]}); using the stand-in {STAND_IN}")
    current = image_exists(STAND_IN) and image_field(STAND_IN, f'{{{{index .Labels "{LABEL}.base"}}}}')
    if current != stand_in_recipe():
        build_stand_in()
    return STAND_IN


# The host's pip settings, for the build.


def pip_config_files() -> list[Path]:
    """pip's configuration files in its order (global, user, PIP_CONFIG_FILE); later ones win."""
    if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs.split(":") if d] + [Path("/etc/pip.conf")]
    user_config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    files += [Path.home() / ".pip" / "pip.conf", user_config / "pip" / "pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return [f for f in files if f.is_file()]


def host_pip_settings() -> dict[str, str]:
    """What `pip install` here runs with: [global], then [install] of every file, then PIP_* variables."""
    settings: dict[str, str] = {}
    parsers = []
    for path in pip_config_files():
        parser = configparser.RawConfigParser()
        parser.read(path)
        parsers.append(parser)
    for section in ("global", "install"):
        for parser in parsers:
            if parser.has_section(section):
                settings.update({k.replace("_", "-"): v for k, v in parser.items(section)})
    for name, value in os.environ.items():
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE":
            settings[name[4:].lower().replace("_", "-")] = value
    return settings


class Mounts:
    """Host paths mounted read-only under MOUNT_ROOT, each at a point made in a host folder mounted there first."""

    def __init__(self, stage: Path) -> None:
        self.stage = stage
        self.volumes: list[tuple[Path, str]] = []

    def add(self, host: Path) -> str:
        """The path at which the build sees `host`."""
        for source, inside in self.volumes:
            if source == host:
                return inside
        name = f"m{len(self.volumes)}-{host.name}"
        point = self.stage / name
        point.mkdir() if host.is_dir() else point.touch()
        self.volumes.append((host, f"{MOUNT_ROOT}/{name}"))
        return f"{MOUNT_ROOT}/{name}"

    def args(self) -> list[str]:
        """podman build -v arguments: the staging folder first, then what is mounted inside it."""
        pairs = [(self.stage, MOUNT_ROOT), *self.volumes]
        return [arg for source, inside in pairs for arg in ("-v", f"{source}:{inside}:ro")]


def rewrite(value: str, option: str, mounts: Mounts) -> str:
    """Each local path (or file:// URL) in a pip option's value, as the build sees it; remote URLs unchanged."""
    out = []
    for item in value.split():
        url = urlparse(item)
        if url.scheme in ("http", "https"):
            out.append(item)
            continue
        local = Path(url.path if url.scheme == "file" else item).expanduser()
        if not local.is_absolute() or not local.exists():
            log(f"pip setting {option}: {item} is not here; left out of the build")
            continue
        local = local.resolve()
        # A local index's pages link their files relative to themselves (PEP 503 trees: ../../files/...): mount
        # the folder that holds the index.
        index = option.endswith("index-url")
        inside = f"{mounts.add(local.parent)}/{local.name}" if index else mounts.add(local)
        out.append(f"file://{inside}" if url.scheme == "file" else inside)
    return " ".join(out)


def pip_build_config(mounts: Mounts) -> Path | None:
    """A pip.conf for the build, written into the staging folder; None when the host has nothing to pass on."""
    settings = host_pip_settings()
    if "cert" not in settings and HOST_CA_BUNDLE.is_file():
        settings["cert"] = str(HOST_CA_BUNDLE)  # a TLS proxy's CA lives in the host's bundle, not in certifi's
    lines = ["[global]"]
    for option, value in sorted(settings.items()):
        if option in HOST_ONLY_OPTIONS:
            continue
        if option in PATH_OPTIONS or option in URL_OPTIONS:
            value = rewrite(value, option, mounts)
            if not value:
                continue
        lines.append(f"{option} = {value}")
    if len(lines) == 1:
        return None
    path = mounts.stage / "pip.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def torch_index(settings: dict[str, str]) -> str:
    """The Dockerfile's TORCH_INDEX_URL where its host answers; else the host's own index, whose pip settings then
    bring the CPU wheel (find-links or a local index), as they did for this machine's venv."""
    if os.environ.get("TORCH_INDEX_URL"):
        return os.environ["TORCH_INDEX_URL"]
    default = dockerfile_arg("TORCH_INDEX_URL")
    host = urlparse(default).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=10).close()
        return default
    except OSError as exc:
        fallback = settings.get("index-url", "https://pypi.org/simple").split()[0]
        log(f"{host} unreachable ({exc}); torch from {fallback} and the host's pip settings")
        return fallback


# The build.


def excluded(relative: PurePosixPath, patterns: list[str]) -> bool:
    """Whether a .dockerignore exclusion drops the path: `**/x` matches any part, `a/b` a leading path."""
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in relative.parts):
                return True
        elif any(fnmatch.fnmatch("/".join(relative.parts[:n]), pattern) for n in range(1, len(relative.parts) + 1)):
            return True
    return False


def context_files() -> Iterator[Path]:
    """What the build reads from the repository: the Dockerfile, .dockerignore, its allowlist (`!` lines) less its
    exclusions (bytecode, a local pip install's leftovers)."""
    yield DOCKERFILE
    ignore = ROOT / ".dockerignore"
    yield ignore
    lines = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    exclusions = [line.strip("/") for line in lines if not line.startswith("!") and line != "*"]
    for line in (line for line in lines if line.startswith("!")):
        path = ROOT / line[1:].strip("/")
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and not excluded(PurePosixPath(file.relative_to(ROOT).as_posix()), exclusions):
                yield file


def inputs_hash(build_args: dict[str, str], base_id: str) -> str:
    digest = hashlib.sha256()
    for file in context_files():
        digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    for key, value in sorted(build_args.items()):
        digest.update(f"{key}={value}\0".encode())
    digest.update(base_id.encode())
    return digest.hexdigest()


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    with LOCK.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build to finish ({LOCK})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build(tag: str, provider: str) -> int:
    with machine_lock():
        return _build(tag, provider)


def _build(tag: str, provider: str) -> int:
    base = ensure_base()
    base_id = image_field(base, "{{.Id}}")
    settings = host_pip_settings()
    build_args = {"PYTHON_IMAGE": base, "PROVIDER": provider, "TORCH_INDEX_URL": torch_index(settings)}
    wanted = inputs_hash(build_args, base_id)
    if image_exists(tag) and image_field(tag, f'{{{{index .Labels "{LABEL}"}}}}') == wanted:
        log(f"{tag} is current ({LABEL}={wanted[:12]})")
        return 0
    with tempfile.TemporaryDirectory(prefix="attnserve-pip-") as tmp:
        stage = Path(tmp)
        stage.chmod(0o755)
        mounts = Mounts(stage)
        pip_conf = pip_build_config(mounts)
        args = dict(build_args)
        if pip_conf is not None:
            args["PIP_CONFIG_FILE"] = PIP_CONFIG_IN_BUILD  # not hashed: where settings come from, not what is built
        argv = [
            *engine(), "build", "--format", "docker",  # docker format: OCI images drop HEALTHCHECK
            "--layers", "--tag", tag, "--label", f"{LABEL}={wanted}", "--file", str(DOCKERFILE),
            *(arg for key, value in args.items() for arg in ("--build-arg", f"{key}={value}")),
            *mounts.args(), str(ROOT),
        ]  # fmt: skip
        log(f"building {tag} from {base}: {shlex.join(argv)}")
        started = time.monotonic()
        done = subprocess.run(argv)
    if done.returncode != 0:
        log(f"build failed ({done.returncode})")
        return done.returncode
    size = int(image_field(tag, "{{.Size}}"))
    log(f"built {tag} in {time.monotonic() - started:.0f} s, {size / 2**20:.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/image.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("engine", help="print the podman command line this machine needs")
    build_parser = commands.add_parser("build", help="build the image unless the tagged one is current")
    build_parser.add_argument("--tag", default=DEFAULT_TAG)
    build_parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.command == "engine":
        print(shlex.join(engine()))
        return 0
    return build(args.tag, args.provider)


if __name__ == "__main__":
    sys.exit(main())
