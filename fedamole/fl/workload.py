"""Workloads: a MoLE-injected model plus how to batch, train and score one client's examples.

* `CausalLMWorkload`: prompt + response, loss on the response tokens only; classification by the lowest mean token
  loss among candidate answers, generation by greedy decoding scored with ROUGE-L.
* `SeqClsWorkload`: a BERT-style encoder with mean pooling and a linear head (``classifier``) that is trained
  locally and averaged like the adapters.

Both expose ``model``, ``batches``, ``loss`` (task loss + load_balance_coef x load balance), ``forward_tokens``
(a no-grad forward returning the token mask, for the embedding statistics) and ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fedamole
from fedamole.data.scenarios import Example
from fedamole.metrics import accuracy_from_losses, rouge_l

__all__ = ["CausalLMWorkload", "SeqClsWorkload", "MeanPoolClassifier"]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


class _Base:
    model: nn.Module
    kind: str

    def __init__(self, model: nn.Module, batch_size_eval: int = 16) -> None:
        self.model = model
        self.batch_size_eval = batch_size_eval
        self.coef = float(model.fedamole_config.load_balance_coef)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches(self, examples: Sequence[Example], batch_size: int, steps: int | None = None,
                rng: np.random.Generator | None = None) -> Iterator[dict]:
        """``steps`` shuffled training batches (cycling through epochs), or one ordered pass when steps is None."""
        if steps is None:
            for i in range(0, len(examples), batch_size):
                yield self.collate(examples[i:i + batch_size])
            return
        rng = rng or np.random.default_rng(0)
        order: list[int] = []
        for _ in range(steps):
            while len(order) < batch_size:
                order.extend(rng.permutation(len(examples)).tolist())
            take, order = order[:batch_size], order[batch_size:]
            yield self.collate([examples[i] for i in take])

    def loss(self, batch: dict) -> Tensor:
        task = self.task_loss(batch)
        if self.coef > 0:
            # Real tokens only, so the loss does not depend on how much a batch was padded (cohort engine).
            lb = fedamole.load_balance_loss(self.model, token_mask=batch["attention_mask"].bool())
            task = task + self.coef * lb.to(task.device)
        return task

    @torch.no_grad()
    def forward_tokens(self, batch: dict) -> Tensor:
        """Run the model (no grad) on a batch; returns the bool token mask [B, L] of real tokens."""
        self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return batch["attention_mask"].bool()


class CausalLMWorkload(_Base):
    """A causal LM with MoLE; examples are (prompt = ``text``, response = ``target``)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256, max_new_tokens: int = 128,
                 batch_size_eval: int = 16) -> None:
        super().__init__(model, batch_size_eval)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    def _pair(self, prompt: str, response: str, eos: bool = True) -> tuple[list[int], list[int]]:
        p, r = _encode(self.tokenizer, prompt), _encode(self.tokenizer, response)
        if eos and self.eos_id is not None:
            r = r + [self.eos_id]
        r = r[: self.max_length - 1]
        p = p[-(self.max_length - len(r)):]
        return p + r, [-100] * len(p) + r

    def _pad(self, seqs: list[tuple[list[int], list[int]]]) -> dict:
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}

    def collate(self, examples: Sequence[Example]) -> dict:
        return self._pad([self._pair(ex.text, ex.target) for ex in examples])

    def _token_losses(self, batch: dict) -> Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"), labels != -100

    def task_loss(self, batch: dict) -> Tensor:
        losses, valid = self._token_losses(batch)
        return (losses * valid).sum() / valid.sum().clamp(min=1)

    @torch.no_grad()
    def candidate_losses(self, examples: Sequence[Example], choices: Sequence[str]) -> np.ndarray:
        """Mean token loss of every candidate answer after every prompt: [n, len(choices)]."""
        pairs = [self._pair(ex.text, ch, eos=False) for ex in examples for ch in choices]
        out = []
        for i in range(0, len(pairs), self.batch_size_eval):
            losses, valid = self._token_losses(self._pad(pairs[i:i + self.batch_size_eval]))
            out.append(((losses * valid).sum(1) / valid.sum(1).clamp(min=1)).cpu())
        return torch.cat(out).numpy().reshape(len(examples), len(choices))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy decoding, one prompt at a time (no padding effects), up to ``max_new_tokens``."""
        outs = []
        for prompt in prompts:
            ids = _encode(self.tokenizer, prompt)[-(self.max_length - 1):]
            x = torch.tensor([ids], device=self.device)
            gen = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id)
            new = gen[0, x.shape[1]:].tolist()
            if self.eos_id in new:
                new = new[: new.index(self.eos_id)]
            outs.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return outs

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], kind: str, choices: Sequence[str] | None = None) -> float:
        """Accuracy (classification with candidate ``choices``) or mean ROUGE-L F (generation)."""
        if not examples:
            return float("nan")
        if kind == "classification":
            if not choices:
                raise ValueError("choices: candidate answers are needed to score causal-LM classification")
            return accuracy_from_losses(self.candidate_losses(examples, choices), [ex.label for ex in examples])
        return float(np.mean(rouge_l(self.generate([ex.text for ex in examples]), [ex.target for ex in examples])))


class MeanPoolClassifier(nn.Module):
    """Encoder -> mean over real tokens -> ``classifier`` (nn.Linear). Returns logits [B, num_labels]."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * m).sum(1) / m.sum(1).clamp(min=1))


class SeqClsWorkload(_Base):
    """A sequence classifier (`MeanPoolClassifier` or any model returning logits [B, num_labels])."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 64, batch_size_eval: int = 32) -> None:
        super().__init__(model, batch_size_eval)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def collate(self, examples: Sequence[Example]) -> dict:
        enc = self.tokenizer([ex.text for ex in examples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        dev = self.device
        return {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
                "labels": torch.tensor([ex.label for ex in examples], device=dev)}

    def _logits(self, batch: dict) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return (out.logits if hasattr(out, "logits") else out).float()

    def task_loss(self, batch: dict) -> Tensor:
        return F.cross_entropy(self._logits(batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], kind: str = "classification", choices=None) -> float:
        if not examples:
            return float("nan")
        preds = []
        for batch in self.batches(examples, self.batch_size_eval):
            preds.append(self._logits(batch).argmax(-1).cpu())
        return float((torch.cat(preds).numpy() == np.array([ex.label for ex in examples])).mean())
