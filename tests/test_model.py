"""model.py against transformers: logits, saved checkpoints, KV-cache decoding, config errors."""
import json
import os

import pytest
import torch

import decode
from model import ModelConfig, Transformer

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5)
# one config per feature model.py must reproduce
CASES = {
    "mistral_window": ("mistral", dict(sliding_window=8, rope_theta=10000.0)),  # window shorter than the test sequence
    "mistral_head_dim": ("mistral", dict(head_dim=16, sliding_window=None)),   # Mistral-NeMo style explicit head_dim
    "llama3_tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2_bias": ("qwen2", dict(rope_theta=1000000.0)),
    "qwen2_window_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=6,
                                          layer_types=["sliding_attention", "full_attention"])),
}


def make_hf(kind, **overrides):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    cls = {"mistral": (MistralConfig, MistralForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**dict(TINY, **overrides))).eval()
    if kind == "qwen2":  # transformers initializes biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                    p.normal_(std=0.5)
    return model


def load_ours(hf_model, path, **kw):
    hf_model.save_pretrained(path, **kw)
    return Transformer.from_pretrained(str(path))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    ref = make_hf(kind, **overrides)
    ours = load_ours(ref, tmp_path)
    idx = torch.randint(0, TINY["vocab_size"], (2, 24))  # 24 > every sliding window above
    with torch.no_grad():
        diff = (ours(idx) - ref(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |logits diff| {diff}"


def test_sharded_checkpoint_and_save_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM
    ref = make_hf("mistral", sliding_window=8)
    ours = load_ours(ref, tmp_path / "hf", max_shard_size="100KB")  # transformers writes several shards
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    idx = torch.randint(0, TINY["vocab_size"], (2, 20))
    # our save, sharded too, read back by transformers
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=200_000)
    assert len([f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors")]) > 1
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(idx).logits - ref(idx).logits).abs().max() <= 1e-5
        assert (Transformer.from_pretrained(str(tmp_path / "ours"))(idx) - ours(idx)).abs().max() == 0


@pytest.mark.parametrize("case", ["llama3_tied", "qwen2_window_layers"])
def test_save_pretrained_loads_in_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM
    kind, overrides = CASES[case]
    ref = make_hf(kind, **overrides)
    ours = load_ours(ref, tmp_path / "hf")
    ours.save_pretrained(str(tmp_path / "ours"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 24))
    with torch.no_grad():
        assert (back(idx).logits - ref(idx).logits).abs().max() <= 1e-5


def test_embeds_path_equals_ids_path():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64))
    idx = torch.randint(0, 100, (2, 10))
    assert torch.equal(m(idx), m(embed=lambda E: E(idx)))
    # the head hook sees the final hidden states and the output layer
    assert torch.equal(m(idx, head=lambda h, lm_head: lm_head(h)), m(idx))


@pytest.mark.parametrize("case", ["mistral_window", "qwen2_window_layers", "llama3_tied"])
def test_kv_cache_decoding_matches_full_forward(case, tmp_path):
    kind, overrides = CASES[case]
    ref = make_hf(kind, **overrides)
    ours = load_ours(ref, tmp_path)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    out = ours.generate(prompt, max_new_tokens=15, temperature=0)  # 20 positions: past every window
    assert out.shape == (2, 20)
    with torch.no_grad():
        full = ours(out[:, :-1]).argmax(-1)[:, 4:]  # greedy choice at each generated position, no cache
    assert torch.equal(full, out[:, 5:])
    hf_out = ref.generate(prompt, max_new_tokens=15, do_sample=False, min_new_tokens=15, pad_token_id=0)
    assert torch.equal(out, hf_out)


def left_padded_prompts(lengths=(11, 4, 8)):
    """Random prompts of different lengths, left-padded with 0 into one batch: (prompts, idx, pad)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    T = max(lengths)
    pad = torch.tensor([T - n for n in lengths])
    idx = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    return prompts, idx, pad


@pytest.mark.parametrize("case", ["mistral_window", "qwen2_window_layers", "llama3_tied"])
def test_left_padded_batch_equals_each_prompt_alone(case, tmp_path):
    """Prompts of different lengths in one left-padded batch: the same logits and greedy continuations as
    each prompt run alone (positions count from a row's first real token; padding is masked)."""
    kind, overrides = CASES[case]
    ours = load_ours(make_hf(kind, **overrides), tmp_path)
    prompts, idx, pad = left_padded_prompts()
    T = idx.shape[1]
    with torch.no_grad():
        batched = ours(idx, pad=pad)
        assert torch.isfinite(batched).all()  # padding positions included: no all-masked softmax row
        for b, p in enumerate(prompts):
            torch.testing.assert_close(batched[b, pad[b]:], ours(p[None])[0], rtol=1e-5, atol=1e-5)
    out = ours.generate(idx, 14, temperature=0, pad=pad)  # 11 + 14 tokens: past every sliding window
    for b, p in enumerate(prompts):
        assert torch.equal(out[b, T:], ours.generate(p[None], 14, temperature=0)[0, len(p):]), b


def test_generate_stops_at_eos_and_samples_reproducibly():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, intermediate_size=64))
    prompt = torch.randint(0, 50, (3, 4))
    greedy = m.generate(prompt, 8, temperature=0)
    eos = int(greedy[0, 6])  # make row 0's third new token an eos id
    out = m.generate(prompt, 8, temperature=0, eos_ids=[eos])
    assert out[0, 6] == eos and (out[0, 6:] == eos).all()
    for row in out:  # every row stops once, and is padded with eos after
        hits = (row[4:] == eos).nonzero()
        if len(hits):
            assert (row[4 + hits[0, 0]:] == eos).all()
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = m.generate(prompt, 6, temperature=0.8, top_k=10, top_p=0.9, generator=g())
    b = m.generate(prompt, 6, temperature=0.8, top_k=10, top_p=0.9, generator=g())
    assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["mistral_window", "qwen2_window_layers", "llama3_tied"])
def test_compiled_static_cache_decoding_gives_the_eager_tokens(case, tmp_path, compile_counter):
    """The compiled step over the static cache: the eager path's tokens with left padding, eos and sampling,
    batch 3, past every sliding window, and one graph for every position and call."""
    kind, overrides = CASES[case]
    ours = load_ours(make_hf(kind, **overrides), tmp_path)
    prompts, idx, pad = left_padded_prompts()
    T = idx.shape[1]
    eager = ours.generate(idx, 14, temperature=0, pad=pad, compile=False)
    assert torch.equal(ours.generate(idx, 14, temperature=0, pad=pad, compile=True), eager)
    eos = int(eager[1, T + 2])  # row 1 stops at its third new token, the others later or never
    eager = ours.generate(idx, 14, temperature=0, pad=pad, eos_ids=[eos], compile=False)
    assert torch.equal(ours.generate(idx, 14, temperature=0, pad=pad, eos_ids=[eos], compile=True), eager)
    sampled = [ours.generate(idx, 10, 0.9, top_k=40, top_p=0.9, pad=pad, generator=torch.Generator().manual_seed(1),
                             compile=c) for c in (False, True)]
    assert torch.equal(*sampled)
    assert compile_counter.frame_count == 1  # every step of the 3 calls, one graph: no recompilation


def test_static_cache_is_kept_and_reused_when_it_fits():
    """The compiled step reads the cache at fixed addresses: later calls reuse it unless it is too short or of
    another batch size (lengths rounded up to 256 positions)."""
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=64))
    cpu = torch.device("cpu")
    a = decode.static_cache(m, 2, 10, torch.float32, cpu)
    assert len(a) == 3 and a[0].k.shape == (2, 2, 256, 8) and m._static_cache is a
    assert decode.static_cache(m, 2, 256, torch.float32, cpu) is a
    b = decode.static_cache(m, 2, 257, torch.float32, cpu)
    assert b is not a and b[0].v.shape == (2, 2, 512, 8)
    assert decode.static_cache(m, 2, 20, torch.float32, cpu) is b
    assert decode.static_cache(m, 3, 20, torch.float32, cpu)[0].k.shape == (3, 2, 256, 8)
    assert decode.static_cache(m, 3, 20, torch.bfloat16, cpu)[0].k.dtype == torch.bfloat16


def test_generate_checking_eos_every_8_steps_cuts_where_every_step_would():
    """On a GPU generate reads 'all rows finished' only every 8 steps and cuts the extra steps afterwards."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64))
    prompt = torch.randint(0, 50, (2, 4))
    greedy = m.generate(prompt, 20, temperature=0)
    for a, b in [(4, 5), (6, 9), (15, 12)]:  # each row's eos at those positions: all finish at step 2, 6 or 12
        eos = [int(greedy[0, a]), int(greedy[1, b])]
        every_step = decode.generate(m, prompt, 20, 0, eos_ids=eos, check_every=1)
        assert torch.equal(decode.generate(m, prompt, 20, 0, eos_ids=eos, check_every=8), every_step)
        assert every_step.shape[1] <= max(a, b) + 1 and torch.isin(every_step[:, -1], torch.tensor(eos)).all()


@pytest.mark.parametrize("T,masked", [(1, False), (1, True), (6, False), (6, True)])
def test_attention_inputs_for_fused_cuda_kernels_give_the_same_output(T, masked):
    """attend() with gqa=False (the inputs chosen on CUDA where enable_gqa would fall back to the math kernel:
    a mask or float32) equals SDPA's own grouped-query attention, up to float round-off."""
    from model import attend
    g = torch.Generator().manual_seed(0)
    B, nh, nkv, hd, S = 3, 8, 2, 16, 10
    q, k, v = (torch.randn(B, h, n, hd, generator=g) for h, n in ((nh, T), (nkv, S), (nkv, S)))
    mask = torch.rand(B, 1, T, S, generator=g) > 0.3 if masked else None
    if masked:
        mask[..., -1] = True  # no all-masked row
    causal = not masked and T > 1
    if causal:
        k, v = k[:, :, :T], v[:, :, :T]
    ref = attend(q, k, v, mask, causal)  # CPU: enable_gqa as is
    assert torch.equal(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                             enable_gqa=True))
    torch.testing.assert_close(attend(q, k, v, mask, causal, gqa=False), ref, rtol=0, atol=1e-6)


def test_top_k_and_top_p_filter():
    from decode import sample_next
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    # p(0)=0.66, p(1)=0.24: top_p=0.8 keeps exactly the first two
    picks = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert picks == {0, 1}
    assert int(sample_next(logits, 0)) == 0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps(make_hf("llama").config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# the real pretrained model


def test_smollm2_logits_match_transformers_gguf_loading(smollm2_dir, smollm2_reference):
    ref, _ = smollm2_reference
    ours = Transformer.from_pretrained(smollm2_dir)
    idx = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(idx), ref(idx).logits)  # measured: identical, not merely close


CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 + 7?",
         "Name three primary colors."]


def test_smollm2_greedy_generation_matches_transformers(smollm2_dir, smollm2_reference):
    ref, tok = smollm2_reference
    ours = Transformer.from_pretrained(smollm2_dir)
    for i, question in enumerate(CHATS):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        n = 24
        out = ours.generate(ids, n, temperature=0, eos_ids=[2])
        hf = ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=2)
        assert torch.equal(out[0, : hf.shape[1]], hf[0]), question
        if i == 0:
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert "Paris" in answer, answer


def test_hub_id_offline_is_a_clear_error(no_network):
    with pytest.raises(FileNotFoundError, match="could not download 'someone/no-such-model'"):
        Transformer.from_pretrained("someone/no-such-model")
    assert no_network == []  # refused by offline mode, not by a failed connection


def test_the_network_guard_stops_and_records_a_connection(no_network):
    import socket
    with pytest.raises(OSError, match="tried to reach the network"):
        socket.create_connection(("203.0.113.7", 443), timeout=1)  # TEST-NET-3: never a real host
    with pytest.raises(OSError, match="tried to look up"):
        socket.getaddrinfo("huggingface.co", 443)
    assert no_network == [("203.0.113.7", 443), "huggingface.co"]
    no_network.clear()  # seen: let this test pass


def test_cached_default_conversion_is_made_again_when_stale(monkeypatch, tmp_path, smollm2_dir):
    """checkpoints/SmolLM2-135M-Instruct carries a stamp of the GGUF file and the converter it came from; a
    missing or different stamp converts again, a matching one does not."""
    import convert_gguf
    want = convert_gguf.stamp(convert_gguf.default_gguf())
    assert json.load(open(os.path.join(smollm2_dir, "conversion.json"))) == want  # the real conversion is stamped
    out = tmp_path / "SmolLM2-135M-Instruct"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(convert_gguf, "DEFAULT_OUT", str(out))
    calls = []
    monkeypatch.setattr(convert_gguf, "convert", lambda gguf_path, out_dir: calls.append(out_dir))
    for stamped, converts in [(None, True), (dict(want, converter_sha256="0" * 64), True), (want, False)]:
        if stamped is None:
            (out / "conversion.json").unlink(missing_ok=True)
        else:
            (out / "conversion.json").write_text(json.dumps(stamped))
        calls.clear()
        assert convert_gguf.ensure_default(str(out)) == str(out)
        assert calls == ([str(out)] if converts else []), stamped
