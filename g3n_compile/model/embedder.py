"""`embed_audio` / `embed_vision`: one module, transformers' `Gemma3nMultimodalEmbedder`, maps a tower's outputs
("soft") or its own token ids ("hard") into the text model's width: RMSNorm -> Linear -> RMSNorm without scale."""

from __future__ import annotations

from torch import Tensor, nn

from .layers import Linear, RMSNorm


class MultimodalEmbedder(nn.Module):
    """`config` is an AudioConfig or VisionConfig: vocab_offset, vocab_size, hidden_size, text_hidden_size and
    rms_norm_eps."""

    def __init__(self, config):
        super().__init__()
        self.vocab_offset = config.vocab_offset
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.hard_embedding_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.soft_embedding_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embedding_projection = Linear(config.hidden_size, config.text_hidden_size)
        self.embedding_post_projection_norm = RMSNorm(config.text_hidden_size, config.rms_norm_eps, with_scale=False)

    def soft(self, encodings: Tensor) -> Tensor:
        """[B, T, hidden] tower outputs -> [B, T, text_hidden]."""
        return self.embedding_post_projection_norm(self.embedding_projection(self.soft_embedding_norm(encodings)))

    def hard(self, ids: Tensor) -> Tensor:
        """Ids in vocab_offset .. vocab_offset + vocab_size - 1 (e.g. <end_of_image>) -> [.., text_hidden]. They do
        not depend on context: a runtime can compute all of them once."""
        rows = self.embedding(ids - self.vocab_offset)
        return self.embedding_post_projection_norm(self.embedding_projection(self.hard_embedding_norm(rows)))
