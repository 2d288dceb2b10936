"""The pack plan of a training batch: where each token of the padded ``[B, S]`` batch goes in the
packed (padding-free) LLM step, built on the host where the token lists are known.

The packed step (`SAM.forward` with labels) keeps only the valid tokens of every row, puts the
visual tokens at the image placeholders and takes the loss at the positions whose next token is
supervised. Finding all of that from the device tensors reads them back to the host (lengths,
placeholder counts, valid and supervised positions): on a GPU every such read drains the queue of
kernels and rules out CUDA graphs. The collator (`sam_fast.data.Collator`, also behind
`SAMProcessor`) pads the batch from Python lists, so it builds the plan from those lists at no
device cost and puts it in the batch as ``pack_plan``; the forward then reads nothing back.

A `PackPlan` is a read-only mapping (so that every batch mover keeps it: DataLoader's
``pin_memory``, HF Trainer's ``_prepare_inputs``, accelerate's ``send_to_device``, `model_inputs`)
of index tensors, which move to the device with the batch, and host values:

- ``index`` [N] long: flat positions (``b * S + s``) of the valid tokens, sample after sample.
- ``position_ids`` [N] long: positions restarting at 0 in every sample.
- ``cu_seqlens`` [B + 1] int32: the samples' boundaries in the packed row.
- ``image_rows`` [T * Q] long: packed rows holding the image placeholders, in order (sample-major,
  image order): where the visual tokens go.
- ``target_rows`` [M] long: packed rows whose next token (same sample) is supervised.
- ``targets`` [M] long: those next tokens' labels (the shifted targets).
- ``seqlens`` (host) the B sample lengths; ``image_counts`` (host) images per sample;
  ``num_labels`` (host) labels other than -100 in the batch; ``batch_shape`` (host) ``(B, S)``.
- ``filler_tokens``, ``filler_targets`` (host, 0 unless bucketed): see below.

Bucketing (`PackPlan.bucketed`, the collator's ``pack_buckets``): a compiled step (torch.compile)
is specialised to its tensor shapes, and N and M change with every batch. A bucketed plan rounds
them up: a filler segment of ``filler_tokens`` tokens closes the packed row (its own entry in
``cu_seqlens`` and ``seqlens``, so it attends only to itself; its tokens are embedded as id 0 and
predict nothing), and ``filler_targets`` rows of ``targets`` hold -100 (no loss) at filler rows. The
loss and the gradients are those of the plain plan; the shapes take one value per bucket.

`PackPlan.build` makes one from host lists (the collator's path), `PackPlan.from_tensors` from
padded tensors (hand-built batches: it reads them to the host once and applies the same checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Sequence

import torch

from sam_fast._text import bounded_repr

IGNORE_INDEX = -100

TENSOR_FIELDS = ("index", "position_ids", "cu_seqlens", "image_rows", "target_rows", "targets")
HOST_FIELDS = ("seqlens", "image_counts", "num_labels", "batch_shape", "filler_tokens", "filler_targets")
FIELDS = TENSOR_FIELDS + HOST_FIELDS
OPTIONAL = {"filler_tokens": 0, "filler_targets": 0}  # a plan built without buckets may leave them out


class PackPlanError(ValueError):
    """A batch that cannot be packed; ``row`` is the offending row (sample) of the batch, or None."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


class PackPlan(Mapping):
    """The pack plan of one batch (module docstring): ``PackPlan({field: value, ...})`` with
    exactly the `FIELDS`; fields read as attributes (``plan.index``). Read-only: `to` and
    `pin_memory` return new plans."""

    def __init__(self, fields: Mapping):
        if not isinstance(fields, Mapping):
            raise TypeError(f"PackPlan takes a mapping of its fields {FIELDS}, got {type(fields).__name__}")
        fields = {**OPTIONAL, **fields}
        missing = [k for k in FIELDS if k not in fields]
        extra = sorted(str(k) for k in fields if k not in FIELDS)
        if missing or extra:
            raise ValueError(f"pack_plan: missing field(s) {missing}, unknown field(s) {bounded_repr(extra)}; "
                             f"a plan has exactly {list(FIELDS)}")
        for k in TENSOR_FIELDS:
            if not isinstance(fields[k], torch.Tensor) or fields[k].dim() != 1:
                raise ValueError(f"pack_plan[{k!r}] must be a 1-D tensor, got {bounded_repr(fields[k])}")
        self._fields = {k: fields[k] for k in FIELDS}

    # -- mapping -----------------------------------------------------------------------------
    def __getitem__(self, key):
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)

    def __getattr__(self, name):
        fields = self.__dict__.get("_fields")
        if fields is None or name not in fields:
            raise AttributeError(f"PackPlan has no field {name!r}")
        return fields[name]

    def __reduce__(self):  # pickles as its fields (DataLoader workers send plans to the main process)
        return PackPlan, (dict(self._fields),)

    def __repr__(self) -> str:
        B, S = self.batch_shape
        filler = f", filler={self.filler_tokens}/{self.filler_targets}" if self.bucketed_plan else ""
        return (f"PackPlan(B={B}, S={S}, tokens={self.num_tokens}, images={sum(self.image_counts)}, "
                f"targets={self.num_targets}{filler}, device={self.index.device})")

    # -- derived -----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """N, the valid tokens of the batch (the packed row without its filler)."""
        return int(self.index.shape[0]) - self.filler_tokens

    @property
    def packed_length(self) -> int:
        """Length of the packed row, filler included (N rounded up to its bucket when bucketed)."""
        return int(self.index.shape[0])

    @property
    def num_targets(self) -> int:
        """M, the supervised rows (the targets without the filler's -100)."""
        return int(self.targets.shape[0]) - self.filler_targets

    @property
    def bucketed_plan(self) -> bool:
        return bool(self.filler_tokens)

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens) if self.seqlens else 0

    # -- bucketing ---------------------------------------------------------------------------
    def bucketed(self, tokens: int = 256, targets: int = 128) -> PackPlan:
        """This plan with its packed row padded to the next multiple of `tokens` by a filler
        segment (at least one token, so that ``cu_seqlens`` always has B + 2 entries) and its
        targets to a multiple of `targets` by -100 at filler rows (module docstring). A bucketed
        plan is returned as it is."""
        if self.bucketed_plan:
            return self
        if int(tokens) < 1 or int(targets) < 1:
            raise ValueError(f"pack plan buckets must be >= 1, got tokens={tokens!r} targets={targets!r}")
        n, m = self.num_tokens, self.num_targets
        fill = _round_up(n + 1, int(tokens)) - n
        fill_t = _round_up(max(m, 1), int(targets)) - m
        dev = self.index.device

        def extend(t: torch.Tensor, values) -> torch.Tensor:
            return torch.cat([t, torch.as_tensor(values, dtype=t.dtype).to(dev)])

        return PackPlan({
            **self._fields,
            "index": extend(self.index, [0] * fill),  # position 0: the filler's ids are replaced by 0 anyway
            "position_ids": extend(self.position_ids, list(range(fill))),
            "cu_seqlens": extend(self.cu_seqlens, [n + fill]),
            "target_rows": extend(self.target_rows, [n] * fill_t),  # the filler's first row, never supervised
            "targets": extend(self.targets, [IGNORE_INDEX] * fill_t),
            "seqlens": tuple(self.seqlens) + (fill,), "filler_tokens": fill, "filler_targets": fill_t,
        })

    # -- moving ------------------------------------------------------------------------------
    def _map(self, fn) -> PackPlan:
        return PackPlan({**self._fields, **{k: fn(self._fields[k]) for k in TENSOR_FIELDS}})

    def to(self, device, non_blocking: bool = False) -> PackPlan:
        """The plan with its tensors on `device` (`non_blocking` as `Tensor.to`: asynchronous from
        pinned memory). Host fields stay host values."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self, device=None) -> PackPlan:
        """The plan with its tensors in pinned memory (what DataLoader's ``pin_memory=True`` calls)."""
        return self._map(lambda t: t.pin_memory())

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, rows: Sequence[tuple[int, Sequence[int], Sequence[int]]], width: int,
              image_counts: Sequence[int], image_token_index: int, num_query_tokens: int,
              vocab_size: int | None = None) -> PackPlan:
        """The plan of a padded batch given on the host: per sample ``(start, ids, labels)``, its
        valid tokens starting at column `start` of a row `width` wide (0 for right padding) and
        their labels (-100: not supervised); `image_counts` its images.

        Raises:
            PackPlanError: naming the sample (``row``): tokens outside the row, labels that do not
                match the tokens, a label that is neither -100 nor a token id (outside [0,
                `vocab_size`) when given), or image placeholders (`image_token_index`) other than
                `num_query_tokens` x its image count.
        """
        counts = [int(n) for n in image_counts]
        if len(counts) != len(rows):
            raise PackPlanError(f"pack plan: {len(rows)} samples but {len(counts)} image counts")
        acc = _Accumulator(width, image_token_index, vocab_size)
        bad = []
        for b, (start, ids, labels) in enumerate(rows):
            found = acc.add(b, int(start), ids, labels)
            if found != num_query_tokens * counts[b]:
                bad.append((b, found, num_query_tokens * counts[b]))
        if bad:
            raise PackPlanError(
                f"image placeholders (token {image_token_index}) per sample must be {num_query_tokens} x its "
                f"image count; (sample, found, expected): {bounded_repr(bad, 160)}", bad[0][0])
        return acc.plan(counts)

    @classmethod
    def from_tensors(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                     image_counts: Sequence[int], image_token_index: int, num_query_tokens: int,
                     vocab_size: int | None = None) -> PackPlan:
        """The plan of padded tensors ``[B, S]`` (`attention_mask` None: all valid), on the CPU.
        Reads the three tensors to the host in one copy (a device sync on a GPU: what a batch
        without a plan costs), then checks and builds as `build`; each row's valid tokens must
        be contiguous (left or right padding) and unlabelled where the mask is 0.

        Raises:
            PackPlanError: the row (sample) and what is wrong with it, as `build`, and for an
                attention mask holding values other than 0 and 1, with a gap, or with a label at
                a padded position.
        """
        S = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        if mask.is_floating_point():  # 0.5 must not become 0 (padding) on the way: 2 marks any value but 0 and 1
            mask = torch.where((mask == 0) | (mask == 1), mask, 2)
        labels = labels.to(input_ids.device)
        host = torch.stack([input_ids, mask.to(input_ids.dtype), labels.to(input_ids.dtype)]).tolist()
        rows = [_valid_row(b, ids, m, lab) for b, (ids, m, lab) in enumerate(zip(*host))]
        return cls.build(rows, S, image_counts, image_token_index, num_query_tokens, vocab_size)


def _valid_row(b: int, ids: list[int], mask: list[int], labels: list[int]) -> tuple[int, list[int], list[int]]:
    """(start, ids, labels) of row `b`'s valid span, checked as `pack` checks it."""
    if any(m not in (0, 1) for m in mask):
        raise PackPlanError(f"attention_mask row {b} holds values other than 0 and 1", b)
    valid = [s for s, m in enumerate(mask) if m]
    start, stop = (valid[0], valid[-1] + 1) if valid else (0, 0)
    if stop - start != len(valid):
        raise PackPlanError(f"attention_mask row {b} has a gap: packing needs each row's tokens contiguous "
                            f"(left or right padding)", b)
    if any(lab != IGNORE_INDEX and not m for lab, m in zip(labels, mask)):
        raise PackPlanError(f"labels row {b} has a label other than -100 at a padded position (attention_mask 0)", b)
    return start, ids[start:stop], labels[start:stop]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Accumulator:
    """The plan's lists, grown sample by sample (`PackPlan.build`)."""

    def __init__(self, width: int, image_token_index: int, vocab_size: int | None):
        self.width, self.image_token, self.vocab = int(width), int(image_token_index), vocab_size
        self.index, self.positions, self.image_rows, self.target_rows, self.targets = [], [], [], [], []
        self.seqlens, self.num_labels = [], 0

    def add(self, b: int, start: int, ids: Sequence[int], labels: Sequence[int]) -> int:
        """Append sample `b`; returns the number of its image placeholders."""
        n, offset = len(ids), len(self.index)
        if len(labels) != n:
            raise PackPlanError(f"pack plan: sample {b} has {n} tokens but {len(labels)} labels", b)
        if start < 0 or start + n > self.width:
            raise PackPlanError(f"pack plan: sample {b}'s {n} tokens from column {start} do not fit a row of "
                                f"{self.width}", b)
        self.index.extend(range(b * self.width + start, b * self.width + start + n))
        self.positions.extend(range(n))
        self.seqlens.append(n)
        rows = [offset + i for i, t in enumerate(ids) if t == self.image_token]
        self.image_rows.extend(rows)
        for i, lab in enumerate(labels):
            if lab == IGNORE_INDEX:
                continue
            if lab < 0 or (self.vocab is not None and lab >= self.vocab):
                bound = f"[0, {self.vocab})" if self.vocab is not None else "non-negative"
                raise PackPlanError(f"labels row {b} holds {bounded_repr(lab)} at position {start + i}: a label is -100 "
                                    f"or a token id ({bound})", b)
            self.num_labels += 1
            if i:  # a sample's first label is predicted by nothing of the sample
                self.target_rows.append(offset + i - 1)
                self.targets.append(int(lab))
        return len(rows)

    def plan(self, counts: list[int]) -> PackPlan:
        cu = [0]
        for n in self.seqlens:
            cu.append(cu[-1] + n)
        long = torch.long
        return PackPlan({
            "index": torch.tensor(self.index, dtype=long), "position_ids": torch.tensor(self.positions, dtype=long),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "image_rows": torch.tensor(self.image_rows, dtype=long),
            "target_rows": torch.tensor(self.target_rows, dtype=long),
            "targets": torch.tensor(self.targets, dtype=long),
            "seqlens": tuple(self.seqlens), "image_counts": tuple(counts), "num_labels": self.num_labels,
            "batch_shape": (len(self.seqlens), self.width),
        })
