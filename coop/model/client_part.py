"""The client part of a model: tokenizer, embeddings, final norm and LM head.

The coordinator (and the in-process SDK) holds this small part; the decoder blocks live on
nodes. Logits come from running the model's own causal-LM forward with every block a
PassThrough, so model-specific head details (final norm, tied weights, logit soft-capping) are
transformers' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from coop.errors import InvalidInput, ModelStoreError
from coop.model.loading import load_client_model, resolve_device
from coop.model.manifest import Manifest
from coop.model.weight_layout import DEFAULT_BATCH_ROWS, LayoutChoice, apply_weight_layout, layout_of


class ClientPart:
    def __init__(
        self,
        manifest: Manifest,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        device: torch.device,
        weight_layout: LayoutChoice | None = None,
    ) -> None:
        self.manifest = manifest
        self.weight_layout = weight_layout or LayoutChoice(layout_of(model), "fixed")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype: torch.dtype = getattr(torch, manifest.dtype)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        weight_layout: str = "auto",
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> ClientPart:
        """`weight_layout`: the LM head's CPU layout, auto (timed here), stock or packed (coop.model.weight_layout)."""
        model_dir = Path(model_dir)
        manifest = Manifest.load(model_dir)
        dev = resolve_device(device)
        model = load_client_model(model_dir, manifest, dev)
        choice = apply_weight_layout(model, weight_layout, batch_rows=batch_rows, what="client part")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir)) if manifest.has_tokenizer else None
        return cls(manifest, model, tokenizer, dev, choice)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.manifest.eos_token_ids)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[1, n] token ids -> [1, n, hidden] hidden states in the model dtype."""
        if token_ids.ndim != 2 or token_ids.shape[0] != 1:
            raise InvalidInput(f"token ids must have shape (1, n), got {tuple(token_ids.shape)}")
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.manifest.vocab_size):
            raise InvalidInput(f"token ids must lie in [0, {self.manifest.vocab_size})")
        with torch.inference_mode():
            embeddings = self.model.get_input_embeddings()
            return embeddings(token_ids.to(self.device)).to(self.dtype)

    def logits(self, hidden: torch.Tensor, *, last_only: bool = True) -> torch.Tensor:
        """Hidden states after the last block [1, n, hidden] -> float32 logits [1, n or 1, vocab]."""
        with torch.inference_mode():
            out = self.model(
                inputs_embeds=hidden.to(self.device), use_cache=False, logits_to_keep=1 if last_only else 0
            )
        return out.logits.float()

    def logits_at(self, hidden: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Hidden states [1, n, hidden] (several sessions' steps packed side by side) -> float32 logits
        [len(positions), vocab] of the given positions only."""
        keep = torch.tensor(list(positions), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(inputs_embeds=hidden.to(self.device), use_cache=False, logits_to_keep=keep)
        return out.logits[0].float()

    # -- text -------------------------------------------------------------------------------

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ModelStoreError(f"{self.manifest.name} was prepared without a tokenizer: send token ids")
        return self.tokenizer

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        tokenizer = self._require_tokenizer()
        if not messages:
            raise InvalidInput("messages must not be empty")
        if tokenizer.chat_template is None:
            text = "\n".join(str(m.get("content", "")) for m in messages)
            return list(tokenizer.encode(text))
        encoded: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # BatchEncoding in transformers 5
        return [int(i) for i in ids]

    def encode(self, text: str) -> list[int]:
        return list(self._require_tokenizer().encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return str(self._require_tokenizer().decode(token_ids, skip_special_tokens=True))
