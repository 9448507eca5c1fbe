"""Workloads: a MoLE-injected model plus how to batch, train and score one client's examples.

* `CausalLMWorkload`: prompt + response, loss on the response tokens only; classification by the lowest mean token
  loss among candidate answers, generation by greedy decoding scored with ROUGE-L.
* `SeqClsWorkload`: a BERT-style encoder with mean pooling and a linear head (``classifier``) that is trained
  locally and averaged like the adapters.

Both expose ``model``, ``batches``, ``loss`` (task loss + load_balance_coef x load balance), ``forward_tokens``
(a no-grad forward returning the token mask, for the embedding statistics) and ``evaluate``. For the cohort engine
(`fedamole.fl.cohort`), which runs many clients' rows in one batch under `fedamole.segments.use_segments`, they
also expose ``merge_batches`` (several clients' batches as one, right-padded), ``client_losses`` (one training
loss per client of such a batch, as a `SegmentPlan` splits it) and the per-row scores that evaluation reduces per
client (``row_predictions`` / ``row_losses``, and ``generate(..., batched=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedamole.data.prompts import prompt_ids
from fedamole.data.scenarios import Example
from fedamole.metrics import ROUGE_IMPLEMENTATIONS, accuracy_from_losses, rouge_l
from fedamole.packing import attention_bias, pack_rows, sequence_sums
from fedamole.routing import record_routing
from fedamole.segments import SegmentPlan

__all__ = ["CausalLMWorkload", "SeqClsWorkload", "MeanPoolClassifier", "per_client_mean"]

DECODINGS = ("greedy", "generation_config")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def per_client_mean(row_sums: Tensor, row_counts: Tensor, plan: SegmentPlan, by_sequence: bool = False) -> Tensor:
    """[S]: client s's sum of ``row_sums`` over its rows (its sequences when ``by_sequence``: a packed batch's
    per-sequence values) divided by its sum of ``row_counts`` (0 without rows)."""
    ids = plan.sequence_client_ids(row_sums.device) if by_sequence else plan.row_client_ids(row_sums.device)
    sums = row_sums.new_zeros(plan.num_clients).index_add(0, ids, row_sums)
    counts = row_counts.to(row_sums.dtype)
    return sums / counts.new_zeros(plan.num_clients).index_add(0, ids, counts).clamp(min=1)


# What `_Base.packs` runs padded and packed: a long sequence and two short ones that share a packed row.
_PROBE = (
    Example(text="sequence packing probe, " * 3, target="a longer answer", label=0),
    Example(text="one", target="a", label=0),
    Example(text="two", target="b", label=0),
)


class _Base:
    model: nn.Module
    kind: str
    causal = False  # packed rows attend causally inside each sequence
    _packs: bool | None = None

    def __init__(self, model: nn.Module, batch_size_eval: int = 16) -> None:
        self.model = model
        self.batch_size_eval = batch_size_eval
        # A model without MoLE layers (a PEFT prompt-learning baseline) has no load-balance loss.
        config = getattr(model, "fedamole_config", None)
        self.coef = float(config.load_balance_coef) if config is not None else 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        steps: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> Iterator[dict]:
        """``steps`` shuffled training batches (cycling through epochs), or one ordered pass when steps is None."""
        if steps is None:
            for i in range(0, len(examples), batch_size):
                yield self.collate(examples[i : i + batch_size])
            return
        rng = rng or np.random.default_rng(0)
        order: list[int] = []
        for _ in range(steps):
            while len(order) < batch_size:
                order.extend(rng.permutation(len(examples)).tolist())
            take, order = order[:batch_size], order[batch_size:]
            yield self.collate([examples[i] for i in take])

    def loss(self, batch: dict) -> Tensor:
        with record_routing(self.model) as routing:
            task = self.task_loss(batch)
        if self.coef > 0:
            # Real tokens only, so the loss does not depend on how much a batch was padded (cohort engine).
            lb = routing.load_balance_loss(token_mask=batch["attention_mask"].bool())
            task = task + self.coef * lb.to(task.device)
        return task

    @property
    def packs(self) -> bool:
        """Whether packed batches (`fedamole.packing`) may stand in for padded ones: the backbone takes a 4-D
        additive attention mask and position ids and gives each packed sequence what its padded row gives (checked
        once, on a small probe, in eval mode; any error or a relative difference above 1e-4 says no)."""
        if self._packs is None:
            self._packs = self._probe_packing()
        return self._packs

    def pack(self, batch: dict, plan: SegmentPlan) -> tuple[dict, SegmentPlan]:
        """``batch`` and ``plan`` packed (`fedamole.packing.pack_rows`) when the backbone allows it, else as given."""
        return pack_rows(batch, plan, self.causal) if self.packs else (batch, plan)

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword arguments for ``batch``; a packed one gets position ids and a block-diagonal mask."""
        if "sequence_ids" not in batch:
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        dtype = next(self.model.parameters()).dtype
        bias = attention_bias(batch["sequence_ids"], self.causal, dtype if dtype.is_floating_point else torch.float32)
        return {"input_ids": batch["input_ids"], "attention_mask": bias, "position_ids": batch["position_ids"]}

    @torch.no_grad()
    def _probe_packing(self) -> bool:
        batch = self.collate(_PROBE)
        packed, _ = pack_rows(batch, SegmentPlan.from_counts([len(_PROBE)]), self.causal)
        if packed is batch:
            return False
        was_training = self.model.training
        self.model.eval()
        try:
            padded, repacked = self.sequence_scores(batch), self.sequence_scores(packed)
        except Exception:  # noqa: BLE001 - a backbone that cannot take packed inputs runs padded
            return False
        finally:
            self.model.train(was_training)
        if padded.shape != repacked.shape:
            return False
        return bool(torch.allclose(repacked, padded, rtol=1e-4, atol=1e-4 * float(padded.abs().max().clamp(min=1))))

    def pad_value(self, key: str) -> int:
        """The value that right-pads ``key`` of a batch (token ids: the pad token; labels: ignored; masks: 0)."""
        if key == "labels":
            return -100
        return int(getattr(self, "pad_id", 0) or 0) if key == "input_ids" else 0

    def merge_batches(self, batches: Sequence[dict]) -> dict:
        """Concatenate batches along rows, right-padding every [rows, width] tensor to the widest one.

        Right padding under an attention mask leaves the real tokens' outputs unchanged (causal or masked
        attention, per-token layers), so each client's rows give what its own batch gives alone.
        """
        width = max(int(b["input_ids"].shape[1]) for b in batches)
        out = {}
        for key in batches[0]:
            parts = []
            for b in batches:
                v = b[key]
                if v.dim() == 2 and v.shape[1] < width:
                    v = F.pad(v, (0, width - v.shape[1]), value=self.pad_value(key))
                parts.append(v)
            out[key] = torch.cat(parts)
        return out

    def client_losses(self, batch: dict, plan: SegmentPlan) -> Tensor:
        """Per-client training losses [S] of a merged batch split by ``plan`` (run inside `use_segments` with that
        plan): client s's entry equals ``loss`` of its own rows alone — its task loss over its rows plus
        load_balance_coef x its load balance over its real tokens; 0 for a client without rows."""
        with record_routing(self.model) as routing:
            task = self.task_losses(batch, plan)
        if self.coef > 0 and routing.calls:
            lb = routing.load_balance_loss(token_mask=batch["attention_mask"].bool(), per_client=True)
            task = task + self.coef * lb.to(task.device)
        return task

    @torch.no_grad()
    def forward_tokens(self, batch: dict) -> Tensor:
        """Run the model (no grad) on a batch; returns the bool token mask [B, L] of real tokens."""
        self.model(**self.model_inputs(batch))
        return batch["attention_mask"].bool()


class CausalLMWorkload(_Base):
    """A causal LM with MoLE; examples are (prompt = ``text``, response = ``target``).

    Generation tasks are scored by ROUGE-L F (``rouge``: "rouge" = the authors' package, or "rouge-score") on
    generations of at most ``max_new_tokens``, decoded greedily (``decoding="greedy"``: deterministic, the default)
    or with the model's own ``generation_config`` (``decoding="generation_config"``, as the authors: it may sample,
    from torch's global RNG, which the simulation seeds).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int = 256,
        max_new_tokens: int = 128,
        batch_size_eval: int = 16,
        decoding: str = "greedy",
        rouge: str = "rouge",
        add_bos: bool = True,
        candidate_eos: bool = True,
    ) -> None:
        super().__init__(model, batch_size_eval)
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if rouge not in ROUGE_IMPLEMENTATIONS:
            raise ValueError(f"rouge must be one of {ROUGE_IMPLEMENTATIONS}, got {rouge!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.decoding, self.rouge = decoding, rouge
        self.add_bos = add_bos
        self.candidate_eos = candidate_eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.causal = True

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids as the model sees them (BOS first when ``add_bos`` and the tokenizer has one)."""
        return prompt_ids(self.tokenizer, prompt, self.add_bos)

    def _pair(self, prompt: str, response: str, eos: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) of prompt + response (+ EOS), at most ``max_length`` tokens. As the authors: a prompt
        that fits is kept whole and the response cut to fit, its last token then EOS; a prompt of ``max_length``
        tokens or more (the paper presets drop those examples beforehand) keeps its last tokens before one response
        token."""
        p, r = self.prompt_ids(prompt), _encode(self.tokenizer, response)
        with_eos = eos and self.eos_id is not None
        if with_eos:
            r = r + [self.eos_id]
        if len(p) < self.max_length:
            r = r[: self.max_length - len(p)]
            if with_eos:
                r[-1] = self.eos_id
        else:
            r = r[:1]
            p = p[-(self.max_length - 1) :]
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
        logits = self.model(**self.model_inputs(batch)).logits
        # A prompt-learning model returns logits for its virtual tokens first: keep the input tokens' positions.
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1] :]
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"), labels != -100

    def task_loss(self, batch: dict) -> Tensor:
        losses, valid = self._token_losses(batch)
        return (losses * valid).sum() / valid.sum().clamp(min=1)

    def task_losses(self, batch: dict, plan: SegmentPlan) -> Tensor:
        """`task_loss` of each client's rows of ``batch`` as ``plan`` splits them (each its own mean) [S]."""
        losses, valid = self._token_losses(batch)
        return per_client_mean((losses * valid).sum(1), valid.sum(1), plan)

    def _sequence_sums(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Each sequence's summed response-token loss and its count of response tokens, [sequences] each (a packed
        batch's sequences in their unpacked order)."""
        losses, valid = self._token_losses(batch)
        if "sequence_ids" not in batch:
            return (losses * valid).sum(1), valid.sum(1)
        return sequence_sums(losses, valid, batch["sequence_ids"][:, 1:])  # [:, 1:]: the sequence of each label

    def sequence_scores(self, batch: dict) -> Tensor:
        """Mean response-token loss of every sequence [sequences] (what the packing probe compares)."""
        sums, counts = self._sequence_sums(batch)
        return sums / counts.clamp(min=1)

    @torch.no_grad()
    def row_losses(self, batch: dict) -> Tensor:
        """Mean token loss of every sequence's response (candidate scoring), float32 CPU [sequences]."""
        return self.sequence_scores(batch).float().cpu()

    def candidate_pairs(self, examples: Sequence[Example], choices: Sequence[str]) -> list[tuple]:
        """The (input ids, labels) rows that score every candidate after every prompt, example-major."""
        return [self._pair(ex.text, ch, eos=self.candidate_eos) for ex in examples for ch in choices]

    @torch.no_grad()
    def candidate_losses(self, examples: Sequence[Example], choices: Sequence[str]) -> np.ndarray:
        """Mean token loss of every candidate answer (followed by EOS when ``candidate_eos``, as the authors score
        them) after every prompt: [n, len(choices)]."""
        pairs = self.candidate_pairs(examples, choices)
        out = [
            self.row_losses(self._pad(pairs[i : i + self.batch_size_eval]))
            for i in range(0, len(pairs), self.batch_size_eval)
        ]
        return torch.cat(out).numpy().reshape(len(examples), len(choices))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Decode each prompt (one at a time: no padding effects) up to ``max_new_tokens`` (see the class docstring)."""
        return [self.generate_rows([prompt])[0] for prompt in prompts]

    @torch.no_grad()
    def generate_rows(self, prompts: Sequence[str]) -> list[str]:
        """Decode ``prompts`` as one batch, left-padded (the cohort engine runs many clients' prompts per call under
        a `SegmentPlan`); greedy results equal one prompt at a time up to floating-point rounding, sampled ones
        (``decoding="generation_config"``) draw differently."""
        rows = [self.prompt_ids(prompt)[-(self.max_length - 1) :] for prompt in prompts]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        # generation_config: the model's own settings (sampling, temperature, eos) decide; only the length cap
        # and the pad id (needed without a pad token) are ours.
        options = {"do_sample": False, "eos_token_id": self.eos_id} if self.decoding == "greedy" else {}
        gen = self.model.generate(
            input_ids=x.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.pad_id,
            **options,
        )
        outs = []
        for row in gen[:, width:].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            outs.append(self.tokenizer.decode(row, skip_special_tokens=True))
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
        predictions = self.generate([ex.text for ex in examples])
        return float(np.mean(rouge_l(predictions, [ex.target for ex in examples], self.rouge)))


class MeanPoolClassifier(nn.Module):
    """Encoder -> mean over real tokens -> ``classifier`` (nn.Linear). Returns logits [B, num_labels]."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        sequence_ids: Tensor | None = None,
    ) -> Tensor:
        """Padded rows: attention_mask [B, L] marks real tokens, logits per row. Packed rows (`fedamole.packing`):
        attention_mask is the additive [R, 1, W, W] bias, ``sequence_ids`` [R, W] (-1 on padding) says whose each
        token is, logits per sequence."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = hidden.last_hidden_state
        if sequence_ids is None:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return self.classifier((hidden * m).sum(1) / m.sum(1).clamp(min=1))
        sums, counts = sequence_sums(hidden, sequence_ids >= 0, sequence_ids)
        return self.classifier(sums / counts.clamp(min=1)[:, None])


class SeqClsWorkload(_Base):
    """A sequence classifier (`MeanPoolClassifier` or any model returning logits [B, num_labels])."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 64, batch_size_eval: int = 32) -> None:
        super().__init__(model, batch_size_eval)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def collate(self, examples: Sequence[Example]) -> dict:
        enc = self.tokenizer(
            [ex.text for ex in examples], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        dev = self.device
        return {
            "input_ids": enc["input_ids"].to(dev),
            "attention_mask": enc["attention_mask"].to(dev),
            "labels": torch.tensor([ex.label for ex in examples], device=dev),
        }

    @property
    def packs(self) -> bool:
        """Packing needs per-sequence pooling: only a `MeanPoolClassifier` whose encoder passes the probe."""
        return isinstance(self.model, MeanPoolClassifier) and super().packs

    def model_inputs(self, batch: dict) -> dict:
        inputs = super().model_inputs(batch)
        if "sequence_ids" in batch:
            inputs["sequence_ids"] = batch["sequence_ids"]
        return inputs

    def _logits(self, batch: dict) -> Tensor:
        out = self.model(**self.model_inputs(batch))
        return (out.logits if hasattr(out, "logits") else out).float()

    def sequence_scores(self, batch: dict) -> Tensor:
        """The logits of every sequence [sequences, num_labels] (what the packing probe compares)."""
        return self._logits(batch)

    def task_loss(self, batch: dict) -> Tensor:
        return F.cross_entropy(self._logits(batch), batch["labels"])

    def task_losses(self, batch: dict, plan: SegmentPlan) -> Tensor:
        """`task_loss` of each client's rows of ``batch`` as ``plan`` splits them [S]."""
        losses = F.cross_entropy(self._logits(batch), batch["labels"], reduction="none")
        return per_client_mean(losses, torch.ones_like(losses), plan, by_sequence=True)

    @torch.no_grad()
    def row_predictions(self, batch: dict) -> Tensor:
        """The predicted label of every row, int64 CPU [rows]."""
        return self._logits(batch).argmax(-1).cpu()

    def pad_value(self, key: str) -> int:
        if key == "input_ids":
            return int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        return super().pad_value(key)

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], kind: str = "classification", choices=None) -> float:
        if not examples:
            return float("nan")
        preds = [self.row_predictions(batch) for batch in self.batches(examples, self.batch_size_eval)]
        return float((torch.cat(preds).numpy() == np.array([ex.label for ex in examples])).mean())
