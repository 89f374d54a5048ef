"""``microsoft/DialoGPT-medium`` from "the Hub": downloaded, then generated with, chatted with
and served, with nothing but the Hub's HTTP API in between.

The Hub is ``mock_hub.py``'s loopback server, reached the way a user would point any
``huggingface_hub`` at a mirror: ``HF_ENDPOINT``, with ``HF_HUB_OFFLINE`` unset and an empty
``HF_HOME`` and ``YAIE_CACHE_DIR``. Every command runs as its own process, so the environment
is read exactly as in a shell, and ``yaie chat`` runs its real entry point with Textual's pilot
standing in for the keyboard (this file's ``__main__`` part).

The repository is modelled on DialoGPT-medium's file list and has its config shape
(``GPT2LMHeadModel``, ``vocab_size`` 50,257, ``n_positions`` 1,024, ``n_head`` 16, EOS 50,256)
EXCEPT, for speed, two numbers: ``n_layer`` 2 (real: 24) and ``n_embd`` 64 (real: 1,024). The
weights are random safetensors, with EOS's embedding row zeroed so greedy replies are never
empty (see ``_weights``); ``pytorch_model.bin``, ``tf_model.h5`` and ``flax_model.msgpack`` are
placeholders that must never be fetched. The tokenizer is GPT-2's byte-level BPE (``vocab.json`` +
``merges.txt``), trained here on a paragraph and padded with filler tokens to the real vocabulary
size, ``<|endoftext|>`` at 50,256, and no chat template, so YAIE must use DialoGPT's
convention: every turn followed by EOS.

What this cannot show: that the real huggingface.co still serves DialoGPT-medium with
safetensors weights, and what the real weights say.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import safetensors.torch
import torch
from mock_hub import HubRepo, MockHub, Request, serve_hub
from server_helpers import free_port, stop_process, wait_healthy
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

REPO_ID = "microsoft/DialoGPT-medium"
EOS = 50256
USER_TURNS = ["Hello there", "How are you today?"]

# DialoGPT-medium's config.json, but for n_layer and n_embd (see the module docstring).
CONFIG = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": EOS,
    "embd_pdrop": 0.1,
    "eos_token_id": EOS,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 64,  # real: 1024
    "n_head": 16,
    "n_layer": 2,  # real: 24
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"conversational": {"max_length": 1000}},
    "vocab_size": EOS + 1,
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": EOS, "eos_token_id": EOS}
# Downloaded: config, generation configs, tokenizer, safetensors. Never: pickles, TF, Flax, docs.
EXPECTED_FETCHES = {
    "config.json",
    "generation_config.json",
    "generation_config_for_conversational.json",
    "merges.txt",
    "tokenizer_config.json",
    "vocab.json",
    "model.safetensors",
}
CORPUS = """\
Hello there! How are you today? I am fine, thank you. What are you doing this weekend?
I think we should go to the beach, the weather is nice and the water is warm. Do you like
music? I love to listen to music when I read a book. That sounds great, let us talk later.
"""
SERVE_TIMEOUT_S = 120  # a guard against a hung server, not a speed check


def _tokenizer_files() -> dict[str, bytes]:
    """GPT-2's tokenizer format: byte-level BPE, ``vocab.json`` and ``merges.txt``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS.splitlines(), trainer)
    vocab = bpe.get_vocab()
    merges = json.loads(bpe.to_str())["model"]["merges"]
    # Fillers no merge produces (the random model may still sample them): " w123" and so on.
    for i in range(len(vocab), EOS):
        vocab[f"Ġw{i}"] = i
    vocab["<|endoftext|>"] = EOS
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": merges_txt.encode(),
        "tokenizer_config.json": json.dumps({"model_max_length": 1024}).encode(),
    }


def _weights() -> bytes:
    """Random GPT-2 weights under transformers' names, saved as the Hub stores them."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()
    # With a tied head, a random GPT-2 echoes its last token, and every DialoGPT prompt ends in
    # EOS: every reply would be empty. A zero EOS row makes EOS's logit 0, below the best of
    # 50,256 random ones, so greedy replies run to max_tokens.
    with torch.no_grad():
        model.transformer.wte.weight[EOS] = 0
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return safetensors.torch.save(tensors, metadata={"format": "pt"})  # tied head: saved once


def dialogpt_repo() -> HubRepo:
    files = {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"---\nlicense: mit\npipeline_tag: conversational\n---\n# DialoGPT\n",
        "config.json": json.dumps(CONFIG, indent=2).encode(),
        "generation_config.json": json.dumps(GENERATION_CONFIG).encode(),
        "generation_config_for_conversational.json": json.dumps(
            {**GENERATION_CONFIG, "max_length": 1000}
        ).encode(),
        **_tokenizer_files(),
        "model.safetensors": _weights(),
        "pytorch_model.bin": b"placeholder: must never be downloaded",
        "tf_model.h5": b"placeholder: must never be downloaded",
        "flax_model.msgpack": b"placeholder: must never be downloaded",
    }
    return HubRepo.from_files(REPO_ID, files)


# --------------------------------------------------------------------------------- the test


def _env(hub: MockHub, home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home / "hf"),
        YAIE_CACHE_DIR=str(home / "yaie"),
        NO_PROXY="127.0.0.1,localhost",
        YAIE_API_KEY="",
        PYTHONUNBUFFERED="1",
    )
    return env


def _run_on_a_terminal(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``cmd`` with stderr on a pseudo-terminal, as in a shell: progress bars only draw on
    a terminal. Returns (exit code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    shown: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
            timeout=SERVE_TIMEOUT_S, check=False,
        )  # fmt: skip
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return done.returncode, done.stdout.decode(), b"".join(shown).decode(errors="replace")


def _repo_requests(requests: list[Request]) -> list[Request]:
    """The requests about the model: its info, its file list, its files (not the client's own
    user-agent registry)."""
    return [r for r in requests if REPO_ID in r.path or r.path.startswith("/cdn/")]


def _fetched(requests: list[Request]) -> set[str]:
    """Files whose bytes were sent: GETs of ``/resolve/`` or of the CDN."""
    names = set()
    for r in requests:
        if r.method == "GET" and "/resolve/" in r.path:
            names.add(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
        elif r.method == "GET" and r.path.startswith("/cdn/"):
            names.add("model.safetensors")  # the only LFS file that may be fetched
    return names


@pytest.fixture(scope="module")
def hub() -> Iterator[MockHub]:
    with serve_hub([dialogpt_repo()]) as server:
        yield server


def test_dialogpt_downloads_once_then_generates_chats_and_serves(
    hub: MockHub, tmp_path: Path
) -> None:
    env = _env(hub, tmp_path)
    yaie = [sys.executable, "-m", "yaie.cli"]

    # (a) `yaie generate` downloads the model, showing progress, and generates.
    code, out, terminal = _run_on_a_terminal(
        [*yaie, "generate", REPO_ID, "hi", "--max-tokens", "8"], env
    )
    assert code == 0, terminal
    download = _repo_requests(hub.take_requests())
    paths = [r.path for r in download]
    assert paths[0] == f"/api/models/{REPO_ID}", paths  # the resolver's model-info call
    sha = hub.repos[REPO_ID].sha
    assert f"/api/models/{REPO_ID}/tree/{sha}" in paths
    assert _fetched(download) == EXPECTED_FETCHES
    assert sum(r.path.startswith("/cdn/") for r in download) == 1, "weights came from the CDN"
    assert re.search(r"Fetching 7 files: +100%", terminal), terminal  # huggingface_hub's bars
    assert "Download complete" in terminal, terminal
    cached = tmp_path / "hf" / "hub" / "models--microsoft--DialoGPT-medium"
    assert (cached / "refs" / "main").read_text() == sha, "later runs find the snapshot by branch"
    snapshot = cached / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(EXPECTED_FETCHES)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    assert tokenizer.chat_template is None and tokenizer.eos_token_id == EOS
    # `generate` formats the prompt as a one-turn chat: DialoGPT's "hi<|endoftext|>".
    stats = re.search(r"\[(\d+) prompt tokens, (\d+) generated", terminal)
    assert stats, terminal
    assert int(stats[1]) == len(tokenizer.encode("hi")) + 1
    assert int(stats[2]) == 8  # EOS never wins (see _weights)
    generated = out.removesuffix("\n")
    assert generated.strip(), out

    # (b) `yaie chat`: from the cache (no request reaches the Hub), two turns under the pilot.
    transcript = tmp_path / "chat.json"
    chat = subprocess.run(
        [sys.executable, __file__, str(transcript)], env=env, capture_output=True, text=True,
        timeout=SERVE_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert _repo_requests(hub.take_requests()) == [], "the second run must not touch the Hub"
    assert f"Using {REPO_ID} from the Hugging Face cache" in chat.stderr, chat.stderr
    assert "using DialoGPT's" in chat.stderr, chat.stderr
    assert "(context 1024 tokens" in chat.stderr, chat.stderr  # from n_positions
    record = json.loads(transcript.read_text())
    assert record["errors"] == [], record
    messages = record["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert [m["content"] for m in messages[::2]] == USER_TURNS
    # The prompt of each turn is the conversation so far, every turn followed by EOS.
    expected = []
    for turn, message in enumerate(messages):
        expected += tokenizer.encode(message["content"]) + [EOS]
        if message["role"] == "user":
            assert record["prompts"][turn // 2] == expected, (turn, record["prompts"])
    assert re.search(r"context \d+/1024", record["status"]), record["status"]  # n_positions

    # (c) `yaie serve` answers the openai client; from the cache, and offline: once downloaded,
    # the model no longer needs the Hub at all.
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*yaie, "serve", REPO_ID, "--port", str(port), "--kv-cache-memory", "16MiB"],
            env={**env, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, log_path, SERVE_TIMEOUT_S)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [REPO_ID]
        reply = client.chat.completions.create(
            model=REPO_ID,
            messages=[{"role": "user", "content": "hi"}],
            temperature=0,
            max_tokens=8,
        )
        assert reply.model == REPO_ID
        assert reply.usage.prompt_tokens == len(tokenizer.encode("hi")) + 1
        # The same weights and prompt, greedy: the same text `generate` printed.
        assert reply.choices[0].message.content == generated
    finally:
        stop_process(server, timeout_s=30)
    assert _repo_requests(hub.take_requests()) == [], log_path.read_text()



# ------------------------------------------------------- `yaie chat` under the pilot (child)


def _drive_chat(transcript: Path) -> int:
    """Run ``yaie chat microsoft/DialoGPT-medium`` through its real entry point, with the app
    driven by Textual's pilot instead of a keyboard; write what happened to ``transcript``."""
    import asyncio

    from chat_helpers import lines, send, status

    from yaie.cli import main
    from yaie.core.async_engine import AsyncEngine
    from yaie.ui.chat import ChatApp

    prompts: list[list[int]] = []
    generate = AsyncEngine.generate

    def recording_generate(self, prompt_token_ids, *args, **kwargs):
        prompts.append(list(prompt_token_ids))
        return generate(self, prompt_token_ids, *args, **kwargs)

    async def drive(app: ChatApp) -> None:
        async with app.run_test(size=(110, 32)) as pilot:
            await send(pilot, "/set temperature=0 max_tokens=8")
            for text in USER_TURNS:
                await send(pilot, text)
            record = {
                "messages": app.conversation.messages,
                "prompts": prompts,
                "status": status(app),
                "errors": lines(app, "error"),
            }
            transcript.write_text(json.dumps(record))

    AsyncEngine.generate = recording_generate
    ChatApp.run = lambda app, *args, **kwargs: asyncio.run(drive(app))
    return main(["chat", REPO_ID, "--kv-cache-memory", "16MiB"])


if __name__ == "__main__":
    sys.exit(_drive_chat(Path(sys.argv[1])))
