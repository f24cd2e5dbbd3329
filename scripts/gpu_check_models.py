"""The models and tokenizer scripts/gpu-check makes for itself, with transformers and tokenizers alone
(no downloads): random Llamas of the tiny test fixture's shape and of Llama 3.2 1B, 3.2 3B and 3.1 8B
shapes in bf16 safetensors shards, and, when no Llama 3 tokenizer is at hand, a byte-level BPE trained on
the bundled CoQA sample with Llama 3's special tokens. Not a test and not used by ferrotune itself."""

import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent



def find_tokenizer(explicit, work):
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("FERROTUNE_HOME", Path.home() / ".cache" / "ferrotune"))
    for d in (home / "fixtures" / "llama3-tokenizer", ROOT / ".device" / "fixtures" / "llama3-tokenizer"):
        if (d / "tokenizer.json").exists():
            return d
    return trained_tokenizer(work / "bpe-tokenizer")


def trained_tokenizer(out):
    """A byte-level BPE trained on the bundled CoQA sample, with Llama 3's special tokens at Llama 3's
    ids (128000...) so the built-in llama3 template renders through it."""
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stories = json.load(open(ROOT / "data" / "samples" / "coqa" / "train.json"))["data"]
    texts = [s["story"] for s in stories] + [q["input_text"] for s in stories for q in s["questions"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    pad = [f"<|reserved_{i}|>" for i in range(128000 - tok.get_vocab_size())]
    tok.add_tokens(pad)
    tok.add_special_tokens(specials)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    json.dump({"bos_token": specials[0], "eos_token": specials[4], "tokenizer_class": "PreTrainedTokenizerFast"}, open(tmp / "tokenizer_config.json", "w"))
    tmp.rename(out)
    return out


def llama_config(shape):
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if shape == "tiny":  # the tiny-llama test fixture's shape
        rope["original_max_position_embeddings"] = 64
        dims = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384)
    else:
        rope["original_max_position_embeddings"] = 8192
        dims = {
            "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
            "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128),
            "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        }[shape]
        dims["max_position_embeddings"] = 131072
    return LlamaConfig(
        vocab_size=128256, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=[128001, 128009], **dims,
    )


def make_model(out, shape, tokenizer, device):
    """A random Llama of `shape` in bf16 shards (seed 0), made on `device`; kept for the next run."""
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = llama_config(shape)
    torch.set_default_dtype(torch.float32 if shape == "tiny" else torch.bfloat16)
    with torch.device(device if shape != "tiny" else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if shape == "tiny":  # as the fixture: spread logits so that differences show
        with torch.no_grad():
            for name, p in model.named_parameters():
                (p.normal_(0.0, 0.08) if p.dim() == 2 else p.uniform_(0.8, 1.2))
    model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="8MB" if shape == "tiny" else "5GB")
    del model
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, tmp / f)
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
