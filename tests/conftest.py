"""Shared fixtures: tiny random causal LMs (built from configs, no hub) and tiny sae-lens SAEs.

Everything here runs on CPU in milliseconds; no network, no downloads.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lorasae.models import decoder_layers
from lorasae.saes import LoadedSAE, hook_layer

VOCAB = 256
D_MODEL = 32
N_LAYERS = 4  # Llama / Gemma2; GPT-2 gets 3
BATCH, SEQ = 2, 10
ARCHS = ("llama", "gemma2", "gpt2")


def _config(arch: str):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    # initializer_range larger than the default 0.02 so next-token distributions are not flat and
    # splicing a random SAE moves the logits by a visible amount.
    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=64, initializer_range=0.1,
                           bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if arch == "gemma2":
        return Gemma2Config(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                            max_position_embeddings=64, initializer_range=0.1,
                            bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=3, n_head=4, n_positions=64,
                          initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    raise ValueError(arch)


def build_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random causal LM of ``arch`` in eval mode, frozen."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def make_topk_sae(d_in: int = D_MODEL, d_sae: int = 4 * D_MODEL, k: int = 8,
                  hook_name: str = "blocks.1.hook_resid_post", seed: int = 1,
                  enc_bias: float = 0.0) -> nn.Module:
    """A sae-lens TopK SAE with random weights scaled so its latents fire on residual activations."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k,
                                metadata=SAEMetadata(hook_name=hook_name)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) * 0.3)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) * 0.3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1 + enc_bias)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
    sae.eval()
    sae.requires_grad_(False)
    return sae


def make_identity_sae(d_in: int = D_MODEL, hook_name: str = "blocks.1.hook_resid_post") -> nn.Module:
    """A sae-lens StandardSAE (ReLU) with ``decode(encode(x)) == x`` exactly.

    ``d_sae = 2 d_in``, ``W_enc = [I, -I]``, ``W_dec = [I; -I]``, biases 0:
    ``relu(x) - relu(-x) = x``.
    """
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in,
                                        metadata=SAEMetadata(hook_name=hook_name)))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.eval()
    sae.requires_grad_(False)
    return sae


def wrap(sae: nn.Module, sae_id: str = "test-sae") -> LoadedSAE:
    hook_name = sae.cfg.metadata.hook_name
    return LoadedSAE(sae=sae, sae_id=sae_id, hook_name=hook_name, layer=hook_layer(hook_name))


def random_ids(batch: int = BATCH, seq: int = SEQ, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=gen)


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int = 6, seq: int = 12, seed: int = 7) -> torch.Tensor:
    """Token ids sampled from ``model`` itself (no KV cache, temperature 1).

    On its own samples the clean model has the lowest expected CE, so any splice raises CE:
    ``ce_gap > 0`` reliably, which gap-closed tests need.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 1, dtype=torch.long)  # BOS = 0
    for _ in range(seq - 1):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return ids


def hidden_of(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def with_hidden(output, hidden):
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def manual_logits(model: nn.Module, ids: torch.Tensor,
                  replacements: dict[int, Callable[[torch.Tensor], torch.Tensor]],
                  keep_first: bool = True) -> torch.Tensor:
    """Logits with the output of layer L replaced by ``replacements[L](x)`` via plain forward hooks,
    written independently of lorasae.splice."""
    layers = decoder_layers(model)
    handles = []

    def make(fn):
        def hook(_m, _a, output):
            x = hidden_of(output)
            new = fn(x).to(x.dtype).clone()
            if keep_first:
                new[:, 0] = x[:, 0]
            return with_hidden(output, new)
        return hook

    try:
        for layer, fn in replacements.items():
            handles.append(layers[layer].register_forward_hook(make(fn)))
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def plain_latents(model: nn.Module, saes: list[LoadedSAE], ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every token's latents ``[B, T, d_sae]`` of each SAE, all spliced together, through the plain
    hooks of ``manual_logits`` (independent of lorasae.splice), by layer."""
    found: dict[int, torch.Tensor] = {}

    def encode(loaded: LoadedSAE) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            found[loaded.layer] = latents = loaded.sae.encode(x)
            return loaded.sae.decode(latents)
        return fn

    manual_logits(model, ids, {s.layer: encode(s) for s in saes})
    return found


def sae_fn(sae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: sae.decode(sae.encode(x))


def lora_targets(arch: str) -> list[str]:
    return ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]


def peft_wrap(model: nn.Module, arch: str, random_b: bool = False, seed: int = 5) -> nn.Module:
    """Wrap ``model`` (in place) with a rank-4 LoRA; with ``random_b`` the adapter is not a no-op."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_targets(arch),
                     fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(model, cfg)
    if random_b:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.eval()
    return peft_model


class StubTokenizer:
    """Whitespace-separated integers are the token ids; 0 is BOS, 1 is EOS."""

    bos_token_id = 0
    eos_token_id = 1

    def get_vocab(self) -> dict[str, int]:
        return {"<bos>": 0, "<eos>": 1}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [int(w) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch) -> nn.Module:
    """A fresh tiny random model of each architecture (fresh per test: peft wraps in place)."""
    return build_model(arch)


@pytest.fixture
def llama() -> nn.Module:
    return build_model("llama")


@pytest.fixture
def ids() -> torch.Tensor:
    return random_ids()


@pytest.fixture
def topk_sae() -> LoadedSAE:
    return wrap(make_topk_sae(), "topk-L1")


@pytest.fixture
def identity_sae() -> LoadedSAE:
    return wrap(make_identity_sae(), "identity-L1")


@pytest.fixture(autouse=True)
def _lorasae_home(request, tmp_path_factory, monkeypatch):
    """Fast tests never touch the user's cache: LORASAE_HOME points at a fresh tmp folder.

    Tests marked ``slow`` keep the real cache (the default SAE is trained once and reused there).
    """
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("LORASAE_HOME", str(tmp_path_factory.mktemp("lorasae_home")))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """An on-disk model dir + tokenizer, two sae-lens SAE folders and a corpus (tests/tiny_world.py)."""
    from tiny_world import build_world

    return build_world(tmp_path_factory.mktemp("tiny_world"))
