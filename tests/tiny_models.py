"""Small random models the whole-model tests share (no weights to download)."""
from torch import nn


def tiny_llama(hidden_size: int = 64, tie_word_embeddings: bool = False, num_hidden_layers: int = 2):
    """A 2-layer (by default) Llama with GQA (4 query heads, 2 kv heads), vocabulary 128, in eval mode."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden_size, intermediate_size=176,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(cfg).eval()


class MHABlock(nn.Module):
    """An nn.MultiheadAttention (self-attention, batch_first) followed by an nn.Linear: a plain torch model."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.proj = nn.Linear(32, 48)

    def forward(self, x):
        return self.proj(self.mha(x, x, x, need_weights=False)[0])
