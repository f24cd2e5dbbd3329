"""Python reference for benches/prepare.rs: the same work as `ferrotune prepare --strategy assistant`
without packing, in the way a transformers user does it: the chat template rendered by
`apply_chat_template` (with the row's `tools`) with `return_assistant_tokens_mask=True` (fast tokenizer, offsets, assistant
spans from {% generation %} blocks), then labels shifted within each sample.

usage: prepare_reference.py TOKENIZER_DIR TEMPLATE.jinja DATA.jsonl
prints: JSON {"tokens": N, "trained": N, "seconds": S}
"""

import json
import sys
import time

from transformers import AutoTokenizer


def main():
    tok_dir, template_path, data = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    template = open(template_path).read()
    rows = [json.loads(line) for line in open(data)]
    # Text parts joined, `weight` dropped, as ferrotune reads them (outside the timed loop).
    for row in rows:
        row["messages"] = [
            {k: ("".join(p["text"] for p in v) if k == "content" and isinstance(v, list) else v)
             for k, v in m.items() if k != "weight"}
            for m in row["messages"]
        ]
    t0 = time.perf_counter()
    tokens = trained = 0
    for row in rows:
        enc = tok.apply_chat_template(
            row["messages"], tools=row.get("tools"), chat_template=template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        labels = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
        tokens += len(ids)
        trained += sum(1 for x in labels if x != -100)
    seconds = time.perf_counter() - t0
    print(json.dumps({"tokens": tokens, "trained": trained, "seconds": seconds}))


if __name__ == "__main__":
    main()
