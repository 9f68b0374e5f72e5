"""Unlearning evaluation of a causal LM on the per-split evaluation data (greedy + teacher-forced).

:class:`UnlearningEvaluator` holds one set of torchmetrics ``Metric`` objects per split (so Lightning moves
them with the module and they reduce correctly under DDP), updates them batch by batch, keeps per-item
records for the eval report and adds the cross-split metrics: forget quality (against the retain model's
truth ratios), Min-K% membership AUC and privleak (forget vs holdout) and model utility.

Tokenisation of teacher-forced passes is SFT's (:func:`rerule_lightning.modules.sft.tokenize_pair`): ``bos +
prompt`` ids, then the ids of the completion text (``" " + answer`` in the raw format) tokenised on its
own. **Only the answer tokens count, not the end-of-sequence token** (``include_eos=False``), as TOFU's
"answer tokens only" convention: the eos is the same for every option, so it would only dilute truth
ratios and Min-K% with a near-certain token. ``include_eos=True`` appends it (SFT trained on it).

Lightning glue, reference statistics and report writing live in :mod:`rerule_lightning.modules.eval_hooks`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rerule_lightning.evaluation.metrics import (
    AnswerAccuracy,
    AnswerProbability,
    ExtractionStrength,
    Fluency,
    MinKPercent,
    OutputClassRate,
    RefusalRate,
    RougeLF1,
    RougeLRecall,
    TruthRatio,
)
from rerule_lightning.evaluation.metrics import functional as MF
from rerule_lightning.evaluation.metrics.outputs import output_classes
from rerule_lightning.evaluation.suite import EvalSuite, SplitSpec, embedded_suite
from rerule_lightning.primitives.generation import cut_at_stop, greedy_generate
from rerule_lightning.primitives.jsonio import write_json_atomic
from rerule_lightning.primitives.logprobs import accepts_logits_to_keep, token_logprobs
from rerule_lightning.primitives.prompting import format_answer, format_prompt

FORGET, HOLDOUT = "forget", "holdout"
#: Item columns carried into the per-item records and summarised by :func:`group_summary` when present
#: (``target``: the entity, e.g. the author; ``collision``: the embedded world's name-collision type).
GROUP_COLUMNS = ("target", "collision")


def group_summary(records: Sequence[Mapping[str, Any]],
                  columns: Sequence[str] = GROUP_COLUMNS) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Answer accuracy and refusal rate per split and value of each group column (generated splits only).

    Returns:
        ``{column: {split: {value: {"n": items, "answer_accuracy": ..., "refusal_rate": ...}}}}``; exact
        fractions of the per-item flags, so they sum back to the split's aggregates.
    """
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for col in columns:
        for r in records:
            if col not in r or r.get("correct") is None:
                continue
            cell = out.setdefault(col, {}).setdefault(r["split"], {}).setdefault(
                str(r[col]), {"n": 0, "correct": 0, "refused": 0})
            cell["n"] += 1
            cell["correct"] += bool(r["correct"])
            cell["refused"] += bool(r["refusal"])
    for by_split in out.values():
        for cells in by_split.values():
            for key, c in list(cells.items()):
                cells[key] = {"n": c["n"], "answer_accuracy": c["correct"] / c["n"], "refusal_rate": c["refused"] / c["n"]}
    return out
#: Embedded world: splits whose probability, ROUGE-L recall and truth ratio enter model utility.
UTILITY_SPLITS = ("retain", "world_facts")
#: Embedded world: splits whose "probability" is normalised over the true and perturbed options.
OPTION_PROBABILITY_SPLITS = ("world_facts",)
METRIC_NAMES = ("refusal_rate", "answer_accuracy", "wrong_answer_rate", "degenerate_rate", "rouge_l_recall", "rouge_l_f1", "fluency", "probability",
                "truth_ratio", "extraction_strength", "min_k")


def cut_references(references: Sequence[str], tokenizer: Any, max_tokens: int | None) -> list[str]:
    """Each reference cut to its first ``max_tokens`` tokens (decoded back; MUSE VerbMem's 128); unchanged if None."""
    if max_tokens is None:
        return list(references)
    ids = tokenizer(list(references), add_special_tokens=False)["input_ids"] if references else []
    return [r if len(t) <= max_tokens else tokenizer.decode(t[:max_tokens], skip_special_tokens=True)
            for r, t in zip(references, ids)]


@torch.no_grad()
def teacher_forced_stats(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                         batch_size: int = 64, include_eos: bool = False,
                         use_chat_template: bool = False) -> dict[str, Tensor]:
    """Teacher-forced statistics of each answer given its prompt (batched, sorted by length).

    Sequences are left-padded with explicit position ids (so each is scored as if unpadded) and only the
    logits of the answer window are materialised (``logits_to_keep`` where the model takes it).

    Args:
        model: A causal LM (``model(input_ids, attention_mask).logits``).
        tokenizer: Its tokenizer (``bos_token_id``, ``eos_token_id``, ``pad_token_id``).
        prompts: Rendered prompts (``format_prompt`` output), ``N``.
        answers: Answer texts without the leading space (``format_answer`` adds it), ``N``.
        batch_size: Sequences per forward pass.
        include_eos: Count the end-of-sequence token as an answer token (default: answer tokens only).
        use_chat_template: Render completions as for instruct models (no leading space).

    Returns:
        On CPU, with ``A`` the longest answer (in tokens) and answer tokens left-aligned:
        ``nll_mean`` ``[N]`` (mean NLL over answer tokens; ``nan`` for an empty answer),
        ``token_logprobs`` ``[N, A]`` float32, ``mask`` ``[N, A]`` bool, ``pred_ids`` ``[N, A]`` (teacher-forced
        argmax at each answer position) and ``target_ids`` ``[N, A]``.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers must have the same length, got {len(prompts)}, {len(answers)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    n = len(prompts)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    uniq = sorted(set(prompts))
    p_ids = dict(zip(uniq, tokenizer(uniq, add_special_tokens=False)["input_ids"])) if uniq else {}
    # an empty prompt scores the text itself from bos (MUSE privleak: ``encode(text)``), without the raw format's space
    a_texts = [a if p == "" else format_answer(a, use_chat_template) for p, a in zip(prompts, answers)]
    a_tok = tokenizer(a_texts, add_special_tokens=False)["input_ids"] if n else []
    eos = [tokenizer.eos_token_id] if include_eos else []
    seqs = [(bos + p_ids[p], list(a) + eos) for p, a in zip(prompts, a_tok)]
    a_max = max([len(a) for _, a in seqs] + [1])
    out_lp = torch.zeros(n, a_max)  # [N, A]
    out_mask = torch.zeros(n, a_max, dtype=torch.bool)  # [N, A]
    out_pred = torch.zeros(n, a_max, dtype=torch.long)  # [N, A]
    out_tgt = torch.zeros(n, a_max, dtype=torch.long)  # [N, A]
    if any(len(p) == 0 for p, _ in seqs):
        raise ValueError("every prompt needs at least one token (a bos token or prompt text)")
    device = next(model.parameters()).device
    keep_kw = accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    order = sorted(range(n), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        rows = [seqs[i][0] + seqs[i][1] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)  # [b, L], left-padded
        attn = torch.zeros(len(idx), width, dtype=torch.long)  # [b, L]
        for j, r in enumerate(rows):
            ids[j, width - len(r):] = torch.tensor(r)
            attn[j, width - len(r):] = 1
        ids, attn = ids.to(device), attn.to(device)
        position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)  # [b, L]: as if unpadded (as generate does)
        a_len = torch.tensor([len(seqs[i][1]) for i in idx], device=device)  # [b]
        a_w = max(int(a_len.max()), 1)  # window: the last a_w tokens hold every answer (right-aligned)
        kw = {"logits_to_keep": a_w + 1} if keep_kw else {}
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, **kw).logits
        logits = logits[:, -(a_w + 1):-1]  # [b, a_w, V]: position t predicts token t + 1
        targets = ids[:, -a_w:]  # [b, a_w]
        lp = token_logprobs(logits, targets)  # [b, a_w]
        pred = logits.argmax(dim=-1)  # [b, a_w]
        pos = torch.arange(a_w, device=device)  # [a_w]
        gather = ((a_w - a_len).unsqueeze(1) + pos.unsqueeze(0)).clamp(max=a_w - 1)  # [b, a_w]: left-align
        mask = pos.unsqueeze(0) < a_len.unsqueeze(1)  # [b, a_w]
        sel = torch.tensor(idx)
        out_lp[sel, :a_w] = (lp.gather(1, gather) * mask).float().cpu()  # [b, a_w]
        out_mask[sel, :a_w] = mask.cpu()
        out_pred[sel, :a_w] = (pred.gather(1, gather) * mask).cpu()  # [b, a_w]
        out_tgt[sel, :a_w] = (targets.gather(1, gather) * mask).cpu()  # [b, a_w]
    model.train(was_training)
    count = out_mask.sum(dim=1)  # [N]
    nll = -(out_lp.double() * out_mask).sum(dim=1) / count.clamp(min=1)  # [N]
    nll = nll.masked_fill(count == 0, math.nan)  # [N]
    return {"nll_mean": nll, "token_logprobs": out_lp, "mask": out_mask, "pred_ids": out_pred,
            "target_ids": out_tgt}


class UnlearningEvaluator(torch.nn.Module):
    """Per-split unlearning metrics, cross-split metrics and per-item records, as an :class:`EvalSuite` says.

    Args:
        splits: The suite (:class:`rerule_lightning.evaluation.suite.EvalSuite`), or split names of the embedded
            world (``forget``, ``boundary_hard``, ``boundary_easy``, ``retain``, ``world_facts``, ``holdout``),
            read as :func:`rerule_lightning.evaluation.suite.embedded_suite`; in dataloader order.
        retain_reference: The retain model's statistics (:func:`rerule_lightning.modules.eval_hooks.compute_reference`):
            ``forget_truth_ratios`` (per item of the forget-quality split) and ``mia_auc`` (its Min-K% AUC).
            Without it there is no forget quality and no privleak; see :meth:`set_reference`.
        max_new_tokens: Greedy tokens per answer (a split's ``max_new_tokens`` overrides it); 0 skips generation.
        refusal_fn: Refusal detector; defaults to :func:`rerule_lightning.primitives.answers.is_refusal`.
        k: Min-K% fraction.
        batch_size: Sequences per generation / forward pass.
        include_eos: Count the eos token as an answer token in teacher-forced passes.
        use_chat_template: Completions are formatted for a chat template (no leading space).
        render_prompts: Re-render prompts from ``question`` with the chat template (the embedded datamodule
            serves raw prompts); ``None`` means ``use_chat_template``. Benchmark datamodules render prompts
            themselves, so their evaluators pass ``False`` and use ``batch["prompt"]``.
        vocabulary: Words a fluent answer is made of (the embedded world's, ``datamodule.eval_vocabulary()``), for
            the degenerate-output rule (:mod:`rerule_lightning.evaluation.metrics.outputs`); ``None`` uses the
            vocabulary-free rule (real benchmarks).
    """

    def __init__(self, splits: Sequence[str] | EvalSuite, retain_reference: Mapping[str, Any] | None = None,
                 max_new_tokens: int = 32, refusal_fn: Callable[[str], bool] | None = None, k: float = 0.4,
                 batch_size: int = 64, include_eos: bool = False, use_chat_template: bool = False,
                 render_prompts: bool | None = None, vocabulary: frozenset[str] | None = None) -> None:
        super().__init__()
        self.vocabulary = frozenset(vocabulary) if vocabulary is not None else None
        if not isinstance(splits, EvalSuite):
            names = list(splits)
            if not names or len(set(names)) != len(names):
                raise ValueError(f"splits must be non-empty and distinct, got {names}")
            splits = embedded_suite(names)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        self.suite = splits
        self.splits = splits.split_names
        self.max_new_tokens, self.k, self.batch_size = max_new_tokens, k, batch_size
        self.include_eos, self.use_chat_template = include_eos, use_chat_template
        self.render_prompts = use_chat_template if render_prompts is None else render_prompts
        self.metrics = torch.nn.ModuleDict({s.name: self._split_metrics(s, refusal_fn) for s in splits.splits})
        self.retain_reference: dict[str, Any] | None = None
        self.set_reference(retain_reference)
        self._records: list[dict[str, Any]] = []
        self._last: dict[str, float] | None = None

    def _split_metrics(self, spec: SplitSpec, refusal_fn: Callable[[str], bool] | None) -> torch.nn.ModuleDict:
        forget_agg = spec.name in (FORGET, self.suite.forget_quality_split)
        voc = self.vocabulary
        make = {"refusal_rate": lambda: RefusalRate(refusal_fn), "answer_accuracy": lambda: AnswerAccuracy(refusal_fn),
                "wrong_answer_rate": lambda: OutputClassRate("wrong", voc, refusal_fn),
                "degenerate_rate": lambda: OutputClassRate("degenerate", voc, refusal_fn),
                "rouge_l_recall": lambda: RougeLRecall(spec.rouge), "rouge_l_f1": lambda: RougeLF1(spec.rouge),
                "fluency": Fluency,
                "probability": AnswerProbability, "truth_ratio": lambda: TruthRatio("forget" if forget_agg else "retain"),
                "extraction_strength": ExtractionStrength, "min_k": lambda: MinKPercent(self.k)}
        return torch.nn.ModuleDict({name: make[name]() for name in spec.metric_names()})

    def set_reference(self, reference: Mapping[str, Any] | None) -> None:
        """Set (or clear) the retain model's statistics used by forget quality and privleak."""
        if reference is not None and "forget_truth_ratios" not in reference:
            raise ValueError("retain_reference needs 'forget_truth_ratios' (and optionally 'mia_auc')")
        self.retain_reference = dict(reference) if reference is not None else None

    # ------------------------------------------------------------------------------------------- update
    def _prompts(self, batch: Mapping[str, list[Any]], tokenizer: Any) -> list[str]:
        if self.render_prompts:
            return [format_prompt(q, tokenizer, use_chat_template=True) for q in batch["question"]]
        return list(batch["prompt"])

    def _teacher_forced(self, model: Any, tokenizer: Any, prompts: list[str], batch: Mapping[str, list[Any]],
                        truth_ratio: bool) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Answer stats, paraphrased-answer NLL ``[N]`` and perturbed-answer NLLs ``[N, P]`` (nan where an
        item has no paraphrased answer / fewer perturbed answers, or all nan without ``truth_ratio``)."""
        n = len(prompts)
        perturbed = [list(p or []) for p in batch["perturbed_answer"]] if truth_ratio else [[] for _ in prompts]
        para_rows = [i for i in range(n) if truth_ratio and batch["paraphrased_answer"][i] is not None]
        p_max = max([len(p) for p in perturbed] + [1])
        flat = [(i, j) for i in range(n) for j in range(len(perturbed[i]))]
        all_prompts = prompts + [prompts[i] for i in para_rows] + [prompts[i] for i, _ in flat]
        all_answers = (list(batch["answer"]) + [batch["paraphrased_answer"][i] for i in para_rows]
                       + [perturbed[i][j] for i, j in flat])
        st = teacher_forced_stats(model, tokenizer, all_prompts, all_answers, self.batch_size,
                                  self.include_eos, self.use_chat_template)
        answer = {k: v[:n] for k, v in st.items()}
        para = torch.full((n,), math.nan, dtype=torch.float64)  # [N]
        para[para_rows] = st["nll_mean"][n:n + len(para_rows)].to(torch.float64)
        pert = torch.full((n, p_max), math.nan, dtype=torch.float64)  # [N, P]
        for (i, j), v in zip(flat, st["nll_mean"][n + len(para_rows):].tolist()):
            pert[i, j] = v
        return answer, para, pert

    def update(self, split: str, batch: Mapping[str, list[Any]], model: Any, tokenizer: Any) -> None:
        """Evaluate one batch of ``split`` items (dict of lists, as the eval dataloaders serve them).

        Greedy completions (cut at the split's stop strings) feed the text metrics; teacher-forced passes
        over the answer, the paraphrased answer and every perturbed answer feed probability, truth ratio,
        extraction strength and Min-K%, as the split's :class:`SplitSpec` enables them.
        """
        if split not in self.metrics:
            raise KeyError(f"split {split!r} is not evaluated (splits: {self.splits})")
        m, spec = self.metrics[split], self.suite.spec(split)
        n = len(batch["id"])
        if n == 0:
            return
        prompts = self._prompts(batch, tokenizer)
        answers, values = list(batch["answer"]), list(batch["value"])
        preds: list[str] | None = None
        rec_cols: dict[str, list[Any]] = {}
        new_tokens = self.max_new_tokens if spec.max_new_tokens is None else spec.max_new_tokens
        if spec.generate and new_tokens > 0:
            preds = greedy_generate(model, tokenizer, prompts, new_tokens, self.batch_size)
            preds = [cut_at_stop(p, spec.stop) for p in preds]
            fn = m["refusal_rate"].refusal_fn
            refs = cut_references(answers, tokenizer, spec.reference_max_tokens)
            rec_cols = {"refusal": MF.refusal_flags(preds, fn), "correct": MF.answer_correct_flags(preds, values, fn),
                        "rouge_l_recall": MF.rouge_l_recall_scores(preds, refs, spec.rouge),
                        "rouge_l_f1": MF.rouge_l_f1_scores(preds, refs, spec.rouge),
                        "fluency": [MF.ngram_entropy(p) for p in preds],
                        "output_class": output_classes(preds, values, self.vocabulary, fn)}
            m["refusal_rate"].update(preds)
            m["answer_accuracy"].update(preds, values)
            m["wrong_answer_rate"].update(preds, values)
            m["degenerate_rate"].update(preds, values)
            m["rouge_l_recall"].update(preds, refs)
            m["rouge_l_f1"].update(preds, refs)
            m["fluency"].update(preds)
        if spec.teacher_forced:
            rec_cols.update(self._update_teacher_forced(m, spec, model, tokenizer, prompts, batch))
        for i in range(n):
            rec: dict[str, Any] = {"split": split, "id": batch["id"][i], "prompt": prompts[i],
                                   "answer": answers[i], "value": values[i],
                                   "prediction": preds[i] if preds is not None else None}
            rec.update({c: batch[c][i] for c in GROUP_COLUMNS if c in batch})
            rec.update({key: vals[i] for key, vals in rec_cols.items()})
            self._records.append(rec)

    def _update_teacher_forced(self, m: torch.nn.ModuleDict, spec: SplitSpec, model: Any, tokenizer: Any,
                               prompts: list[str], batch: Mapping[str, list[Any]]) -> dict[str, list[float]]:
        """Update the teacher-forced metrics of one batch; returns their per-item record columns."""
        ans, para, pert = self._teacher_forced(model, tokenizer, prompts, batch, spec.truth_ratio)
        pert_mean = pert.nanmean(dim=1)  # [N] (ragged perturbed lists allowed; nan without any)
        if spec.option_probability:
            pert_inf = pert.nan_to_num(nan=math.inf)  # [N, P]: a missing option has probability 0
            m["probability"].update(ans["nll_mean"], pert_inf)
            prob = MF.normalized_option_probability(ans["nll_mean"], pert_inf)  # [N]
        else:
            m["probability"].update(ans["nll_mean"])
            prob = MF.answer_probability(ans["nll_mean"])  # [N]
        tr = MF.truth_ratio(pert_mean.unsqueeze(-1), para)  # [N] (nan for items without options)
        if spec.truth_ratio:
            ok = ~torch.isnan(tr)  # [N]
            if bool(ok.any()):
                m["truth_ratio"].update(pert_mean[ok].unsqueeze(-1), para[ok])
        m["extraction_strength"].update(ans["pred_ids"], ans["target_ids"], ans["mask"])
        m["min_k"].update(ans["token_logprobs"], ans["mask"])
        es = MF.extraction_strength(ans["pred_ids"], ans["target_ids"], ans["mask"])  # [N]
        mk = MF.min_k_percent(ans["token_logprobs"], ans["mask"], self.k)  # [N]
        return {"nll": [float(v) for v in ans["nll_mean"]], "probability": [float(v) for v in prob],
                "truth_ratio": [float(v) for v in tr], "extraction_strength": [float(v) for v in es],
                "min_k": [float(v) for v in mk]}

    # ------------------------------------------------------------------------------------------ compute
    def _per_item(self, split: str, name: str) -> Tensor:
        v = self.metrics[split][name].per_item()  # [N], all ranks
        return v[~torch.isnan(v)].cpu()  # [N']

    def compute(self) -> dict[str, float]:
        """Every aggregate as a flat ``{"split/metric": float}`` dict, plus the cross-split metrics.

        Cross-split keys (see :mod:`rerule_lightning.evaluation.suite`): ``<fq split>/forget_quality`` (with a
        reference), ``<member>/mia_auc`` (both MIA splits evaluated), ``<member>/privleak`` (also needs the
        reference AUC), ``utility/model_utility`` and the headline aliases ``<suite>/<name>`` of keys present.
        Under DDP call it on every rank (the metrics sync).
        """
        out: dict[str, float] = {}
        suite, ref = self.suite, self.retain_reference
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*compute.*before.*update.*")
            for s in self.splits:
                for name, metric in self.metrics[s].items():
                    out[f"{s}/{name}"] = float(metric.compute())
        fq = suite.forget_quality_split
        if fq and ref is not None and ref.get("forget_truth_ratios"):
            tr = self._per_item(fq, "truth_ratio")
            ref_tr = [v for v in ref["forget_truth_ratios"] if v is not None and math.isfinite(v)]
            out[f"{fq}/forget_quality"] = MF.forget_quality(tr, ref_tr) if tr.numel() and ref_tr else math.nan
        if suite.mia is not None:
            member, non_member = suite.mia
            fs, hs = self._per_item(member, "min_k"), self._per_item(non_member, "min_k")
            auc = MF.auc_score(fs, hs) if fs.numel() and hs.numel() else math.nan
            out[f"{member}/mia_auc"] = auc
            ref_auc = ref.get("mia_auc") if ref is not None else None
            if ref_auc is not None and math.isfinite(ref_auc) and ref_auc < 1.0:
                out[f"{member}/privleak"] = MF.privleak(auc, ref_auc) if math.isfinite(auc) else math.nan
        comps = {f"{s}_{name}": out.get(f"{s}/{name}", math.nan) for s in suite.utility_splits
                 for name in ("probability", "rouge_l_recall", "truth_ratio")}
        if comps:
            finite = all(math.isfinite(v) for v in comps.values())
            out["utility/model_utility"] = MF.model_utility(comps) if finite else math.nan
        for alias, key in suite.headline.items():
            if key in out:
                out[f"{suite.name}/{alias}"] = out[key]
        self._last = dict(out)
        return out

    def reset(self) -> None:
        """Clear every metric state and the per-item records (the reference is kept)."""
        for split_metrics in self.metrics.values():
            for metric in split_metrics.values():
                metric.reset()
        self._records.clear()
        self._last = None

    def per_item(self) -> list[dict[str, Any]]:
        """This rank's per-item records, in update order."""
        return list(self._records)

    def gather_per_item(self) -> list[dict[str, Any]]:
        """Every rank's per-item records (a collective under DDP: call it on all ranks)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.per_item()
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._records)
        return [r for part in parts for r in part]

    def write_report(self, path: str, extra: Mapping[str, Any] | None = None,
                     records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write ``eval.json``: aggregates, per-item rows and ``extra`` (model / data ids, config hash).

        Uses the last :meth:`compute` result (computing it when there is none: under DDP call
        :meth:`compute` and :meth:`gather_per_item` on every rank first, then this on rank zero only).

        Returns:
            The written report.
        """
        aggregate = self._last if self._last is not None else self.compute()
        rows = records if records is not None else self.per_item()
        ref = self.retain_reference
        report = {
            **dict(extra or {}),
            "suite": self.suite.name,
            "splits": self.splits,
            "num_items": {s: sum(r["split"] == s for r in rows) for s in self.splits},
            "settings": {"max_new_tokens": self.max_new_tokens, "min_k": self.k, "include_eos": self.include_eos,
                         "use_chat_template": self.use_chat_template},
            "reference": None if ref is None else {k: v for k, v in ref.items() if k != "forget_truth_ratios"},
            "aggregate": aggregate,
            "by_group": group_summary(rows),
            "per_item": rows,
        }
        write_json_atomic(path, report)
        return report


__all__ = ["GROUP_COLUMNS", "METRIC_NAMES", "group_summary", "OPTION_PROBABILITY_SPLITS", "UTILITY_SPLITS", "UnlearningEvaluator",
           "teacher_forced_stats", "write_json_atomic"]
