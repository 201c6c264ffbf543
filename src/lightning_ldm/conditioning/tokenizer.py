"""A WordPiece caption tokenizer trained on the dataset's own captions.

LDM's text-to-image model tokenizes with BERT's uncased WordPiece vocabulary (``BERTTokenizer`` in
``ldm/modules/encoders/modules.py``). Training from scratch, the same recipe is learned from the training
captions instead of downloaded: BERT's normaliser (NFD, lowercase, strip accents), whitespace and punctuation
pre-tokenisation, and every caption wrapped as ``[CLS] ... [SEP]``.

Ids come out at one fixed length with a boolean mask, so the text encoder's shapes never change (torch.compile
and CUDA graphs see one shape). The whole tokenizer serialises to one string (``to_str``) that is stored in
checkpoints and exports, so a checkpoint alone can tokenize prompts.
"""

import hashlib
import heapq
import json
import warnings
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm.auto import tqdm

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # the vocabulary's first ids: [PAD] is 0, as in BERT
FORMAT = "lightning_ldm.caption_tokenizer/1"
PREFIX = "##"  # WordPiece's mark of a piece that continues a word


class CaptionTokenizer:
    def __init__(self, tokenizer: Tokenizer, *, length: int) -> None:
        if length < 2:
            raise ValueError(f"a caption length must leave room for [CLS] and [SEP], got {length}")
        self._tokenizer = tokenizer
        # A caption that contains "[PAD]" or "[SEP]" as text is tokenized as text: only the template and the
        # padding place special tokens. The library does not serialise this switch, so it is set here.
        self._tokenizer.encode_special_tokens = True
        self.length = int(length)
        self.pad_id = self._id("[PAD]")
        self.cls_id = self._id("[CLS]")
        self.sep_id = self._id("[SEP]")
        self._warned_truncation = False
        self._text = None  # the serialisation, computed once: it is hashed for every fingerprint

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token} token")
        return token_id

    # ----------------------------------------------------------------------------------------- building

    @classmethod
    def train(cls, captions: Iterable[str], *, vocab_size: int, length: int,
              progress: bool = True) -> "CaptionTokenizer":
        """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens from ``captions`` (BERT's recipe).

        ``vocab_size`` bounds the merges; the alphabet of the captions is always kept whole, so a tiny
        ``vocab_size`` on a varied corpus can give a few more tokens (``vocab_size`` says how many there are).
        The same captions always give the same vocabulary, in any process (see ``learn_vocabulary``)."""
        normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, then every punctuation mark alone
        words: Counter = Counter()
        for caption in tqdm(captions, desc="tokenizer: reading captions", unit=" captions", disable=not progress,
                            leave=False):
            words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(caption))))
        vocab = learn_vocabulary(words, vocab_size=vocab_size, progress=progress)
        tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # marked special: decode leaves them out
        tokenizer.decoder = decoders.WordPiece(prefix=PREFIX)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
        return cls(tokenizer, length=length)

    def to_str(self) -> str:
        """The library's JSON serialisation together with the fixed length, as one JSON string."""
        if self._text is None:
            self._text = json.dumps({"format": FORMAT, "length": self.length,
                                     "tokenizer": json.loads(self._tokenizer.to_str())}, sort_keys=True)
        return self._text

    @classmethod
    def from_str(cls, text: str) -> "CaptionTokenizer":
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a serialised caption tokenizer: {error}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a serialised caption tokenizer (expected format {FORMAT!r})")
        return cls(Tokenizer.from_str(json.dumps(state["tokenizer"])), length=state["length"])

    # ---------------------------------------------------------------------------------------- identity

    @property
    def fingerprint(self) -> str:
        """A short hash of the serialisation: two tokenizers with the same fingerprint give the same ids."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, length={self.length}, fingerprint={self.fingerprint})"

    # ---------------------------------------------------------------------------------------- encoding

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, length) and the mask of real tokens (B, length; False at padding).

        Every row starts with [CLS] and ends its tokens with [SEP]; a caption longer than ``length`` is cut
        before its [SEP], which is kept, so the encoder always sees a closed sequence."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of captions, not one string")
        encodings = self._tokenizer.encode_batch([str(t) for t in texts])
        ids = torch.full((len(encodings), self.length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), self.length), dtype=torch.bool)
        longest = 0
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            longest = max(longest, len(tokens))
            if len(tokens) > self.length:
                tokens = tokens[: self.length - 1] + [self.sep_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = True
        if longest > self.length:
            self._warn_truncation(longest)
        return ids, mask

    def _warn_truncation(self, longest: int) -> None:
        if self._warned_truncation:
            return
        self._warned_truncation = True
        warnings.warn(f"a caption has {longest} tokens ([CLS] and [SEP] included), more than the caption length "
                      f"{self.length}: captions are cut to {self.length} tokens (raise the text embedder's length "
                      f"to keep them whole; this is said once)", stacklevel=3)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Captions from ids (B, L), special tokens and padding left out: the normalised text."""
        return self._tokenizer.decode_batch([list(map(int, row)) for row in ids], skip_special_tokens=True)


def learn_vocabulary(words: Mapping[str, int], *, vocab_size: int, progress: bool = False) -> list[str]:
    """WordPiece's vocabulary by frequency-ranked merges, as the ``tokenizers`` WordPieceTrainer learns it:
    the special tokens, every character (pieces after a word's first character carry ``##``), then the merged
    pair with the highest count, repeatedly, until ``vocab_size`` tokens or no pair is left.

    The library's trainer breaks ties between equally frequent pairs by hash-map order, which changes from one
    process to the next: two ranks of one run would learn different ids. Here a tie goes to the pair that sorts
    first, so the vocabulary is a function of the captions alone."""
    ordered = sorted(w for w in words if w)
    counts = [words[w] for w in ordered]
    pieces = [[w[0]] + [PREFIX + c for c in w[1:]] for w in ordered]
    vocab = list(SPECIAL_TOKENS) + sorted({p for word in pieces for p in word} - set(SPECIAL_TOKENS))
    known = set(vocab)

    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)  # the words that hold a pair
    for index, word in enumerate(pieces):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[index]
            where[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    bar = tqdm(total=max(0, vocab_size - len(vocab)), desc="tokenizer: merging", disable=not progress, leave=False)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # an outdated entry: the pair's count changed after it was pushed
        first, second = pair
        merged = first + second[len(PREFIX):] if second.startswith(PREFIX) else first + second
        if merged not in known:  # one string can come from two different splits
            known.add(merged)
            vocab.append(merged)
            bar.update()
        touched = set()
        for index in sorted(where.pop(pair, ())):
            word, count = pieces[index], counts[index]
            for old in zip(word, word[1:]):
                pair_counts[old] -= count
                where[old].discard(index)
                touched.add(old)
            joined, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    joined.append(merged)
                    i += 2
                else:
                    joined.append(word[i])
                    i += 1
            pieces[index] = joined
            for new in zip(joined, joined[1:]):
                pair_counts[new] += count
                where[new].add(index)
                touched.add(new)
        for changed in touched:
            if pair_counts[changed] > 0:
                heapq.heappush(heap, (-pair_counts[changed], changed))
    bar.close()
    return vocab
