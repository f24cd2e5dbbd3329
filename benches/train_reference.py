"""The reference side of benches/train.rs: the training step a transformers (+ peft) user writes, timed.

  train_reference.py MODEL_DIR ROWS.safetensors MODE DTYPE WARMUP

ROWS holds input_ids, position_ids and labels_hf (unshifted, -100 = not trained), each (steps, T): one
packed row per optimizer step. MODE is `lora` (peft, r=8, alpha=16, dropout 0, all-linear) or `full`.
DTYPE is float32 or bfloat16 (the model's weights and compute). Each step: forward with labels (the
model's own shifted mean cross-entropy; passing position_ids without an attention mask makes
transformers build the block-diagonal causal mask of packed rows, so no token attends across
conversations, like ferrotune), backward, clip_grad_norm_(1.0), torch.optim.AdamW. The first WARMUP steps
are not timed. Prints one JSON object: tokens, trained tokens, seconds, peak RSS and the losses.
scripts/gpu-check sets REF_DEVICE=cuda (the model and rows on that GPU; the JSON then also holds the
caching allocator's peaks, peak_allocated and peak_reserved), REF_LORA_R (default 8) and
REF_CHECKPOINTING=1 (transformers' gradient checkpointing, non-reentrant, like ferrotune's full).
REF_PROFILE=PATH profiles one extra, untimed step with torch.profiler and writes its operators there.
"""

import json
import os
import resource
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(model_dir, rows_path, mode, dtype, warmup):
    warmup = int(warmup)
    device = os.environ.get("REF_DEVICE", "cpu")
    r = int(os.environ.get("REF_LORA_R", "8"))
    rows = {k: v.to(device) for k, v in load_file(rows_path).items()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    model.config.use_cache = False
    if os.environ.get("REF_CHECKPOINTING") == "1":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))
        if os.environ.get("REF_CHECKPOINTING") == "1":
            model.enable_input_require_grads()
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4)
    steps = rows["input_ids"].shape[0]
    losses, tokens, trained, t0 = [], 0, 0, None
    for i in range(steps):
        if i == warmup:
            t0 = time.perf_counter()
        ids, pos, labels = (rows[k][i : i + 1] for k in ("input_ids", "position_ids", "labels_hf"))
        out = model(input_ids=ids, position_ids=pos, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if i >= warmup:
            tokens += ids.numel()
            trained += int((labels[:, 1:] != -100).sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    profile_path = os.environ.get("REF_PROFILE")
    if profile_path:
        # One more step (row 0 again, not timed) under torch.profiler: self time per operator, as
        # ferrotune's trainer/src/profile.rs sums it from the same libtorch profiler.
        from torch.profiler import ProfilerActivity, profile

        cuda = device.startswith("cuda")
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            ids, pos, labels = (rows[k][0:1] for k in ("input_ids", "position_ids", "labels_hf"))
            model(input_ids=ids, position_ids=pos, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ops = [
            {"name": e.key, "calls": e.count, "self_ns": int(e.self_cpu_time_total * 1000), "total_ns": int(e.cpu_time_total * 1000)}
            for e in prof.key_averages()
            if e.self_cpu_time_total > 0 or e.cpu_time_total > 0
        ]
        # CUDA kernels as ferrotune's profile lists them: one row per kernel name, its time on the GPU.
        kernels = [
            {"name": e.key, "calls": e.count, "self_ns": int(e.self_device_time_total * 1000), "total_ns": int(e.device_time_total * 1000)}
            for e in prof.key_averages()
            if cuda and e.device_type == torch.autograd.DeviceType.CUDA
        ]
        with open(profile_path, "w") as f:
            json.dump({"ops": sorted(ops, key=lambda o: -o["self_ns"]), "kernels": sorted(kernels, key=lambda o: -o["self_ns"])}, f)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"tokens": tokens, "trained": trained, "secs": secs, "peak_rss": peak, "losses": losses}
    if device.startswith("cuda"):
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
    print(json.dumps(out))


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:])
