"""A word-level tokenizer trained locally on a world's text.

Tiny models learn facts far faster when every year and every name word is a
single token, and a word-level vocabulary makes that true by construction.
The result is a ``PreTrainedTokenizerFast`` saved with ``save_pretrained`` so
that ``AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

#: Words every rtteval tokenizer knows, so that the paper's letter prompt
#: ("... A. 1965 ... Answer:") never maps to <unk> even if the world's own
#: text never contains them.
PROMPT_WORDS = ["A", "B", "C", "D", "Answer", "Q", ":", ".", "?", "\n"]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on whitespace, then isolate punctuation: "1965." -> "1965", "."
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def train_word_tokenizer(
    texts: Iterable[str],
    *,
    min_frequency: int = 1,
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer; every sequence is prefixed with ``<s>``.

    ``min_frequency=1`` because a fact mentioned once must still be
    tokenizable: an ``<unk>`` in place of a name would make facts about
    different people indistinguishable.
    """
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(
        special_tokens=[PAD, UNK, BOS, EOS], min_frequency=min_frequency, show_progress=False
    )
    words = list(texts) + [" ".join(PROMPT_WORDS)]
    tok.train_from_iterator(words, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
    )
