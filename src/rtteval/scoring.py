"""Scoring 4-choice questions.

Three ways, all batched and padding-safe:

* ``letter`` — the paper's prompt, byte for byte: the question, ``A. c1``
  ... ``D. c4``, ``Answer:`` (:func:`rtteval.data.types.mcq_prompt`, the
  formatter RTT's training texts also use); the choice is the argmax of the
  last-position logits restricted to the four letter tokens.  An MMLU-style
  ``preamble`` is available but off by default, because the paper has none.
* ``calibrated`` — the same, after subtracting each letter's mean logit over
  the question set (as the paper's code does), which removes a model's
  preference for one letter.
* ``likelihood`` — lm-evaluation-harness style: the summed log-probability
  of each choice as a continuation of a question-form prompt.  Models trained
  from scratch on a small world can answer this way long before they learn
  the letter format.

Which token "is" the letter is tokenizer-specific: for Llama-3, ``"A"`` and
``" A"`` are different tokens.  :func:`letter_token_ids` makes the convention
explicit (``letter_format``) and refuses a format whose letters collide.

Every forward pass passes an attention mask and position ids derived from
it, so scores do not depend on batch size or padding side.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from rtteval.data.types import LETTERS, MCQ, mcq_answer, mcq_prompt
from rtteval.errors import ConfigError, DataError

ScoringMode = Literal["letter", "calibrated", "likelihood"]

#: The likelihood prompt used by the synthetic world (and a sensible default).
DEFAULT_LIKELIHOOD_PROMPT = "Q: {question} A:"

#: Letter conventions: the paper takes the first token of "A. "; lm-eval uses " A".
LETTER_FORMATS = {"paper": "{letter}. ", "bare": "{letter}", "space": " {letter}"}


@dataclass
class ScoringConfig:
    """How questions are put to the model.  Plain data, stored with results."""

    mode: ScoringMode = "letter"
    letter_format: str = "paper"
    likelihood_prompt: str = DEFAULT_LIKELIHOOD_PROMPT
    preamble: str = ""
    n_shots: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(ge=1)] = 32
    padding_side: Literal["left", "right"] = "left"
    dev: list[MCQ] = field(default_factory=list, repr=False)


@dataclass
class EvalResult:
    """Accuracy plus the per-question detail needed for bootstrap CIs."""

    accuracy: float
    correct: list[bool]
    scores: torch.Tensor  # [N, n_choices]
    predictions: list[int]

    @property
    def n(self) -> int:
        return len(self.correct)


#: An optional MMLU-style first line (``ScoringConfig.preamble``); the paper uses none.
MMLU_PREAMBLE = "The following are multiple choice questions (with answers).\n\n"


def format_mcq(q: MCQ, *, with_answer: bool = False) -> str:
    """The paper's prompt: question, lettered choices, ``Answer:`` (optionally answered).

    Answered, it is RTT's ``mcq`` training text; unanswered, the scorer's
    prompt.  Both come from :mod:`rtteval.data.types`, the one formatter.
    """
    text = mcq_prompt(q.question, q.choices)
    return text + mcq_answer(q.choices, q.answer) if with_answer else text


def letter_prompt(q: MCQ, cfg: ScoringConfig) -> str:
    """Preamble (empty by default), ``n_shots`` answered dev questions, then the question.

    Shots end ``Answer: L.`` and are separated by a blank line, as the
    paper's ``make_k_shot`` writes them.
    """
    shots = "".join(format_mcq(d) + f" {LETTERS[d.answer]}.\n\n" for d in cfg.dev[: cfg.n_shots])
    return cfg.preamble + shots + format_mcq(q)


def letter_token_ids(
    tokenizer: PreTrainedTokenizerBase, n_choices: int = 4, letter_format: str = "paper"
) -> list[int]:
    """Token id of each letter under ``letter_format`` (a key of LETTER_FORMATS or a template).

    We take the first token of the formatted letter, as the paper does for
    ``"A. "``.  Distinct letters must give distinct tokens, or accuracy would
    be meaningless; that is checked here rather than discovered later.
    """
    template = LETTER_FORMATS.get(letter_format, letter_format)
    if "{letter}" not in template:
        raise ConfigError(
            f"letter_format {letter_format!r} must be one of {sorted(LETTER_FORMATS)} or contain '{{letter}}'"
        )
    ids = []
    for letter in LETTERS[:n_choices]:
        enc = tokenizer.encode(template.format(letter=letter), add_special_tokens=False)
        if not enc:
            raise ConfigError(
                f"letter_format {letter_format!r} encodes letter {letter} to no token"
            )
        ids.append(enc[0])
    if len(set(ids)) != len(ids) or (
        tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids
    ):
        raise ConfigError(
            f"letter_format {letter_format!r} does not give {n_choices} distinct known tokens: {ids}"
        )
    return ids


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one."""
    pos = mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def forward_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One padded forward pass; returns float32 logits."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    return out.logits.float()


#: ``model_max_length`` at or above this means "no limit" (transformers' placeholder is 1e30).
_NO_LIMIT = 10**8


def context_limit(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The model's maximum sequence length, which :func:`rtteval.models.load_model` records
    on its tokenizer (``model_max_length``); None when unknown."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < _NO_LIMIT else None


def check_context(
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    sources: Sequence[str | None] | None = None,
    *,
    what: str = "a question",
    texts: Sequence[str] | None = None,
    limit: int | None = None,
) -> None:
    """Refuse any sequence longer than the model's context, naming the longest one's file:line.

    The one length check of scoring and training (``rtteval.training.batching.encode_texts``
    calls it too).  Refused, not truncated: cutting a prompt drops the
    question or its choices, so its score would be another question's, and
    past the context a model's positions are untrained (or, for a long
    enough text, the attention matrix alone exhausts memory).  ``sources``
    are ``path:line`` strings as the dataset loader records them.
    """
    limit = limit if limit is not None else context_limit(tokenizer)
    if limit is None or not lengths:
        return
    i = max(range(len(lengths)), key=lambda j: lengths[j])
    if lengths[i] <= limit:
        return
    n_over = sum(1 for n in lengths if n > limit)
    src = sources[i] if sources is not None else None
    file, line = None, None
    if src:
        path, _, ln = str(src).rpartition(":")
        file, line = (path, int(ln)) if ln.isdigit() and path else (src, None)
    shown = f" ({texts[i][:60]!r}...)" if texts is not None and file is None else ""
    raise DataError(
        f"{what} is {lengths[i]} tokens{shown}, over the model's maximum context of {limit} "
        f"tokens ({n_over} such; the longest is named); shorten it or use a longer-context model",
        file=file,
        line=line,
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True, verbose=False)  # check_context says it


@torch.no_grad()
def score_letters(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQ],
    cfg: ScoringConfig,
) -> torch.Tensor:
    """Last-position logits of the letter tokens, shape [N, n_choices]."""
    n_choices = len(questions[0].choices)
    letter_ids = torch.tensor(letter_token_ids(tokenizer, n_choices, cfg.letter_format))
    encoded = [_encode(tokenizer, letter_prompt(q, cfg)) for q in questions]
    check_context(
        tokenizer, [len(e) for e in encoded], [q.source for q in questions], what="a question"
    )
    out = torch.empty((len(questions), n_choices))
    for start in range(0, len(encoded), cfg.batch_size):
        chunk = encoded[start : start + cfg.batch_size]
        ids, mask = _pad(chunk, tokenizer.pad_token_id, cfg.padding_side)
        logits = forward_logits(model, ids, mask)
        # pick the letters on the model's device: copying [B, L, vocab] float32 logits
        # to the CPU would cost ~4 GB per batch of 64 on a 128k-vocabulary model
        if cfg.padding_side == "left":
            last = logits[:, -1, :]
        else:
            lengths = mask.to(logits.device).sum(-1) - 1
            last = logits[torch.arange(len(chunk), device=logits.device), lengths, :]
        out[start : start + len(chunk)] = last[:, letter_ids.to(logits.device)].cpu()
    return out


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Tokens of ``context`` and of ``continuation`` as it follows the context.

    Encoding the whole string and splitting at the context's length keeps
    the tokenization a model sees in training text (lm-eval does the same);
    if the context's tokens are not a prefix of the whole, the two parts are
    encoded separately.
    """
    ctx = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation, add_special_tokens=False)


#: :func:`single_token_items` per tokenizer, then per (prompt, questions): RTT scores the same
#: questions after every epoch of every run, and tokenizing them each time cost about a tenth of
#: the attack on tiny-1m.
_ITEMS_MEMO: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict] = weakref.WeakKeyDictionary()


def single_token_items(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[MCQ], cfg: ScoringConfig
) -> tuple[list[list[int]], list[list[int]]] | None:
    """Prompt tokens and one token per choice, when every choice is a single token after its prompt.

    Then one forward pass per question gives every choice's log-probability
    (the world's years under a word-level tokenizer), instead of one pass per
    choice; ``None`` when any choice needs more than one token.  Memoized
    (the lists are shared: do not modify them).
    """
    memo = _ITEMS_MEMO.setdefault(tokenizer, {})
    key = (cfg.likelihood_prompt, tuple(questions))
    if key not in memo:
        if len(memo) >= 64:
            memo.clear()
        memo[key] = _single_token_items(tokenizer, questions, cfg.likelihood_prompt)
    return memo[key]


def _single_token_items(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[MCQ], template: str
) -> tuple[list[list[int]], list[list[int]]] | None:
    ctxs: list[list[int]] = []
    conts: list[list[int]] = []
    for q in questions:
        prompt = template.format(question=q.question)
        ctx0: list[int] | None = None
        ids = []
        for c in q.choices:
            ctx, cont = continuation_ids(tokenizer, prompt, " " + c)
            if len(cont) != 1 or (ctx0 is not None and ctx != ctx0):
                return None
            ctx0 = ctx
            ids.append(cont[0])
        ctxs.append(ctx0 or [])
        conts.append(ids)
    if len({len(c) for c in conts}) != 1:
        return None
    return ctxs, conts


@torch.no_grad()
def score_likelihood(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQ],
    cfg: ScoringConfig,
    *,
    allow_single_pass: bool = True,
) -> torch.Tensor:
    """Summed log-probability of each choice after the question-form prompt, [N, n_choices].

    ``allow_single_pass`` uses :func:`single_token_items` when it applies;
    the numbers are the same as the general path's (tested).
    """
    fast = single_token_items(tokenizer, questions, cfg) if allow_single_pass else None
    if fast is not None:
        ctxs, conts = fast
        check_context(tokenizer, [len(c) + 1 for c in ctxs], [q.source for q in questions])
        out = torch.empty((len(questions), len(conts[0])))
        bs = cfg.batch_size * len(conts[0])
        for start in range(0, len(ctxs), bs):
            chunk = ctxs[start : start + bs]
            ids, mask = _pad(chunk, tokenizer.pad_token_id, cfg.padding_side)
            logits = forward_logits(model, ids, mask).cpu()
            last = (
                logits[:, -1, :]
                if cfg.padding_side == "left"
                else logits[torch.arange(len(chunk)), mask.sum(-1) - 1, :]
            )
            logp = torch.log_softmax(last, dim=-1)
            out[start : start + len(chunk)] = logp.gather(
                1, torch.tensor(conts[start : start + bs])
            )
        return out
    items: list[tuple[list[int], int]] = []  # (full sequence, continuation length)
    longest: list[int] = []  # per question, its longest choice's sequence
    for q in questions:
        prompt = cfg.likelihood_prompt.format(question=q.question)
        for c in q.choices:
            ctx, cont = continuation_ids(tokenizer, prompt, " " + c)
            items.append((ctx + cont, len(cont)))
        longest.append(max(len(s) for s, _ in items[-len(q.choices) :]))
    check_context(tokenizer, longest, [q.source for q in questions])
    flat = torch.empty(len(items))
    bs = cfg.batch_size * len(questions[0].choices)
    for start in range(0, len(items), bs):
        chunk = items[start : start + bs]
        seqs = [s for s, _ in chunk]
        ids, mask = _pad(seqs, tokenizer.pad_token_id, cfg.padding_side)
        logp = torch.log_softmax(forward_logits(model, ids, mask), dim=-1).cpu()
        width = ids.shape[1]
        for j, (seq, n_cont) in enumerate(chunk):
            offset = width - len(seq) if cfg.padding_side == "left" else 0
            # token at position p is predicted by logits at p-1
            pos = torch.arange(len(seq) - n_cont, len(seq)) + offset
            flat[start + j] = logp[j, pos - 1, ids[j, pos]].sum()
    return flat.view(len(questions), -1)


def calibrate(scores: torch.Tensor) -> torch.Tensor:
    """Subtract each choice position's mean score over the set (the paper's calibration)."""
    return scores - scores.mean(dim=0, keepdim=True)


def evaluate_mcq(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQ],
    cfg: ScoringConfig | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on ``questions`` under ``cfg.mode``."""
    cfg = cfg or ScoringConfig()
    if not questions:
        raise ValueError("evaluate_mcq needs at least one question")
    was_training = model.training
    model.eval()
    try:
        if cfg.mode == "likelihood":
            scores = score_likelihood(model, tokenizer, questions, cfg)
        elif cfg.mode in ("letter", "calibrated"):
            scores = score_letters(model, tokenizer, questions, cfg)
            if cfg.mode == "calibrated":
                scores = calibrate(scores)
        else:
            raise ConfigError(
                f"unknown scoring mode {cfg.mode!r}; use letter, calibrated or likelihood"
            )
    finally:
        model.train(was_training)
    preds = scores.argmax(dim=-1).tolist()
    correct = [p == q.answer for p, q in zip(preds, questions, strict=True)]
    return EvalResult(
        accuracy=sum(correct) / len(correct), correct=correct, scores=scores, predictions=preds
    )
