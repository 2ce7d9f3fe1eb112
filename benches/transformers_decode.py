"""Decode speed of Hugging Face transformers (torch, CPU, f32) on the same GGUF model
and the same workload as `avp bench model`: prefill 128 tokens of the same passage,
then 32 greedy tokens one at a time with the KV cache. Prints one JSON line.

Used by `avp bench model --python PYTHON` (a Python with torch and transformers,
e.g. from `scripts/bench-transformers`).
"""

import argparse
import json
import os
import statistics
import time

PASSAGE = (
    "The harbour town woke before dawn. Fishermen checked their nets by lantern light while the baker "
    "pulled the first loaves from the oven, and the smell of bread drifted down to the water. By six the "
    "market square was full: farmers with crates of apples and cabbages, a cheesemaker arguing about the "
    "price of salt, children weaving between the stalls. The mayor, who had promised a new sea wall before "
    "the winter storms, walked through the crowd shaking hands and counting, in his head, the votes he "
    "still needed. "
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    # transformers leaves lm_head untied when loading a tied GGUF (no output.weight).
    from gguf import GGUFReader

    if "output.weight" not in {t.name for t in GGUFReader(a.gguf).tensors}:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    with torch.inference_mode():
        probe = tok("The capital of France is", return_tensors="pt")["input_ids"]
        check = model.generate(probe, max_new_tokens=3, do_sample=False)
        check = tok.decode(check[0, probe.shape[1] :])
    one = tok(PASSAGE, add_special_tokens=False)["input_ids"]
    ids = (one * (a.prompt_tokens // len(one) + 1))[: a.prompt_tokens]
    x = torch.tensor([ids])

    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(a.reps + 1):  # the first is a warm-up
            t = time.perf_counter()
            out = model(x, use_cache=True)
            prefill.append(time.perf_counter() - t)
            past = out.past_key_values
            nxt = torch.tensor([[ids[0]]])
            t = time.perf_counter()
            for _ in range(a.decode):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            decode.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "bench": "model_reference",
                "engine": "transformers",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "dtype": "f32",
                "prefill_tokens": len(ids),
                "prefill_tok_s": len(ids) / statistics.median(prefill[1:]),
                "decode_tok_s": a.decode / statistics.median(decode[1:]),
                "greedy_check": check,
            }
        )
    )


if __name__ == "__main__":
    main()
