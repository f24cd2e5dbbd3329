"""Hugging Face reference computations for ferrotune's tests (the oracle). Tests write their inputs,
call this script with the project's venv python, and compare ferrotune's numbers with what it writes.
Everything runs on CPU with transformers' default attention, in fp32 unless ORACLE_DTYPE=bfloat16
(ORACLE_ATTENTION_FP32=1: bf16 with attention computed in fp32, as ferrotune does on CPU for short rows
without bf16 units; ORACLE_ATTENTION_EAGER=1: transformers' eager attention, bf16 products and softmax
in fp32 rounded to bf16, as ferrotune's grouped attention computes short rows on CPUs with bf16 units);
ORACLE_ADAPTER=DIR puts a peft adapter on the model for `forward`; ORACLE_DEVICE=cuda (or cuda:N) runs
the model computations on that GPU instead (scripts/gpu-check), inputs moved there and results back.

  oracle.py forward MODEL_DIR IN.safetensors OUT.safetensors [GRAD_PARAM ...]
      IN holds input_ids (B, T) and optionally position_ids (B, T) and labels (B, T) (unshifted, -100 =
      ignored; transformers shifts them). OUT gets logits (B, T, V), and with labels: loss (1,) and
      grad.NAME for each GRAD_PARAM after loss.backward().
  oracle.py generate MODEL_DIR PROMPTS.json OUT.json MAX_NEW_TOKENS
      PROMPTS is a list of token-id lists; each is generated greedily on its own (no padding). OUT is the
      list of generated ids per prompt, cut before the first eos id of the generation config.
  oracle.py train_step MODEL_DIR IN.safetensors OUT.safetensors LR WEIGHT_DECAY MAX_GRAD_NORM [ADAPTER_DIR]
      One optimizer step as a transformers (+ peft, with ADAPTER_DIR) user takes it: mean loss over
      IN's labels (unshifted), backward, clip_grad_norm_, torch.optim.AdamW (single-tensor path, no
      weight decay on 1-D parameters). OUT gets loss, grad_norm, and grad.NAME (clipped, as the step
      used it) and param.NAME (after the step) for every trainable parameter (peft names without the
      adapter name). With ORACLE_DROPOUT_KEY=K the
      model trains in train mode and each LoRA dropout module, in module order, first reseeds torch's
      generator with mask_seed(K, its index): ferrotune's adapters draw their masks the same way.
  oracle.py squad PAIRS.json OUT.json
      EM and F1 of each [prediction, gold] pair by SQuAD v1.1's official evaluate-v1.1.py functions
      (normalize_answer, exact_match_score, f1_score), transcribed below verbatim.
  oracle.py chat TOKENIZER_DIR TEMPLATE CONVERSATIONS.json OUT.json
      For each conversation (a list of {role, content}): transformers' apply_chat_template text
      (tokenize=False) and ids (tokenize=True), and `assistant_masks` when the template has
      {% generation %} blocks. TEMPLATE is `own` (the tokenizer's) or a path to a Jinja file.
      A conversation may also be a row {"messages", "tools"?} as in a JSONL file; one the template
      refuses gives {"error": ...}.
  oracle.py masked_loss MODEL_DIR TEMPLATE CONVERSATIONS.jsonl OUT.json
      The mean token loss over the assistant tokens of every conversation (transformers'
      `return_assistant_tokens_mask=True` under TEMPLATE, which has {% generation %} blocks), each
      conversation a forward of its own: {"loss": sum / tokens, "tokens": N}.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


DEVICE = os.environ.get("ORACLE_DEVICE", "cpu")


def sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa attention on fp32 copies of q, k, v, the output cast back: what ferrotune
    computes for bf16 attention of short sequences on a CPU without bf16 units (attention.rs,
    CPU_BF16_ATTENTION_FROM)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    f = lambda t: t.float()
    mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask.float()
    out, weights = sdpa_attention_forward(module, f(query), f(key), f(value), mask, **kwargs)
    return out.to(query.dtype), weights


def load(model_dir):
    dtype = getattr(torch, os.environ.get("ORACLE_DTYPE", "float32"))
    kwargs = {}
    if os.environ.get("ORACLE_ATTENTION_FP32") == "1":
        from transformers import AttentionInterface

        AttentionInterface.register("sdpa_fp32", sdpa_in_fp32)
        kwargs["attn_implementation"] = "sdpa_fp32"
    elif os.environ.get("ORACLE_ATTENTION_EAGER") == "1":
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(DEVICE)
    model.eval()
    return model


def inputs(path):
    return {k: v.to(DEVICE) for k, v in load_file(path).items()}


def save(result, out):
    save_file({k: v.detach().cpu().contiguous() for k, v in result.items()}, out)


def forward(model_dir, inp, out, *grad_params):
    t = inputs(inp)
    model = load(model_dir)
    if os.environ.get("ORACLE_ADAPTER"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.environ["ORACLE_ADAPTER"])
        model.eval()
    kwargs = {k: t[k] for k in ("position_ids", "labels") if k in t}
    res = model(input_ids=t["input_ids"], **kwargs)
    result = {"logits": res.logits.detach().float().contiguous()}
    if "labels" in t:
        res.loss.backward()
        result["loss"] = res.loss.detach().reshape(1)
        params = dict(model.named_parameters())
        for name in grad_params:
            result["grad." + name] = params[name].grad.detach().float().contiguous()
    save(result, out)


def generate(model_dir, prompts_path, out, max_new_tokens):
    model = load(model_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    outputs = []
    with torch.no_grad():
        for prompt in json.load(open(prompts_path)):
            ids = torch.tensor([prompt], device=DEVICE)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens), do_sample=False)
            new = gen[0, len(prompt):].tolist()
            cut = next((i for i, tok in enumerate(new) if tok in eos), len(new))
            outputs.append(new[:cut])
    json.dump(outputs, open(out, "w"))


def mask_seed(key, index):
    """ferrotune's lora::mask_seed, transcribed: splitmix64 of (key, index), 63 bits."""
    m = (1 << 64) - 1
    z = key ^ (((index + 1) * 0x9E3779B97F4A7C15) & m)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) >> 1


def seed_lora_dropout(model, key):
    drops = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    for i, m in enumerate(drops):
        m.register_forward_pre_hook(lambda _m, _a, i=i: torch.manual_seed(mask_seed(key, i)) and None)
    model.train()


def train_step(model_dir, inp, out, lr, wd, clip, adapter=None):
    t = inputs(inp)
    model = load(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        if os.environ.get("ORACLE_DROPOUT_KEY"):
            seed_lora_dropout(model, int(os.environ["ORACLE_DROPOUT_KEY"]))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [(n.replace(".default", ""), p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": float(wd)},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=float(lr), betas=(0.9, 0.999), eps=1e-8, foreach=False)
    res = model(input_ids=t["input_ids"], labels=t["labels"])
    res.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], float(clip), foreach=False)
    opt.step()
    result = {"loss": res.loss.detach().reshape(1), "grad_norm": norm.detach().reshape(1)}
    for n, p in params:
        result["param." + n] = p.detach().contiguous()
        result["grad." + n] = p.grad.detach().contiguous()  # clipped, as the step used it
    save(result, out)


def normalize_answer(s):
    import re
    import string

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    from collections import Counter

    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad(pairs_path, out):
    pairs = json.load(open(pairs_path))
    json.dump([[float(exact_match_score(p, g)), float(f1_score(p, g))] for p, g in pairs], open(out, "w"))


def chat(tokenizer_dir, template, conversations_path, out):
    """Renders each conversation with apply_chat_template: a list of messages, or a row
    {"messages", "tools"?} as in a JSONL file. Text parts are joined (as ferrotune reads them) and
    `weight` is dropped; everything else goes to transformers as given. A conversation the template
    refuses gives {"error": message}."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = None if template == "own" else open(template).read()
    generation = source is not None and "{% generation" in source.replace("{%-", "{%")
    results = []
    for item in json.load(open(conversations_path)):
        messages, tools = (item, None) if isinstance(item, list) else (item["messages"], item.get("tools"))
        messages = [
            {k: ("".join(p["text"] for p in v) if k == "content" and isinstance(v, list) else v)
             for k, v in m.items() if k != "weight"}
            for m in messages
        ]
        try:
            text = tok.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False)
            enc = tok.apply_chat_template(
                messages, tools=tools, chat_template=source, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=generation,
            )
        except Exception as e:  # the template raised: ferrotune must refuse the same conversation
            results.append({"error": f"{type(e).__name__}: {e}"})
            continue
        item = {"text": text, "ids": list(enc["input_ids"])}
        if generation:
            item["assistant_masks"] = list(enc["assistant_masks"])
        results.append(item)
    json.dump(results, open(out, "w"), ensure_ascii=False)


def masked_loss(model_dir, template, conversations_path, out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir)
    source = open(template).read()
    total, n = 0.0, 0
    with torch.no_grad():
        for line in open(conversations_path):
            if not line.strip():
                continue
            enc = tok.apply_chat_template(
                json.loads(line)["messages"], chat_template=source, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids = torch.tensor([enc["input_ids"]], device=DEVICE)
            trained = torch.tensor(enc["assistant_masks"][1:], device=DEVICE).bool()
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits[trained], ids[0, 1:][trained], reduction="sum").item()
            n += int(trained.sum())
    json.dump({"loss": total / n, "tokens": n}, open(out, "w"))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    commands = {"forward": forward, "generate": generate, "chat": chat, "train_step": train_step, "squad": squad}
    commands["masked_loss"] = masked_loss
    commands[cmd](*args)
