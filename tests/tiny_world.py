"""An on-disk world for end-to-end LoRA-SAE training tests, built offline in a few seconds.

``build_world(root)`` writes:
- ``root/model``: a 4-layer Llama (hidden 32, init std 0.1, lm_head scaled x3 so next-token
  distributions are peaked) with a word-level tokenizer over 96 made-up words, saved with
  ``save_pretrained`` so ``lorasae.models.load_model(path)`` loads it (AutoTokenizer +
  AutoModelForCausalLM);
- ``root/corpus``: 256 documents of 30 words sampled from that model after BOS, one ``.txt`` file
  each, exactly 16 of them in the held-out split. At ``--ctx 32`` every packed sequence is
  ``[BOS] document [EOS]``, i.e. text the clean model itself generated, so splicing an SAE opens a
  clear positive CE gap (``gap_closed`` is defined) and the adapter has something to close;
- ``root/sae1``, ``root/sae2``: sae-lens TopK SAEs (d_sae 64, k 8, random weights) on
  ``blocks.{1,2}.hook_resid_post``, saved with ``sae.save_model``.
Everything is seeded, and the split is forced, so numbers do not depend on where ``root`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorasae.data import split_of

CTX = 32  # the context length the tests train with: each packed sequence is [BOS] doc [EOS]
N_LAYERS = 4
D_MODEL = 32
SAE_LAYERS = (1, 2)
LOGIT_SCALE = 3.0  # lm_head scale: peaked next-token distributions, low-entropy samples
SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = [a + b + c for a in "bdklmst" for b in "aeiou" for c in "nrx"][:96]


@dataclass(frozen=True)
class World:
    root: Path
    model: Path
    corpus: Path
    sae1: Path
    sae2: Path


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@torch.no_grad()
def _sample_docs(model, n_docs: int, length: int, bos: int) -> list[str]:
    """``n_docs`` documents of ``length`` words sampled from ``model`` after BOS (temperature 1,
    special tokens never sampled)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((n_docs, 1), bos, dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    picks = []
    for _ in range(length):
        logits = out.logits[:, -1].float()
        logits[:, :len(SPECIALS)] = float("-inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        picks.append(nxt)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    rows = (torch.cat(picks, 1) - len(SPECIALS)).tolist()
    return [" ".join(WORDS[i] for i in row) for row in rows]


def _write_corpus(directory: Path, docs: list[str], n_heldout: int) -> None:
    """One file per document, named so that exactly the first ``n_heldout`` documents fall in the
    held-out split (lorasae hashes a document's path to split), wherever ``directory`` is."""
    directory.mkdir(parents=True, exist_ok=True)
    for d, text in enumerate(docs):
        want = "heldout" if d < n_heldout else "train"
        salt = 0
        while split_of(f"doc{d:03d}-{salt}.txt") != want:
            salt += 1
        (directory / f"doc{d:03d}-{salt}.txt").write_text(text)


def save_topk_sae(path: Path, layer: int, seed: int) -> None:
    """A TopK SAE with random weights (not trained: splicing it hurts, which is what we need)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=2 * D_MODEL, k=8,
                                metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sae.save_model(str(path))


def build_world(root: Path, n_docs: int = 256, n_heldout: int = 16) -> World:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=64,
                      num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=0.1,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen next-token distributions: low-entropy samples, clear CE gaps
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    docs = _sample_docs(model, n_docs, CTX - 2, tokenizer.bos_token_id)
    _write_corpus(root / "corpus", docs, n_heldout)
    for layer in SAE_LAYERS:
        save_topk_sae(root / f"sae{layer}", layer, seed=layer)
    return World(root=root, model=root / "model", corpus=root / "corpus", sae1=root / "sae1",
                 sae2=root / "sae2")
