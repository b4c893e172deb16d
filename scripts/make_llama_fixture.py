"""Writes tests/fixtures/llama_tiny: a tiny random Hugging Face Llama checkpoint and what transformers computes on it.

Run in any environment with torch, transformers and safetensors (not effarch's venv; transformers is never an
effarch dependency), e.g.:

    python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors numpy
    /tmp/hf/bin/python scripts/make_llama_fixture.py            # writes tests/fixtures/llama_tiny/

The model covers what the importer maps: GQA (6 query heads, 2 KV heads), an untied LM head, an intermediate size
that is not a multiple of 16, rms_norm_eps != 1e-6, rope_theta != 1e4 and llama3 RoPE scaling whose original context
(64) puts the head's 4 frequencies in all three bands (kept, interpolated, divided). Weights are drawn with a large
std and the norm scales away from 1, so a swapped or transposed tensor changes the logits; they are stored in
bfloat16 like real checkpoints. expected.json holds the float32 logits of transformers (eager attention) on the
bf16 weights upcast to float32, and the greedy continuation of `model.generate`, whose top-2 logit margins are
checked here to be far above float32 noise so the continuation is a stable target.
"""

import json
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama_tiny"
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33]  # 13 tokens
NEW_TOKENS = 8
MIN_MARGIN = 1e-2  # smallest top-1 minus top-2 logit allowed along the greedy path


def main():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=199,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.25,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    OUT.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(OUT, safe_serialization=True)

    # The reference: the stored (bf16) weights, upcast to float32.
    ref = LlamaForCausalLM.from_pretrained(OUT, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = ref(ids).logits[0]
        out = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
    continuation = out.sequences[0, len(PROMPT):].tolist()
    margins = [float(torch.topk(step[0], 2).values.diff().abs()) for step in out.logits]
    assert min(margins) > MIN_MARGIN, f"greedy path too close to a tie: margins {margins}; change the seed"
    expected = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt": PROMPT,
        "logits": logits.tolist(),  # [len(PROMPT), vocab_size], float32
        "greedy_continuation": continuation,
        "greedy_min_margin": min(margins),
    }
    (OUT / "expected.json").write_text(json.dumps(expected) + "\n")
    (OUT / "generation_config.json").unlink(missing_ok=True)  # not part of the fixture
    print(f"wrote {OUT}: continuation {continuation}, min margin {min(margins):.3g}, "
          f"{sum(p.stat().st_size for p in OUT.iterdir()) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
