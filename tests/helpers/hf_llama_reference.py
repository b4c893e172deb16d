"""transformers' side of the Llama round-trip test, run as a script by whichever Python has transformers + torch.

    python hf_llama_reference.py make DIR     # a fresh random Llama (GQA 4/1, tied head, default RoPE) in DIR
    python hf_llama_reference.py logits DIR   # prints {"logits": ...} of the checkpoint in DIR on PROMPT
    python hf_llama_reference.py text DIR TEXT  # prints {"ids": ..., "logits": ...}: TEXT through DIR's tokenizer

Kept out of effarch's own environment: transformers is never an effarch dependency, and the machines' torch wheel
may be for another Python than effarch's venv (tests/train/test_hf.py picks the interpreter).
"""

import json
import sys

PROMPT = [5, 77, 12, 0, 93, 41, 8, 60, 2, 19, 33]


def make(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         initializer_range=0.2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def logits(path: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.tensor([PROMPT])).logits[0]
    print(json.dumps({"logits": out.tolist()}))


def text(path: str, prompt: str) -> None:
    """The checkpoint's own tokenizer (tokenizer.json, read by AutoTokenizer) on `prompt`, without added special
    tokens (as effarch packs documents), and the model's logits on those ids."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    ids = AutoTokenizer.from_pretrained(path)(prompt, add_special_tokens=False)["input_ids"]
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    print(json.dumps({"ids": ids, "logits": out.tolist()}))


if __name__ == "__main__":
    {"make": make, "logits": logits, "text": text}[sys.argv[1]](*sys.argv[2:])
