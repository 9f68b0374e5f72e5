"""What each prompt-sharing path saves on its own: rollout generation with and without ``prefill_once``, and the
policy pass (forward + backward) with and without ``share_prompt_prefix``, alternated, process CPU time.

    OMP_NUM_THREADS=1 python benchmarks/prefix_share_parts.py --prompt_tokens 128 --repeats 5

16 embedded prompts (padded with ``benchmarks/vs_trl.py``'s filler to ``--prompt_tokens``) × 8 completions, ≤ 24
new tokens, temperature 1, on ``--model`` (default as ``vs_trl.py``). Each repeat times both variants of both
parts once, in alternating order; printed: the median CPU time of each and the ratio shared / unshared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt_tokens", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--world_dir", default=".cache/rerule/embedded/world")
    args = ap.parse_args(argv)
    import tempfile

    import torch

    from benchmarks import vs_trl
    from rerule_lightning.primitives.generation import sample_completions
    from rerule_lightning.primitives.logprobs import completion_logprobs
    from rerule_lightning.primitives.policy import PolicyConfig, build_policy, load_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = vs_trl.model_copy(args.model or vs_trl.default_model(), args.prompt_tokens, tmp)
        cfg = PolicyConfig(name_or_path=path)
        model, tok = build_policy(cfg), load_tokenizer(cfg)
    fn = vs_trl.prefixer(tok, args.prompt_tokens)
    prompts = [fn(p) for p in vs_trl.embedded_batches(args.world_dir, 1)[0]["prompt"]]
    times: dict[str, list[float]] = {k: [] for k in ("generate", "generate_prefill_once", "policy", "policy_shared")}
    for r in range(args.repeats):
        for once in ((False, True) if r % 2 == 0 else (True, False)):
            torch.manual_seed(r)
            t = time.process_time()
            p_ids, c_ids, mask, _ = sample_completions(model, tok, prompts, num_generations=8, temperature=1.0,
                                                       top_p=1.0, max_new_tokens=24, prefill_once=once)
            times["generate_prefill_once" if once else "generate"].append(time.process_time() - t)
        rows = [x for x in p_ids for _ in range(8)]
        for share in ((False, True) if r % 2 == 0 else (True, False)):
            model.zero_grad()
            t = time.process_time()
            logp, m = completion_logprobs(model, rows, c_ids, mask, tok.pad_token_id, 1.0, share_prefix=share)
            (logp * m).sum().backward()
            times["policy_shared" if share else "policy"].append(time.process_time() - t)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"prompt tokens ~{args.prompt_tokens or 'embedded'}, {args.repeats} repeats, CPU ms (median): "
          + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    print(f"generation prefill_once / today = {med['generate_prefill_once'] / med['generate']:.3f}; policy pass "
          f"shared / full = {med['policy_shared'] / med['policy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
